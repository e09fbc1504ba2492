"""What the instruction processors share: inputs, tables, image sizes, letterbox, skips, output.

Every processor module (``mimic``, ``mscxr``, ``vindr``, ``padchest_gr``, ...) exposes
``build(inputs, out_dir, *, seed=2025) -> dict[str, int]``; this module holds what they share:

  * :func:`require_inputs`: the ``inputs`` mapping has the keys the source needs, and they exist;
  * :func:`read_csv` / :func:`number`: CSV rows with named-column checks; a wrong schema raises
    :class:`schema.SchemaError` naming the file, line and column;
  * :func:`image_size`: ``(height, width)`` from an image file's header (PNG/JPEG via PIL, DICOM via
    pydicom when it is installed);
  * :func:`letterbox_box`: an original-pixel xyxy box → the CANVAS×CANVAS letterboxed frame, the
    exact geometry of :func:`anatomix_jax.data.images.letterbox` (which the stage-2 loader applies);
  * :class:`Skips`: counted, logged skips (missing images, ...), reported in the returned counts as
    ``skipped_{reason}``;
  * :func:`write_splits`: ``{out_dir}/{source}/{split}.jsonl`` for all three splits (empty ones too,
    so the loader always finds a file).
"""

from __future__ import annotations

import csv
import gzip
import io
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging
from PIL import Image

from anatomix_jax.data import images
from anatomix_jax.instruct import schema

_MAX_LOGGED = 20
DICOM_SUFFIXES = (".dcm", ".dicom")


def require_inputs(inputs: Mapping[str, str], keys: Sequence[str], source: str,
                   dirs: Sequence[str] = ()) -> dict[str, str]:
  """Checks that ``inputs`` names every key of ``keys`` and that those paths exist.

  Args:
    inputs: the caller's mapping of input names to paths.
    keys: the names this source needs.
    source: the source name, for messages.
    dirs: the keys that name directories (the others name files).

  Returns:
    A plain dict with exactly ``keys``.

  Raises:
    ValueError: a key is missing.
    FileNotFoundError: a path does not exist.
  """
  missing = [k for k in keys if k not in inputs or not inputs[k]]
  if missing:
    raise ValueError(f"{source}: inputs lack {missing} (needs {list(keys)}, got {sorted(inputs)})")
  out = {k: str(inputs[k]) for k in keys}
  for key, path in out.items():
    ok = os.path.isdir(path) if key in dirs else os.path.isfile(path)
    if not ok:
      kind = "directory" if key in dirs else "file"
      raise FileNotFoundError(f"{source}: inputs[{key!r}] = {path}: no such {kind}")
  return out


def _open_text(path: str) -> io.TextIOBase:
  with open(path, "rb") as f:
    gzipped = f.read(2) == b"\x1f\x8b"
  raw = gzip.open(path, "rb") if gzipped else open(path, "rb")
  # utf-8-sig: a byte-order mark would otherwise become part of the first column's name.
  return io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")


def read_csv(path: str, required: Sequence[str]) -> Iterator[tuple[int, dict[str, str]]]:
  """Yields ``(line number, row)`` of a CSV file (plain or gzipped) with a header.

  Raises:
    schema.SchemaError: the header lacks a required column, or the file is not readable CSV.
  """
  try:
    with _open_text(path) as f:
      reader = csv.DictReader(f)
      columns = reader.fieldnames or []
      missing = [c for c in required if c not in columns]
      if missing:
        raise schema.SchemaError(f"{path}: missing column(s) {missing} (has {columns})")
      for row in reader:
        yield reader.line_num, row
  except (UnicodeDecodeError, csv.Error, EOFError, gzip.BadGzipFile) as e:
    raise schema.SchemaError(f"{path}: not a readable CSV file ({type(e).__name__}: {e})") from e


def number(value: Any, where: str, field: str) -> float:
  """A finite number from a CSV cell or JSON value.

  Raises:
    schema.SchemaError: ``"{where}: column/field {field!r} ..."`` when it is not one.
  """
  if isinstance(value, bool):
    raise schema.SchemaError(f"{where}: {field!r} is not a number: {value!r}")
  try:
    result = float(value.strip() if isinstance(value, str) else value)
  except (TypeError, ValueError):
    raise schema.SchemaError(f"{where}: {field!r} is not a number: {value!r}") from None
  if not math.isfinite(result):
    raise schema.SchemaError(f"{where}: {field!r} is not a finite number: {value!r}")
  return result


def map_split(value: str, mapping: Mapping[str, str], where: str, field: str = "split") -> str:
  """A dataset's own split name → ``"train"``/``"validate"``/``"test"``.

  Raises:
    schema.SchemaError: an unknown split name.
  """
  key = (value or "").strip()
  if key not in mapping:
    raise schema.SchemaError(f"{where}: {field!r} must be one of {sorted(mapping)}, got {value!r}")
  return mapping[key]


def _dicom_size(path: str) -> tuple[int, int]:
  try:
    import pydicom  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ImportError(
        f"{path} is a DICOM file; reading its size needs pydicom (pip install pydicom), or pass "
        "images converted to PNG at the original resolution instead") from None
  try:
    header = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    return int(header.Rows), int(header.Columns)
  except FileNotFoundError as e:
    raise images.ImageError(path, "image file does not exist", reason="missing_image") from e
  except Exception as e:  # pydicom raises InvalidDicomError, AttributeError (no Rows), ...
    raise images.ImageError(path, f"cannot read the DICOM header ({type(e).__name__}: {e})") from e


def image_size(path: str) -> tuple[int, int]:
  """``(height, width)`` of an image file, from its header only.

  PNG/JPEG (8- or 16-bit) are read with PIL; ``.dcm``/``.dicom`` files with pydicom.

  Raises:
    images.ImageError: the file is missing (reason ``missing_image``) or unreadable.
    ImportError: a DICOM file while pydicom is not installed (the message says what to do).
  """
  if path.lower().endswith(DICOM_SUFFIXES):
    return _dicom_size(path)
  try:
    with Image.open(path) as pil:
      width, height = pil.size
  except FileNotFoundError as e:
    raise images.ImageError(path, "image file does not exist", reason="missing_image") from e
  except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
    raise images.ImageError(path, f"cannot read the image header ({type(e).__name__}: {e})") from e
  return int(height), int(width)


def letterbox_box(box: Sequence[float], height: int, width: int) -> list[float]:
  """One xyxy box in original-image pixels → float xyxy on the CANVAS letterboxed frame."""
  transform = images.letterbox_transform(int(height), int(width), schema.CANVAS)
  return [float(v) for v in images.map_boxes(np.asarray(box, np.float64), transform)]


def by_position(boxes: Sequence[Sequence[float]]) -> list[list[float]]:
  """Boxes sorted by (x1, y1), as the reference orders every multi-box answer."""
  return [list(b) for b in sorted(boxes, key=lambda b: (b[0], b[1]))]


class Skips:
  """Counts skipped inputs per reason and logs the first few of each (absl logging)."""

  def __init__(self, source: str, reasons: Sequence[str]):
    self.source = source
    self.counts = {r: 0 for r in reasons}

  def add(self, reason: str, message: str) -> None:
    self.counts[reason] = self.counts.get(reason, 0) + 1
    if self.counts[reason] <= _MAX_LOGGED:
      logging.warning("%s: skipped (%s): %s", self.source, reason, message)
    elif self.counts[reason] == _MAX_LOGGED + 1:
      logging.warning("%s: more %s skips; only counting from now on", self.source, reason)

  def summary(self) -> dict[str, int]:
    return {f"skipped_{r}": n for r, n in self.counts.items()}


def write_splits(out_dir: str, source: str, by_split: Mapping[str, Sequence[Mapping[str, Any]]]
                 ) -> dict[str, int]:
  """Writes ``{out_dir}/{source}/{split}.jsonl`` for every split in ``schema.SPLITS``.

  Returns:
    ``{split: records written}``.
  """
  counts = {}
  for split in schema.SPLITS:
    path = os.path.join(out_dir, source, f"{split}.jsonl")
    counts[split] = schema.write_jsonl(path, by_split.get(split, ()))
  logging.info("%s: wrote %s to %s", source, counts, os.path.join(out_dir, source))
  return counts
