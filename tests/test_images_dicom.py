"""DICOM rendering, read_radiograph's format detection, and the grounding overlay.

Every DICOM is built here with pydicom (uncompressed Explicit VR Little Endian unless a test says
otherwise) from known pixels; the expected values are computed in numpy from the DICOM standard's
definitions (Modality LUT: m = slope * stored + intercept; linear VOI: PS3.3 C.11.2.1.2.1;
MONOCHROME1: minimum is white), or decoded independently with OpenCV/PIL.
"""

from __future__ import annotations

import io

import cv2
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.uid import (ComprehensiveSRStorage, DigitalXRayImageStorageForPresentation,
                         ExplicitVRLittleEndian, JPEGLosslessSV1, RLELossless,
                         SecondaryCaptureImageStorage, generate_uid)

from anatomix_jax.data import images
from anatomix_jax.evaluation import overlays

RNG = np.random.default_rng(20250101)
# 40 rows × 30 columns: not square, so a transposed result would not pass.
PIXELS16 = RNG.integers(300, 60000, size=(40, 30)).astype(np.uint16)


# --------------------------------------------------------------------------------------------------
# Building DICOMs and the numpy references
# --------------------------------------------------------------------------------------------------


def _file_dataset(sop_class=DigitalXRayImageStorageForPresentation,
                  transfer_syntax=ExplicitVRLittleEndian) -> FileDataset:
  meta = FileMetaDataset()
  meta.TransferSyntaxUID = transfer_syntax
  meta.MediaStorageSOPClassUID = sop_class
  meta.MediaStorageSOPInstanceUID = generate_uid()
  ds = FileDataset("test.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
  ds.SOPClassUID = sop_class
  ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
  ds.Modality = "DX"
  return ds


def _to_bytes(ds: FileDataset) -> bytes:
  buf = io.BytesIO()
  ds.save_as(buf, enforce_file_format=True)
  return buf.getvalue()


def make_dicom(stored: np.ndarray, *, photometric: str = "MONOCHROME2", bits_allocated: int = 16,
               bits_stored: int | None = None, signed: bool = False, frames: int = 1,
               **elements) -> bytes:
  """A grayscale DICOM whose PixelData holds exactly ``stored`` (raw container words)."""
  ds = _file_dataset()
  bits_stored = bits_allocated if bits_stored is None else bits_stored
  ds.Rows, ds.Columns = stored.shape[-2:]
  ds.SamplesPerPixel = 1
  ds.PhotometricInterpretation = photometric
  ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits_allocated, bits_stored, bits_stored - 1
  ds.PixelRepresentation = int(signed)
  if frames > 1:
    ds.NumberOfFrames = frames
  for key, value in elements.items():
    setattr(ds, key, value)
  dtype = {8: "u1", 16: "<u2"}[bits_allocated]
  ds.PixelData = np.ascontiguousarray(stored).astype(dtype).tobytes()
  return _to_bytes(ds)


def minmax(values: np.ndarray) -> np.ndarray:
  values = np.asarray(values, np.float64)
  return (values - values.min()) / (values.max() - values.min())


def linear_voi(x: np.ndarray, center: float, width: float, y_min: float = 0.0,
               y_max: float = 255.0) -> np.ndarray:
  """PS3.3 C.11.2.1.2.1, written out as the standard states it."""
  x = np.asarray(x, np.float64)
  y = ((x - (center - 0.5)) / (width - 1) + 0.5) * (y_max - y_min) + y_min
  y = np.where(x <= center - 0.5 - (width - 1) / 2, y_min, y)
  return np.where(x > center - 0.5 + (width - 1) / 2, y_max, y)


def write(tmp_path, name: str, data: bytes) -> str:
  path = tmp_path / name
  path.write_bytes(data)
  return str(path)


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


def test_monochrome2_16bit_is_minmax_of_the_pixels():
  out = images.decode_dicom(make_dicom(PIXELS16))
  assert out.dtype == np.float32 and out.shape == (40, 30)
  np.testing.assert_allclose(out, minmax(PIXELS16), atol=1e-7)
  assert out.min() == 0.0 and out.max() == 1.0


def test_monochrome1_is_inverted_to_the_monochrome2_rendering():
  mono2 = images.decode_dicom(make_dicom(PIXELS16))
  mono1 = images.decode_dicom(make_dicom(PIXELS16.max() - PIXELS16, photometric="MONOCHROME1"))
  np.testing.assert_array_equal(mono1, mono2)
  np.testing.assert_allclose(mono1, minmax(PIXELS16), atol=1e-7)


def test_rescale_slope_and_intercept():
  stored = RNG.integers(0, 4096, size=(16, 12)).astype(np.uint16)
  data = make_dicom(stored, bits_stored=12, RescaleSlope="0.5", RescaleIntercept="-1024")
  np.testing.assert_allclose(images.decode_dicom(data), minmax(0.5 * stored.astype(np.float64)
                                                               - 1024), atol=1e-7)


def test_window_after_rescale_follows_the_standards_linear_formula():
  stored = np.linspace(0, 4095, 24 * 18).reshape(24, 18).astype(np.uint16)
  # Two windows: the first is used. It cuts both ends of the rescaled range [-1024, 7166].
  data = make_dicom(stored, bits_stored=12, RescaleSlope="2", RescaleIntercept="-1024",
                    WindowCenter=["1500", "300"], WindowWidth=["2000", "800"])
  modality = 2.0 * stored.astype(np.float64) - 1024
  expected = minmax(linear_voi(modality, center=1500, width=2000))
  out = images.decode_dicom(data)
  np.testing.assert_allclose(out, expected, atol=1e-6)
  assert (out == 0).sum() > 10 and (out == 1).sum() > 10  # both clips were exercised


def test_window_on_monochrome1_is_applied_before_the_inversion():
  stored = np.linspace(0, 4095, 20 * 10).reshape(20, 10).astype(np.uint16)
  data = make_dicom(stored, photometric="MONOCHROME1", bits_stored=12, WindowCenter="2000",
                    WindowWidth="1000")
  expected = 1.0 - minmax(linear_voi(stored, center=2000, width=1000))
  np.testing.assert_allclose(images.decode_dicom(data), expected, atol=1e-6)


def test_voi_lut_sequence():
  stored = RNG.integers(900, 1400, size=(12, 9)).astype(np.uint16)
  first, lut = 1000, np.rint(np.sqrt(np.arange(256) / 255) * 65535).astype(np.uint16)
  item = Dataset()
  item.LUTDescriptor = [256, first, 16]
  item.add_new(0x00283006, "US", lut.tolist())  # LUT Data: "US or OW" in the dictionary
  data = make_dicom(stored, VOILUTSequence=[item])
  # PS3.3 C.11.2.1.1: inputs below the first mapped value take the first entry, above the last one.
  expected = minmax(lut[np.clip(stored.astype(np.int64) - first, 0, 255)])
  np.testing.assert_allclose(images.decode_dicom(data), expected, atol=1e-7)


def test_12_bits_stored_in_16_ignores_the_unused_high_bits():
  values = RNG.integers(0, 4096, size=(10, 14)).astype(np.uint16)
  junk = values | np.uint16(0xA000)  # e.g. an old overlay plane in the unused bits
  out = images.decode_dicom(make_dicom(junk, bits_stored=12))
  np.testing.assert_allclose(out, minmax(values), atol=1e-7)


def test_signed_12_bits_are_sign_extended():
  values = RNG.integers(-2048, 2048, size=(10, 14))
  values[0, :2] = -2048, 2047
  twos_complement_12 = (values & 0xFFF).astype(np.uint16)
  out = images.decode_dicom(make_dicom(twos_complement_12, bits_stored=12, signed=True))
  np.testing.assert_allclose(out, minmax(values), atol=1e-7)


def test_8_bit_dicom():
  values = RNG.integers(10, 250, size=(9, 11)).astype(np.uint8)
  out = images.decode_dicom(make_dicom(values, bits_allocated=8))
  np.testing.assert_allclose(out, minmax(values), atol=1e-7)


def test_constant_image_is_zeros():
  out = images.decode_dicom(make_dicom(np.full((5, 6), 700, np.uint16)))
  np.testing.assert_array_equal(out, np.zeros((5, 6), np.float32))


def test_rgb_dicom_becomes_bt601_luminance():
  rgb = RNG.integers(0, 256, size=(8, 10, 3)).astype(np.uint8)
  ds = _file_dataset(sop_class=SecondaryCaptureImageStorage)
  ds.Rows, ds.Columns = rgb.shape[:2]
  ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
  ds.PhotometricInterpretation = "RGB"
  ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
  ds.PixelData = rgb.tobytes()
  luma = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
  np.testing.assert_allclose(images.decode_dicom(_to_bytes(ds)), minmax(luma), atol=1e-6)


# --------------------------------------------------------------------------------------------------
# read_radiograph: detection by content, PNG and JPEG
# --------------------------------------------------------------------------------------------------


def test_16bit_png_of_the_rendered_pixels_matches_the_dicom(tmp_path):
  stored = np.linspace(0, 4095, 30 * 22).reshape(30, 22).astype(np.uint16)
  dcm = write(tmp_path, "a.dcm", make_dicom(stored, bits_stored=12, WindowCenter="1800",
                                            WindowWidth="2400"))
  # What a dataset's DICOM → 16-bit PNG conversion stores, computed from the standard.
  rendered = minmax(linear_voi(stored, center=1800, width=2400))
  png16 = np.rint(rendered * 65535).astype(np.uint16)
  png = str(tmp_path / "a.png")
  assert cv2.imwrite(png, png16)
  from_png, from_dicom = images.read_radiograph(png), images.read_radiograph(dcm)
  assert from_png.dtype == np.float32 and from_dicom.dtype == np.float32
  np.testing.assert_allclose(from_png, png16 / 65535.0, atol=1e-7)
  np.testing.assert_allclose(from_png, from_dicom, atol=1 / 65535)
  # And the same model input: the stage-2 letterbox then min–max stretch.
  to_input = lambda x: images.minmax_stretch(images.letterbox(x, 64)[0]).astype(int)  # noqa: E731
  assert np.abs(to_input(from_png) - to_input(from_dicom)).max() <= 1


def test_8bit_png_and_jpeg(tmp_path):
  gray = RNG.integers(0, 256, size=(33, 47)).astype(np.uint8)
  png = str(tmp_path / "g.png")
  assert cv2.imwrite(png, gray)
  out = images.read_radiograph(png)
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, gray / 255.0, rtol=0, atol=1e-7)
  jpg = str(tmp_path / "g.jpg")
  Image.fromarray(gray).save(jpg, quality=95)
  reference = np.asarray(Image.open(jpg).convert("L"), np.float64) / 255.0
  np.testing.assert_allclose(images.read_radiograph(jpg), reference, rtol=0, atol=1e-7)


def test_dicom_is_detected_by_content_not_name(tmp_path):
  data = make_dicom(PIXELS16)
  for name in ("scan", "scan.png", "SCAN.DCM"):
    np.testing.assert_allclose(images.read_radiograph(write(tmp_path, name, data)),
                               minmax(PIXELS16), atol=1e-7)


# --------------------------------------------------------------------------------------------------
# Errors name the file
# --------------------------------------------------------------------------------------------------


def _raises(path: str, *words: str) -> images.ImageError:
  with pytest.raises(images.ImageError) as e:
    images.read_radiograph(path)
  message = str(e.value)
  assert path in message, message
  for word in words:
    assert word.lower() in message.lower(), message
  return e.value


def test_non_image_files(tmp_path):
  _raises(write(tmp_path, "notes.txt", b"not an image at all\n" * 20), "cannot decode")
  _raises(write(tmp_path, "fake.dcm", b"not an image at all\n" * 20), "DICM")
  with pytest.raises(images.ImageError, match="x.bin: not a DICOM"):
    images.decode_dicom(b"\0" * 200, source="x.bin")


def test_empty_and_missing_files(tmp_path):
  _raises(write(tmp_path, "empty.dcm", b""), "empty")
  assert _raises(str(tmp_path / "nowhere.dcm"), "does not exist").reason == "missing_image"


def test_dicom_without_pixel_data(tmp_path):
  ds = _file_dataset(sop_class=ComprehensiveSRStorage)
  ds.Modality = "SR"
  ds.ValueType = "CONTAINER"
  _raises(write(tmp_path, "report.dcm", _to_bytes(ds)), "no pixel data")


def test_multi_frame_is_an_error(tmp_path):
  two = np.stack([PIXELS16, PIXELS16])
  _raises(write(tmp_path, "multi.dcm", make_dicom(two, frames=2)), "multi-frame", "2 frames")


def test_truncated_pixel_data(tmp_path):
  ds = pydicom.dcmread(io.BytesIO(make_dicom(PIXELS16)))
  ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
  _raises(write(tmp_path, "short.dcm", _to_bytes(ds)), "pixel data")


def test_compressed_with_a_decoder_is_decoded():
  ds = pydicom.dcmread(io.BytesIO(make_dicom(PIXELS16)))
  ds.compress(RLELossless)  # pydicom's own RLE encoder and decoder: no extra package
  assert ds.file_meta.TransferSyntaxUID == RLELossless
  np.testing.assert_allclose(images.decode_dicom(_to_bytes(ds)), minmax(PIXELS16), atol=1e-7)


def test_compressed_without_a_decoder_names_the_transfer_syntax(tmp_path):
  if get_decoder(JPEGLosslessSV1).is_available:
    pytest.skip("a JPEG Lossless decoder (pylibjpeg or GDCM) is installed here")
  ds = _file_dataset(transfer_syntax=JPEGLosslessSV1)
  ds.Rows, ds.Columns, ds.SamplesPerPixel = 4, 4, 1
  ds.PhotometricInterpretation = "MONOCHROME2"
  ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
  ds.PixelData = encapsulate([b"\xff\xd8\xff\xd9"])
  ds["PixelData"].VR = "OB"
  ds["PixelData"].is_undefined_length = True
  _raises(write(tmp_path, "lossless.dcm", _to_bytes(ds)), "JPEG Lossless", JPEGLosslessSV1,
          "pylibjpeg")


# --------------------------------------------------------------------------------------------------
# Grounding overlay
# --------------------------------------------------------------------------------------------------


def _colour(pil: Image.Image, x: int, y: int) -> tuple[int, int, int]:
  return tuple(int(v) for v in np.asarray(pil)[y, x])


def test_draw_grounding_boxes_land_on_the_scaled_coordinates():
  gray = np.linspace(0.2, 0.8, 300 * 600, dtype=np.float32).reshape(300, 600)  # H 300, W 600
  anatomy = np.array([[100, 200, 400, 600], [np.nan, 0, 10, 10]])  # the NaN box is skipped
  answer = np.array([[512, 512, 1024, 1024]])
  pil = overlays.draw_grounding(gray, anatomy, ["Left lung", "absent"], answer, ["effusion"])
  assert pil.mode == "RGB" and pil.size == (600, 300)
  sx, sy = 600 / 1024, 300 / 1024
  # Anatomy box: thin (1 px) on its outermost columns/rows.
  left, top = round(100 * sx), round(200 * sy)
  right, bottom = round(400 * sx) - 1, round(600 * sy) - 1
  mid_y, mid_x = (top + bottom) // 2, (left + right) // 2
  for x, y in ((left, mid_y), (right, mid_y), (mid_x, bottom)):
    assert _colour(pil, x, y) == overlays.ANATOMY_COLOUR, (x, y)
  for x, y in ((left - 1, mid_y), (left + 1, mid_y), (right + 1, mid_y), (mid_x, bottom + 1)):
    r, g, b = _colour(pil, x, y)
    assert r == g == b == round(float(gray[y, x]) * 255), (x, y)
  # Answer box: thick (3 px at this size), reaching the image's right and bottom borders.
  a_left, a_top = round(512 * sx), round(512 * sy)
  a_mid_y = (a_top + 299) // 2
  for dx in range(3):
    assert _colour(pil, a_left + dx, a_mid_y) == overlays.ANSWER_COLOUR
    assert _colour(pil, 599 - dx, a_mid_y) == overlays.ANSWER_COLOUR
  r, g, b = _colour(pil, a_left + 3, a_mid_y)
  assert r == g == b
  # Its label: a filled tag just above the box's top-left corner.
  assert _colour(pil, a_left, a_top - 1) == overlays.ANSWER_COLOUR


def test_draw_grounding_without_boxes_is_the_gray_image():
  gray = RNG.random((20, 30)).astype(np.float32)
  pil = overlays.draw_grounding(gray[..., None], None, None, np.zeros((0, 4)), [])
  expected = np.rint(gray * 255).astype(np.uint8)
  np.testing.assert_array_equal(np.asarray(pil), np.stack([expected] * 3, axis=-1))


def test_draw_grounding_rejects_mismatched_labels():
  with pytest.raises(ValueError, match="2 boxes but 1 labels"):
    overlays.draw_grounding(np.zeros((8, 8)), np.zeros((2, 4)), ["one"], None, None)
