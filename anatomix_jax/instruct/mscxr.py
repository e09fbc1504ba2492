"""MS-CXR v1.1.0 → Phrase Grounding, Grounded Captioning and Grounded Diagnosis records.

Reads ``MS_CXR_Local_Alignment_v1.1.0.csv`` (one row per box: ``dicom_id``, ``category_name``,
``label_text``, ``path`` (MIMIC-CXR-JPG relative, ``files/pXX/pSUBJECT/sSTUDY/{dicom_id}.jpg``),
``x``, ``y``, ``w``, ``h`` (original pixels), ``image_width``, ``image_height``, ``split``
(``train``/``val``/``test``)) like the reference (``instruction_tune/ms_cxr.py``):

  * rows are grouped by (dicom_id, label_text), groups in sorted key order (pandas ``groupby``);
  * each group's boxes are letterboxed to the 1024 frame (image size from the CSV's
    ``image_width``/``image_height``), rounded to integers (``round``, half to even, as numpy's
    ``.round()``) and sorted by (x1, y1);
  * per group three records, written Phrase Grounding first, then Grounded Captioning, then Grounded
    Diagnosis (the reference's ``a[split] + b[split] + c[split]``):

    - Phrase Grounding: "Please locate the following phrase: {label_text}" (2 templates) →
      ``<ref>{label_text}</ref><box>(x1,y1),(x2,y2)</box>`` repeated per box;
    - Grounded Captioning: "Please generate a caption for the following region(s): {boxes}"
      (2 templates) → ``label_text``;
    - Grounded Diagnosis: "Please give the corresponding diagnosis for the following region(s):
      {boxes}" (2 templates) → ``category_name``;

  * the split is the CSV's own ``split`` column of the group's first row (``val`` → ``validate``).

The letterbox is the exact geometry of the images the loader builds
(:func:`anatomix_jax.data.images.letterbox_transform`); the reference used the continuous
``scale = 1024 / max(H, W)``, ``pad = (1024 - side * scale) / 2``, which differs by under a pixel
when ``max - min`` is odd.

Inputs: ``mscxr_csv`` (the CSV) and ``mimic_dir`` (the MIMIC-CXR-JPG root the ``path`` column is
relative to; record ``image`` paths are that ``path``). Groups whose image is missing are counted
skips.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from anatomix_jax.instruct import common, schema

SOURCE = "mscxr"
INPUT_KEYS = ("mscxr_csv", "mimic_dir")
COLUMNS = ("dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h", "image_width",
           "image_height", "split")
SPLIT_NAMES = {"train": "train", "val": "validate", "validate": "validate", "test": "test"}

PHRASE_GROUNDING = ("Please locate the following phrase: {phrase}",
                    "Identify the position of the following finding in the CXR: {phrase}")
GROUNDED_CAPTIONING = ("Please generate a caption for the following region(s): {boxes}",
                       "Describe the content of the following region(s): {boxes}")
GROUNDED_DIAGNOSIS = (
    "Please give the corresponding diagnosis for the following region(s): {boxes}",
    "Provide a diagnosis based on the content of the following region(s): {boxes}")
_STUDY = re.compile(r"/s(\d+)/")


def _box(row: dict[str, str], where: str) -> tuple[list[float], int, int]:
  """(original xyxy, height, width) of one CSV row."""
  x, y, w, h = (common.number(row[c], where, c) for c in ("x", "y", "w", "h"))
  if w < 0 or h < 0:
    raise schema.SchemaError(f"{where}: bad box: columns 'w'/'h' must be >= 0, got {w}, {h}")
  height = common.number(row["image_height"], where, "image_height")
  width = common.number(row["image_width"], where, "image_width")
  if height <= 0 or width <= 0 or not height.is_integer() or not width.is_integer():
    raise schema.SchemaError(f"{where}: columns 'image_height'/'image_width' must be positive "
                             f"integers, got {row['image_height']!r}, {row['image_width']!r}")
  return [x, y, x + w, y + h], int(height), int(width)


def _group_rows(path: str) -> dict[tuple[str, str], list[tuple[str, dict[str, str]]]]:
  groups: dict[tuple[str, str], list[tuple[str, dict[str, str]]]] = {}
  for line, row in common.read_csv(path, COLUMNS):
    where = f"{path}:{line}"
    for column in ("dicom_id", "label_text", "category_name", "path"):
      if not (row[column] or "").strip():
        raise schema.SchemaError(f"{where}: column {column!r} is empty")
    groups.setdefault((row["dicom_id"], row["label_text"]), []).append((where, row))
  return dict(sorted(groups.items()))


def group_boxes(rows: list[tuple[str, dict[str, str]]]) -> list[list[int]]:
  """The group's boxes on the 1024 frame: letterboxed, rounded, sorted by (x1, y1)."""
  boxes = []
  for where, row in rows:
    box, height, width = _box(row, where)
    boxes.append([round(v) for v in common.letterbox_box(box, height, width)])
  return common.by_position(boxes)


def _records(key: int, dicom_id: str, split: str, image: str, rows: list[tuple[str, dict[str, str]]]
             ) -> list[dict[str, Any]]:
  """The group's three records (PG, GC, GD), in that order."""
  first = rows[0][1]
  phrase, category = first["label_text"], first["category_name"]
  boxes = group_boxes(rows)
  boxes_text = "".join(schema.boxed(b) for b in boxes)
  study = _STUDY.search("/" + first["path"])
  meta = {"dicom_id": dicom_id, "label_text": phrase, "category_name": category}
  if study:
    meta["study_id"] = study.group(1)
  base = {"source": SOURCE, "split": split, "image": image, "meta": meta}
  return [
      {**base, "id": f"{dicom_id}-pg{key}", "task": "Phrase Grounding",
       "instructions": [t.format(phrase=phrase) for t in PHRASE_GROUNDING],
       "responses": ["".join(f"<ref>{phrase}</ref>{schema.boxed(b)}" for b in boxes)]},
      {**base, "id": f"{dicom_id}-gc{key}", "task": "Grounded Captioning",
       "instructions": [t.format(boxes=boxes_text) for t in GROUNDED_CAPTIONING],
       "responses": [phrase]},
      {**base, "id": f"{dicom_id}-gd{key}", "task": "Grounded Diagnosis",
       "instructions": [t.format(boxes=boxes_text) for t in GROUNDED_DIAGNOSIS],
       "responses": [category]},
  ]


def build(inputs: Mapping[str, str], out_dir: str, *, seed: int = 2025) -> dict[str, int]:
  """Writes ``{out_dir}/mscxr/{split}.jsonl`` (see the module docstring).

  Args:
    inputs: ``mscxr_csv`` and ``mimic_dir``.
    out_dir: output root.
    seed: unused (no random choice); kept for the common signature.

  Returns:
    ``{split: records}`` plus ``skipped_missing_image`` (images, each costing its groups' records).

  Raises:
    schema.SchemaError: a missing column, an empty id/text cell, a non-numeric or negative box
      size, a bad image size or an unknown split value (file, line and column named).
  """
  del seed
  paths = common.require_inputs(inputs, INPUT_KEYS, SOURCE, dirs=("mimic_dir",))
  skips = common.Skips(SOURCE, ("missing_image",))
  missing: set[str] = set()
  by_task: dict[str, dict[str, list[dict[str, Any]]]] = {}
  per_image: dict[str, int] = {}
  for (dicom_id, _), rows in _group_rows(paths["mscxr_csv"]).items():
    where, first = rows[0]
    split = common.map_split(first["split"], SPLIT_NAMES, where)
    image = first["path"].strip()
    key = per_image[dicom_id] = per_image.get(dicom_id, -1) + 1
    if not os.path.isfile(os.path.join(paths["mimic_dir"], image)):
      if image not in missing:
        missing.add(image)
        skips.add("missing_image", f"{dicom_id}: {os.path.join(paths['mimic_dir'], image)} "
                  "does not exist")
      group_boxes(rows)  # the rows are still checked
      continue
    for record in _records(key, dicom_id, split, image, rows):
      by_task.setdefault(record["task"], {}).setdefault(split, []).append(record)
  by_split = {split: [r for task in ("Phrase Grounding", "Grounded Captioning",
                                     "Grounded Diagnosis")
                      for r in by_task.get(task, {}).get(split, [])]
              for split in schema.SPLITS}
  counts = common.write_splits(out_dir, SOURCE, by_split)
  return {**counts, **skips.summary()}
