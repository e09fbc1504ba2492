"""APM evaluation metrics (NumPy, host side): anatomy IoU, mAP, image-label AUROC and F1.

Axis letters: E examples, N anatomies (36), C image labels (14), K boxes.

Definitions (REFERENCE.md §5, "APM-only metrics"):
  * IoU: per example and anatomy, IoU of the predicted and true box at 1024 scale; averaged per
    anatomy over examples where the anatomy is present (the reference also scores absent anatomies
    against an all-zero box, i.e. as 0 — see DESIGN.md on masking), then over anatomies.
  * mAP: COCO-style 101-point interpolated average precision per anatomy (one class per anatomy,
    one prediction per image, every score 1 as the APM has no confidence), averaged over anatomies
    and over the IoU thresholds 0.25/0.5/0.75/0.95.
  * AUROC: per-label area under the ROC curve (ties count ½), macro-averaged over labels that have
    both positives and negatives.
  * F1: per-label F1 at sigmoid(logit) > 0.5, macro-averaged; ``f1_reference`` thresholds the raw
    logits at 0.5 as the reference does (REFERENCE.md §7.12).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from anatomix_jax.ops import boxes as box_ops

MAP_THRESHOLDS = (0.25, 0.5, 0.75, 0.95)


def anatomy_iou(pred_cxcywh: np.ndarray, true_cxcywh: np.ndarray, present: np.ndarray,
                scale: float = 1024.0) -> tuple[np.ndarray, np.ndarray]:
  """Per-anatomy mean IoU.

  Args:
    pred_cxcywh: ``[E, N, 4]`` predicted normalized boxes.
    true_cxcywh: ``[E, N, 4]`` true normalized boxes.
    present: ``[E, N]`` 1 where the anatomy has a true box.
    scale: the pixel frame the boxes are scored in (IoU is scale-invariant; kept for clarity).

  Returns:
    ``(per_anatomy [N], ious [E, N])``: mean over present examples (NaN where never present), and
    the raw IoUs (NaN where absent).
  """
  ious = box_ops.iou(box_ops.cxcywh_to_xyxy(pred_cxcywh * scale),
                     box_ops.cxcywh_to_xyxy(true_cxcywh * scale))
  ious = np.where(present > 0, ious, np.nan)
  with np.errstate(invalid="ignore"):
    counts = (present > 0).sum(0)
    per_anatomy = np.where(counts > 0, np.nansum(ious, 0) / np.maximum(counts, 1), np.nan)
  return per_anatomy, ious


def average_precision(scores: np.ndarray, is_tp: np.ndarray, num_gt: int) -> float:
  """COCO 101-point interpolated AP of a ranked detection list.

  Args:
    scores: ``[K]`` detection scores; ties keep their given order (stable sort), as COCO does.
    is_tp: ``[K]`` bool, whether each detection matched a ground truth.
    num_gt: number of ground-truth boxes (0 → NaN, the class is not scored).
  """
  if num_gt == 0:
    return float("nan")
  order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
  tp = np.asarray(is_tp, bool)[order]
  tp_cum, fp_cum = np.cumsum(tp), np.cumsum(~tp)
  recall = tp_cum / num_gt
  precision = tp_cum / np.maximum(tp_cum + fp_cum, 1)
  # Interpolate: precision at recall r = max precision at any recall ≥ r.
  precision = np.maximum.accumulate(precision[::-1])[::-1] if precision.size else precision
  recall_points = np.linspace(0.0, 1.0, 101)
  idx = np.searchsorted(recall, recall_points, side="left")
  sampled = np.where(idx < precision.size, precision[np.minimum(idx, precision.size - 1)], 0.0)
  return float(sampled.mean())


def anatomy_map(ious: np.ndarray, thresholds: Sequence[float] = MAP_THRESHOLDS) -> dict[str, float]:
  """mAP of one-box-per-anatomy predictions from their IoUs ``[E, N]`` (NaN = anatomy absent).

  Returns:
    ``{"map": mean over thresholds, "map_25": ..., "map_50": ..., ...}``.
  """
  out = {}
  for t in thresholds:
    aps = []
    for n in range(ious.shape[1]):
      col = ious[:, n]
      present = ~np.isnan(col)
      # Every image yields a prediction; predictions on images without the anatomy are false.
      is_tp = np.where(present, np.nan_to_num(col) >= t, False)
      aps.append(average_precision(np.ones_like(col), is_tp, int(present.sum())))
    out[f"map_{int(round(t * 100))}"] = float(np.nanmean(aps))
  out["map"] = float(np.mean([out[f"map_{int(round(t * 100))}"] for t in thresholds]))
  return out


def binary_auroc(scores: np.ndarray, targets: np.ndarray) -> float:
  """AUROC of one label: P(score_pos > score_neg) + ½ P(equal). NaN without both classes."""
  targets = np.asarray(targets) > 0.5
  n_pos, n_neg = int(targets.sum()), int((~targets).sum())
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  ranks = _average_ranks(np.asarray(scores, np.float64))
  return float((ranks[targets].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _average_ranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks with ties given their average rank."""
  order = np.argsort(x, kind="stable")
  ranks = np.empty(len(x), np.float64)
  sorted_x = x[order]
  boundaries = np.flatnonzero(np.diff(sorted_x)) + 1
  starts = np.concatenate([[0], boundaries])
  ends = np.concatenate([boundaries, [len(x)]])
  for s, e in zip(starts, ends):
    ranks[order[s:e]] = (s + e + 1) / 2.0
  return ranks


def binary_f1(pred: np.ndarray, targets: np.ndarray) -> float:
  """F1 of boolean predictions; 0 when there are no positives at all (nothing to find or found)."""
  pred, targets = np.asarray(pred, bool), np.asarray(targets) > 0.5
  tp = np.sum(pred & targets)
  denom = 2 * tp + np.sum(pred & ~targets) + np.sum(~pred & targets)
  return float(2 * tp / denom) if denom else 0.0


def label_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """Macro AUROC and F1 over the image labels: ``logits [E, C]``, ``labels [E, C]``."""
  aurocs = [binary_auroc(logits[:, c], labels[:, c]) for c in range(labels.shape[1])]
  f1 = [binary_f1(logits[:, c] > 0.0, labels[:, c]) for c in range(labels.shape[1])]
  f1_ref = [binary_f1(logits[:, c] > 0.5, labels[:, c]) for c in range(labels.shape[1])]
  scored = [a for a in aurocs if not np.isnan(a)]
  return {"auroc": float(np.mean(scored)) if scored else float("nan"),
          "auroc_labels_scored": len(scored),
          "f1": float(np.mean(f1)), "f1_reference": float(np.mean(f1_ref)),
          **{f"auroc/{c}": a for c, a in enumerate(aurocs)}}


def stage1_metrics(pred_boxes: np.ndarray, true_boxes: np.ndarray, present: np.ndarray,
                   logits: np.ndarray, labels: np.ndarray,
                   anatomy_names: Sequence[str], label_names: Sequence[str]) -> dict[str, float]:
  """All APM metrics for one evaluation pass (inputs as in the functions above)."""
  per_anatomy, ious = anatomy_iou(pred_boxes, true_boxes, present)
  out = {"mean_iou": float(np.nanmean(per_anatomy)), **anatomy_map(ious)}
  out.update({f"iou/{name}": float(v) for name, v in zip(anatomy_names, per_anatomy)})
  lm = label_metrics(logits, labels)
  out.update({k: v for k, v in lm.items() if not k.startswith("auroc/")})
  out.update({f"auroc/{label_names[int(k.split('/')[1])]}": v
              for k, v in lm.items() if k.startswith("auroc/")})
  return out
