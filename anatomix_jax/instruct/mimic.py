"""MIMIC-CXR reports + Chest ImaGenome → Report Generation and Anatomy Grounding records.

Two sources (REFERENCE.md §4.1), both one pass over the Chest ImaGenome images of the official MIMIC
split (``preprocess.build_index``: split table joined with the CheXpert table, images with a scene
graph; the reference's ``data_split_with_labels.csv``), in split-table order:

  * ``mimic_report_gen`` (:func:`build_report_gen`): one record per image. The study's free-text
    report is split into sections RGRG-style (:func:`report_sections`, the reference's
    ``ReportProcessor``), its findings and impression are cleaned (:func:`clean_section`) and the
    answer is ``"Findings:\\n{findings}\\n\\nImpression:\\n{impression}"`` with only the sections
    present; reports with neither are dropped. Instructions: the 4 report templates.
  * ``anatomy_grounding`` (:func:`build_anatomy_grounding`): 2 random anatomies per image; each
    gives a record with 2 questions and 2 answers drawn from the reference's 20×20 templates. The
    answer holds ``<box>__BOX0__</box>`` and the record's ``boxes`` the anatomy's box (1024
    letterboxed frame, by default the reference's ``int(v * 1024 / 224)`` of the scene graph's 224
    grid), so the loader can fill in the box after augmentation. Draws come from
    ``random.Random(seed)``, reseeded per split, consumed as the reference's global ``random`` was
    (one 2-of-36 sample, then per anatomy a 2-of-20 question sample and a 2-of-20 answer sample).

Differences from the reference (see also the module functions):
  * Anatomies are drawn among those present in the scene graph (``include_absent=False``); the
    reference draws among all 36, so an absent anatomy got the target box ``(0,0),(0,0)``.
    ``include_absent=True`` restores that (and then reproduces the reference's draws exactly).
  * The report answer carries no trailing ``"\\n\\n"`` when only findings are present (the
    reference's Gemma chat template trims it away anyway).
  * Reports that are missing are counted skips; the reference would crash.

Inputs (``generator.layout(root)`` of a synthetic dataset has exactly these keys):
  ``mimic_dir``: MIMIC-CXR-JPG root (``files/``, ``mimic-cxr-2.0.0-split.csv[.gz]``,
  ``mimic-cxr-2.0.0-chexpert.csv[.gz]``); ``imagenome_dir``: Chest ImaGenome root
  (``silver_dataset/scene_graph/``); ``reports_dir``: the MIMIC-CXR reports, a directory holding
  ``files/pXX/pSUBJECT/sSTUDY.txt`` (or the ``files`` directory itself).

Record ``image`` paths are relative to ``mimic_dir``: ``files/pXX/pSUBJECT/sSTUDY/{dicom_id}.jpg``.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Mapping
from typing import Any

from absl import logging

from anatomix_jax import anatomy
from anatomix_jax.data import preprocess, scene_graph
from anatomix_jax.instruct import common, schema

REPORT_SOURCE = "mimic_report_gen"
GROUNDING_SOURCE = "anatomy_grounding"
INPUT_KEYS = ("mimic_dir", "imagenome_dir", "reports_dir")
ANATOMIES_PER_IMAGE = 2
VARIANTS = 2

REPORT_TEMPLATES = ("Generate report:\n", "Write a comprehensive report:\n",
                    "Write findings and impressions:\n", "Generate findings and impressions:\n")

QUESTION_TEMPLATES = (
    "Where is the {} located in this Chest X-ray?",
    "Can you point out the {}'s position on the image?",
    "What's the location of the {} in the X-ray?",
    "Identify where the {} is on this Chest X-ray, please.",
    "Where exactly is the {} found on this image?",
    "Could you specify where to find the {} on this X-ray?",
    "Highlight the {}'s area on the image.",
    "Show me the {}'s location on this CXR.",
    "Where should I look to find the {} in this image?",
    "Can you locate the {} on this X-ray for me?",
    "Please point to the {} on this Chest X-ray.",
    "Indicate the position of the {} on this image.",
    "Describe the location of the {} on the X-ray.",
    "Where on this image is the {} located?",
    "Point out the exact location of the {} in the Chest X-ray.",
    "How can I identify the {} on this image?",
    "Where is the {} situated in this CXR?",
    "Can you highlight the {} on this image?",
    "Indicate where the {} is found on this X-ray.",
    "Describe where to find the {} on this Chest X-ray.",
)

# "{0}" the anatomy, "{1}" the box; the reference's double space in "'s  location" is kept.
ANSWER_TEMPLATES = (
    "The <ref>{0}</ref> is located at the coordinates {1} on the image.",
    "You'll find the <ref>{0}</ref> at {1} in the X-ray.",
    "The <ref>{0}</ref> can be seen at {1} on the Chest X-ray.",
    "The location of the <ref>{0}</ref> is at {1} on the image.",
    "For the <ref>{0}</ref>, the coordinates are {1} on the X-ray.",
    "The <ref>{0}</ref> is situated at {1} in the image.",
    "On the Chest X-ray, the <ref>{0}</ref> is located at {1}.",
    "The <ref>{0}</ref> appears at the coordinates {1} on the image.",
    "In the X-ray, the <ref>{0}</ref> is identifiable at {1}.",
    "The location for the <ref>{0}</ref> is marked at {1} on the Chest X-ray.",
    "The <ref>{0}</ref> is positioned at {1} on the image.",
    "The area occupied by the <ref>{0}</ref> is at {1} in the X-ray.",
    "On the image, you can find the <ref>{0}</ref> at {1}.",
    "The <ref>{0}</ref>'s  location is at {1} on the Chest X-ray.",
    "In terms of coordinates, the <ref>{0}</ref> is found at {1} on the image.",
    "Regarding the <ref>{0}</ref>, it is located at {1} on the X-ray.",
    "The <ref>{0}</ref> specifically is at {1} on the Chest X-ray.",
    "Concerning the <ref>{0}</ref>, you will find it at {1} in the image.",
    "The <ref>{0}</ref> is at {1} on the X-ray.",
    "For identifying the <ref>{0}</ref>, look at {1} on the Chest X-ray.",
)
BOX_PLACEHOLDER = "<box>__BOX0__</box>"

# --- RGRG-style report sectioning (the reference's src/util/data_utils.py) ------------------------

_SECTION = re.compile(r"\n ([A-Z ()/,-]+):\s", re.DOTALL)
# Section-name normalisation: exact names first (MIMIC-CXR's frequent and misspelt headers) ...
_SECTION_NAMES = {
    "preamble": "preamble", "impression": "impression", "comparison": "comparison",
    "indication": "indication", "findings": "findings", "examination": "examination",
    "technique": "technique", "history": "history", "comparisons": "comparison",
    "clinical history": "history", "reason for examination": "indication",
    "notification": "notification", "reason for exam": "indication",
    "clinical information": "history", "exam": "examination", "clinical indication": "indication",
    "conclusion": "impression", "chest, two views": "findings",
    "recommendation(s)": "recommendations", "type of examination": "examination",
    "reference exam": "comparison", "patient history": "history", "addendum": "addendum",
    "comparison exam": "comparison", "date": "date", "comment": "comment",
    "findings and impression": "impression", "wet read": "wet read",
    "comparison film": "comparison", "recommendations": "recommendations",
    "findings/impression": "impression", "pfi": "history", "recommendation": "recommendations",
    "wetread": "wet read", "ndication": "impression", "impresson": "impression",
    "imprression": "impression", "imoression": "impression", "impressoin": "impression",
    "imprssion": "impression", "impresion": "impression", "imperssion": "impression",
    "mpression": "impression", "impession": "impression", "findings/ impression": "impression",
    "finding": "findings", "findins": "findings", "findindgs": "findings",
    "findgings": "findings", "findngs": "findings", "findnings": "findings",
    "finidngs": "findings", "idication": "indication", "reference findings": "findings",
    "comparision": "comparison", "comparsion": "comparison", "comparrison": "comparison",
    "comparisions": "comparison",
}
# ... then names containing a main section's word (in this order), then view-like names = findings.
_MAIN_SECTIONS = ("impression", "findings", "history", "comparison", "addendum")
_VIEW_WORDS = re.compile(
    "(chest|portable|pa and lateral|lateral and pa|ap and lateral|lateral and ap|frontal and|"
    "two views|frontal view|pa view|ap view|one view|lateral view|bone window|frontal upright|"
    "frontal semi-upright|ribs|pa and lat)")
# Header phrases and list markers removed from a section's text (RGRG's list; case-sensitive
# regular expressions, tried in this order at each position: "1. " removes "1" + any char + " ").
_REMOVED = re.compile("|".join((
    r"WET READ VERSION", r"WET READ", r"UPRIGHT PORTABLE AP CHEST RADIOGRAPH:",
    r"UPRIGHT AP VIEW OF THE CHEST:", r"UPRIGHT AP AND LATERAL VIEWS OF THE CHEST:",
    r"TECHNOLOGIST'S NOTE:", r"TECHNIQUE:", r"SUPINE PORTABLE RADIOGRAPH:",
    r"SUPINE PORTABLE CHEST RADIOGRAPHS:", r"SUPINE PORTABLE CHEST RADIOGRAPH:",
    r"SUPINE PORTABLE AP CHEST RADIOGRAPH:", r"SUPINE FRONTAL CHEST RADIOGRAPH:",
    r"SUPINE CHEST RADIOGRAPH:", r"SUPINE AP VIEW OF THE CHEST:",
    r"SINGLE SUPINE PORTABLE VIEW OF THE CHEST:",
    r"SINGLE SEMI-ERECT AP PORTABLE VIEW OF THE CHEST:",
    r"SINGLE PORTABLE UPRIGHT CHEST RADIOGRAPH:", r"SINGLE PORTABLE CHEST RADIOGRAPH:",
    r"SINGLE PORTABLE AP CHEST RADIOGRAPH:", r"SINGLE FRONTAL VIEW OF THE CHEST:",
    r"SINGLE FRONTAL PORTABLE VIEW OF THE CHEST:", r"SINGLE AP UPRIGHT PORTABLE CHEST RADIOGRAPH:",
    r"SINGLE AP UPRIGHT CHEST RADIOGRAPH:", r"SINGLE AP PORTABLE CHEST RADIOGRAPH:",
    r"SEMIERECT PORTABLE RADIOGRAPH OF THE CHEST:", r"SEMIERECT AP VIEW OF THE CHEST:",
    r"SEMI-UPRIGHT PORTABLE RADIOGRAPH OF THE CHEST:", r"SEMI-UPRIGHT PORTABLE CHEST RADIOGRAPH:",
    r"SEMI-UPRIGHT PORTABLE AP RADIOGRAPH OF THE CHEST:", r"SEMI-UPRIGHT AP VIEW OF THE CHEST:",
    r"SEMI-ERECT PORTABLE FRONTAL CHEST RADIOGRAPH:", r"SEMI-ERECT PORTABLE CHEST:",
    r"SEMI-ERECT PORTABLE CHEST RADIOGRAPH:", r"REPORT:",
    r"PORTABLES SEMI-ERECT CHEST RADIOGRAPH:", r"PORTABLE UPRIGHT FRONTAL VIEW OF THE CHEST:",
    r"PORTABLE UPRIGHT AP VIEW OF THE CHEST:", r"PORTABLE UPRIGHT AP VIEW OF THE ABDOMEN:",
    r"PORTABLE SUPINE FRONTAL VIEW OF THE CHEST:", r"PORTABLE SUPINE FRONTAL CHEST RADIOGRAPH:",
    r"PORTABLE SUPINE CHEST RADIOGRAPH:", r"PORTABLE SEMI-UPRIGHT RADIOGRAPH:",
    r"PORTABLE SEMI-UPRIGHT FRONTAL CHEST RADIOGRAPH:", r"PORTABLE SEMI-UPRIGHT CHEST RADIOGRAPH:",
    r"PORTABLE SEMI-UPRIGHT AP CHEST RADIOGRAPH:",
    r"PORTABLE SEMI-ERECT FRONTAL CHEST RADIOGRAPHS:",
    r"PORTABLE SEMI-ERECT FRONTAL CHEST RADIOGRAPH:", r"PORTABLE SEMI-ERECT CHEST RADIOGRAPH:",
    r"PORTABLE SEMI-ERECT AP AND PA CHEST RADIOGRAPH:", r"PORTABLE FRONTAL VIEW OF THE CHEST:",
    r"PORTABLE FRONTAL CHEST RADIOGRAPH:", r"PORTABLE ERECT RADIOGRAPH:",
    r"PORTABLE CHEST RADIOGRAPH:", r"PORTABLE AP VIEW OF THE CHEST:",
    r"PORTABLE AP UPRIGHT CHEST RADIOGRAPH:", r"PORTABLE AP CHEST RADIOGRAPH:",
    r"PA AND LATERAL VIEWS OF THE CHEST:", r"PA AND LATERAL CHEST RADIOGRAPHS:",
    r"PA AND LATERAL CHEST RADIOGRAPH:", r"PA AND LAT CHEST RADIOGRAPH:",
    r"PA AND AP CHEST RADIOGRAPH:", r"NOTIFICATION:", r"IMPRESSON:", r"IMPRESSION: AP CHEST:",
    r"IMPRESSION: AP", r"IMPRESSION:", r"IMPRESSION AP", r"IMPRESSION",
    r"FRONTAL UPRIGHT PORTABLE CHEST:", r"FRONTAL UPRIGHT PORTABLE CHEST:",
    r"FRONTAL UPPER ABDOMINAL RADIOGRAPH, TWO IMAGES:", r"FRONTAL SUPINE PORTABLE CHEST:",
    r"FRONTAL SEMI-UPRIGHT PORTABLE CHEST:", r"FRONTAL RADIOGRAPH OF THE CHEST:",
    r"FRONTAL PORTABLE SUPINE CHEST:", r"FRONTAL PORTABLE CHEST:",
    r"FRONTAL PORTABLE CHEST RADIOGRAPH:", r"FRONTAL LATERAL VIEWS CHEST:",
    r"FRONTAL LATERAL CHEST RADIOGRAPH:", r"FRONTAL CHEST RADIOGRAPHS:",
    r"FRONTAL CHEST RADIOGRAPH:",
    r"FRONTAL CHEST RADIOGRAPH WITH THE PATIENT IN SUPINE AND UPRIGHT POSITIONS:",
    r"FRONTAL AND LATERAL VIEWS OF THE CHEST:", r"FRONTAL AND LATERAL FRONTAL CHEST RADIOGRAPH:",
    r"FRONTAL AND LATERAL CHEST RADIOGRAPHS:", r"FRONTAL AND LATERAL CHEST RADIOGRAPH:",
    r"FRONTAL", r"FINIDNGS:", r"FINDNGS:", r"FINDINGS:", r"FINDINGS/IMPRESSION:",
    r"FINDINGS AND IMPRESSION:", r"FINDINGS", r"FINDING:", r"FINAL REPORT FINDINGS:",
    r"FINAL REPORT EXAMINATION:", r"FINAL REPORT", r"FINAL ADDENDUM ADDENDUM:",
    r"FINAL ADDENDUM ADDENDUM",
    r"FINAL ADDENDUM \*\*\*\*\*\*\*\*\*\*ADDENDUM\*\*\*\*\*\*\*\*\*\*\*",
    r"FINAL ADDENDUM", r"EXAMINATION: DX CHEST PORT LINE/TUBE PLCMT 1 EXAM", r"CONCLUSION:",
    r"COMPARISONS:", r"COMPARISON:", r"COMPARISON.", r"CHEST:", r"CHEST/ABDOMEN RADIOGRAPHS:",
    r"CHEST, TWO VIEWS:", r"CHEST, SINGLE AP PORTABLE VIEW:", r"CHEST, PA AND LATERAL:",
    r"CHEST, AP:", r"CHEST, AP UPRIGHT:", r"CHEST, AP UPRIGHT AND LATERAL:", r"CHEST, AP SUPINE:",
    r"CHEST, AP SEMI-UPRIGHT:", r"CHEST, AP PORTABLE, UPRIGHT:", r"CHEST, AP AND LATERAL:",
    r"CHEST SUPINE:", r"CHEST RADIOGRAPH:", r"CHEST PA AND LATERAL RADIOGRAPH:", r"CHEST AP:",
    r"BEDSIDE UPRIGHT FRONTAL CHEST RADIOGRAPH:", r"AP:", r"AP,", r"AP VIEW OF THE CHEST:",
    r"AP UPRIGHT PORTABLE CHEST RADIOGRAPH:", r"AP UPRIGHT CHEST RADIOGRAPH:",
    r"AP UPRIGHT AND LATERAL CHEST RADIOGRAPHS:", r"AP PORTABLE SUPINE CHEST RADIOGRAPH:",
    r"AP PORTABLE CHEST RADIOGRAPH:", r"AP FRONTAL CHEST RADIOGRAPH:", r"AP CHEST:",
    r"AP CHEST RADIOGRAPH:", r"AP AND LATERAL VIEWS OF THE CHEST:",
    r"AP AND LATERAL CHEST RADIOGRAPHS:", r"AP AND LATERAL CHEST RADIOGRAPH:",
    r"5. ", r"4. ", r"3. ", r"2. ", r"1. ", r"#1 ", r"#2 ", r"#3 ", r"#4 ", r"#5 ")), re.DOTALL)
_SPACES = re.compile(r"[\t ]+")


def _section_name(raw: str) -> str:
  name = raw.lower().strip()
  if name in _SECTION_NAMES:
    return _SECTION_NAMES[name]
  for main in _MAIN_SECTIONS:
    if main in name:
      return main
  return "findings" if _VIEW_WORDS.search(name) else name


def report_sections(text: str) -> dict[str, str]:
  """Splits a MIMIC-CXR report into ``{normalised section name: raw section text}``.

  A section starts at a line ``" HEADER:"`` (upper case after a newline and one space). Empty
  findings/impression sections are dropped; of repeated names the last one wins.
  """
  match = _SECTION.search(text, 0)
  if match is None:
    return {"full report": text}
  sections = [("preamble", text[:match.start(1)])]
  while match:
    name = _section_name(match.group(1))
    start = match.end()
    skip = text[start:].find("\n")  # the next header is searched from the section's second line
    match = _SECTION.search(text, start + max(skip, 0))
    sections.append((name, text[start:len(text) if match is None else match.start()]))
  return {name: body for name, body in sections
          if not (name in ("findings", "impression") and not body.strip())}


def clean_section(text: str) -> str:
  """The reference's section cleaning: header phrases out, whitespace collapsed.

  Newlines are deleted (not replaced by a space); MIMIC-CXR lines start with a space, so words
  stay apart. (The reference's wet-read remover never removes anything: its append is unreachable;
  only the words "WET READ" go, through the phrase list.)
  """
  text = _REMOVED.sub("", text)
  text = _SPACES.sub(" ", text).strip()
  return re.sub(" +", " ", text.replace("\n", ""))


def report_target(text: str) -> str:
  """A report's Report Generation answer, or "" when it has neither findings nor impression."""
  sections = report_sections(text)
  findings = clean_section(sections["findings"]) if "findings" in sections else ""
  impression = clean_section(sections["impression"]) if "impression" in sections else ""
  parts = []
  if findings:
    parts.append(f"Findings:\n{findings}")
  if impression:
    parts.append(f"Impression:\n{impression}")
  return "\n\n".join(parts)


# --- builders -------------------------------------------------------------------------------------


def _index(paths: Mapping[str, str]) -> dict[str, list[preprocess.Item]]:
  try:
    index, excluded = preprocess.build_index(paths["mimic_dir"], paths["imagenome_dir"],
                                             schema.SPLITS)
  except preprocess.DataError as e:
    raise schema.SchemaError(str(e)) from e
  for split, reasons in excluded.items():
    if any(reasons.values()):
      logging.info("MIMIC %s: not used %s", split, reasons)
  return index


def _reports_root(reports_dir: str) -> str:
  files = os.path.join(reports_dir, "files")
  return files if os.path.isdir(files) else reports_dir


def _ids(item: preprocess.Item) -> dict[str, str]:
  return {"dicom_id": item.dicom_id, "study_id": item.study_id, "subject_id": item.subject_id}


def _relative_image(paths: Mapping[str, str], item: preprocess.Item) -> str | None:
  """The image path relative to ``mimic_dir``, or None when the file is missing."""
  path = preprocess.image_path(paths["mimic_dir"], item.subject_id, item.study_id, item.dicom_id)
  return os.path.relpath(path, paths["mimic_dir"]) if os.path.isfile(path) else None


def build_report_gen(inputs: Mapping[str, str], out_dir: str, *, seed: int = 2025
                     ) -> dict[str, int]:
  """Writes ``{out_dir}/mimic_report_gen/{split}.jsonl`` (see the module docstring).

  Args:
    inputs: ``mimic_dir``, ``imagenome_dir``, ``reports_dir``.
    out_dir: output root.
    seed: unused (the records involve no random choice); kept for the common signature.

  Returns:
    ``{split: records}`` plus ``skipped_missing_image``, ``skipped_missing_report`` and
    ``dropped_empty_report`` (reports without findings and impression).

  Raises:
    schema.SchemaError: a malformed split or CheXpert table (file and column named).
  """
  del seed
  paths = common.require_inputs(inputs, INPUT_KEYS, REPORT_SOURCE, dirs=INPUT_KEYS)
  reports_root = _reports_root(paths["reports_dir"])
  skips = common.Skips(REPORT_SOURCE, ("missing_image", "missing_report"))
  empty = 0
  by_split: dict[str, list[dict[str, Any]]] = {}
  for split, items in _index(paths).items():
    records = by_split.setdefault(split, [])
    for item in items:
      image = _relative_image(paths, item)
      if image is None:
        skips.add("missing_image", f"{item.dicom_id}: no image under {paths['mimic_dir']}")
        continue
      report_path = os.path.join(reports_root, f"p{item.subject_id[:2]}", f"p{item.subject_id}",
                                 f"s{item.study_id}.txt")
      try:
        with open(report_path, encoding="utf-8") as f:
          report = f.read()
      except FileNotFoundError:
        skips.add("missing_report", f"{item.dicom_id}: {report_path} does not exist")
        continue
      target = report_target(report)
      if not target:
        empty += 1
        continue
      records.append({"id": item.dicom_id, "source": REPORT_SOURCE, "split": split,
                      "task": "Report Generation", "image": image,
                      "instructions": list(REPORT_TEMPLATES), "responses": [target],
                      "meta": _ids(item)})
  counts = common.write_splits(out_dir, REPORT_SOURCE, by_split)
  return {**counts, **skips.summary(), "dropped_empty_report": empty}


def grounding_texts(name: str, rng: random.Random) -> tuple[list[str], list[str]]:
  """2 questions and 2 answers (with :data:`BOX_PLACEHOLDER`) about anatomy ``name``."""
  questions = [t.format(name) for t in rng.sample(QUESTION_TEMPLATES, k=VARIANTS)]
  answers = [t.format(name, BOX_PLACEHOLDER) for t in rng.sample(ANSWER_TEMPLATES, k=VARIANTS)]
  return questions, answers


def build_anatomy_grounding(inputs: Mapping[str, str], out_dir: str, *, seed: int = 2025,
                            include_absent: bool = False, box_source: str = "grid224"
                            ) -> dict[str, int]:
  """Writes ``{out_dir}/anatomy_grounding/{split}.jsonl`` (see the module docstring).

  Args:
    inputs: ``mimic_dir``, ``imagenome_dir`` (``reports_dir`` is not needed).
    out_dir: output root.
    seed: the draws are a function of it and of the image list.
    include_absent: draw among all 36 anatomies like the reference (absent ones get box
      ``[0, 0, 0, 0]``) instead of among those the scene graph has.
    box_source: ``"grid224"`` (reference) or ``"original"`` (exact letterbox of the original-pixel
      boxes; reads each image's size from its header), see :mod:`anatomix_jax.data.scene_graph`.

  Returns:
    ``{split: records}`` plus ``skipped_missing_image``.

  Raises:
    schema.SchemaError: a malformed table or scene graph (file and field named).
  """
  paths = common.require_inputs(inputs, INPUT_KEYS[:2], GROUNDING_SOURCE, dirs=INPUT_KEYS[:2])
  skips = common.Skips(GROUNDING_SOURCE, ("missing_image",))
  by_split: dict[str, list[dict[str, Any]]] = {}
  for split, items in _index(paths).items():
    rng = random.Random(seed)  # reseeded per split, as the reference builds each split afresh
    records = by_split.setdefault(split, [])
    for item in items:
      image = _relative_image(paths, item)
      if image is None:
        skips.add("missing_image", f"{item.dicom_id}: no image under {paths['mimic_dir']}")
        continue
      graph_path = scene_graph.scene_graph_path(paths["imagenome_dir"], item.dicom_id)
      image_hw = (common.image_size(os.path.join(paths["mimic_dir"], image))
                  if box_source == "original" else None)
      try:
        graph = scene_graph.read_scene_graph(graph_path, box_source=box_source, image_hw=image_hw)
      except scene_graph.SceneGraphError as e:
        raise schema.SchemaError(str(e)) from e
      candidates = [i for i in range(anatomy.NUM_ANATOMIES) if include_absent or graph.present[i]]
      chosen = rng.sample(candidates, k=min(ANATOMIES_PER_IMAGE, len(candidates)))
      for k, index in enumerate(chosen):
        questions, answers = grounding_texts(anatomy.DISPLAY_NAMES[index], rng)
        records.append({
            "id": f"{item.dicom_id}-ag{k}", "source": GROUNDING_SOURCE, "split": split,
            "task": "Anatomy Grounding", "image": image, "instructions": questions,
            "responses": answers, "boxes": [[float(v) for v in graph.boxes[index]]],
            "meta": {**_ids(item), "anatomy": anatomy.ANATOMY_NAMES[index],
                     "anatomy_index": index}})
  counts = common.write_splits(out_dir, GROUNDING_SOURCE, by_split)
  return {**counts, **skips.summary()}


def build(inputs: Mapping[str, str], out_dir: str, *, seed: int = 2025) -> dict[str, int]:
  """Both sources: :func:`build_report_gen` and :func:`build_anatomy_grounding`.

  Returns:
    Their counts with keys prefixed by the source: ``"mimic_report_gen/train"``, ...,
    ``"anatomy_grounding/skipped_missing_image"``.
  """
  out = {f"{REPORT_SOURCE}/{k}": v
         for k, v in build_report_gen(inputs, out_dir, seed=seed).items()}
  out.update({f"{GROUNDING_SOURCE}/{k}": v
              for k, v in build_anatomy_grounding(inputs, out_dir, seed=seed).items()})
  return out
