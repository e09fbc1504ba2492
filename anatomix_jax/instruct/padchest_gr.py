"""PadChest-GR → Phrase Grounding records.

Reads the released files like the reference (``instruction_tune/padchest_gr.py``):

  * ``grounded_reports_20240819.json``: a list of ``{"ImageID": ..., "findings": [{"sentence_en":
    ..., "boxes": [[x1, y1, x2, y2], ...] (normalised to [0, 1] of the original image), ...}]}``;
  * ``master_table.csv``: ``ImageID``, ``StudyID``, ``split`` (``train``/``validation``/``test``);
  * the PadChest label table ``PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv``: ``ImageID``,
    ``Projection``; only images with projection AP or PA (and a master-table row) are used.

Every finding with at least one box gives one record (in file order): its English sentence
(lower-cased when it starts upper-case and is not all upper-case) in one of 8 question templates,
and its **first** box only, letterboxed to the 1024 frame (image size from the image file's header)
and rounded to integers (``round``, half to even, as numpy's ``.round()``), in one of 8 answer
templates ("This sentence is located at the coordinates <box>(x1,y1),(x2,y2)</box> on the image.").
As in the reference one question and one answer are drawn per record (``random.Random(seed)
.choice``, question first); the split is the master table's.

The letterbox is the exact geometry of the images the loader builds; the reference used the
continuous ``scale = 1024 / max(H, W)``, ``pad = (1024 - side * scale) / 2`` (under a pixel apart
when ``max - min`` is odd).

Inputs: ``grounded_reports``, ``master_table``, ``reports_csv`` (the three files) and ``image_dir``
(the ``PadChest_GR`` image directory, holding ``{ImageID}``). Record ``image`` paths are the
``ImageID`` (relative to ``image_dir``). Missing images are counted skips.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Mapping
from typing import Any

from absl import logging

from anatomix_jax.data import images
from anatomix_jax.instruct import common, schema

SOURCE = "padchest_gr"
INPUT_KEYS = ("grounded_reports", "master_table", "reports_csv", "image_dir")
PROJECTIONS = ("AP", "PA")
SPLIT_NAMES = {"train": "train", "validation": "validate", "val": "validate",
               "validate": "validate", "test": "test"}

QUESTIONS = ("Please locate the following sentence: {}",
             "Identify the position of the following phrase in the CXR: {}",
             "Please show me the location of: {}",
             "Highlight the area of the following observation on the image: {}",
             "Where on the image can you see the following observation: {}",
             "Find the region corresponding to: {}",
             "Please indicate where this finding is located: {}",
             "Mark the area where you observe: {}")
ANSWERS = ("This sentence is located at the coordinates {} on the image.",
           "You'll find it at {} in the CXR.",
           "This phrase can be observed at {} on the image.",
           "The bounding box for this observation is {}.",
           "Its location is given by {}.",
           "It is displayed at {} in the radiograph.",
           "The area specified is at coordinates {}.",
           "This finding is located at {} in the image.")


def phrase(sentence: str) -> str:
  """The reference's case rule: lower-cased when it starts upper-case and is not all upper-case."""
  return sentence.lower() if sentence[:1].isupper() and not sentence.isupper() else sentence


def _master(path: str) -> dict[str, tuple[str, str]]:
  """{ImageID: (split, StudyID)}; a repeated image keeps its last row, like the reference."""
  out = {}
  for line, row in common.read_csv(path, ("ImageID", "StudyID", "split")):
    where = f"{path}:{line}"
    out[row["ImageID"].strip()] = (common.map_split(row["split"], SPLIT_NAMES, where),
                                   row["StudyID"].strip())
  return out


def _frontal(path: str) -> set[str]:
  return {row["ImageID"].strip() for _, row in common.read_csv(path, ("ImageID", "Projection"))
          if (row["Projection"] or "").strip() in PROJECTIONS}


def _box(value: Any, where: str) -> list[float]:
  if not isinstance(value, list) or len(value) != 4:
    raise schema.SchemaError(f"{where}: bad box: expected [x1, y1, x2, y2], got {value!r}")
  box = [common.number(v, where, "box") for v in value]
  if box[0] > box[2] or box[1] > box[3]:
    raise schema.SchemaError(f"{where}: bad box {value!r}: needs x1 <= x2 and y1 <= y2")
  return box


def _findings(path: str) -> list[tuple[str, list[tuple[str, str, list[float]]]]]:
  """[(ImageID, [(where, sentence_en, first box), ...]), ...] in file order, findings with boxes."""
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise schema.SchemaError(f"{path}: not valid JSON ({e})") from e
  if not isinstance(data, list):
    raise schema.SchemaError(f"{path}: expected a JSON list of images, got {type(data).__name__}")
  out = []
  for i, entry in enumerate(data):
    where = f"{path}: [{i}]"
    if not isinstance(entry, dict) or not isinstance(entry.get("ImageID"), str):
      raise schema.SchemaError(f"{where}: field 'ImageID' missing or not a string")
    findings = entry.get("findings", [])
    if not isinstance(findings, list):
      raise schema.SchemaError(f"{where}: field 'findings' must be a list")
    kept = []
    for j, finding in enumerate(findings):
      at = f"{where}.findings[{j}]"
      if not isinstance(finding, dict):
        raise schema.SchemaError(f"{at}: expected an object")
      boxes = finding.get("boxes") or []
      if not isinstance(boxes, list):
        raise schema.SchemaError(f"{at}: field 'boxes' must be a list")
      if not boxes:
        continue
      checked = [_box(b, f"{at}.boxes[{k}]") for k, b in enumerate(boxes)]
      sentence = finding.get("sentence_en")
      if not isinstance(sentence, str) or not sentence.strip():
        raise schema.SchemaError(f"{at}: field 'sentence_en' missing or empty")
      kept.append((at, sentence, checked[0]))
    out.append((entry["ImageID"].strip(), kept))
  return out


def build(inputs: Mapping[str, str], out_dir: str, *, seed: int = 2025) -> dict[str, int]:
  """Writes ``{out_dir}/padchest_gr/{split}.jsonl`` (see the module docstring).

  Args:
    inputs: ``grounded_reports``, ``master_table``, ``reports_csv``, ``image_dir``.
    out_dir: output root.
    seed: the drawn question and answer templates are a function of it.

  Returns:
    ``{split: records}`` plus ``skipped_missing_image`` and ``skipped_unreadable_image`` (images).

  Raises:
    schema.SchemaError: malformed JSON, a missing field or column, a bad box, an unknown split
      (file and field named).
  """
  paths = common.require_inputs(inputs, INPUT_KEYS, SOURCE, dirs=("image_dir",))
  master = _master(paths["master_table"])
  frontal = _frontal(paths["reports_csv"])
  entries = _findings(paths["grounded_reports"])
  rng = random.Random(seed)
  skips = common.Skips(SOURCE, ("missing_image", "unreadable_image"))
  by_split: dict[str, list[dict[str, Any]]] = {}
  excluded, sizes, per_image = 0, {}, {}
  for image_id, findings in entries:
    if image_id not in master or image_id not in frontal:
      excluded += bool(findings)
      continue
    split, study = master[image_id]
    for _, sentence, box in findings:
      if image_id not in sizes:
        try:
          sizes[image_id] = common.image_size(os.path.join(paths["image_dir"], image_id))
        except images.ImageError as e:
          sizes[image_id] = None
          skips.add(e.reason, str(e))
      if sizes[image_id] is None:
        continue
      height, width = sizes[image_id]
      pixels = [box[0] * width, box[1] * height, box[2] * width, box[3] * height]
      mapped = [round(v) for v in common.letterbox_box(pixels, height, width)]
      question = rng.choice(QUESTIONS).format(phrase(sentence))
      answer = rng.choice(ANSWERS).format(schema.boxed(mapped))
      k = per_image[image_id] = per_image.get(image_id, -1) + 1
      stem = os.path.splitext(image_id)[0]
      by_split.setdefault(split, []).append({
          "id": f"{stem}-pg{k}", "source": SOURCE, "split": split, "task": "Phrase Grounding",
          "image": image_id, "instructions": [question], "responses": [answer],
          "meta": {"image_id": image_id, "study_id": study, "sentence_en": sentence}})
  if excluded:
    logging.info("%s: %d images with grounded findings are not AP/PA or not in the master table",
                 SOURCE, excluded)
  counts = common.write_splits(out_dir, SOURCE, by_split)
  return {**counts, **skips.summary()}
