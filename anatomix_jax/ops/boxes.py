"""Box format conversions and overlaps.

Works on NumPy arrays (data pipeline, metrics) and JAX arrays (losses) alike: each function computes
with the array module of its input (NumPy for NumPy arrays, scalars and lists; jax.numpy otherwise,
imported only then, so NumPy-only callers do not load JAX). Boxes are in the last axis, ``[..., 4]``:
  * ``xyxy``: (x1, y1, x2, y2), corners;
  * ``cxcywh``: (cx, cy, w, h), centre and size (the APM's normalized output format).

This is the project's one home for box overlaps: :func:`iou` (elementwise), :func:`pairwise_iou`
(every pair, in the inputs' dtype), :func:`iou_matrix` (every pair, NumPy, float64 by default: the
evaluation metrics) and :func:`giou` (the loss).
"""

from __future__ import annotations

from typing import Any

import numpy as np

Array = Any


def _xp(x: Array):
  if isinstance(x, (np.ndarray, np.generic, float, int, list, tuple)):
    return np
  import jax.numpy as jnp  # noqa: PLC0415 (only for JAX inputs, which have loaded it already)
  return jnp


def cxcywh_to_xyxy(boxes: Array) -> Array:
  """``[..., 4]`` cxcywh → ``[..., 4]`` xyxy."""
  xp = _xp(boxes)
  boxes = xp.asarray(boxes)
  cx, cy, w, h = (boxes[..., i] for i in range(4))
  return xp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def xyxy_to_cxcywh(boxes: Array) -> Array:
  """``[..., 4]`` xyxy → ``[..., 4]`` cxcywh."""
  xp = _xp(boxes)
  boxes = xp.asarray(boxes)
  x1, y1, x2, y2 = (boxes[..., i] for i in range(4))
  return xp.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], axis=-1)


def area(boxes: Array) -> Array:
  """``[..., 4]`` xyxy → ``[...]`` areas (negative sizes count as 0)."""
  xp = _xp(boxes)
  boxes = xp.asarray(boxes)
  w = xp.clip(boxes[..., 2] - boxes[..., 0], 0, None)
  h = xp.clip(boxes[..., 3] - boxes[..., 1], 0, None)
  return w * h


def _intersection_union(a: Array, b: Array):
  xp = _xp(a)
  a, b = xp.asarray(a), xp.asarray(b)
  lt = xp.maximum(a[..., :2], b[..., :2])
  rb = xp.minimum(a[..., 2:], b[..., 2:])
  wh = xp.clip(rb - lt, 0, None)
  inter = wh[..., 0] * wh[..., 1]
  union = area(a) + area(b) - inter
  return inter, union


def iou(a: Array, b: Array, eps: float = 0.0) -> Array:
  """Elementwise IoU of broadcastable xyxy boxes ``[..., 4]`` → ``[...]``.

  Two empty boxes (union 0) have IoU 0; a reversed box counts as empty. Computed in the inputs'
  dtype (integer inputs give float64 under NumPy).
  """
  xp = _xp(a)
  inter, union = _intersection_union(a, b)
  safe = xp.where(union > 0, union, 1.0)
  return xp.where(union > 0, inter / (safe + eps), 0.0)


def pairwise_iou(a: Array, b: Array) -> Array:
  """IoU of every box in ``a [N, 4]`` with every box in ``b [M, 4]`` (xyxy) → ``[N, M]``.

  Computed in the inputs' dtype and array module (see :func:`iou`).
  """
  xp = _xp(a)
  a, b = xp.asarray(a), xp.asarray(b)
  return iou(a[:, None, :], b[None, :, :])


def iou_matrix(a: Array, b: Array, dtype: Any = np.float64) -> np.ndarray:
  """NumPy IoU of every xyxy box of ``a`` with every xyxy box of ``b``.

  Args:
    a: ``[N, 4]`` boxes (any array-like reshapable to ``[-1, 4]``: a list, ``[4]``, empty).
    b: ``[M, 4]`` boxes, likewise.
    dtype: the float type the IoUs are computed in; None keeps the inputs' own (stage-2 validation
      scores its float32 boxes in float32).

  Returns:
    ``[N, M]`` IoUs; reversed and empty boxes give 0.
  """
  a = np.asarray(a, dtype).reshape(-1, 4)
  b = np.asarray(b, dtype).reshape(-1, 4)
  return pairwise_iou(a, b)


def giou(a: Array, b: Array, eps: float = 1e-7) -> Array:
  """Elementwise generalized IoU (Rezatofighi et al. 2019) of xyxy boxes ``[..., 4]`` → ``[...]``.

  ``GIoU = IoU - (|C| - |A ∪ B|) / |C|`` with ``C`` the smallest box enclosing both. ``eps`` keeps
  degenerate (zero-area) pairs finite; for ordinary boxes it changes nothing measurable.
  """
  xp = _xp(a)
  a, b = xp.asarray(a), xp.asarray(b)
  inter, union = _intersection_union(a, b)
  lt = xp.minimum(a[..., :2], b[..., :2])
  rb = xp.maximum(a[..., 2:], b[..., 2:])
  wh = xp.clip(rb - lt, 0, None)
  enclosing = wh[..., 0] * wh[..., 1]
  return inter / (union + eps) - (enclosing - union) / (enclosing + eps)
