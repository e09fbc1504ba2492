"""Grounding scores of stage-2 answers against hand-computed values."""

import numpy as np
import pytest

from anatomix_jax.evaluation.grounding import reference_iou
from anatomix_jax.ops import boxes as box_ops
from anatomix_jax.stage2 import grounding as evaluate


def test_parse_boxes_and_iou_by_hand():
  text = "<ref>x</ref><box>(0,0),(10,10)</box> and <box>( 5 , 5 ),(15,15)</box> <box>(1,2)</box>"
  np.testing.assert_array_equal(evaluate.parse_boxes(text),
                                [[0, 0, 10, 10], [5, 5, 15, 15]])  # the unclosed one is ignored
  assert evaluate.parse_boxes("no box here").shape == (0, 4)
  truth = np.array([[0, 0, 10, 10]], np.float32)
  # box 1: identical (1.0); box 2: overlap 25 / union 175.
  assert reference_iou(evaluate.parse_boxes(text), truth) == pytest.approx((1 + 25 / 175) / 2)
  assert reference_iou(np.zeros((0, 4)), truth) is None
  assert box_ops.iou_matrix(np.array([[0, 0, 0, 5.0]]), truth)[0, 0] == 0.0  # degenerate


def test_summary_separates_negatives_and_strict_iou():
  record = lambda i, response, task="Phrase Grounding": {  # noqa: E731
      "id": str(i), "source": "vindr_instruct", "task": task, "responses": [response]}
  records = [record(0, "<ref>A</ref><box>(0,0),(10,10)</box>"),
             record(1, "<ref>A</ref><box>(0,0),(10,10)</box>"),
             record(2, "No a detected.")]
  answers = ["<ref>A</ref><box>(0,0),(10,5)</box>", "I cannot tell.", "No a detected."]
  rows = evaluate.score_grounding(records, answers, np.zeros((3, 36, 4), np.float32))
  out = evaluate.summarize(rows)
  assert out["grounding_samples"] == 2 and out["parse_rate"] == 0.5
  assert out["iou"] == pytest.approx(0.5) and out["iou_strict"] == pytest.approx(0.25)
  assert out["negative_samples"] == 1 and out["negative_accuracy"] == 1.0
