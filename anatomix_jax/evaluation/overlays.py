"""PNG overlays on a radiograph: predicted (red) and true (green) anatomy boxes while training,
and the grounding of a prediction (APM anatomy boxes thin, answer boxes thick, with labels)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

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


ANATOMY_COLOUR = (0, 200, 255)   # sky blue: the APM's anatomy boxes
ANSWER_COLOUR = (255, 160, 0)    # orange: boxes parsed from the generated answer
_TEXT_ON_ANSWER = (0, 0, 0)
_OUTLINE = (0, 0, 0)


def draw_grounding(image: np.ndarray, anatomy_boxes: np.ndarray | None,
                   anatomy_names: Sequence[str] | None, answer_boxes: np.ndarray | None,
                   answer_labels: Sequence[str] | None, canvas: int = 1024) -> Image.Image:
  """Draws a prediction's grounding: anatomy boxes thin with small names, answer boxes thick with
  their phrases on a filled tag.

  The image is the letterboxed frame (the canvas the boxes live on) at any resolution: box
  coordinates are scaled by ``width / canvas`` and ``height / canvas``. To draw on the original,
  un-letterboxed image, map the boxes with ``LetterboxTransform.inverse_boxes`` first instead.

  Boxes are continuous pixel-edge xyxy (``images`` module convention): a canvas box ``(x1, y1, x2,
  y2)`` covers image columns ``round(x1 * sx) .. round(x2 * sx) - 1``, and its outline is drawn on
  those outermost columns/rows, growing inwards when thick. Non-finite or empty boxes are skipped.

  Args:
    image: ``[H, W]`` or ``[H, W, 1]`` float in [0, 1].
    anatomy_boxes: ``[N, 4]`` xyxy on the canvas (e.g. the 36 APM boxes), or None.
    anatomy_names: ``N`` labels for them, or None for no labels.
    answer_boxes: ``[M, 4]`` xyxy on the canvas, parsed from the generated text, or None.
    answer_labels: ``M`` phrases for them, or None for no labels.
    canvas: side of the square frame the boxes are expressed in.

  Returns:
    An RGB PIL image of size ``W × H``.

  Raises:
    ValueError: a label list whose length differs from its boxes'.
  """
  gray = np.asarray(image, np.float32)
  gray = np.clip(gray.reshape(gray.shape[0], gray.shape[1]), 0, 1)
  pil = Image.fromarray(np.rint(gray * 255).astype(np.uint8)).convert("RGB")
  draw = ImageDraw.Draw(pil)
  # Line widths and font sizes follow the resolution, so a 1024 overlay and a 4096 one look alike.
  side = min(pil.width, pil.height) / 1024
  thin, thick = max(1, round(side)), max(3, round(3 * side))
  anatomy = _pixel_boxes(anatomy_boxes, anatomy_names, pil.size, canvas)
  answers = _pixel_boxes(answer_boxes, answer_labels, pil.size, canvas)
  for box, _ in anatomy:
    draw.rectangle(box, outline=ANATOMY_COLOUR, width=thin)
  for box, _ in answers:
    draw.rectangle(box, outline=ANSWER_COLOUR, width=thick)
  # Labels last, so that no outline crosses a label; answer labels on top of anatomy names.
  small, large = _font(max(9, round(11 * side))), _font(max(11, round(16 * side)))
  for box, name in anatomy:
    if name:
      _anatomy_label(draw, box, name, small, thin, pil.size)
  for box, label in answers:
    if label:
      _answer_label(draw, box, label, large, pil.size)
  return pil


def _pixel_boxes(boxes: np.ndarray | None, labels: Sequence[str] | None, size: tuple[int, int],
                 canvas: int) -> list[tuple[tuple[int, int, int, int], str | None]]:
  """Canvas xyxy ``[N, 4]`` → ``[(PIL rectangle (x0, y0, x1, y1) inclusive, label)]``."""
  if boxes is None:
    return []
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  if labels is not None and len(labels) != len(boxes):
    raise ValueError(f"{len(boxes)} boxes but {len(labels)} labels")
  width, height = size
  scale = np.array([width, height, width, height], np.float64) / canvas
  out = []
  for i, box in enumerate(boxes):
    if not np.all(np.isfinite(box)):
      continue
    x0, y0, x1, y1 = np.rint(box * scale).astype(np.int64).tolist()
    # Edge coordinates → the inclusive pixel rectangle PIL draws, clipped to the image.
    x0, y0 = max(x0, 0), max(y0, 0)
    x1, y1 = min(x1, width) - 1, min(y1, height) - 1
    if x1 < x0 or y1 < y0:
      continue
    out.append(((x0, y0, x1, y1), None if labels is None else labels[i]))
  return out


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
  """PIL's built-in font (no font file); sized when PIL has FreeType, else its fixed bitmap font."""
  try:
    return ImageFont.load_default(size=size)
  except (ImportError, OSError, TypeError):
    return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
  left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
  return right - left, bottom


def _anatomy_label(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], text: str, font,
                   line: int, size: tuple[int, int]) -> None:
  """A small name inside the box's top-left corner, outlined in black to stay legible on bone."""
  w, _ = _text_size(draw, text, font)
  x = min(box[0] + line + 1, max(size[0] - w - 1, 0))
  y = box[1] + line + 1
  stroke = 1 if isinstance(font, ImageFont.FreeTypeFont) else 0  # bitmap fonts take no stroke
  draw.text((x, y), text, fill=ANATOMY_COLOUR, font=font, stroke_width=stroke, stroke_fill=_OUTLINE)


def _answer_label(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], text: str, font,
                  size: tuple[int, int]) -> None:
  """The phrase on a filled tag just above the box (inside its top edge when there is no room)."""
  w, h = _text_size(draw, text, font)
  pad = 2
  x = min(box[0], max(size[0] - w - 2 * pad, 0))
  y = box[1] - h - 2 * pad
  if y < 0:
    y = box[1]
  draw.rectangle((x, y, x + w + 2 * pad - 1, y + h + 2 * pad - 1), fill=ANSWER_COLOUR)
  draw.text((x + pad, y + pad), text, fill=_TEXT_ON_ANSWER, font=font)
