"""Radiograph decoding, the reference's letterbox, and mapping boxes through it.

Decoding turns a file into one grayscale array ``[H, W]``:
  * 8-bit JPEG/PNG (MIMIC-CXR-JPG, ...) go through PIL, converted with ``convert("L")`` like the
    reference's data loader. The whole image is loaded (``.load()``) and PIL's
    ``LOAD_TRUNCATED_IMAGES`` is left off, so a truncated file is an error, not a grey bottom half.
  * 16-bit PNG (PadChest, VinDr conversions) go through OpenCV (``IMREAD_UNCHANGED``), because PIL's
    ``convert("L")`` clips 16-bit values at 255 instead of scaling them.
  The result is ``uint8`` in [0, 255] or ``float32`` in [0, 1] (16-bit: value / 65535).

The letterbox is the reference's ``padd_and_resize``: zero-pad the short side by ``(long - short) // 2``
on EACH side, then ``cv2.resize`` (bilinear) to ``size × size``. When ``long - short`` is odd the
padded image is one pixel short of square and the resize stretches it slightly;
:class:`LetterboxTransform` records the exact per-axis scales, so boxes map exactly.

Box coordinates are continuous pixel-edge coordinates (a box covering pixel columns 0..9 has
x1 = 0, x2 = 10); a point ``x`` of the original image lands at ``(x + pad_left) * size / padded_width``.
"""

from __future__ import annotations

import dataclasses
import io

import cv2
import numpy as np
from PIL import Image

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ImageError(ValueError):
  """An image file that is missing, unreadable or truncated; the message names the file.

  Attributes:
    path: the file.
    reason: a short machine-readable cause (``missing_image`` or ``unreadable_image``), used to count
      skips.
  """

  def __init__(self, path: str, problem: str, reason: str = "unreadable_image"):
    super().__init__(f"{path}: {problem}")
    self.path = path
    self.problem = problem
    self.reason = reason

  def __reduce__(self):  # picklable, so pool workers can hand it back to the parent
    return ImageError, (self.path, self.problem, self.reason)


def _is_16bit_png(data: bytes) -> bool:
  # IHDR is always the first chunk: 8-byte signature, 4-byte length, 'IHDR', width, height, bit depth.
  return len(data) > 24 and data[:8] == _PNG_SIGNATURE and data[24] == 16


def _to_dtype(image: np.ndarray, dtype: np.dtype | type, max_value: float) -> np.ndarray:
  dtype = np.dtype(dtype)
  if dtype == np.uint8:
    if max_value == 255:
      return image.astype(np.uint8, copy=False)
    return np.rint(image.astype(np.float32) * (255.0 / max_value)).astype(np.uint8)
  if dtype == np.float32:
    return image.astype(np.float32) * np.float32(1.0 / max_value)
  raise ValueError(f"dtype must be uint8 or float32, got {dtype}")


def decode_image(data: bytes, source: str = "<bytes>", dtype: np.dtype | type = np.uint8
                 ) -> np.ndarray:
  """Decodes an encoded image to one grayscale channel.

  Args:
    data: the encoded file contents (JPEG, PNG 8/16-bit, or anything PIL reads).
    source: the file name used in error messages.
    dtype: ``np.uint8`` (values 0..255) or ``np.float32`` (values in [0, 1]).

  Returns:
    ``[H, W]`` array of ``dtype``.

  Raises:
    ImageError: the data is empty, not an image, or truncated.
  """
  if not data:
    raise ImageError(source, "file is empty")
  if _is_16bit_png(data):
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
      raise ImageError(source, "16-bit PNG could not be decoded (corrupt or truncated)")
    if image.ndim == 3:  # colour 16-bit PNG: OpenCV gives BGR(A)
      code = cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY
      image = cv2.cvtColor(image, code)
    return _to_dtype(image, dtype, 65535.0)
  try:
    with Image.open(io.BytesIO(data)) as pil:
      pil.load()  # decodes everything now: truncation raises here instead of being padded with grey
      if pil.mode != "L":
        pil = pil.convert("L")
      image = np.asarray(pil)
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
    raise ImageError(source, f"cannot decode image ({type(e).__name__}: {e})") from e
  return _to_dtype(image, dtype, 255.0)


def read_image(path: str, dtype: np.dtype | type = np.uint8) -> np.ndarray:
  """Reads an image file as one grayscale channel (see :func:`decode_image`).

  Args:
    path: the image file.
    dtype: ``np.uint8`` or ``np.float32``.

  Returns:
    ``[H, W]`` array of ``dtype``.

  Raises:
    ImageError: the file is missing (reason ``missing_image``), unreadable, or truncated.
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError as e:
    raise ImageError(path, "image file does not exist", reason="missing_image") from e
  except OSError as e:
    raise ImageError(path, f"cannot read image file ({e})") from e
  return decode_image(data, source=path, dtype=dtype)


@dataclasses.dataclass(frozen=True)
class LetterboxTransform:
  """The exact geometry of one :func:`letterbox` call.

  Attributes:
    height, width: size of the original image.
    pad_top, pad_left: zero rows/columns added above and to the left (the same number is added below
      or to the right).
    padded_height, padded_width: size after padding (may differ by one pixel when the difference of
      the sides is odd).
    size: side of the square output.
  """
  height: int
  width: int
  pad_top: int
  pad_left: int
  padded_height: int
  padded_width: int
  size: int

  def scale(self, target_size: float | None = None) -> tuple[float, float]:
    """(x, y) scale from padded-image pixels to a ``target_size``-sided frame (default ``size``)."""
    target = self.size if target_size is None else target_size
    return target / self.padded_width, target / self.padded_height

  def forward_boxes(self, boxes: np.ndarray, target_size: float | None = None) -> np.ndarray:
    """Maps original-pixel boxes into the letterboxed frame of side ``target_size``.

    Args:
      boxes: ``[..., 4]`` xyxy in original-image pixels.
      target_size: side of the target frame (e.g. 1024 for the box canvas); default ``size``.

    Returns:
      ``[..., 4]`` float64 xyxy in the target frame.
    """
    sx, sy = self.scale(target_size)
    boxes = np.asarray(boxes, np.float64)
    offset = np.array([self.pad_left, self.pad_top, self.pad_left, self.pad_top], np.float64)
    factor = np.array([sx, sy, sx, sy], np.float64)
    return (boxes + offset) * factor

  def inverse_boxes(self, boxes: np.ndarray, source_size: float | None = None) -> np.ndarray:
    """Inverse of :meth:`forward_boxes`: ``[..., 4]`` letterboxed xyxy → original pixels (float64)."""
    sx, sy = self.scale(source_size)
    boxes = np.asarray(boxes, np.float64)
    offset = np.array([self.pad_left, self.pad_top, self.pad_left, self.pad_top], np.float64)
    factor = np.array([sx, sy, sx, sy], np.float64)
    return boxes / factor - offset


def letterbox_transform(height: int, width: int, size: int) -> LetterboxTransform:
  """The :class:`LetterboxTransform` that :func:`letterbox` applies to an ``height × width`` image."""
  if height <= 0 or width <= 0 or size <= 0:
    raise ValueError(f"letterbox needs positive sizes, got {height}×{width} → {size}")
  pad_top = pad_left = 0
  if height > width:
    pad_left = (height - width) // 2
  else:
    pad_top = (width - height) // 2
  return LetterboxTransform(height=height, width=width, pad_top=pad_top, pad_left=pad_left,
                            padded_height=height + 2 * pad_top, padded_width=width + 2 * pad_left,
                            size=size)


def letterbox(image: np.ndarray, size: int) -> tuple[np.ndarray, LetterboxTransform]:
  """The reference's ``padd_and_resize``: centred zero padding to (almost) square, then resize.

  Args:
    image: ``[H, W]`` grayscale (uint8 or float32); a ``[H, W, C]`` image uses channel 0 like the
      reference.
    size: output side.

  Returns:
    ``([size, size] image of the input dtype, transform)``. The resize is ``cv2.resize`` with its
    default bilinear interpolation, exactly as in the reference.
  """
  if image.ndim == 3:
    image = image[:, :, 0]
  if image.ndim != 2:
    raise ValueError(f"letterbox expects a [H, W] image, got shape {image.shape}")
  transform = letterbox_transform(image.shape[0], image.shape[1], size)
  padded = np.pad(image, ((transform.pad_top, transform.pad_top),
                          (transform.pad_left, transform.pad_left)), mode="constant")
  if padded.shape != (size, size):
    padded = cv2.resize(padded, (size, size))
  return padded, transform


def minmax_stretch(image: np.ndarray) -> np.ndarray:
  """The intensity stretch the reference applies when it saves letterboxed images.

  The reference writes each letterboxed image with ``plt.imsave(path, image, cmap="gray")``, which
  normalises to the image's own [min, max] and maps through matplotlib's 256-entry grey lookup table
  (``floor(norm * 256)``, clipped, then ``(linspace(0, 1, 256) * 255).astype(uint8)``); its loader
  reads the result back with ``convert("L")``. This reproduces that mapping.

  Args:
    image: ``[H, W]`` uint8 or float array.

  Returns:
    ``[H, W]`` uint8.
  """
  low, high = float(image.min()), float(image.max())
  if high <= low:  # matplotlib maps a constant image to the bottom of the colour map
    return np.zeros(image.shape, np.uint8)

  def stretch(values: np.ndarray) -> np.ndarray:
    norm = (values.astype(np.float32) - np.float32(low)) / np.float32(high - low)
    return _GREY_LUT[np.clip((norm * np.float32(256)).astype(np.int64), 0, 255)]

  if image.dtype == np.uint8:  # the same arithmetic on the 256 possible values, then a lookup
    return cv2.LUT(image, stretch(np.arange(256)))
  return stretch(image)


_GREY_LUT = (np.linspace(0.0, 1.0, 256) * 255).astype(np.uint8)


def map_boxes(boxes: np.ndarray, transform: LetterboxTransform,
              target_size: float | None = None) -> np.ndarray:
  """Original-pixel xyxy boxes ``[..., 4]`` → float64 xyxy in the ``target_size`` letterboxed frame."""
  return transform.forward_boxes(boxes, target_size)


def encode_png(image: np.ndarray, compression: int = 1) -> bytes:
  """PNG-encodes a ``[H, W]`` uint8 image (``compression`` 0–9; 1 is fast and still lossless)."""
  if image.dtype != np.uint8 or image.ndim != 2:
    raise ValueError(f"encode_png expects a [H, W] uint8 image, got {image.dtype} {image.shape}")
  # Run-length strategy: as fast as the default at level 1 and ~20% smaller on radiographs.
  ok, buf = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, compression,
                                         cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE])
  if not ok:
    raise ValueError("PNG encoding failed")
  return buf.tobytes()


def decode_png(data: bytes, source: str = "<record>") -> np.ndarray:
  """Decodes a grayscale PNG (as stored in records) to ``[H, W]`` uint8."""
  image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
  if image is None:
    raise ImageError(source, "PNG could not be decoded")
  return image

