"""Stage-2 instruction records from a synthetic dataset, for the tasks the real readers lack.

The MIMIC processors (``anatomix_jax.instruct.mimic``) make Report Generation and Anatomy Grounding
records from a synthetic root. :func:`build` makes the other eight task types from the same files,
as records of :mod:`anatomix_jax.instruct.schema`, in the style of the released sources
(REFERENCE.md §4.1-4.3). Source per style:

  * ``vindr_instruct`` (VinDr-CXR): Abnormality Detection (``<ref>Class</ref><box>…</box>`` per
    box, or "No abnormalities detected."), Phrase Grounding by class name ("Detect pleural effusion
    in the given image." → boxes, or "No pleural effusion detected.", negatives at most 1/3 of the
    positives per split), Grounded Diagnosis of one box (→ the classes drawn there);
  * ``mscxr`` (MS-CXR): Phrase Grounding of a report phrase, Grounded Captioning of its box(es)
    (→ the phrase), Grounded Diagnosis of its box(es) (→ the CheXpert label);
  * ``mimic_vqa`` (MIMIC-CXR-VQA): Close-Ended VQA, yes/no on the CheXpert labels, alternating yes
    and no within each image, ``"{question} Options:\n(A) yes\n(B) no"`` with the reference's
    random option labels (A/B, a/b or 1/2), order and direct-answer suffix; Open-Ended VQA, the list
    of abnormal labels or the region of a finding;
  * ``radialog_instruct`` (RaDialog-Instruct): RQA, a region question answered with the region's
    finding sentence (the reference sentence rule, ``scene_graph.finding_sentence``), alternating
    regions with and without findings;
  * ``mimic_cxr_classification``: Image Classification, an all-label option list, one of four
    label combinations, or "Does this chest X-ray show {label}?".

Every answer is a function of what the image shows:

  * labels come from the real reader (``preprocess.build_index``: CheXpert table, −1/empty → 0; the
    generator writes −1 only for true negatives, so the reference's U-ones rule is not applied);
  * boxes come from the real scene-graph reader (``scene_graph.parse_scene_graph``: the reference's
    ``int(v * 1024 / 224)`` of the 224 grid, on the 1024 letterboxed frame). A finding's box is the
    box of the anatomy where the generator draws it (:data:`FINDINGS`; e.g. a pleural effusion →
    that side's lower lung zone, a pneumothorax → that side's apical zone), found through the
    finding's ``"category|yes|finding"`` attributes in the scene graph. Findings whose anatomy is
    missing from the scene graph's objects (~2% of anatomies) are never asked about with boxes, and
    such an image gets no detection record (its answer would be incomplete).

Records go to ``{out_dir}/{source}/{split}.jsonl`` (five sources × three splits, possibly empty).
``image`` is relative to the synthetic root's MIMIC-CXR-JPG directory (``generator.layout(root)
["mimic_dir"]`` = ``{root}/mimic-cxr-jpg``): ``files/pXX/pSUBJECT/sSTUDY/{dicom_id}.jpg``. The split
is the image's official split (the split table), not each source's own rule. ``meta`` holds the ids
and the fact asked about. Output is a function of the dataset, ``seed`` and ``per_image``; each
image's choices come from random streams keyed by its dicom id (only the split-level cap on VinDr
negatives looks across images).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from anatomix_jax import anatomy
from anatomix_jax.data import preprocess, scene_graph
from anatomix_jax.instruct import schema
from anatomix_jax.synthetic import generator

SOURCES = ("vindr_instruct", "mscxr", "mimic_vqa", "radialog_instruct", "mimic_cxr_classification")
TASKS = ("Phrase Grounding", "Grounded Diagnosis", "Grounded Captioning", "Abnormality Detection",
         "Close-Ended VQA", "Open-Ended VQA", "RQA", "Image Classification")
MAX_DETECTION_BOXES = 5   # VinDr: detection skipped above this many boxes
MAX_CLASS_BOXES = 2       # VinDr: no phrase grounding of a class with more boxes than this
NEGATIVE_SHARE = 1 / 3    # VinDr: "No {class} detected." records ≤ this share of the positives
NO_FINDING = "No Finding"

_ZONE = r"(right|left) (upper|mid|lower) lung zone"
_SIDE = r"(right|left)"


@dataclasses.dataclass(frozen=True)
class Finding:
  """One synthetic finding kind.

  Attributes:
    attribute: its finding text in the scene-graph attributes (``"anatomicalfinding|yes|{this}"``).
    label: the CheXpert label it makes positive.
    name: VinDr-style class name.
    term: how questions name it.
    where: regular expression (full match) on ``bbox_name`` of the anatomy it is drawn in.
    abnormal: False for support devices (left out of detection and grounding).
  """
  attribute: str
  label: str
  name: str
  term: str
  where: str
  abnormal: bool = True


# Most specific first: a report phrase's diagnosis is its first finding in this order.
FINDINGS: tuple[Finding, ...] = (
    Finding("pneumonia", "Pneumonia", "Pneumonia", "pneumonia", _ZONE),
    Finding("consolidation", "Consolidation", "Consolidation", "consolidation", _ZONE),
    Finding("atelectasis", "Atelectasis", "Atelectasis", "atelectasis", f"{_SIDE} lower lung zone"),
    Finding("mass/nodule (not otherwise specified)", "Lung Lesion", "Nodule/Mass", "nodule", _ZONE),
    Finding("pleural/parenchymal scarring", "Pleural Other", "Pleural thickening",
            "pleural thickening", _ZONE),
    Finding("pleural effusion", "Pleural Effusion", "Pleural effusion", "pleural effusion",
            f"{_SIDE} lower lung zone"),
    Finding("pneumothorax", "Pneumothorax", "Pneumothorax", "pneumothorax", f"{_SIDE} apical zone"),
    Finding("pulmonary edema/hazy opacity", "Edema", "Edema", "pulmonary edema", f"{_SIDE} lung"),
    Finding("lung opacity", "Lung Opacity", "Lung Opacity", "lung opacity", _ZONE),
    Finding("enlarged cardiac silhouette", "Cardiomegaly", "Cardiomegaly",
            "enlarged cardiac silhouette", "cardiac silhouette"),
    Finding("mediastinal widening", "Enlarged Cardiomediastinum", "Mediastinal widening",
            "mediastinal widening", "upper mediastinum"),
    Finding("fracture", "Fracture", "Clavicle fracture", "fracture", f"{_SIDE} clavicle"),
    Finding("endotracheal tube", "Support Devices", "Endotracheal tube", "endotracheal tube",
            "trachea", abnormal=False),
    Finding("ij line", "Support Devices", "Internal jugular line", "internal jugular line", "svc",
            abnormal=False),
    Finding("cardiac pacer and wires", "Support Devices", "Pacemaker", "pacemaker",
            "left upper lung zone", abnormal=False),
    Finding("enteric tube", "Support Devices", "Enteric tube", "enteric tube", "left upper abdomen",
            abnormal=False),
)
_BY_ATTRIBUTE = {f.attribute: f for f in FINDINGS}
_ORDER = {f.attribute: i for i, f in enumerate(FINDINGS)}

# Templates (REFERENCE.md §4.3).
_VINDR_PG = ("Detect {d} in the given image.",
             "Locate areas in the chest X-ray where {d} is present, using bounding box coordinates",
             "Localize {d} in the bounding box format for the given image.")
_MSCXR_PG = ("Please locate the following phrase: {p}",
             "Identify the position of the following finding in the CXR: {p}")
_GD = ("Please give the corresponding diagnosis for the following region(s): {b}",
       "Provide a diagnosis based on the content of the following region(s): {b}")
_GC = ("Please generate a caption for the following region(s): {b}",
       "Describe the content of the following region(s): {b}")
_DETECT = ("Detect abnormalities in the given image.",
           "Perform abnormality detection (in the bounding box format) for the given image.",
           "Locate abnormalities for the given image.")
_CLOSE = ("Is there evidence of {t} in this image?", "Does this chest X-ray show {t}?",
          "Are there any signs of {t} in the image?")
_CLOSE_NORMAL = ("Is this chest X-ray normal, without any findings?",
                 "Is this a normal chest X-ray with no findings?")
_OPEN_LIST = ("What abnormalities are seen in this chest X-ray?",
              "List all abnormal findings in this image.")
_OPEN_WHERE = ("Where is the {t} located?", "Which anatomical region shows the {t}?",
               "In which part of the chest X-ray is the {t} seen?")
_RQA = ("What are the findings in the {r}?", "Describe the {r} in this chest X-ray.",
        "Please describe any findings in the {r} of this image.")
_CLS_OPTIONS = ("Given the CXR, identify any diseases. Options:\n{o}\n"
                "There may be more than one answer.",
                "Which diseases are present in this chest X-ray? Options:\n{o}\n"
                "There may be more than one answer.",
                "Identify the findings in this chest X-ray. Options:\n{o}\n"
                "There may be more than one answer.")
_CLS_CHOICE = ("Which findings are in this chest X-ray? Options:\n{o}",
               "Which combination of findings does this chest X-ray show? Options:\n{o}")
_CLS_YESNO = ("Does this chest X-ray show {d}?", "Is {d} present in this chest X-ray?")
_DIRECT = "\nAnswer with the option\u2019s letter/number from the given choices directly."
_OPTION_STYLES = (("A", "B"), ("a", "b"), ("1", "2"))
# How yes/no questions and open answers name the CheXpert labels.
LABEL_TERMS = {
    "Atelectasis": "atelectasis", "Cardiomegaly": "cardiomegaly", "Consolidation": "consolidation",
    "Edema": "pulmonary edema", "Enlarged Cardiomediastinum": "enlarged cardiomediastinum",
    "Fracture": "fracture", "Lung Lesion": "lung lesion", "Lung Opacity": "lung opacity",
    "Pleural Effusion": "pleural effusion", "Pleural Other": "pleural thickening",
    "Pneumonia": "pneumonia", "Pneumothorax": "pneumothorax", "Support Devices": "support devices"}
_DISEASES = tuple(n for n in anatomy.CHEXPERT_LABELS if n != NO_FINDING)
_REGION_WORDS = {"svc": "superior vena cava"}


def region_name(index: int) -> str:
  """How questions and answers name anatomy ``index``: its ``bbox_name``, "svc" spelled out."""
  bbox_name = anatomy.ANATOMIES[index].bbox_name
  return _REGION_WORDS.get(bbox_name, bbox_name)


@dataclasses.dataclass
class _Image:
  """What one image shows, read from the dataset files."""
  item: preprocess.Item
  image: str                           # path relative to the MIMIC-CXR-JPG root
  boxes: np.ndarray                    # [36, 4] on the 1024 frame (real reader)
  present: np.ndarray                  # [36]
  groups: dict[int, list[list[str]]]   # anatomy → its attribute groups
  instances: list[tuple[Finding, int]]  # (finding, anatomy where it is drawn), present or not
  phrases: dict[str, tuple[list[Finding], list[int]]]  # report phrase → (findings, anatomies)

  def positives(self) -> list[str]:
    return [n for n, v in zip(anatomy.CHEXPERT_LABELS, self.item.labels) if v]

  def box(self, index: int) -> list[float]:
    return [float(v) for v in self.boxes[index]]

  def all_present(self, indices: Sequence[int]) -> bool:
    return all(self.present[i] for i in indices)


@dataclasses.dataclass
class _Draft:
  source: str
  task: str
  instructions: list[str]
  responses: list[str]
  meta: dict[str, Any]


def _yes_findings(group: Sequence[str]) -> list[str]:
  out = []
  for item in group:
    parts = item.split("|") if isinstance(item, str) else ()
    if len(parts) == 3 and parts[1] == "yes":
      out.append(parts[2])
  return out


def _matches(bbox_name: str) -> Callable[[str], Finding | None]:
  def finding(text: str) -> Finding | None:
    f = _BY_ATTRIBUTE.get(text)
    return f if f is not None and re.fullmatch(f.where, bbox_name) else None
  return finding


def _read_image(item: preprocess.Item, mimic_dir: str, imagenome_dir: str) -> _Image:
  path = preprocess.image_path(mimic_dir, item.subject_id, item.study_id, item.dicom_id)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"image of {item.dicom_id} ({item.split}) is missing: {path}")
  graph_path = scene_graph.scene_graph_path(imagenome_dir, item.dicom_id)
  with open(graph_path, "rb") as f:
    graph = json.loads(f.read())
  parsed = scene_graph.parse_scene_graph(graph, source=graph_path)
  groups: dict[int, list[list[str]]] = {}
  instances: set[tuple[str, int]] = set()
  phrases: dict[str, tuple[set[str], set[int]]] = {}
  for entry in graph.get("attributes", []):
    index = next((table[entry[key]] for key, table in (("name", anatomy.NAME_TO_INDEX),
                                                       ("bbox_name", anatomy.BBOX_NAME_TO_INDEX))
                  if entry.get(key) in table), None)
    if index is None:
      continue
    entry_groups = [list(g) for g in entry.get("attributes", [])]
    groups.setdefault(index, []).extend(entry_groups)
    finding = _matches(anatomy.ANATOMIES[index].bbox_name)
    texts = list(entry.get("phrases") or [])
    for j, group in enumerate(entry_groups):
      phrase = texts[j] if j < len(texts) and isinstance(texts[j], str) else ""
      found = [f for f in map(finding, _yes_findings(group)) if f is not None]
      instances.update((f.attribute, index) for f in found)
      if found and phrase.strip():
        kinds, where = phrases.setdefault(phrase.strip().rstrip("."), (set(), set()))
        kinds.update(f.attribute for f in found)
        where.add(index)
  return _Image(
      item=item, image=os.path.relpath(path, mimic_dir), boxes=parsed.boxes,
      present=parsed.present, groups=groups,
      instances=[(_BY_ATTRIBUTE[a], i) for a, i in sorted(instances,
                                                           key=lambda x: (_ORDER[x[0]], x[1]))],
      phrases={p: ([_BY_ATTRIBUTE[a] for a in sorted(k, key=_ORDER.get)], sorted(w))
               for p, (k, w) in phrases.items()})


def _boxes_text(img: _Image, indices: Sequence[int]) -> str:
  return "".join(schema.boxed(img.box(i)) for i in _by_position(img, indices))


def _by_position(img: _Image, indices: Sequence[int]) -> list[int]:
  """Anatomies sorted by their box's (x1, y1), as MS-CXR sorts its boxes."""
  return sorted(indices, key=lambda i: (img.box(i)[0], img.box(i)[1], i))


def _class_boxes(img: _Image, abnormal_only: bool = True) -> dict[Finding, list[int]]:
  out: dict[Finding, list[int]] = {}
  for f, index in img.instances:
    if f.abnormal or not abnormal_only:
      out.setdefault(f, []).append(index)
  return out


def _sample(rng: np.random.Generator, candidates: list[_Draft], k: int) -> list[_Draft]:
  keep = sorted(rng.permutation(len(candidates))[:k].tolist())
  return [candidates[i] for i in keep]


def _fill(templates: Sequence[str], **values: str) -> list[str]:
  return [t.format(**values) for t in templates]


def _grounding(img: _Image, rng: np.random.Generator, k: int) -> dict[str, list[_Draft]]:
  """Phrase Grounding, Grounded Diagnosis and Grounded Captioning (VinDr and MS-CXR styles)."""
  classes = _class_boxes(img)
  ids = _ids(img)
  pg, gd, gc = [], [], []
  for f, where in classes.items():
    if img.all_present(where) and len(where) <= MAX_CLASS_BOXES:
      answer = "".join(f"<ref>{f.name}</ref>{schema.boxed(img.box(i))}"
                       for i in _by_position(img, where))
      pg.append(_Draft("vindr_instruct", "Phrase Grounding", _fill(_VINDR_PG, d=f.name.lower()),
                       [answer], {**ids, "class": f.name, "negative": False}))
  absent = [f for f in FINDINGS if f.abnormal and f not in classes]
  if absent:
    f = absent[int(rng.integers(len(absent)))]
    pg.append(_Draft("vindr_instruct", "Phrase Grounding", _fill(_VINDR_PG, d=f.name.lower()),
                     [f"No {f.name.lower()} detected."],
                     {**ids, "class": f.name, "negative": True}))
  # VinDr-style diagnosis: one box, answered with every class drawn in that anatomy.
  at: dict[int, list[Finding]] = {}
  for f, where in classes.items():
    for i in where:
      at.setdefault(i, []).append(f)
  for i in sorted(at):
    if img.present[i]:
      names = [f.name for f in at[i]]
      gd.append(_Draft("vindr_instruct", "Grounded Diagnosis",
                       _fill(_GD, b=schema.boxed(img.box(i))), [", ".join(names)],
                       {**ids, "classes": names, "anatomies": [i]}))
  # MS-CXR style: a report phrase and its boxes.
  by_region: dict[tuple[int, ...], list[str]] = {}
  for phrase, (kinds, where) in img.phrases.items():
    if kinds[0].abnormal and img.all_present(where):
      by_region.setdefault(tuple(where), []).append(phrase)
      answer = "".join(f"<ref>{phrase}</ref>{schema.boxed(img.box(i))}"
                       for i in _by_position(img, where))
      pg.append(_Draft("mscxr", "Phrase Grounding", _fill(_MSCXR_PG, p=phrase), [answer],
                       {**ids, "phrase": phrase, "anatomies": where}))
  for where, phrases in by_region.items():
    labels = []
    for phrase in phrases:
      label = img.phrases[phrase][0][0].label
      if label not in labels:
        labels.append(label)
    boxes = _boxes_text(img, where)
    gd.append(_Draft("mscxr", "Grounded Diagnosis", _fill(_GD, b=boxes), [", ".join(labels)],
                     {**ids, "labels": labels, "anatomies": list(where)}))
    if len(phrases) == 1:  # a region that two phrases describe has no single caption
      gc.append(_Draft("mscxr", "Grounded Captioning", _fill(_GC, b=boxes), [phrases[0]],
                       {**ids, "phrase": phrases[0], "anatomies": list(where)}))
  return {"Phrase Grounding": _sample(rng, pg, k), "Grounded Diagnosis": _sample(rng, gd, k),
          "Grounded Captioning": _sample(rng, gc, k)}


def _detection(img: _Image) -> list[_Draft]:
  """VinDr-style abnormality detection: every abnormal finding's boxes, or none."""
  classes = _class_boxes(img)
  where = [i for indices in classes.values() for i in indices]
  if not img.all_present(where) or len(where) > MAX_DETECTION_BOXES:
    return []
  answer = "".join(f"<ref>{f.name}</ref>{schema.boxed(img.box(i))}"
                   for f, indices in classes.items() for i in _by_position(img, indices))
  return [_Draft("vindr_instruct", "Abnormality Detection", list(_DETECT),
                 [answer or "No abnormalities detected."],
                 {**_ids(img), "classes": [f.name for f in classes]})]


def _yes_no_block(yes: bool, rng: np.random.Generator) -> tuple[str, str]:
  """Close-ended option block and answer: random option labels, order and direct-answer suffix."""
  style = _OPTION_STYLES[int(rng.integers(len(_OPTION_STYLES)))]
  words = ["yes", "no"] if rng.random() < 0.5 else ["no", "yes"]
  options = "\n".join(f"({s}) {w}" for s, w in zip(style, words))
  word = "yes" if yes else "no"
  key = f"({style[words.index(word)]})"
  if rng.random() < 0.5:
    return f" Options:\n{options}{_DIRECT}", key
  return f" Options:\n{options}", f"{key} {word}"


def _alternating(rng: np.random.Generator, yes_pool: list[Any], no_pool: list[Any],
                 k: int) -> list[tuple[Any, bool]]:
  """Up to ``k`` (item, answer) pairs, yes/no alternating from a random start while both last."""
  pools = {True: [yes_pool[i] for i in rng.permutation(len(yes_pool))],
           False: [no_pool[i] for i in rng.permutation(len(no_pool))]}
  answer, out = bool(rng.integers(2)), []
  while len(out) < k and (pools[True] or pools[False]):
    if not pools[answer]:
      answer = not answer
    out.append((pools[answer].pop(0), answer))
    answer = not answer
  return out


def _close_vqa(img: _Image, rng: np.random.Generator, k: int) -> list[_Draft]:
  """MIMIC-VQA-style yes/no questions on the CheXpert labels, half yes and half no."""
  positives = set(img.positives())
  out = []
  for label, yes in _alternating(rng, sorted(positives, key=anatomy.CHEXPERT_LABELS.index),
                                 [n for n in anatomy.CHEXPERT_LABELS if n not in positives], k):
    questions = (_CLOSE_NORMAL if label == NO_FINDING
                 else _fill(_CLOSE, t=LABEL_TERMS[label]))
    block, answer = _yes_no_block(yes, rng)
    out.append(_Draft("mimic_vqa", "Close-Ended VQA", [q + block for q in questions], [answer],
                      {**_ids(img), "label": label, "answer": "yes" if yes else "no"}))
  return out


def _open_vqa(img: _Image, rng: np.random.Generator, k: int) -> list[_Draft]:
  """Open questions: the list of abnormal labels, and where a finding is."""
  ids = _ids(img)
  found = [LABEL_TERMS[n] for n in img.positives() if n not in (NO_FINDING, "Support Devices")]
  candidates = [_Draft("mimic_vqa", "Open-Ended VQA", list(_OPEN_LIST),
                       [", ".join(found) if found else "none"], {**ids, "kind": "list"})]
  for f, where in _class_boxes(img, abnormal_only=False).items():
    if img.all_present(where):
      regions = " and ".join(region_name(i) for i in where)
      candidates.append(_Draft("mimic_vqa", "Open-Ended VQA", _fill(_OPEN_WHERE, t=f.term),
                               [regions], {**ids, "kind": "where", "finding": f.attribute}))
  return _sample(rng, candidates, k)


def _rqa(img: _Image, rng: np.random.Generator, k: int) -> list[_Draft]:
  """RaDialog-style region questions answered with the region's finding sentence."""
  sentences = {}
  for i in range(anatomy.NUM_ANATOMIES):
    if img.present[i]:
      region = region_name(i)
      sentences[i] = scene_graph.finding_sentence(img.groups.get(i, []),
                                                  region[0].upper() + region[1:])
  abnormal = [i for i, s in sentences.items() if not s.endswith(" is healthy.")]
  healthy = [i for i in sentences if i not in abnormal]
  out = []
  for i, _ in _alternating(rng, abnormal, healthy, k):
    out.append(_Draft("radialog_instruct", "RQA", _fill(_RQA, r=region_name(i)),
                      [sentences[i]], {**_ids(img), "anatomy": i}))
  return out


def _label_set_text(names: Sequence[str]) -> str:
  return ", ".join(sorted(names, key=anatomy.CHEXPERT_LABELS.index)) if names else NO_FINDING


def _other_sets(rng: np.random.Generator, positives: list[str], n: int) -> list[list[str]]:
  """``n`` distinct label combinations other than ``positives`` (1–2 diseases toggled)."""
  seen, out = {_label_set_text(positives)}, []
  while len(out) < n:
    names = set(positives)
    for j in rng.choice(len(_DISEASES), size=int(rng.integers(1, 3)), replace=False):
      names ^= {_DISEASES[int(j)]}
    text = _label_set_text(sorted(names))
    if text not in seen:
      seen.add(text)
      out.append(sorted(names, key=anatomy.CHEXPERT_LABELS.index))
  return out


def _classification(img: _Image, rng: np.random.Generator, k: int) -> list[_Draft]:
  """MIMIC-CXR classification: all-label option list, one of four combinations, disease yes/no."""
  ids = _ids(img)
  diseases = [n for n in img.positives() if n != NO_FINDING]
  kinds = [["options", "choice", "yesno"][int(j)] for j in rng.permutation(3)]
  kinds = (kinds + ["yesno"] * k)[:k]
  answer_text = _label_set_text(diseases)
  out = []
  yes_no = iter(_alternating(rng, diseases, [n for n in _DISEASES if n not in diseases],
                             kinds.count("yesno")))
  for kind in kinds:
    if kind == "options":
      out.append(_Draft("mimic_cxr_classification", "Image Classification",
                        _fill(_CLS_OPTIONS, o=", ".join(anatomy.CHEXPERT_LABELS)), [answer_text],
                        {**ids, "kind": kind}))
    elif kind == "choice":
      sets = [diseases] + _other_sets(rng, diseases, 3)
      order = rng.permutation(4)
      lines = [f"({'ABCD'[j]}) {_label_set_text(sets[int(s)])}" for j, s in enumerate(order)]
      key = "ABCD"[int(np.flatnonzero(order == 0)[0])]
      out.append(_Draft("mimic_cxr_classification", "Image Classification",
                        _fill(_CLS_CHOICE, o="\n".join(lines)), [f"({key}) {answer_text}"],
                        {**ids, "kind": kind}))
    else:
      label, yes = next(yes_no)
      questions = _fill(_CLS_YESNO, d=label)
      if rng.random() < 0.5:
        questions = [q + " Options:\nYes\nNo" for q in questions]
      out.append(_Draft("mimic_cxr_classification", "Image Classification", questions,
                        ["Yes" if yes else "No"], {**ids, "kind": kind, "label": label}))
  return out


def _ids(img: _Image) -> dict[str, str]:
  return {"dicom_id": img.item.dicom_id, "study_id": img.item.study_id,
          "subject_id": img.item.subject_id}


def _rng(seed: int, key: str, stream: int) -> np.random.Generator:
  digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
  return np.random.default_rng([seed, digest, stream])


def _image_drafts(img: _Image, seed: int, per_image: int) -> list[_Draft]:
  """All records of one image, in :data:`TASKS` order (each task has its own random stream)."""
  key = img.item.dicom_id
  grounded = _grounding(img, _rng(seed, key, 0), per_image)
  return [*grounded["Phrase Grounding"], *grounded["Grounded Diagnosis"],
          *grounded["Grounded Captioning"], *_detection(img)[:per_image],
          *_close_vqa(img, _rng(seed, key, 1), per_image),
          *_open_vqa(img, _rng(seed, key, 2), per_image),
          *_rqa(img, _rng(seed, key, 3), per_image),
          *_classification(img, _rng(seed, key, 4), per_image)]


def _drop_extra_negatives(drafts: list[_Draft], rng: np.random.Generator) -> set[int]:
  """Indices of VinDr "No {class} detected." drafts beyond NEGATIVE_SHARE × the positives."""
  negatives = [j for j, d in enumerate(drafts)
               if d.source == "vindr_instruct" and d.meta.get("negative")]
  positives = sum(d.source == "vindr_instruct" and d.task == "Phrase Grounding"
                  and not d.meta.get("negative") for d in drafts)
  extra = len(negatives) - int(positives * NEGATIVE_SHARE)
  if extra <= 0:
    return set()
  return set(rng.choice(negatives, size=extra, replace=False).tolist())


_SLUG = {"Phrase Grounding": "pg", "Grounded Diagnosis": "gd", "Grounded Captioning": "gc",
         "Abnormality Detection": "ad", "Close-Ended VQA": "cvqa", "Open-Ended VQA": "ovqa",
         "RQA": "rqa", "Image Classification": "cls"}


def build(root: str, out_dir: str, *, seed: int = 2025, per_image: int = 2
          ) -> dict[str, dict[str, dict[str, int]]]:
  """Writes instruction records for a synthetic dataset (see the module docstring).

  Args:
    root: a finished :func:`generator.generate` output directory.
    out_dir: where ``{source}/{split}.jsonl`` go (created; other sources' files are left alone).
    seed: the records (questions asked, option layouts, negatives kept) are a function of it.
    per_image: at most this many records per task per image (Abnormality Detection: one).

  Returns:
    ``{source: {split: {task: count}}}`` of what was written.

  Raises:
    FileNotFoundError: ``root`` is not a finished synthetic dataset, or an image is missing.
    preprocess.DataError, scene_graph.SceneGraphError: a malformed table or scene graph.
  """
  if isinstance(per_image, bool) or not isinstance(per_image, int) or per_image < 1:
    raise ValueError(f"per_image must be a positive integer, got {per_image!r}")
  if not os.path.isfile(os.path.join(root, generator.DONE_MARKER)):
    raise FileNotFoundError(f"{root} holds no finished synthetic dataset "
                            f"({generator.DONE_MARKER} missing); run synthetic.generate first")
  paths = generator.layout(root)
  index, _ = preprocess.build_index(paths["mimic_dir"], paths["imagenome_dir"])
  summary: dict[str, dict[str, dict[str, int]]] = {s: {} for s in SOURCES}
  for split_number, split in enumerate(schema.SPLITS):
    images, drafts = [], []
    for item in index.get(split, []):
      img = _read_image(item, paths["mimic_dir"], paths["imagenome_dir"])
      for d in _image_drafts(img, seed, per_image):
        images.append(img)
        drafts.append(d)
    dropped = _drop_extra_negatives(drafts, np.random.default_rng([seed, split_number, 7]))
    by_source: dict[str, list[dict[str, Any]]] = {s: [] for s in SOURCES}
    counters: dict[tuple[str, str, str], int] = {}
    for j, (img, d) in enumerate(zip(images, drafts)):
      if j in dropped:
        continue
      key = (d.source, img.item.dicom_id, d.task)
      n = counters[key] = counters.get(key, -1) + 1
      by_source[d.source].append({
          "id": f"{img.item.dicom_id}-{_SLUG[d.task]}{n}", "source": d.source, "split": split,
          "task": d.task, "image": img.image, "instructions": d.instructions,
          "responses": d.responses, "meta": d.meta})
    for source, records in by_source.items():
      schema.write_jsonl(os.path.join(out_dir, source, f"{split}.jsonl"), records)
      tasks = [r["task"] for r in records]
      summary[source][split] = {t: tasks.count(t) for t in TASKS if t in tasks}
  return summary
