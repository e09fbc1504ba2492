"""Joint image + box augmentation in NumPy/OpenCV: the reference's RandomAffine and horizontal flip.

The reference (``src/util/data_utils.py::get_transforms``, REFERENCE.md §2) applies torchvision v2
``RandomAffine(degrees=15, translate=(0.1, 0.1), scale=(0.9, 1.1))`` and then
``RandomHorizontalFlip(p=0.3)`` to the image and its ``BoundingBoxes`` together. This module
reproduces torchvision's geometry without depending on torchvision:

* Coordinates are continuous pixel coordinates: pixel ``(i, j)`` covers ``[j, j+1] × [i, i+1]``, so
  the image centre is ``(W/2, H/2)`` and a box ``x2 = W`` touches the right edge. Boxes are xyxy in
  these units (the 1024 canvas boxes scaled to the image size).
* The forward affine map is ``p' = c + t + s·R(θ)·(p − c)`` with ``c`` the image centre and
  ``R(θ) = [[cos θ, −sin θ], [sin θ, cos θ]]`` in the y-down image frame, i.e. a positive angle
  turns the image CLOCKWISE on screen (torchvision's ``F.affine`` convention; its ``F.rotate`` is
  the opposite). Angles are sampled symmetrically, so the direction only matters for parity.
* Translation is sampled uniformly in ``±translate·W`` (``·H``) and rounded to whole pixels, as
  torchvision does; angle and scale uniformly in their ranges; no shear.
* A box becomes the axis-aligned box enclosing its 4 transformed corners, clamped to the image
  (torchvision's ``affine_bounding_boxes`` + ``clamp_bounding_boxes``).
* Horizontal flip: ``x → W − x`` for the image and the box (``x1' = W − x2``, ``x2' = W − x1``).
  The box keeps its row (its anatomical label), so after a flip "right lung" is supervised at the
  mirrored position — exactly what the reference does.

Differences from the reference, on purpose: the image is resampled bilinearly (torchvision's
``RandomAffine`` default is nearest-neighbour; pass ``interpolation="nearest"`` for parity).
Rows are never dropped: anatomies absent from the scene graph keep their row and a ``present``
mask is threaded through; a present box that is clamped to zero area (moved entirely off the
image) is reported by turning its ``present`` entry off, so the caller can mask it out of losses.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import cv2
import numpy as np

# The reference's setting (REFERENCE.md §2).
DEFAULT_AUGMENT: dict[str, Any] = {
    "enabled": True,
    "degrees": 15.0,
    "translate": 0.1,
    "scale_min": 0.9,
    "scale_max": 1.1,
    "hflip_prob": 0.3,
    "interpolation": "bilinear",
}

_INTERPOLATION = {"bilinear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST}


def config_value(cfg: Any, key: str) -> Any:
  """``cfg[key]`` from a dict, ConfigDict or attribute object; else :data:`DEFAULT_AUGMENT`."""
  if cfg is None:
    return DEFAULT_AUGMENT[key]
  if isinstance(cfg, Mapping):
    return cfg.get(key, DEFAULT_AUGMENT[key])
  return getattr(cfg, key, DEFAULT_AUGMENT[key])


def augment_params(augment: Any) -> dict[str, Any] | None:
  """An augmentation config as a plain, picklable dict for Grain workers, validated.

  Args:
    augment: None, or a dict/ConfigDict/attribute object with the keys of
      :data:`DEFAULT_AUGMENT` (missing keys take the reference's values).

  Returns:
    ``{key: value}`` for every key of :data:`DEFAULT_AUGMENT`, or None when augmentation is off
    (``augment`` is None or its ``enabled`` is false).

  Raises:
    ValueError: on an invalid setting — here, in the calling process, rather than in a worker on
      the first example.
  """
  if augment is None or not config_value(augment, "enabled"):
    return None
  cfg = {k: config_value(augment, k) for k in DEFAULT_AUGMENT}
  if (cfg["degrees"] < 0 or not 0 <= cfg["translate"] <= 1 or not 0 <= cfg["hflip_prob"] <= 1
      or not 0 < cfg["scale_min"] <= cfg["scale_max"]
      or cfg["interpolation"] not in ("bilinear", "nearest")):
    raise ValueError(f"invalid augmentation config {cfg}")
  return cfg


def derived_seed(seed: int, salt: int) -> int:
  """An independent seed for one random stream of a pipeline (augmentation, a source's shuffle).

  Args:
    seed: the pipeline's seed, in ``[0, 2**32)``.
    salt: a small integer naming the stream; different salts give unrelated seeds.

  Returns:
    A seed in ``[0, 2**32)``: the first word of ``np.random.SeedSequence([seed, salt])``.
  """
  return int(np.random.SeedSequence([seed, salt]).generate_state(1, np.uint32)[0])


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
  if isinstance(size, (int, np.integer)):
    return int(size), int(size)
  h, w = size
  return int(h), int(w)


def affine_matrix(size: int | tuple[int, int], angle: float, translate: tuple[float, float],
                  scale: float) -> np.ndarray:
  """Forward affine map of torchvision's ``F.affine`` (no shear) in continuous pixel coordinates.

  Args:
    size: image size ``S`` or ``(H, W)``.
    angle: rotation in degrees, clockwise on screen for positive values.
    translate: ``(tx, ty)`` in pixels.
    scale: isotropic scale about the image centre.

  Returns:
    float64 ``[2, 3]`` matrix ``M`` with ``p' = M[:, :2] @ p + M[:, 2]`` for points ``p = (x, y)``.
  """
  h, w = _hw(size)
  theta = math.radians(angle)
  a = scale * np.array([[math.cos(theta), -math.sin(theta)],
                        [math.sin(theta), math.cos(theta)]])
  centre = np.array([w * 0.5, h * 0.5])
  offset = centre + np.asarray(translate, np.float64) - a @ centre
  return np.concatenate([a, offset[:, None]], axis=1)


def sample_affine(rng: np.random.Generator, cfg: Any, size: int | tuple[int, int]) -> np.ndarray:
  """Draws one RandomAffine transform like torchvision v2 ``RandomAffine._get_params``.

  Args:
    rng: the NumPy generator to draw from (Grain's per-element generator in the pipeline).
    cfg: mapping/ConfigDict with ``degrees``, ``translate`` (fraction of the size), ``scale_min``
      and ``scale_max``; missing keys take the reference's values.
    size: image size ``S`` or ``(H, W)``.

  Returns:
    float64 ``[2, 3]`` forward matrix (see :func:`affine_matrix`).
  """
  h, w = _hw(size)
  degrees = float(config_value(cfg, "degrees"))
  frac = float(config_value(cfg, "translate"))
  angle = rng.uniform(-degrees, degrees)
  # torchvision rounds the translation to whole pixels.
  tx = float(round(rng.uniform(-frac * w, frac * w)))
  ty = float(round(rng.uniform(-frac * h, frac * h)))
  scale = rng.uniform(float(config_value(cfg, "scale_min")), float(config_value(cfg, "scale_max")))
  return affine_matrix((h, w), angle, (tx, ty), scale)


def transform_boxes(boxes: np.ndarray, matrix: np.ndarray, size: int | tuple[int, int]
                    ) -> np.ndarray:
  """Maps xyxy boxes through an affine map: enclosing box of the 4 corners, clamped to the image.

  Args:
    boxes: float ``[N, 4]`` xyxy in pixels.
    matrix: ``[2, 3]`` forward matrix.
    size: image size ``S`` or ``(H, W)`` for the clamping.

  Returns:
    float32 ``[N, 4]`` xyxy boxes.
  """
  h, w = _hw(size)
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  corners = boxes[:, [[0, 1], [2, 1], [2, 3], [0, 3]]]  # [N, 4 corners, (x, y)]
  moved = corners @ matrix[:, :2].T + matrix[:, 2]
  out = np.concatenate([moved.min(axis=1), moved.max(axis=1)], axis=1)
  out[:, 0::2] = np.clip(out[:, 0::2], 0.0, w)
  out[:, 1::2] = np.clip(out[:, 1::2], 0.0, h)
  return out.astype(np.float32)


def nondegenerate(boxes: np.ndarray) -> np.ndarray:
  """bool ``[N]``: the xyxy box has positive width and height."""
  boxes = np.asarray(boxes)
  return (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


def _as_present(present: np.ndarray | None, n: int) -> np.ndarray:
  return np.ones(n, bool) if present is None else np.asarray(present).astype(bool).reshape(n)


def apply_affine(image: np.ndarray, boxes: np.ndarray, matrix: np.ndarray,
                 present: np.ndarray | None = None, interpolation: str = "bilinear"
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Warps an image and its boxes with the same forward affine map (zero fill).

  Args:
    image: ``[H, W]`` or ``[H, W, 1]``, uint8 or float32.
    boxes: float ``[N, 4]`` xyxy in pixels of ``image``. Every row is transformed and kept.
    matrix: ``[2, 3]`` forward matrix in continuous pixel coordinates (:func:`affine_matrix`).
    present: bool ``[N]`` (default all True): rows that hold a real box.
    interpolation: ``"bilinear"`` (default) or ``"nearest"`` (torchvision's RandomAffine default).

  Returns:
    ``(image, boxes, present)``: the warped image (same shape and dtype), float32 ``[N, 4]``
    boxes, and ``present`` with rows whose box was clamped to zero area switched off.
  """
  h, w = image.shape[:2]
  # OpenCV puts pixel centres on integers: x_cv = x − ½. Conjugate the map into that frame.
  a, t = matrix[:, :2], matrix[:, 2]
  m_cv = np.concatenate([a, (t + a @ np.array([0.5, 0.5]) - 0.5)[:, None]], axis=1)
  warped = cv2.warpAffine(image, m_cv, (w, h), flags=_INTERPOLATION[interpolation],
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)
  warped = warped.reshape(image.shape)  # OpenCV drops a trailing channel of size 1
  out_boxes = transform_boxes(boxes, matrix, (h, w))
  out_present = _as_present(present, len(out_boxes)) & nondegenerate(out_boxes)
  return warped, out_boxes, out_present


def hflip(image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mirrors an image and its boxes left–right; box rows (anatomy labels) stay where they are.

  Args:
    image: ``[H, W]`` or ``[H, W, C]``.
    boxes: float ``[N, 4]`` xyxy in pixels of ``image``.

  Returns:
    ``(image, boxes)`` with ``x → W − x``: ``x1' = W − x2``, ``x2' = W − x1``; float32 boxes.
  """
  return np.ascontiguousarray(image[:, ::-1]), hflip_boxes(boxes, image.shape[1])


def hflip_boxes(boxes: np.ndarray, width: float, dtype: Any = np.float32) -> np.ndarray:
  """The box half of :func:`hflip`: xyxy boxes of an image ``width`` wide, mirrored left–right.

  Args:
    boxes: float ``[N, 4]`` xyxy in pixels (e.g. the 1024 canvas: ``width`` 1024).
    width: the image width W.
    dtype: of the result (float32, as :func:`hflip` returns; float64 keeps a record's decimals).

  Returns:
    ``[N, 4]``: ``x1' = W − x2``, ``x2' = W − x1``; y unchanged; rows kept in order.
  """
  boxes = np.asarray(boxes, dtype).reshape(-1, 4)
  return np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=1)


def random_augment(image: np.ndarray, boxes: np.ndarray, rng: np.random.Generator, cfg: Any = None,
                   present: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The reference's augmentation: RandomAffine, then a horizontal flip with ``hflip_prob``.

  Args:
    image: ``[H, W]`` or ``[H, W, 1]``, uint8 or float32.
    boxes: float ``[N, 4]`` xyxy in pixels of ``image``.
    rng: NumPy generator; the same generator state gives the same result.
    cfg: mapping/ConfigDict with ``enabled``, ``degrees``, ``translate``, ``scale_min``,
      ``scale_max``, ``hflip_prob`` and optionally ``interpolation`` (defaults: the reference).
    present: bool ``[N]`` (default all True).

  Returns:
    ``(image, boxes, present)`` as in :func:`apply_affine`. With ``enabled`` False the inputs come
    back unchanged (boxes as float32).
  """
  present = _as_present(present, len(boxes))
  if not config_value(cfg, "enabled"):
    return image, np.asarray(boxes, np.float32), present
  matrix = sample_affine(rng, cfg, image.shape[:2])
  image, boxes, present = apply_affine(image, boxes, matrix, present,
                                       str(config_value(cfg, "interpolation")))
  # Always draw the flip coin so the generator advances identically whatever the outcome.
  if rng.uniform() < float(config_value(cfg, "hflip_prob")):
    image, boxes = hflip(image, boxes)
  return image, boxes, present
