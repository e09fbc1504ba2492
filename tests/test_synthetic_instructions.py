"""Synthetic instruction records: schema, splits, and answers checked against the dataset files.

The facts (split table, CheXpert table, scene-graph boxes and attributes) are read here straight
from the files, without the project's readers, and every record's answer is parsed from its text.
"""

import collections
import copy
import csv
import filecmp
import gzip
import json
import os
import re

import pytest

from anatomix_jax.instruct import schema
from anatomix_jax.synthetic import generator, instructions

NUM_TRAIN, NUM_VAL, NUM_TEST = 48, 8, 8
PER_IMAGE = 2
LABELS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
          "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion",
          "Pleural Other", "Pneumonia", "Pneumothorax", "Support Devices")
ZONE = r"(right|left) (upper|mid|lower) lung zone"
# Where the generator draws each finding (phantom.py / render.py), by the records' class names:
# class → (scene-graph finding, CheXpert label, anatomy bbox_name pattern, question wording).
CLASSES = {
    "Pneumonia": ("pneumonia", "Pneumonia", ZONE, "pneumonia"),
    "Consolidation": ("consolidation", "Consolidation", ZONE, "consolidation"),
    "Atelectasis": ("atelectasis", "Atelectasis", r"(right|left) lower lung zone", "atelectasis"),
    "Nodule/Mass": ("mass/nodule (not otherwise specified)", "Lung Lesion", ZONE, "nodule"),
    "Pleural thickening": ("pleural/parenchymal scarring", "Pleural Other", ZONE,
                           "pleural thickening"),
    "Pleural effusion": ("pleural effusion", "Pleural Effusion", r"(right|left) lower lung zone",
                         "pleural effusion"),
    "Pneumothorax": ("pneumothorax", "Pneumothorax", r"(right|left) apical zone", "pneumothorax"),
    "Edema": ("pulmonary edema/hazy opacity", "Edema", r"(right|left) lung", "pulmonary edema"),
    "Lung Opacity": ("lung opacity", "Lung Opacity", ZONE, "lung opacity"),
    "Cardiomegaly": ("enlarged cardiac silhouette", "Cardiomegaly", "cardiac silhouette",
                     "enlarged cardiac silhouette"),
    "Mediastinal widening": ("mediastinal widening", "Enlarged Cardiomediastinum",
                             "upper mediastinum", "mediastinal widening"),
    "Clavicle fracture": ("fracture", "Fracture", r"(right|left) clavicle", "fracture"),
}
DEVICES = {"endotracheal tube": ("endotracheal tube", "trachea"),
           "internal jugular line": ("ij line", "svc"),
           "pacemaker": ("cardiac pacer and wires", "left upper lung zone"),
           "enteric tube": ("enteric tube", "left upper abdomen")}
# Close-ended questions name the labels so.
TERMS = {"Atelectasis": "atelectasis", "Cardiomegaly": "cardiomegaly",
         "Consolidation": "consolidation", "Edema": "pulmonary edema",
         "Enlarged Cardiomediastinum": "enlarged cardiomediastinum", "Fracture": "fracture",
         "Lung Lesion": "lung lesion", "Lung Opacity": "lung opacity",
         "Pleural Effusion": "pleural effusion", "Pleural Other": "pleural thickening",
         "Pneumonia": "pneumonia", "Pneumothorax": "pneumothorax",
         "Support Devices": "support devices"}
SOURCE_TASKS = {
    "vindr_instruct": {"Abnormality Detection", "Phrase Grounding", "Grounded Diagnosis"},
    "mscxr": {"Phrase Grounding", "Grounded Captioning", "Grounded Diagnosis"},
    "mimic_vqa": {"Close-Ended VQA", "Open-Ended VQA"},
    "radialog_instruct": {"RQA"},
    "mimic_cxr_classification": {"Image Classification"},
}
BOX = re.compile(r"<box>\((\d+),(\d+)\),\((\d+),(\d+)\)</box>")
REF_BOX = re.compile(r"<ref>([^<]+)</ref><box>\((\d+),(\d+)\),\((\d+),(\d+)\)</box>")


# ---- independent facts -------------------------------------------------------------------------

def _table(path):
  with gzip.open(path, "rt", newline="") as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("synthetic"))
  return generator.generate(root, NUM_TRAIN, NUM_VAL, NUM_TEST, seed=3, workers=1)


@pytest.fixture(scope="module")
def facts(dataset):
  """{dicom_id: facts} from the split/CheXpert tables and the scene-graph JSON files."""
  positives = {(r["subject_id"], r["study_id"]): {n for n in LABELS if r[n] == "1.0"}
               for r in _table(dataset["chexpert_csv"])}
  out = {}
  for row in _table(dataset["split_csv"]):
    path = os.path.join(dataset["imagenome_dir"], "silver_dataset", "scene_graph",
                        f"{row['dicom_id']}_SceneGraph.json")
    graph = json.load(open(path))
    boxes = {o["bbox_name"]: tuple(int(o[k] * 1024 / 224) for k in ("x1", "y1", "x2", "y2"))
             for o in graph["objects"]}
    yes, phrases = collections.defaultdict(set), collections.defaultdict(dict)
    for entry in graph["attributes"]:
      for phrase, group in zip(entry["phrases"], entry["attributes"]):
        parts = [a.split("|") for a in group]
        found = {f for category, presence, f in parts
                 if presence == "yes" and category not in ("nlp", "laterality", "severity")}
        yes[entry["bbox_name"]] |= found
        phrases[phrase.rstrip(".")][entry["bbox_name"]] = found
    out[row["dicom_id"]] = {**row, "positives": positives[(row["subject_id"], row["study_id"])],
                            "boxes": boxes, "yes": yes, "phrases": phrases}
  return out


def _where(fact, finding, pattern):
  """bbox_names (present or not) where ``finding`` is positive and drawn (``pattern``)."""
  return {b for b, found in fact["yes"].items() if finding in found and re.fullmatch(pattern, b)}


def _expected_boxes(fact, cls):
  finding, _, pattern, _ = CLASSES[cls]
  return {fact["boxes"][b] for b in _where(fact, finding, pattern) if b in fact["boxes"]}


def _boxes(text):
  return {tuple(int(v) for v in m) for m in BOX.findall(text)}


def _ref_boxes(text):
  return [(m[0], tuple(int(v) for v in m[1:])) for m in REF_BOX.findall(text)]


@pytest.fixture(scope="module")
def built(dataset, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("instruct"))
  summary = instructions.build(dataset["root"], out, seed=2025, per_image=PER_IMAGE)
  return out, summary


def _read(out):
  records = []
  for source in SOURCE_TASKS:
    for split in schema.SPLITS:
      path = os.path.join(out, source, f"{split}.jsonl")
      assert os.path.isfile(path), path
      for r in schema.read_jsonl(path):  # validates every record
        assert (r["source"], r["split"]) == (source, split), (path, r["id"])
        records.append(r)
  return records


@pytest.fixture(scope="module")
def records(built):
  return _read(built[0])


# ---- the checker: one answer against the facts -------------------------------------------------

def _check_grounding(r, fact):
  text, answer = r["instructions"][0], r["responses"][0]
  if r["source"] == "vindr_instruct" and r["task"] == "Phrase Grounding":
    asked = re.match(r"Detect (.+) in the given image\.$", text).group(1)
    cls = next(c for c in CLASSES if c.lower() == asked)
    if answer == f"No {asked} detected.":
      assert not _where(fact, CLASSES[cls][0], CLASSES[cls][2]), (r["id"], cls)
      return
    pairs = _ref_boxes(answer)
    assert pairs and {c for c, _ in pairs} == {cls} and "".join(
        f"<ref>{c}</ref><box>({b[0]},{b[1]}),({b[2]},{b[3]})</box>" for c, b in pairs) == answer
    assert {b for _, b in pairs} == _expected_boxes(fact, cls), r["id"]
    assert len(pairs) == len(_where(fact, CLASSES[cls][0], CLASSES[cls][2])), r["id"]
  elif r["task"] == "Abnormality Detection":
    drawn = {c: _where(fact, v[0], v[2]) for c, v in CLASSES.items()}
    assert all(b in fact["boxes"] for w in drawn.values() for b in w), r["id"]  # none missing
    expected = sorted((c, fact["boxes"][b]) for c, w in drawn.items() for b in w)
    if answer == "No abnormalities detected.":
      assert not expected, r["id"]
    else:
      assert sorted(_ref_boxes(answer)) == expected, r["id"]
  elif r["source"] == "vindr_instruct" and r["task"] == "Grounded Diagnosis":
    (box,) = _boxes(text)
    expected = {c for c in CLASSES if box in _expected_boxes(fact, c)}
    assert set(answer.split(", ")) == expected, r["id"]
  elif r["source"] == "mscxr":
    if r["task"] == "Phrase Grounding":
      pairs = _ref_boxes(answer)
      phrase = pairs[0][0]
      assert {p for p, _ in pairs} == {phrase}, r["id"]
      assert r["instructions"][0] == f"Please locate the following phrase: {phrase}"
      boxes = {b for _, b in pairs}
    elif r["task"] == "Grounded Captioning":
      phrase, boxes = answer, _boxes(text)
    else:
      boxes, phrase = _boxes(text), None
    # A phrase's boxes: the anatomies it names in which one of its findings is drawn.
    regions = {}
    for p, named in fact["phrases"].items():
      drawn = [(b, v) for b, found in named.items() for v in CLASSES.values()
               if v[0] in found and re.fullmatch(v[2], b)]
      hits = {fact["boxes"][b] for b, _ in drawn if b in fact["boxes"]}
      labels = {v[1] for _, v in drawn}
      if hits:
        regions[p] = (hits, labels, all(b in fact["boxes"] for b, _ in drawn))
    if phrase is not None:
      assert phrase in regions and regions[phrase][0] == boxes and regions[phrase][2], r["id"]
      if r["task"] == "Grounded Captioning":  # a caption names the one phrase of its region(s)
        assert [p for p, (h, _, _) in regions.items() if h == boxes] == [phrase], r["id"]
    else:
      labels = set().union(*(l for h, l, _ in regions.values() if h == boxes))
      assert labels and set(answer.split(", ")) <= labels, r["id"]
  else:
    raise AssertionError(f"unexpected grounded record {r['source']}/{r['task']}")


def _yes_no(r):
  """(asked label, answer) of a close-ended record, parsed from its option block and response."""
  options = [dict(re.findall(r"^\((\w)\) (yes|no)$", q, re.M)) for q in r["instructions"]]
  assert all(o == options[0] and sorted(o.values()) == ["no", "yes"] for o in options), r["id"]
  key, word = re.fullmatch(r"\((\w)\)(?: (yes|no))?", r["responses"][0]).groups()
  direct = all(q.endswith("from the given choices directly.") for q in r["instructions"])
  assert (word is None) == direct and word in (None, options[0][key]), r["id"]
  question = r["instructions"][0].split(" Options:")[0]
  if "normal" in question:
    return "No Finding", options[0][key]
  (label,) = [n for n, t in TERMS.items() if re.search(rf"\b{re.escape(t)}\b", question)]
  return label, options[0][key]


def _check(r, fact):
  """Asserts that a record's answer is what the image shows (per the independent facts)."""
  assert r["split"] == fact["split"], r["id"]
  assert r["image"] == (f"files/p{fact['subject_id'][:2]}/p{fact['subject_id']}/"
                        f"s{fact['study_id']}/{fact['dicom_id']}.jpg"), r["id"]
  assert r["task"] in SOURCE_TASKS[r["source"]], r["id"]
  text, answer = r["instructions"][0], r["responses"][0]
  diseases = fact["positives"] - {"No Finding"}
  if r["task"] in schema.NO_AUG_TASKS:
    _check_grounding(r, fact)
  elif r["task"] == "Close-Ended VQA":
    label, word = _yes_no(r)
    assert (word == "yes") == (label in fact["positives"]), (r["id"], label)
  elif r["task"] == "Image Classification":
    names = "No Finding" if not diseases else ", ".join(n for n in LABELS if n in diseases)
    if text.startswith("Which findings") or text.startswith("Which combination"):
      lines = dict(re.findall(r"^\(([A-D])\) (.+)$", text, re.M))
      key = re.fullmatch(r"\(([A-D])\) (.+)", answer).group(1)
      assert answer == f"({key}) {names}" and lines[key] == names, r["id"]
      assert len(set(lines.values())) == 4, r["id"]
    elif "There may be more than one answer." in text:
      assert answer == names, r["id"]
    else:
      label = re.match(r"Does this chest X-ray show (.+)\?", text).group(1)
      assert answer == ("Yes" if label in diseases else "No"), (r["id"], label)
  elif r["task"] == "Open-Ended VQA":
    if text.startswith("What abnormalities"):
      found = {TERMS[n] for n in diseases - {"Support Devices"}}
      assert (set(answer.split(", ")) if answer != "none" else set()) == found, r["id"]
    else:
      term = re.fullmatch(r"Where is the (.+) located\?", text).group(1)
      finding, pattern = next(((v[0], v[2]) for v in CLASSES.values() if v[3] == term), None) or (
          DEVICES[term][0], DEVICES[term][1])
      regions = {b.replace("svc", "superior vena cava") for b in _where(fact, finding, pattern)}
      assert set(answer.split(" and ")) == regions, r["id"]
  elif r["task"] == "RQA":
    region = re.fullmatch(r"What are the findings in the (.+)\?", text).group(1)
    bbox = "svc" if region == "superior vena cava" else region
    assert bbox in fact["boxes"], r["id"]
    found = fact["yes"].get(bbox, set())
    if found:
      assert answer.startswith(region[0].upper() + region[1:] + " shows "), r["id"]
      assert all(f in answer for f in found), r["id"]
    else:
      assert answer == f"{region[0].upper()}{region[1:]} is healthy.", r["id"]
  else:
    raise AssertionError(f"unexpected task {r['task']}")


# ---- tests -------------------------------------------------------------------------------------

def test_records_valid_complete_and_split_like_the_images(records, facts, built):
  assert records
  per_task = collections.Counter(r["task"] for r in records if r["split"] == "train")
  assert set(per_task) == set(instructions.TASKS), per_task
  assert all(per_task[t] >= 3 for t in instructions.TASKS), per_task
  assert {(r["source"], r["split"]) for r in records} == {
      (s, sp) for s in SOURCE_TASKS for sp in schema.SPLITS}
  assert len({(r["source"], r["split"], r["id"]) for r in records}) == len(records)
  per_image = collections.Counter((r["image"], r["task"]) for r in records)
  assert max(per_image.values()) <= PER_IMAGE
  for r in records:
    fact = facts[os.path.basename(r["image"])[:-len(".jpg")]]
    assert r["split"] == fact["split"], r["id"]
  summary = built[1]
  assert sum(n for s in summary.values() for sp in s.values() for n in sp.values()) == len(records)


def test_images_exist_under_the_mimic_root(records, dataset):
  for image in {r["image"] for r in records}:
    assert not os.path.isabs(image) and os.path.isfile(os.path.join(dataset["mimic_dir"], image))


def test_every_answer_matches_the_dataset_files(records, facts):
  checked = collections.Counter()
  for r in records:
    _check(r, facts[r["meta"]["dicom_id"]])
    checked[(r["source"], r["task"])] += 1
  assert set(checked) == {(s, t) for s, ts in SOURCE_TASKS.items() for t in ts}


def test_grounded_answers_hold_real_boxes(records, facts):
  # Boxes are non-trivial: most differ between images, and each is a scene-graph box of that image.
  boxes = collections.Counter()
  for r in records:
    if r["task"] in schema.NO_AUG_TASKS:
      fact = facts[r["meta"]["dicom_id"]]
      for box in _boxes(r["instructions"][0] + r["responses"][0]):
        assert box in fact["boxes"].values(), r["id"]
        boxes[box] += 1
  assert len(boxes) > 40


def test_yes_no_balanced_and_both_option_layouts(records):
  for split in schema.SPLITS:
    answers = collections.Counter(_yes_no(r)[1] for r in records
                                  if r["split"] == split and r["task"] == "Close-Ended VQA")
    assert answers["yes"] == answers["no"] > 0, (split, answers)
  close = [r for r in records if r["task"] == "Close-Ended VQA"]
  firsts = {re.search(r"Options:\n(\(\w\) \w+)", r["instructions"][0]).group(1) for r in close}
  assert {"(A) yes", "(A) no"} <= firsts
  assert any(r["responses"][0] in ("(A)", "(B)", "(a)", "(b)", "(1)", "(2)") for r in close)
  labels = collections.Counter(_yes_no(r)[0] for r in close)
  assert len(labels) >= 8  # questions cover many labels, not just one


def test_negative_grounding_capped(records):
  vindr_pg = [r for r in records if r["source"] == "vindr_instruct"
              and r["task"] == "Phrase Grounding" and r["split"] == "train"]
  negatives = sum(r["responses"][0].startswith("No ") for r in vindr_pg)
  assert 0 < negatives <= (len(vindr_pg) - negatives) / 3


def test_checker_catches_wrong_answers(records, facts):
  def fails(r):
    with pytest.raises(AssertionError):
      _check(r, facts[r["meta"]["dicom_id"]])

  pg = next(r for r in records if r["source"] == "vindr_instruct"
            and r["task"] == "Phrase Grounding" and "<box>" in r["responses"][0])
  bad = copy.deepcopy(pg)
  bad["responses"][0] = re.sub(r"\((\d+),", lambda m: f"({int(m.group(1)) + 8},",
                               bad["responses"][0], count=1)
  fails(bad)
  close = next(r for r in records if r["task"] == "Close-Ended VQA")
  bad = copy.deepcopy(close)
  label, word = _yes_no(close)
  options = dict(re.findall(r"^\((\w)\) (yes|no)$", close["instructions"][0], re.M))
  other = next(k for k, w in options.items() if w != word)
  bad["responses"][0] = f"({other})" if bad["responses"][0].endswith(")") else (
      f"({other}) {options[other]}")
  fails(bad)
  cls = next(r for r in records if r["task"] == "Image Classification"
             and r["responses"][0] in ("Yes", "No"))
  bad = copy.deepcopy(cls)
  bad["responses"][0] = "No" if cls["responses"][0] == "Yes" else "Yes"
  fails(bad)
  wrong_split = copy.deepcopy(close)
  wrong_split["split"] = "test" if close["split"] != "test" else "train"
  fails(wrong_split)


def test_deterministic_given_the_seed(dataset, built, tmp_path):
  out = built[0]
  files = sorted(os.path.join(s, f"{sp}.jsonl") for s in SOURCE_TASKS for sp in schema.SPLITS)
  again = str(tmp_path / "again")
  assert instructions.build(dataset["root"], again, seed=2025, per_image=PER_IMAGE) == built[1]
  _, mismatch, errors = filecmp.cmpfiles(out, again, files, shallow=False)
  assert not mismatch and not errors
  other = str(tmp_path / "other")
  instructions.build(dataset["root"], other, seed=7, per_image=PER_IMAGE)
  _, mismatch, errors = filecmp.cmpfiles(out, other, files, shallow=False)
  assert len(mismatch) >= 5 and not errors


def test_per_image_cap(dataset, tmp_path, facts):
  summary = instructions.build(dataset["root"], str(tmp_path), seed=2025, per_image=1)
  records = _read(str(tmp_path))
  assert max(collections.Counter((r["image"], r["task"]) for r in records).values()) == 1
  for r in records:
    _check(r, facts[r["meta"]["dicom_id"]])
  assert sum(n for s in summary.values() for sp in s.values() for n in sp.values()) == len(records)


def test_bad_arguments(dataset, tmp_path):
  with pytest.raises(ValueError, match="per_image"):
    instructions.build(dataset["root"], str(tmp_path), per_image=0)
  with pytest.raises(FileNotFoundError, match="synthetic"):
    instructions.build(str(tmp_path / "empty"), str(tmp_path / "out"))
