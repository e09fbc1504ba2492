"""The stage-2 instruction record: one schema for all nine sources (REFERENCE.md §4).

A processor turns a released dataset into JSON Lines files ``{out_dir}/{source}/{split}.jsonl``,
one record per line. A record is the reference's sample (``InstructionData``) made explicit:

  ============  ===================  ======================================================
  field         type                 meaning
  ============  ===================  ======================================================
  id            str                  unique within (source, split)
  source        str                  one of SOURCES ("mimic_report_gen", "mscxr", ...)
  split         str                  "train", "validate" or "test"
  task          str                  one of TASKS (the reference's task strings)
  image         str                  image path relative to the source's image root
  instructions  list[str] (≥1)       paraphrased user instructions; one is drawn per load
  responses     list[str] (≥1)       paraphrased answers; one is drawn per load
  boxes         list[[x1,y1,x2,y2]]  optional: boxes whose ``__BOX{i}__`` placeholders the
                                     responses hold (anatomy grounding), filled at load
                                     time after augmentation
  meta          dict                 optional source-specific facts (e.g. dicom_id, label)
  ============  ===================  ======================================================

Coordinates, in ``boxes`` and inside instruction/response text, are pixels of the image after
letterboxing to CANVAS×CANVAS (``anatomix_jax.data.images.letterbox_transform``), xyxy; in text
they are written ``(x1,y1),(x2,y2)`` with integer truncation, as the reference does.
The context block (APM boxes and retrieved sentences) is not part of a record: it is built at
load time for every task (``anatomix_jax.stage2.prompt``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

CANVAS = 1024
SPLITS = ("train", "validate", "test")
SOURCES = ("mimic_report_gen", "anatomy_grounding", "mscxr", "vindr_instruct", "padchest_gr",
           "mimic_vqa", "slake", "radialog_instruct", "mimic_cxr_classification")
TASKS = ("Report Generation", "Anatomy Grounding", "Phrase Grounding", "Grounded Captioning",
         "Grounded Diagnosis", "Abnormality Detection", "Close-Ended VQA", "Open-Ended VQA",
         "RQA", "Image Classification")
# Tasks whose answers hold coordinates: their images are never augmented (REFERENCE.md §2).
NO_AUG_TASKS = frozenset({"Grounded Captioning", "Grounded Diagnosis", "Phrase Grounding",
                          "Abnormality Detection", "Anatomy Grounding"})
_REQUIRED = ("id", "source", "split", "task", "image", "instructions", "responses")
_OPTIONAL = ("boxes", "meta")


class SchemaError(ValueError):
  """A record, or a dataset file, that does not follow the expected schema."""


def box_text(box: Sequence[float]) -> str:
  """xyxy pixels → ``"(x1,y1),(x2,y2)"``, truncating toward zero like ``tensor.to(torch.int)``."""
  if len(box) != 4:
    raise SchemaError(f"a box needs 4 numbers (x1, y1, x2, y2), got {list(box)}")
  if not all(math.isfinite(float(v)) for v in box):
    raise SchemaError(f"box {list(box)} has a non-finite coordinate")
  x1, y1, x2, y2 = (int(float(v)) for v in box)
  return f"({x1},{y1}),({x2},{y2})"


def boxed(box: Sequence[float]) -> str:
  """``"<box>(x1,y1),(x2,y2)</box>"``."""
  return f"<box>{box_text(box)}</box>"


def validate(record: Mapping[str, Any], where: str = "<record>") -> dict[str, Any]:
  """Checks one record against the schema above; returns it as a plain dict.

  Raises:
    SchemaError: naming ``where`` and the offending field.
  """
  if not isinstance(record, Mapping):
    raise SchemaError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
  missing = [k for k in _REQUIRED if k not in record]
  if missing:
    raise SchemaError(f"{where}: missing field(s) {missing}")
  unknown = sorted(set(record) - set(_REQUIRED) - set(_OPTIONAL))
  if unknown:
    raise SchemaError(f"{where}: unknown field(s) {unknown}")
  for key in ("id", "source", "split", "task", "image"):
    if not isinstance(record[key], str) or not record[key]:
      raise SchemaError(f"{where}: field {key!r} must be a non-empty string, got {record[key]!r}")
  for key, allowed in (("source", SOURCES), ("split", SPLITS), ("task", TASKS)):
    if record[key] not in allowed:
      raise SchemaError(f"{where}: {key} {record[key]!r} is not one of {list(allowed)}")
  for key in ("instructions", "responses"):
    value = record[key]
    if (not isinstance(value, list) or not value
        or not all(isinstance(s, str) and s for s in value)):
      raise SchemaError(f"{where}: field {key!r} must be a non-empty list of non-empty strings")
  boxes = record.get("boxes")
  if boxes is not None:
    if not isinstance(boxes, list):
      raise SchemaError(f"{where}: field 'boxes' must be a list of [x1, y1, x2, y2]")
    for i, box in enumerate(boxes):
      if (not isinstance(box, list) or len(box) != 4
          or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)):
        raise SchemaError(f"{where}: boxes[{i}] must be 4 finite numbers, got {box!r}")
      if not (box[0] <= box[2] and box[1] <= box[3]):
        raise SchemaError(f"{where}: boxes[{i}] {box} is not x1 <= x2, y1 <= y2")
  if "meta" in record and not isinstance(record["meta"], Mapping):
    raise SchemaError(f"{where}: field 'meta' must be an object")
  return dict(record)


def write_jsonl(path: str, records: Iterable[Mapping[str, Any]]) -> int:
  """Validates and writes records atomically (temp file + rename); returns the count."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = path + ".tmp"
  n = 0
  with open(tmp, "w", encoding="utf-8") as f:
    for n, record in enumerate(records, start=1):
      f.write(json.dumps(validate(record, f"{path} record {n}"), ensure_ascii=False) + "\n")
  os.replace(tmp, path)
  return n


def read_jsonl(path: str) -> Iterator[dict[str, Any]]:
  """Yields validated records of a JSON Lines file.

  Raises:
    SchemaError: naming the file and line of a malformed record.
  """
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise SchemaError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
      yield validate(record, f"{path}:{line_no}")
