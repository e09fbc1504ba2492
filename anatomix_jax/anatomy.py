"""The 36 Chest ImaGenome anatomies and the 14 CheXpert image labels, in the reference's order.

The reference orders anatomies by Python's case-sensitive sort of the Chest ImaGenome object names
(``sorted(json.load("configs/chest_imagenome_objects.json").values())``), a file it never shipped;
the order is reconstructed here from ``src/util/misc.py::object_loss_weights`` (REFERENCE.md §1.2).
Anatomy ``i`` is decoder query ``i`` and LM token ``<obj_i>``.

Each anatomy has three names:
  * ``name``: the object ``name`` in a Chest ImaGenome scene graph (the reference's key and sort key);
  * ``bbox_name``: the object ``bbox_name`` in a scene graph (lower-case short form);
  * ``display``: the text used in prompts (``src/models/anatomix.py::text_to_prompt``).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Anatomy:
  index: int
  name: str
  bbox_name: str
  display: str


_TABLE = (
    ("Abdominal cavity", "abdomen", "Abdominal cavity"),
    ("Aortic arch structure", "aortic arch", "Aortic arch structure"),
    ("Apical zone of left lung", "left apical zone", "Apical zone of left lung"),
    ("Apical zone of right lung", "right apical zone", "Apical zone of right lung"),
    ("Cardiac shadow viewed radiologically;;Heart", "cardiac silhouette",
     "Cardiac shadow viewed radiologically or Heart"),
    ("Descending aorta", "descending aorta", "Descending aorta"),
    ("Hilar Area of the Left Lung", "left hilar structure", "Hilar Area of the Left Lung"),
    ("Hilar Area of the Right Lung", "right hilar structure", "Hilar Area of the Right Lung"),
    ("Left clavicle", "left clavicle", "Left clavicle"),
    ("Left hemidiaphragm", "left hemidiaphragm", "Left hemidiaphragm"),
    ("Left lower lung zone", "left lower lung zone", "Left lower lung zone"),
    ("Left lung", "left lung", "Left lung"),
    ("Left mid lung zone", "left mid lung zone", "Left mid lung zone"),
    ("Left upper lung zone", "left upper lung zone", "Left upper lung zone"),
    ("Mediastinum", "mediastinum", "Mediastinum"),
    ("Right atrial structure", "right atrium", "Right atrial structure"),
    ("Right border of heart viewed radiologically", "right cardiac silhouette",
     "Right border of heart viewed radiologically"),
    ("Right clavicle", "right clavicle", "Right clavicle"),
    ("Right hemidiaphragm", "right hemidiaphragm", "Right hemidiaphragm"),
    ("Right lower lung zone", "right lower lung zone", "Right lower lung zone"),
    ("Right lung", "right lung", "Right lung"),
    ("Right mid lung zone", "right mid lung zone", "Right mid lung zone"),
    ("Right upper lung zone", "right upper lung zone", "Right upper lung zone"),
    ("Structure of carina", "carina", "Structure of carina"),
    ("Structure of left margin of heart", "left cardiac silhouette",
     "Structure of left margin of heart"),
    ("Structure of left upper quadrant of abdomen", "left upper abdomen",
     "Structure of left upper quadrant of abdomen"),
    ("Structure of right upper quadrant of abdomen", "right upper abdomen",
     "Structure of right upper quadrant of abdomen"),
    ("Superior mediastinum", "upper mediastinum", "Superior mediastinum"),
    ("Superior vena cava structure", "svc", "Superior vena cava structure"),
    ("Trachea&&Main Bronchus", "trachea", "Trachea and Main Bronchus"),
    ("Vertebral column", "spine", "Vertebral column"),
    ("cavoatrial", "cavoatrial junction", "cavoatrial"),
    ("left cardiophrenic sulcus", "left cardiophrenic angle", "left cardiophrenic sulcus"),
    ("left costophrenic sulcus;;Left costodiaphragmatic recess", "left costophrenic angle",
     "Left costodiaphragmatic recess"),
    ("right cardiophrenic sulcus", "right cardiophrenic angle", "right cardiophrenic sulcus"),
    ("right costophrenic sulcus;;Right costodiaphragmatic recess", "right costophrenic angle",
     "Right costodiaphragmatic recess"),
)

ANATOMIES: tuple[Anatomy, ...] = tuple(
    Anatomy(i, name, bbox_name, display) for i, (name, bbox_name, display) in enumerate(_TABLE))
NUM_ANATOMIES = len(ANATOMIES)
ANATOMY_NAMES: tuple[str, ...] = tuple(a.name for a in ANATOMIES)
DISPLAY_NAMES: tuple[str, ...] = tuple(a.display for a in ANATOMIES)
NAME_TO_INDEX: dict[str, int] = {a.name: a.index for a in ANATOMIES}
BBOX_NAME_TO_INDEX: dict[str, int] = {a.bbox_name: a.index for a in ANATOMIES}

# The order is the reference's sort order; fail at import if the table above is ever edited out of order.
assert list(ANATOMY_NAMES) == sorted(ANATOMY_NAMES), "anatomy table must stay in sorted order"
assert NUM_ANATOMIES == 36

# CheXpert labels in the order of mimic-cxr-2.0.0-chexpert.csv (REFERENCE.md §1.3).
CHEXPERT_LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
)
NUM_LABELS = len(CHEXPERT_LABELS)


def lookup(name: str) -> int:
  """Index of an anatomy given its scene-graph ``name``, ``bbox_name`` or display name.

  Raises:
    KeyError: naming the unknown anatomy.
  """
  for table in (NAME_TO_INDEX, BBOX_NAME_TO_INDEX):
    if name in table:
      return table[name]
  if name in DISPLAY_NAMES:
    return DISPLAY_NAMES.index(name)
  raise KeyError(f"unknown Chest ImaGenome anatomy {name!r}")
