"""PNG overlays of predicted (red) and true (green) anatomy boxes on a radiograph."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from anatomix_jax.ops import boxes as box_ops


def draw_boxes(image: np.ndarray, pred_cxcywh: np.ndarray, true_cxcywh: np.ndarray | None = None,
               present: np.ndarray | None = None, scale_up: int = 1) -> Image.Image:
  """Draws boxes on a grayscale image.

  Args:
    image: ``[H, W]`` or ``[H, W, 1]`` float in [0, 1].
    pred_cxcywh: ``[N, 4]`` normalized predicted boxes (red).
    true_cxcywh: ``[N, 4]`` normalized true boxes (green), optional.
    present: ``[N]`` mask of true boxes to draw (absent anatomies are skipped).
    scale_up: integer upscaling of small images so boxes stay legible.

  Returns:
    An RGB PIL image.
  """
  gray = np.clip(np.asarray(image, np.float32).reshape(image.shape[0], image.shape[1]), 0, 1)
  pil = Image.fromarray((gray * 255).astype(np.uint8)).convert("RGB")
  if scale_up > 1:
    pil = pil.resize((pil.width * scale_up, pil.height * scale_up), Image.NEAREST)
  size = np.array([pil.width, pil.height, pil.width, pil.height], np.float32)
  draw = ImageDraw.Draw(pil)
  if true_cxcywh is not None:
    for i, box in enumerate(box_ops.cxcywh_to_xyxy(np.asarray(true_cxcywh)) * size):
      if present is None or present[i] > 0:
        draw.rectangle(box.tolist(), outline=(0, 220, 0))
  for box in box_ops.cxcywh_to_xyxy(np.asarray(pred_cxcywh)) * size:
    draw.rectangle(box.tolist(), outline=(255, 40, 40))
  return pil
