"""Radiograph decoding, the reference's letterbox, and mapping boxes through it.

Decoding turns a file into one grayscale array ``[H, W]``:
  * 8-bit JPEG/PNG (MIMIC-CXR-JPG, ...) go through PIL, converted with ``convert("L")`` like the
    reference's data loader. The whole image is loaded (``.load()``) and PIL's
    ``LOAD_TRUNCATED_IMAGES`` is left off, so a truncated file is an error, not a grey bottom half.
  * 16-bit PNG (PadChest, VinDr conversions) go through OpenCV (``IMREAD_UNCHANGED``), because PIL's
    ``convert("L")`` clips 16-bit values at 255 instead of scaling them.
  The result is ``uint8`` in [0, 255] or ``float32`` in [0, 1] (16-bit: value / 65535).
  * DICOM (``--mode=predict`` on hospital files) goes through pydicom and is rendered the way viewers
    and the datasets' PNG conversions (VinDr-CXR, ...) do it: Modality LUT, VOI LUT, MONOCHROME1
    inverted, min–max to [0, 1] (:func:`decode_dicom`). :func:`read_radiograph` picks DICOM or the
    paths above by the file's content.

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
from typing import Any

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
  return decode_image(_read_bytes(path), source=path, dtype=dtype)


def _read_bytes(path: str) -> bytes:
  try:
    with open(path, "rb") as f:
      return f.read()
  except FileNotFoundError as e:
    raise ImageError(path, "image file does not exist", reason="missing_image") from e
  except OSError as e:
    raise ImageError(path, f"cannot read image file ({e})") from e


# --------------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------------

# A DICOM Part 10 file: a 128-byte preamble, then the magic "DICM", then the file meta group.
_DICOM_MAGIC = b"DICM"
_DICOM_MAGIC_OFFSET = 128
_DICOM_SUFFIXES = (".dcm", ".dicom")
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
# Colour interpretations whose pixels pydicom hands back as RGB (YBR_* are converted by
# ``pixel_array``'s default ``as_rgb=True``; PALETTE COLOR goes through its colour LUT here).
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT",
           "PALETTE COLOR")
# ITU-R BT.601 luma, the weights of PIL's ``convert("L")`` that the JPEG/PNG path uses for colour.
_LUMA = np.array([0.299, 0.587, 0.114], np.float64)


def is_dicom(data: bytes) -> bool:
  """Whether ``data`` is a DICOM Part 10 file (``b"DICM"`` at byte 128)."""
  return data[_DICOM_MAGIC_OFFSET:_DICOM_MAGIC_OFFSET + 4] == _DICOM_MAGIC


def decode_dicom(data: bytes, source: str = "<bytes>") -> np.ndarray:
  """Decodes and renders a single-frame DICOM radiograph to grayscale in [0, 1].

  The rendering is the standard grayscale pipeline of PS3.3 C.11 (what viewers show, and what the
  chest X-ray datasets' DICOM → PNG conversions store):

  1. stored values (``pixel_array``: 8/12/16-bit, signed or unsigned; bits above BitsStored are
     masked and signed values sign-extended by pydicom);
  2. the Modality LUT (RescaleSlope/RescaleIntercept or a Modality LUT Sequence);
  3. the VOI LUT when present: a VOI LUT Sequence, else WindowCenter/WindowWidth with the
     VOILUTFunction (LINEAR by default); the first one when there are several;
  4. MONOCHROME1 inverted, so bone is bright as in MONOCHROME2 (the Presentation LUT Shape is not
     used: in DX objects INVERSE only restates MONOCHROME1);
  5. min–max to [0, 1] over the rendered image (a constant image gives zeros).

  Step 5 is the same stretch stage-2 ``LoadImage`` applies (``images.minmax_stretch`` after the
  letterbox, whose zero padding is this image's minimum), so a PNG holding these rendered pixels
  (``round(x * 65535)`` in 16 bits, or 8 bits) gives the same model input up to its quantization.

  Decisions for what a chest radiograph rarely is:
    * multi-frame (NumberOfFrames > 1): an error. The frames of a DX/CR object are different
      images (dual-energy soft-tissue/bone, tomosynthesis slices), and picking one silently would
      give a plausible but possibly wrong prediction; extract the wanted frame instead.
    * colour (RGB, YBR_*, PALETTE COLOR; e.g. secondary captures of a film): converted to
      luminance with the BT.601 weights of PIL's ``convert("L")`` (as colour JPEGs are), then
      min–max. Modality and VOI LUTs are not applied (the standard defines them for grayscale).
    * compressed transfer syntaxes: decoded when pydicom has a plugin for them (here: RLE, and JPEG
      baseline/JPEG 2000 through Pillow); otherwise (e.g. JPEG Lossless, JPEG-LS, which need
      pylibjpeg or GDCM) an error naming the transfer syntax and the packages that would decode it.

  Args:
    data: the file contents (a DICOM Part 10 file, preamble included).
    source: the file name used in error messages.

  Returns:
    ``[H, W]`` float32 in [0, 1].

  Raises:
    ImageError: empty data, not a DICOM file, no pixel data (e.g. a structured report),
      multi-frame, an unsupported photometric interpretation, a transfer syntax no installed
      plugin decodes, or pixel data/LUTs that cannot be decoded or applied.
  """
  if not data:
    raise ImageError(source, "file is empty")
  if not is_dicom(data):
    raise ImageError(source, "not a DICOM file (no 'DICM' marker at byte 128)")
  try:
    return _render_dicom(data, source)
  except ImageError:
    raise
  except Exception as e:  # pydicom parses lazily: a damaged element can fail at any access
    raise ImageError(source, f"cannot render DICOM ({type(e).__name__}: {e})") from e


def _render_dicom(data: bytes, source: str) -> np.ndarray:
  """:func:`decode_dicom` after its checks of the bytes (see there)."""
  ds = _read_dicom(data, source)
  _check_renderable(ds, source)
  photometric = _photometric(ds)
  pixels = _dicom_pixels(ds, photometric, source)
  if photometric in _MONOCHROME:
    rendered = _render_grayscale(pixels, ds, photometric, source)
  else:
    rendered = _luminance(pixels)
  return _minmax_unit(rendered, source)


def read_radiograph(path: str) -> np.ndarray:
  """Reads a radiograph file of any supported kind as grayscale float32 in [0, 1].

  The kind is taken from the content: a DICOM Part 10 file (``b"DICM"`` at byte 128) is rendered
  by :func:`decode_dicom`; anything else goes through :func:`decode_image` (8-bit PNG/JPEG and
  anything PIL reads: value / 255; 16-bit PNG: value / 65535). A ``.dcm``/``.dicom`` file without
  the marker is an error rather than a confusing "cannot decode image".

  Args:
    path: the file.

  Returns:
    ``[H, W]`` float32 in [0, 1].

  Raises:
    ImageError: the file is missing (reason ``missing_image``), empty, unreadable, or not a
      decodable image (the message names the file).
  """
  data = _read_bytes(path)
  if not data:
    raise ImageError(path, "file is empty")
  if is_dicom(data):
    return decode_dicom(data, source=path)
  if path.lower().endswith(_DICOM_SUFFIXES):
    raise ImageError(path, "named as DICOM but has no 'DICM' marker at byte 128: not a DICOM "
                     "Part 10 file (a raw dataset without the 128-byte preamble and file meta is "
                     "not supported; re-save it as a Part 10 file)")
  return decode_image(data, source=path, dtype=np.float32)


def _read_dicom(data: bytes, source: str) -> Any:
  # Imported here: the training pipeline's workers import this module and never read DICOM.
  import pydicom
  try:
    return pydicom.dcmread(io.BytesIO(data))
  except Exception as e:  # InvalidDicomError, EOFError, struct/value errors of a damaged header
    raise ImageError(source, f"cannot parse DICOM ({type(e).__name__}: {e})") from e


def _photometric(ds: Any) -> str:
  return str(ds.get("PhotometricInterpretation", "")).strip().upper()


def _transfer_syntax(ds: Any) -> Any:
  """The file meta's TransferSyntaxUID (a pydicom ``UID``), or None."""
  return getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)


def _check_renderable(ds: Any, source: str) -> None:
  """Raises ImageError for a dataset this module does not render (cheap checks, before decoding)."""
  if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
    kind = getattr(ds.get("SOPClassUID"), "name", None) or "unknown SOP class"
    raise ImageError(source, f"DICOM holds no pixel data ({kind}): not an image")
  frames = int(ds.get("NumberOfFrames") or 1)
  if frames > 1:
    raise ImageError(source, f"multi-frame DICOM ({frames} frames) is not supported: the model "
                     "takes one radiograph; extract the wanted frame")
  photometric = _photometric(ds)
  if photometric not in _MONOCHROME + _COLOUR:
    raise ImageError(source, "unsupported PhotometricInterpretation "
                     f"{photometric or '(missing)'!r}")
  syntax = _transfer_syntax(ds)
  if syntax is not None and syntax.is_compressed:
    _check_decoder(syntax, source)


def _check_decoder(syntax: Any, source: str) -> None:
  from pydicom import pixels as dicom_pixels
  try:
    decoder = dicom_pixels.get_decoder(syntax)
  except NotImplementedError as e:
    raise ImageError(source, f"pixel data uses transfer syntax {syntax.name} ({syntax}), which "
                     "pydicom cannot decode") from e
  if not decoder.is_available:
    needs = "; ".join(decoder.missing_dependencies) or "a decoding plugin"
    raise ImageError(source, f"pixel data is compressed with {syntax.name} ({syntax}) and no "
                     f"installed plugin decodes it (install one of: {needs})")


def _dicom_pixels(ds: Any, photometric: str, source: str) -> np.ndarray:
  """The stored values ``[H, W]`` (grayscale) or RGB ``[H, W, 3]`` (colour)."""
  from pydicom import pixels as dicom_pixels
  try:
    pixels = ds.pixel_array  # YBR_* come back as RGB (as_rgb=True)
    if photometric == "PALETTE COLOR":
      pixels = dicom_pixels.apply_color_lut(pixels, ds)
  except Exception as e:  # a decoder failure, truncated pixel data, inconsistent header...
    syntax = _transfer_syntax(ds)
    where = f" ({syntax.name})" if syntax is not None else ""
    raise ImageError(source, f"cannot decode DICOM pixel data{where} "
                     f"({type(e).__name__}: {e})") from e
  if pixels.ndim != (2 if photometric in _MONOCHROME else 3):
    raise ImageError(source, f"unexpected DICOM pixel array shape {pixels.shape}")
  return pixels


def _render_grayscale(pixels: np.ndarray, ds: Any, photometric: str, source: str) -> np.ndarray:
  """Stored ``[H, W]`` → Modality LUT → VOI LUT → MONOCHROME1 inverted: float64 ``[H, W]``."""
  from pydicom import pixels as dicom_pixels
  try:
    values = dicom_pixels.apply_modality_lut(pixels, ds)
    values = dicom_pixels.apply_voi_lut(values, ds, index=0)
  except Exception as e:  # e.g. a Window Width < 1, a malformed LUT Descriptor
    raise ImageError(source, f"cannot apply the DICOM modality/VOI LUT ({type(e).__name__}: "
                     f"{e})") from e
  values = np.asarray(values, np.float64)
  # Negating is enough: the min–max that follows turns -v into (max - v) / (max - min).
  return -values if photometric == "MONOCHROME1" else values


def _luminance(rgb: np.ndarray) -> np.ndarray:
  """RGB ``[H, W, 3]`` (whatever the stored colour interpretation) → luma float64 ``[H, W]``."""
  return rgb.astype(np.float64) @ _LUMA


def _minmax_unit(values: np.ndarray, source: str) -> np.ndarray:
  """float ``[H, W]`` → float32 ``[H, W]`` in [0, 1]; a constant image → zeros."""
  low, high = float(values.min()), float(values.max())
  if not (np.isfinite(low) and np.isfinite(high)):
    raise ImageError(source, "DICOM pixel values are not finite")
  if high <= low:
    return np.zeros(values.shape, np.float32)
  return ((values - low) / (high - low)).astype(np.float32)


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

