"""Parsing one Chest ImaGenome silver scene graph into per-anatomy boxes, presence and sentences.

A scene graph (``silver_dataset/scene_graph/{dicom_id}_SceneGraph.json``) has top-level ``image_id``,
``viewpoint``, ``patient_id``, ``study_id``, an ``objects`` list (one box per anatomy: ``x1..y2`` on a
224×224 grid of the letterboxed image, ``original_x1..original_y2`` in original-image pixels,
``original_width``/``original_height``, ``name``, ``bbox_name``, ...), an ``attributes`` list (per
anatomy ``name``, ``bbox_name`` and ``attributes``: a list of lists of ``"category|yes/no|finding"``
strings) and ``relationships``.

Boxes come out as float32 ``[36, 4]`` xyxy on the 1024 canvas (``records.CANVAS``), in
``anatomy.ANATOMY_NAMES`` order:
  * ``box_source="grid224"`` (the reference, ``process_chest_imagenome.py::get_obj_dict``):
    ``int(v * 1024 / 224)`` of each 224-grid coordinate (truncation towards zero);
  * ``box_source="original"``: the ``original_*`` pixel coordinates mapped through the exact letterbox
    transform of the original image (:mod:`anatomix_jax.data.images`), without quantisation.
Anatomies missing from ``objects`` get box ``[0, 0, 0, 0]``, ``present = 0`` and the sentence
``"{name} is healthy."`` (the reference's filler).

Sentences follow the reference's ``generate_single_sentence`` (REFERENCE.md §3), using the anatomy's
scene-graph ``name`` as the reference does. Where the reference depends on ``set`` iteration order
(the order of non-``anatomicalfinding`` categories), categories are taken in alphabetical order so the
output is reproducible.

Bad input raises :class:`SceneGraphError`, whose message names the file and the field and whose
``reason`` is a short code a caller that skips bad files can count.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Sequence

import numpy as np

from anatomix_jax import anatomy
from anatomix_jax.data import images

CANVAS = 1024        # the reference's letterbox size (records.CANVAS)
GRID = 224           # Chest ImaGenome's box grid
BOX_SOURCES = ("grid224", "original")
_SKIPPED_CATEGORIES = ("laterality", "severity", "nlp")
_GRID_KEYS = ("x1", "y1", "x2", "y2")
_ORIGINAL_KEYS = ("original_x1", "original_y1", "original_x2", "original_y2")


class SceneGraphError(ValueError):
  """A scene graph that cannot be used; the message names the file and the field.

  Attributes:
    path: the scene-graph file (or a description of the source).
    field: the offending field, e.g. ``objects[3].x2``.
    reason: short cause for skip counts: ``bad_json``, ``missing_field``, ``bad_coordinates``,
      ``unknown_anatomy``, ``degenerate_box``, ``box_outside``, ``size_mismatch``,
      ``missing_scene_graph``.
  """

  def __init__(self, path: str, field: str, problem: str, reason: str):
    super().__init__(f"{path}: field {field!r}: {problem}")
    self.path = path
    self.field = field
    self.problem = problem
    self.reason = reason

  def __reduce__(self):  # picklable, so pool workers can hand it back to the parent
    return SceneGraphError, (self.path, self.field, self.problem, self.reason)


@dataclasses.dataclass(frozen=True)
class SceneGraph:
  """One parsed scene graph.

  Attributes:
    path: source file.
    image_id: the dicom_id.
    study_id, subject_id: MIMIC ids as strings (``subject_id`` is the scene graph's ``patient_id``).
    viewpoint: e.g. ``PA``, ``AP`` ("" when absent).
    boxes: float32 ``[36, 4]`` xyxy on the 1024 canvas; zeros where absent.
    present: uint8 ``[36]``, 1 where ``objects`` has the anatomy.
    sentences: 36 finding sentences.
    num_clipped: how many boxes were partly outside the image and were clipped.
  """
  path: str
  image_id: str
  study_id: str
  subject_id: str
  viewpoint: str
  boxes: np.ndarray
  present: np.ndarray
  sentences: tuple[str, ...]
  num_clipped: int


def scene_graph_path(imagenome_dir: str, dicom_id: str) -> str:
  """Path of a silver scene graph inside a Chest ImaGenome root directory."""
  return os.path.join(imagenome_dir, "silver_dataset", "scene_graph", f"{dicom_id}_SceneGraph.json")


def finding_sentence(attributes: Sequence[Sequence[str]], name: str) -> str:
  """The reference's per-anatomy sentence from an attribute list of lists.

  Only ``presence == "yes"`` items count; categories laterality, severity and nlp are skipped;
  items are de-duplicated; each category's findings are sorted; ``anatomicalfinding`` comes first,
  the other categories (alphabetically) after; all joined by " and ".

  Args:
    attributes: lists of ``"category|yes/no|finding"`` strings (one list per report phrase).
    name: the anatomy's scene-graph name.

  Returns:
    ``"{name} shows {a} and {b}."``, or ``"{name} is healthy."`` without positive findings.
  """
  positives: dict[str, list[str]] = {}
  for item in sorted({item for group in attributes for item in group}):
    parts = item.split("|") if isinstance(item, str) else ()
    if len(parts) != 3:  # the reference silently ignores malformed items
      continue
    category, presence, finding = parts
    if category in _SKIPPED_CATEGORIES or presence != "yes":
      continue
    positives.setdefault(category, []).append(finding)
  ordered = sorted(positives.get("anatomicalfinding", []))
  for category in sorted(positives):
    if category != "anatomicalfinding":
      ordered.extend(sorted(positives[category]))
  if not ordered:
    return f"{name} is healthy."
  return f"{name} shows {' and '.join(ordered)}."


def healthy_sentence(index: int) -> str:
  """The filler sentence of anatomy ``index`` (absent or without positive findings)."""
  return f"{anatomy.ANATOMIES[index].name} is healthy."


def _anatomy_index(entry: dict[str, Any], where: str, path: str) -> int:
  name, bbox_name = entry.get("name"), entry.get("bbox_name")
  if name in anatomy.NAME_TO_INDEX:
    return anatomy.NAME_TO_INDEX[name]
  if bbox_name in anatomy.BBOX_NAME_TO_INDEX:
    return anatomy.BBOX_NAME_TO_INDEX[bbox_name]
  if name is None and bbox_name is None:
    raise SceneGraphError(path, f"{where}.name", "missing (neither name nor bbox_name given)",
                          "missing_field")
  raise SceneGraphError(path, f"{where}.name",
                        f"unknown anatomy (name={name!r}, bbox_name={bbox_name!r})",
                        "unknown_anatomy")


def _attribute_anatomy(entry: dict[str, Any]) -> int | None:
  # Attribute entries naming no known anatomy are ignored, as in the reference's get_findings.
  for key, table in (("name", anatomy.NAME_TO_INDEX), ("bbox_name", anatomy.BBOX_NAME_TO_INDEX)):
    if entry.get(key) in table:
      return table[entry[key]]
  return None


def _number(obj: dict[str, Any], key: str, where: str, path: str) -> float:
  if key not in obj:
    raise SceneGraphError(path, f"{where}.{key}", "missing", "bad_coordinates")
  value = obj[key]
  # bool is an int subclass; a coordinate of `true` is a broken file, not 1.
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise SceneGraphError(path, f"{where}.{key}", f"not a finite number: {value!r}",
                          "bad_coordinates")
  return float(value)


def _clip(box: list[float], width: float, height: float, where: str, path: str
          ) -> tuple[list[float], bool]:
  """Clips an xyxy box to [0, width]×[0, height]; raises if it lies entirely outside."""
  x1, y1, x2, y2 = box
  if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
    raise SceneGraphError(path, where, f"box {box} lies entirely outside the {width:g}×{height:g} "
                          "image", "box_outside")
  clipped = [min(max(x1, 0.0), width), min(max(y1, 0.0), height),
             min(max(x2, 0.0), width), min(max(y2, 0.0), height)]
  return clipped, clipped != [x1, y1, x2, y2]


def _original_size(objects: list[dict[str, Any]], image_hw: tuple[int, int] | None,
                   path: str) -> tuple[int, int]:
  """(height, width) of the original image: from the caller, checked against the objects."""
  sizes = set()
  for i, obj in enumerate(objects):
    h = _number(obj, "original_height", f"objects[{i}]", path)
    w = _number(obj, "original_width", f"objects[{i}]", path)
    sizes.add((int(h), int(w)))
  if image_hw is not None:
    image_hw = (int(image_hw[0]), int(image_hw[1]))
    if sizes and sizes != {image_hw}:
      raise SceneGraphError(path, "objects[].original_height/original_width",
                            f"{sorted(sizes)} does not match the image's size {image_hw}",
                            "size_mismatch")
    return image_hw
  if len(sizes) != 1:
    raise SceneGraphError(path, "objects[].original_height/original_width",
                          f"objects disagree on the image size: {sorted(sizes)}", "size_mismatch")
  return sizes.pop()


def parse_scene_graph(graph: Any, source: str = "<scene graph>", box_source: str = "grid224",
                      image_hw: tuple[int, int] | None = None) -> SceneGraph:
  """Parses a loaded scene-graph JSON object.

  Args:
    graph: the decoded JSON (a dict).
    source: file name for error messages.
    box_source: ``"grid224"`` (reference) or ``"original"`` (see the module docstring).
    image_hw: (height, width) of the actual image; only used (and checked against the objects'
      ``original_height``/``original_width``) with ``box_source="original"``.

  Returns:
    The :class:`SceneGraph`.

  Raises:
    SceneGraphError: missing ``image_id``/``objects``, an object with missing or non-numeric
      coordinates, an unknown anatomy, ``x2 <= x1`` or ``y2 <= y1``, or a box entirely outside the
      image.
  """
  if box_source not in BOX_SOURCES:
    raise ValueError(f"box_source must be one of {BOX_SOURCES}, got {box_source!r}")
  if not isinstance(graph, dict):
    raise SceneGraphError(source, "<root>", f"expected a JSON object, got {type(graph).__name__}",
                          "bad_json")
  for key in ("image_id", "objects"):
    if key not in graph:
      raise SceneGraphError(source, key, "missing", "missing_field")
  objects = graph["objects"]
  if not isinstance(objects, list) or not all(isinstance(o, dict) for o in objects):
    raise SceneGraphError(source, "objects", "expected a list of objects", "missing_field")

  transform = None
  if box_source == "original":
    height, width = _original_size(objects, image_hw, source)
    transform = images.letterbox_transform(height, width, CANVAS)

  boxes = np.zeros((anatomy.NUM_ANATOMIES, 4), np.float32)
  present = np.zeros((anatomy.NUM_ANATOMIES,), np.uint8)
  num_clipped = 0
  for i, obj in enumerate(objects):
    where = f"objects[{i}]"
    index = _anatomy_index(obj, where, source)
    keys = _GRID_KEYS if box_source == "grid224" else _ORIGINAL_KEYS
    box = [_number(obj, key, where, source) for key in keys]
    if box[2] <= box[0] or box[3] <= box[1]:
      raise SceneGraphError(source, f"{where}.{keys[2]}/{keys[3]}",
                            f"degenerate box {box} (needs x2 > x1 and y2 > y1)", "degenerate_box")
    if transform is None:
      scale = CANVAS / GRID
      box = [float(int(v * scale)) for v in box]  # the reference's int() truncation
      box, clipped = _clip(box, CANVAS, CANVAS, where, source)
    else:
      box, clipped = _clip(box, transform.width, transform.height, where, source)
      box = transform.forward_boxes(np.asarray(box)).tolist()
    num_clipped += clipped
    boxes[index] = box  # a repeated anatomy overwrites the earlier one, like the reference's dict
    present[index] = 1

  sentences = [healthy_sentence(i) for i in range(anatomy.NUM_ANATOMIES)]
  attributes = graph.get("attributes", [])
  if not isinstance(attributes, list):
    raise SceneGraphError(source, "attributes", "expected a list", "missing_field")
  for i, entry in enumerate(attributes):
    if not isinstance(entry, dict):
      raise SceneGraphError(source, f"attributes[{i}]", "expected an object", "missing_field")
    index = _attribute_anatomy(entry)
    if index is None or not present[index]:
      continue  # the reference only describes anatomies that have a box
    groups = entry.get("attributes", [])
    if not isinstance(groups, list) or not all(isinstance(g, list) for g in groups):
      raise SceneGraphError(source, f"attributes[{i}].attributes", "expected a list of lists",
                            "missing_field")
    sentences[index] = finding_sentence(groups, anatomy.ANATOMIES[index].name)

  return SceneGraph(path=source, image_id=str(graph["image_id"]),
                    study_id=_id_string(graph.get("study_id", "")),
                    subject_id=_id_string(graph.get("patient_id", "")),
                    viewpoint=str(graph.get("viewpoint") or ""), boxes=boxes, present=present,
                    sentences=tuple(sentences), num_clipped=num_clipped)


def _id_string(value: Any) -> str:
  # MIMIC ids are integers; JSON writers sometimes give them as 12345678.0.
  if isinstance(value, float) and value.is_integer():
    return str(int(value))
  return str(value)


def read_scene_graph(path: str, box_source: str = "grid224",
                     image_hw: tuple[int, int] | None = None) -> SceneGraph:
  """Reads and parses one scene-graph JSON file (see :func:`parse_scene_graph`).

  Raises:
    SceneGraphError: the file is missing or not JSON (reason ``bad_json``), or any problem that
      :func:`parse_scene_graph` reports.
  """
  try:
    with open(path, "rb") as f:
      graph = json.loads(f.read())
  except FileNotFoundError as e:
    raise SceneGraphError(path, "<file>", "does not exist", "missing_scene_graph") from e
  except (ValueError, UnicodeDecodeError) as e:
    raise SceneGraphError(path, "<file>", f"not valid JSON ({e})", "bad_json") from e
  return parse_scene_graph(graph, source=path, box_source=box_source, image_hw=image_hw)
