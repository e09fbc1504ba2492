"""The demo base LM's context-pretraining positions (stage2/demo/lm.py), by hand."""

from __future__ import annotations

import numpy as np

from anatomix_jax.stage2.demo import lm as demo_lm

START = 7  # a line-start token id


def test_stretched_positions_add_gaps_only_before_line_starts():
  ids = np.array([[1, 2, START, 3, 4, START, 5, 6, 0, 0],
                  [1, 2, 3, 4, 5, 0, 0, 0, 0, 0]])
  mask = (ids != 0).astype(np.int32)
  for seed in range(20):
    pos = demo_lm.stretched_positions(ids, mask, START, 100, np.random.default_rng(seed))
    steps = np.diff(pos[0])
    # Adjacent tokens stay one apart except where a line starts; the gaps sum to < 100 − 8.
    assert all(steps[i] == 1 for i in range(9) if ids[0, i + 1] != START and mask[0, i + 1])
    assert steps[1] >= 1 and steps[4] >= 1 and pos[0, 7] - 7 == steps[1] + steps[4] - 2
    assert 0 <= pos[0, 7] - 7 < 100 - 8
    np.testing.assert_array_equal(pos[1], [0, 1, 2, 3, 4, 4, 4, 4, 4, 4])  # no line: unchanged


def test_stretched_positions_reach_the_maximum_over_draws():
  ids = np.array([[1] + [START, 2, 3] * 5])
  mask = np.ones_like(ids)
  last = [demo_lm.stretched_positions(ids, mask, START, 400, np.random.default_rng(s))[0, -1]
          for s in range(200)]
  assert min(last) < 100 and 300 < max(last) < 400
