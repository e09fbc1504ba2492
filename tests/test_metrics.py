"""APM metrics against hand-computed values and scipy."""

import numpy as np
import pytest
from scipy import stats

from anatomix_jax.stage1 import metrics


def test_average_precision_hand_cases():
  # 3 GT, ranked detections TP, FP, TP: precision 1, 1/2, 2/3 at recall 1/3, 1/3, 2/3;
  # interpolated: recall ≤ 1/3 → 1, (1/3, 2/3] → 2/3, above → 0.
  ap = metrics.average_precision(np.array([0.9, 0.8, 0.7]), np.array([True, False, True]), 3)
  n_first = np.sum(np.linspace(0, 1, 101) <= 1 / 3 + 1e-12)
  n_second = np.sum((np.linspace(0, 1, 101) > 1 / 3 + 1e-12) & (np.linspace(0, 1, 101) <= 2 / 3 + 1e-12))
  assert ap == pytest.approx((n_first * 1.0 + n_second * 2 / 3) / 101)
  assert metrics.average_precision(np.ones(2), np.array([True, True]), 2) == pytest.approx(1.0)
  assert metrics.average_precision(np.ones(1), np.array([False]), 1) == 0.0
  assert np.isnan(metrics.average_precision(np.ones(1), np.array([False]), 0))


def test_anatomy_iou_and_map():
  true = np.array([[[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2]],
                   [[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2]]])
  pred = true.copy()
  pred[0, 0] = [0.55, 0.5, 0.2, 0.2]   # shifted by a quarter width: IoU = 0.15/0.25 = 0.6
  present = np.array([[1, 1], [1, 0]])
  per_anatomy, ious = metrics.anatomy_iou(pred, true, present)
  np.testing.assert_allclose(per_anatomy, [(0.6 + 1.0) / 2, 1.0])
  assert np.isnan(ious[1, 1])
  m = metrics.anatomy_map(ious)
  # anatomy 0: both TP up to IoU 0.5 (AP 1). At 0.75 and 0.95 image 0 (IoU .6) is a FP ranked
  # before image 1's TP: precision ½ at recall ½ → the 51 recall points ≤ ½ get ½, the rest 0.
  # anatomy 1: one GT (image 0, IoU 1) then a false prediction on image 1 → AP 1.
  high = (0.5 * 51 / 101 + 1.0) / 2
  assert m["map_25"] == pytest.approx(1.0) and m["map_50"] == pytest.approx(1.0)
  assert m["map_75"] == pytest.approx(high) and m["map_95"] == pytest.approx(high)
  assert m["map"] == pytest.approx(np.mean([1.0, 1.0, high, high]))


def test_auroc_matches_mann_whitney_with_ties():
  rng = np.random.default_rng(0)
  y = rng.integers(0, 2, 200)
  s = np.round(rng.normal(size=200) + y, 1)  # rounding creates ties
  u = stats.mannwhitneyu(s[y == 1], s[y == 0]).statistic
  assert metrics.binary_auroc(s, y) == pytest.approx(u / (y.sum() * (1 - y).sum()))
  assert np.isnan(metrics.binary_auroc(s, np.zeros(200)))


def test_label_metrics_f1_thresholds():
  logits = np.array([[0.2, -1.0], [0.7, 2.0], [-0.3, 0.1]])
  labels = np.array([[1, 0], [1, 1], [0, 0]])
  out = metrics.label_metrics(logits, labels)
  # sigmoid>0.5: label0 preds [1,1,0] → F1 1; label1 preds [0,1,1] → tp1 fp1 → 2/3
  assert out["f1"] == pytest.approx((1.0 + 2 / 3) / 2)
  # reference logits>0.5: label0 [0,1,0] → tp1 fn1 → 2/3; label1 [0,1,0] → 1
  assert out["f1_reference"] == pytest.approx((2 / 3 + 1.0) / 2)
  assert out["auroc"] == pytest.approx(1.0)


def test_metric_writer_jsonl_and_tensorboard_tags(tmp_path):
  from anatomix_jax.core import writers
  writer = writers.MetricWriter(str(tmp_path))
  writer.write(7, "val", {"auroc/Support Devices": np.float32(0.75), "auroc/Pleural Other": float("nan"),
                          "image": np.zeros((2, 2))})  # not a scalar: dropped
  writer.close()
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 1
  rec = __import__("json").loads(lines[0])  # strict JSON: NaN became null
  assert rec["step"] == 7 and rec["split"] == "val" and rec["auroc/Support Devices"] == 0.75
  assert rec["auroc/Pleural Other"] is None and "image" not in rec
  events = b"".join(p.read_bytes() for p in (tmp_path / "tensorboard").iterdir())
  assert b"val/auroc/Support_Devices" in events and b"Support Devices" not in events
