"""Metric writers: a JSONL log and TensorBoard event files (tensorboardX, no TensorFlow), process 0 only."""

from __future__ import annotations

import json
import math
import os
import re
import time
from typing import Mapping

import jax
import numpy as np


def tensorboard_tag(split: str, name: str) -> str:
  """``{split}/{name}`` with the characters TensorBoard rejects (spaces, ``;&,()``) replaced by ``_``."""
  return re.sub(r"[^-/\w.]", "_", f"{split}/{name}")


def _scalar(value) -> float | None:
  try:
    value = float(np.asarray(value))
  except (TypeError, ValueError):
    return None
  return value


class MetricWriter:
  """Writes ``{step, split, time, **scalars}`` lines to ``{workdir}/metrics.jsonl`` and TensorBoard.

  Non-scalar values are ignored; NaN is written as JSON ``null`` (strict JSON readers choke on NaN).
  Other processes than 0 get a writer that does nothing, so callers need no ``if``.
  """

  def __init__(self, workdir: str, tensorboard: bool = True):
    self.active = jax.process_index() == 0
    self._tb = None
    self._jsonl = None
    if not self.active:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, split: str, metrics: Mapping[str, object]) -> None:
    if not self.active:
      return
    scalars = {k: v for k, v in ((k, _scalar(v)) for k, v in metrics.items()) if v is not None}
    line = {"step": int(step), "split": split, "time": time.time(),
            **{k: (None if math.isnan(v) or math.isinf(v) else v) for k, v in scalars.items()}}
    self._jsonl.write(json.dumps(line) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(tensorboard_tag(split, k), v, int(step))
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
