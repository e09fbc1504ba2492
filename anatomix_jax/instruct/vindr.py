"""VinDr-CXR → Abnormality Detection, Phrase Grounding and Grounded Diagnosis records.

Reads the released ``annotations/annotations_train.csv`` and ``annotations_test.csv`` (one row
per radiologist box: ``image_id``, ``class_name``, ``x_min``, ``y_min``, ``x_max``, ``y_max`` in
original pixels; ``rad_id`` is not used; ``"No finding"`` rows have no box) and follows the
reference (``instruction_tune/vindr_cxr.py``, ``process_instruction_tuning.py``):

  * splits: ``validate`` = a random 10% of the train image ids (``random.Random(seed).sample`` of
    the ids in order of first appearance, ``int(10% × n)`` of them), ``train`` = the rest,
    ``test`` = the test file; images are taken in sorted id order;
  * boxes are mapped to the 1024 letterboxed frame and truncated to integers; same-class boxes of an
    image with IoU > 0.1 to a first box are merged into their union (:func:`merge_boxes`, greedy in
    row order);
  * Abnormality Detection: one record per image, ``<ref>{class}</ref><box>…</box>`` per merged box
    sorted by (x1, y1), or "No abnormalities detected."; images with more than 5 boxes are skipped;
  * Phrase Grounding: per class of the image (sorted) with at most 2 boxes, a positive record
    (``<ref>{class}</ref><box>…</box>`` per box) and a negative one ("No {class} detected.");
    instructions are the first 5 of the 9 grounding templates with the class lower-cased;
  * Grounded Diagnosis: per box of each class with at most 2 boxes, "Please give the corresponding
    diagnosis for the following region(s): <box>…</box>" (2 templates) → the class name;
  * per task and split, answers with no box ("No abnormalities detected.", "No … detected.") are
    capped at ``len(others) // 3`` by a random sample, and the split is then shuffled; records of
    a split are written Detection, Grounding, Diagnosis. One ``random.Random(seed)`` stream is
    consumed in the reference's order (val sample; caps of train, test, val for each task in turn).

Differences from the reference (REFERENCE.md §7.9):
  * the letterbox offset IS applied to the boxes (FIX: the reference scaled x and y independently to
    1024 without the padding, misplacing every box of a non-square image);
  * image sizes come from the image files' headers (PNG/JPEG via PIL; DICOM via pydicom when it is
    installed) rather than a separately written ``*_meta.csv``;
  * ``negatives="absent"`` (not the default) pairs each "No {class} detected." with a random image
    of the same split that lacks the class; the reference (default ``"same_image"``) pairs it with
    the very image that shows the class.

Inputs: ``annotations_train``, ``annotations_test`` (the two CSVs) and ``image_dir``, a directory
with ``train/`` and ``test/`` holding ``{image_id}.png`` (or ``.jpg``, ``.jpeg``, ``.dicom``,
``.dcm``; the first found in that order) at the original resolution the annotations refer to.
Record ``image`` paths are relative to ``image_dir`` (``train/{image_id}.png``; validation images
live in ``train/``).
The stage-2 loader decodes PNG/JPEG only: convert DICOMs to PNG for training.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from anatomix_jax.data import images
from anatomix_jax.instruct import common, schema
from anatomix_jax.ops import boxes as box_ops

SOURCE = "vindr_instruct"
INPUT_KEYS = ("annotations_train", "annotations_test", "image_dir")
COLUMNS = ("image_id", "class_name", "x_min", "y_min", "x_max", "y_max")
NO_FINDING = "No finding"
VAL_FRACTION = 0.1
IOU_THRESHOLD = 0.1
MAX_DETECTION_BOXES = 5
MAX_CLASS_BOXES = 2
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dicom", ".dcm")
NEGATIVE_MODES = ("same_image", "absent")

DETECTION = ("Detect abnormalities in the given image.",
             "Locate areas in the chest X-ray where abnormalities are present, using bounding box "
             "coordinates",
             "Perform abnormality detection (in the bounding box format) for the given image.",
             "Find the locations of abnormalities in the bounding box format for the given image.",
             "Locate abnormalities for the given image.")
GROUNDING = ("Detect {disease} in the given image.",
             "Locate areas in the chest X-ray where {disease} is present, using bounding box "
             "coordinates",
             "Localize {disease} in the bounding box format for the given image.",
             "Find the locations of {disease} in the bounding box format for the given image.",
             "Locate {disease} for the given image.")
DIAGNOSIS = ("Please give the corresponding diagnosis for the following region(s): {boxes}",
             "Provide a diagnosis based on the content of the following region(s): {boxes}")
NO_ABNORMALITIES = "No abnormalities detected."

Region = tuple[str, list[int]]  # (class name, integer xyxy box on the 1024 frame)


def merge_boxes(regions: Sequence[Region], threshold: float = IOU_THRESHOLD) -> list[Region]:
  """The reference's greedy merge: the first remaining box absorbs every later same-class box whose
  IoU with it exceeds ``threshold``; the union of those becomes one region."""
  remaining = list(regions)
  merged = []
  while remaining:
    name, base = remaining.pop(0)
    group, rest = [base], []
    for other_name, box in remaining:
      if other_name == name and box_ops.iou(np.asarray(base, np.float64),
                                            np.asarray(box, np.float64)) > threshold:
        group.append(box)
      else:
        rest.append((other_name, box))
    merged.append((name, [min(b[0] for b in group), min(b[1] for b in group),
                          max(b[2] for b in group), max(b[3] for b in group)]))
    remaining = rest
  return merged


def _read_annotations(path: str) -> dict[str, list[tuple[str, dict[str, str]]]]:
  """{image_id: [(where, row), ...]} in order of first appearance."""
  out: dict[str, list[tuple[str, dict[str, str]]]] = {}
  for line, row in common.read_csv(path, COLUMNS):
    where = f"{path}:{line}"
    for column in ("image_id", "class_name"):
      if not (row[column] or "").strip():
        raise schema.SchemaError(f"{where}: column {column!r} is empty")
    out.setdefault(row["image_id"].strip(), []).append((where, row))
  return out


def _regions(rows: Sequence[tuple[str, dict[str, str]]], height: int, width: int) -> list[Region]:
  """Merged regions of one image: boxes letterboxed to 1024, truncated like ``int()``, merged."""
  regions = []
  for where, row in rows:
    name = row["class_name"].strip()
    if name == NO_FINDING:
      continue
    box = [common.number(row[c], where, c) for c in COLUMNS[2:]]
    if box[0] > box[2] or box[1] > box[3]:
      raise schema.SchemaError(f"{where}: bad box: needs x_min <= x_max and y_min <= y_max, "
                               f"got {box}")
    regions.append((name, [int(v) for v in common.letterbox_box(box, height, width)]))
  return merge_boxes(regions)


def _image_files(directory: str) -> dict[str, str]:
  """{stem: file name} of a directory, preferring the suffixes in :data:`IMAGE_SUFFIXES` order."""
  found: dict[str, str] = {}
  names = os.listdir(directory) if os.path.isdir(directory) else []
  for suffix in reversed(IMAGE_SUFFIXES):
    for name in names:
      if name.lower().endswith(suffix):
        found[name[:-len(suffix)]] = name
  return found


def _cap_negatives(records: list[dict[str, Any]], rng: random.Random) -> list[dict[str, Any]]:
  """At most ``len(positives) // 3`` box-less answers: random sample, then the split shuffled."""
  negatives = [r for r in records if r["meta"]["negative"]]
  positives = [r for r in records if not r["meta"]["negative"]]
  keep = len(positives) // 3
  if len(negatives) <= keep:
    return records
  out = rng.sample(negatives, k=keep) + positives
  rng.shuffle(out)
  return out


def _detection(image_id: str, image: str, split: str, regions: list[Region]
               ) -> list[dict[str, Any]]:
  ordered = sorted(regions, key=lambda r: (r[1][0], r[1][1]))
  if len(ordered) > MAX_DETECTION_BOXES:
    return []
  answer = "".join(f"<ref>{n}</ref>{schema.boxed(b)}" for n, b in ordered) or NO_ABNORMALITIES
  return [{"id": f"{image_id}-ad", "source": SOURCE, "split": split,
           "task": "Abnormality Detection", "image": image, "instructions": list(DETECTION),
           "responses": [answer],
           "meta": {"image_id": image_id, "classes": sorted({n for n, _ in ordered}),
                    "negative": not ordered}}]


def _class_boxes(regions: list[Region]) -> list[tuple[str, list[list[int]]]]:
  """(class, boxes sorted by (x1, y1)) for each class (sorted) with at most 2 boxes."""
  out = []
  for name in sorted({n for n, _ in regions}):
    boxes = common.by_position([b for n, b in regions if n == name])
    if len(boxes) <= MAX_CLASS_BOXES:
      out.append((name, boxes))
  return out


def _grounding(image_id: str, image: str, split: str, regions: list[Region]
               ) -> list[dict[str, Any]]:
  records = []
  for k, (name, boxes) in enumerate(_class_boxes(regions)):
    instructions = [t.format(disease=name.lower()) for t in GROUNDING]
    base = {"source": SOURCE, "split": split, "task": "Phrase Grounding", "image": image,
            "instructions": instructions}
    records.append({**base, "id": f"{image_id}-pg{k}",
                    "responses": ["".join(f"<ref>{name}</ref>{schema.boxed(b)}" for b in boxes)],
                    "meta": {"image_id": image_id, "class": name, "negative": False}})
    records.append({**base, "id": f"{image_id}-pg{k}-neg",
                    "responses": [f"No {name.lower()} detected."],
                    "meta": {"image_id": image_id, "class": name, "negative": True}})
  return records


def _diagnosis(image_id: str, image: str, split: str, regions: list[Region]
               ) -> list[dict[str, Any]]:
  records = []
  for name, boxes in _class_boxes(regions):
    for box in boxes:
      records.append({
          "id": f"{image_id}-gd{len(records)}", "source": SOURCE, "split": split,
          "task": "Grounded Diagnosis", "image": image,
          "instructions": [t.format(boxes=schema.boxed(box)) for t in DIAGNOSIS],
          "responses": [name], "meta": {"image_id": image_id, "class": name, "negative": False}})
  return records


def _absent_negatives(records: list[dict[str, Any]], classes: Mapping[str, set[str]],
                      images_of: Mapping[str, str], rng: random.Random) -> list[dict[str, Any]]:
  """Moves each negative grounding record to a random image of the split without its class."""
  out, without = [], {}
  for record in records:
    if not record["meta"]["negative"]:
      out.append(record)
      continue
    name = record["meta"]["class"]
    if name not in without:
      without[name] = [i for i in sorted(classes) if name not in classes[i]]
    candidates = without[name]
    if not candidates:
      continue
    other = rng.choice(candidates)
    out.append({**record, "image": images_of[other],
                "meta": {**record["meta"], "image_id": other, "paired_with": record["meta"]
                         ["image_id"]}})
  return out


def build(inputs: Mapping[str, str], out_dir: str, *, seed: int = 2025,
          negatives: str = "same_image") -> dict[str, int]:
  """Writes ``{out_dir}/vindr_instruct/{split}.jsonl`` (see the module docstring).

  Args:
    inputs: ``annotations_train``, ``annotations_test``, ``image_dir``.
    out_dir: output root.
    seed: the validation ids, the kept negatives and the shuffles are a function of it.
    negatives: ``"same_image"`` (reference) or ``"absent"`` (see the module docstring).

  Returns:
    ``{split: records}`` plus ``skipped_missing_image`` and ``skipped_unreadable_image`` (images).

  Raises:
    schema.SchemaError: a missing column, an empty id/class, a non-numeric or inverted box (file,
      line and column named).
    ImportError: an image is DICOM and pydicom is not installed.
  """
  if negatives not in NEGATIVE_MODES:
    raise ValueError(f"negatives must be one of {NEGATIVE_MODES}, got {negatives!r}")
  paths = common.require_inputs(inputs, INPUT_KEYS, SOURCE, dirs=("image_dir",))
  train = _read_annotations(paths["annotations_train"])
  test = _read_annotations(paths["annotations_test"])
  rng = random.Random(seed)
  ids = list(train)
  val_ids = set(rng.sample(ids, k=int(len(ids) * VAL_FRACTION)))
  # The reference's processing order: train, test, val.
  plan = (("train", "train", {i: r for i, r in train.items() if i not in val_ids}),
          ("test", "test", test),
          ("validate", "train", {i: r for i, r in train.items() if i in val_ids}))
  skips = common.Skips(SOURCE, ("missing_image", "unreadable_image"))
  per_split: dict[str, dict[str, Any]] = {}
  for split, folder, table in plan:
    directory = os.path.join(paths["image_dir"], folder)
    files = _image_files(directory)
    regions, images_of = {}, {}
    for image_id in sorted(table):
      if image_id not in files:
        skips.add("missing_image", f"{image_id}: no {'/'.join(IMAGE_SUFFIXES)} file in {directory}")
        continue
      try:
        height, width = common.image_size(os.path.join(directory, files[image_id]))
      except images.ImageError as e:
        skips.add(e.reason, str(e))
        continue
      regions[image_id] = _regions(table[image_id], height, width)
      images_of[image_id] = f"{folder}/{files[image_id]}"
    per_split[split] = {"regions": regions, "images": images_of}

  tasks = (_detection, _grounding, _diagnosis)
  by_split: dict[str, list[dict[str, Any]]] = {split: [] for split, _, _ in plan}
  negative_rng = random.Random(f"{seed}-absent-negatives")
  for make in tasks:
    for split, _, _ in plan:
      regions, images_of = per_split[split]["regions"], per_split[split]["images"]
      records = [r for i in regions for r in make(i, images_of[i], split, regions[i])]
      if make is _grounding and negatives == "absent":
        classes = {i: {n for n, _ in regions[i]} for i in regions}
        records = _absent_negatives(records, classes, images_of, negative_rng)
      by_split[split].extend(_cap_negatives(records, rng))
  counts = common.write_splits(out_dir, SOURCE, by_split)
  return {**counts, **skips.summary()}
