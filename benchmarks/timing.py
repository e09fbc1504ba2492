"""The timing loop the benchmark scripts share (imported as ``timing``: scripts run from here)."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def timed(fn: Callable[[], object], repeats: int) -> dict:
  """Runs ``fn`` once (warm-up / compile), then ``repeats`` times.

  Returns:
    ``first_s`` (the warm-up call), ``median_s`` and ``times_s`` (the timed calls), in seconds.
  """
  t0 = time.perf_counter()
  fn()
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return {"first_s": first, "median_s": statistics.median(times), "times_s": times}
