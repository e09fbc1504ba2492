"""Instruction processors of grounded sources: VinDr-CXR, MS-CXR, PadChest-GR, MIMIC + ImaGenome.

Each real source gets a tiny hand-made dataset in its released schema (CSV column names, JSON
structure, small PNG/JPEG files); expected boxes and texts are computed by hand in the comments.
The MIMIC processors run on a tiny dataset of the synthetic generator; their answers are checked
against the generator's files, read here without the project's readers.
"""

import csv
import gzip
import json
import os
import random
import re
import shutil

import pytest
from PIL import Image

from anatomix_jax import anatomy
from anatomix_jax.instruct import mimic, mscxr, padchest_gr, schema, vindr
from anatomix_jax.synthetic import generator


def _png(path, height, width):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new("L", (width, height), 0).save(path)


def _csv(path, header, rows):
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)


def _read(out, source):
  records = {}
  for split in schema.SPLITS:
    records[split] = list(schema.read_jsonl(os.path.join(out, source, f"{split}.jsonl")))
  return records


def _by_id(records):
  return {r["id"]: r for split in records.values() for r in split}


# --- VinDr-CXR ----------------------------------------------------------------------------------

VINDR_HEADER = ["image_id", "rad_id", "class_name", "x_min", "y_min", "x_max", "y_max"]
TEST_CLASSES = ["Atelectasis", "Calcification", "Consolidation", "ILD", "Infiltration",
                "Lung Opacity"]
# Per train image: (height, width, [(class, box), ...]); box None = a "No finding" row.
VINDR_TRAIN = {
    "wide": (100, 200, [("Cardiomegaly", (20, 10, 60, 40))]),
    "merge": (256, 256, [("Aortic enlargement", (10, 10, 50, 50)),
                         ("Aortic enlargement", (20, 20, 60, 60)),
                         ("Aortic enlargement", (100, 100, 120, 120)),
                         ("Cardiomegaly", (10, 10, 50, 50)),
                         ("Cardiomegaly", (45, 45, 85, 85))]),
    "many": (256, 256, [("Nodule/Mass", (0, 0, 10, 10)), ("Nodule/Mass", (100, 0, 110, 10)),
                        ("Nodule/Mass", (200, 0, 210, 10)),
                        ("Pleural effusion", (0, 100, 10, 110)),
                        ("Aortic enlargement", (0, 200, 10, 210)),
                        ("Aortic enlargement", (100, 200, 110, 210))]),
    "five": (256, 256, [(c, (10 * i, 10 * i, 10 * i + 5, 10 * i + 5))
                        for i, c in enumerate(TEST_CLASSES[:5])]),
    **{f"n{i}": (64, 64, [("No finding", None)] * 3) for i in range(6)},
}
VINDR_TEST = {
    **{f"p{i}": (64, 64, [(c, (10, 10, 20, 20))]) for i, c in enumerate(TEST_CLASSES)},
    **{f"q{i}": (64, 64, [("No finding", None)]) for i in range(4)},
    "gone": (64, 64, [("Pneumothorax", (1, 1, 2, 2))]),  # no image file
}


def _vindr_rows(table):
  rows = []
  for image_id, (_, _, boxes) in table.items():
    for k, (name, box) in enumerate(boxes):
      rows.append([image_id, f"R{8 + k}", name, *(box if box else ("", "", "", ""))])
  return rows


@pytest.fixture()
def vindr_inputs(tmp_path):
  root = tmp_path / "vindr"
  (root / "annotations").mkdir(parents=True)
  _csv(root / "annotations" / "annotations_train.csv", VINDR_HEADER, _vindr_rows(VINDR_TRAIN))
  _csv(root / "annotations" / "annotations_test.csv", VINDR_HEADER, _vindr_rows(VINDR_TEST))
  for folder, table in (("train", VINDR_TRAIN), ("test", VINDR_TEST)):
    for image_id, (height, width, _) in table.items():
      if image_id != "gone":
        _png(str(root / folder / f"{image_id}.png"), height, width)
  return {"annotations_train": str(root / "annotations" / "annotations_train.csv"),
          "annotations_test": str(root / "annotations" / "annotations_test.csv"),
          "image_dir": str(root)}


@pytest.fixture()
def vindr_built(vindr_inputs, tmp_path):
  out = str(tmp_path / "out")
  counts = vindr.build(vindr_inputs, out, seed=2025)
  return counts, _read(out, "vindr_instruct")


def test_vindr_split_assignment(vindr_built):
  counts, records = vindr_built
  # The reference: random.seed(2025); random.sample(unique train ids, int(0.1 * n)).
  val_ids = set(random.Random(2025).sample(list(VINDR_TRAIN), 1))
  seen = {s: {r["meta"]["image_id"] for r in records[s]} for s in schema.SPLITS}
  assert seen["validate"] <= val_ids
  assert not seen["train"] & val_ids
  assert seen["train"] <= set(VINDR_TRAIN)
  assert seen["test"] <= set(VINDR_TEST) - {"gone"}
  for split in schema.SPLITS:
    assert counts[split] == len(records[split])
    for r in records[split]:
      folder = "test" if split == "test" else "train"
      assert r["image"] == f"{folder}/{r['meta']['image_id']}.png"


def test_vindr_letterbox_offset_on_a_wide_image(vindr_built):
  records = _by_id(vindr_built[1])
  # 100 high × 200 wide: 50 rows of padding on top and bottom, scale 1024 / 200 = 5.12:
  # (20, 10, 60, 40) → (20·5.12, 60·5.12, 60·5.12, 90·5.12) = (102.4, 307.2, 307.2, 460.8) → int.
  # (The reference, without the offset, would give (102,102),(307,409).)
  assert records["wide-ad"]["responses"] == [
      "<ref>Cardiomegaly</ref><box>(102,307),(307,460)</box>"]
  assert records["wide-gd0"]["instructions"] == [
      "Please give the corresponding diagnosis for the following region(s): "
      "<box>(102,307),(307,460)</box>",
      "Provide a diagnosis based on the content of the following region(s): "
      "<box>(102,307),(307,460)</box>"]
  assert records["wide-gd0"]["responses"] == ["Cardiomegaly"]


def test_vindr_iou_merge_sorting_and_templates(vindr_built):
  records = _by_id(vindr_built[1])
  # 256² image, scale 4. Aortic enlargement (40,40,200,200) and (80,80,240,240): IoU
  # 120²/(2·160² − 120²) = 0.39 > 0.1 → union (40,40,240,240); (400,400,480,480) stays apart.
  # Cardiomegaly (40,40,200,200) and (180,180,340,340): IoU 20²/(2·160² − 20²) = 0.008 → apart.
  # Detection sorts by (x1, y1); the two boxes at (40,40) keep the merge order.
  assert records["merge-ad"]["responses"] == [
      "<ref>Aortic enlargement</ref><box>(40,40),(240,240)</box>"
      "<ref>Cardiomegaly</ref><box>(40,40),(200,200)</box>"
      "<ref>Cardiomegaly</ref><box>(180,180),(340,340)</box>"
      "<ref>Aortic enlargement</ref><box>(400,400),(480,480)</box>"]
  assert records["merge-ad"]["instructions"] == [
      "Detect abnormalities in the given image.",
      "Locate areas in the chest X-ray where abnormalities are present, using bounding box "
      "coordinates",
      "Perform abnormality detection (in the bounding box format) for the given image.",
      "Find the locations of abnormalities in the bounding box format for the given image.",
      "Locate abnormalities for the given image."]
  grounding = records["merge-pg0"]  # classes in sorted order: Aortic enlargement first
  assert grounding["instructions"] == [
      "Detect aortic enlargement in the given image.",
      "Locate areas in the chest X-ray where aortic enlargement is present, using bounding box "
      "coordinates",
      "Localize aortic enlargement in the bounding box format for the given image.",
      "Find the locations of aortic enlargement in the bounding box format for the given image.",
      "Locate aortic enlargement for the given image."]
  assert grounding["responses"] == ["<ref>Aortic enlargement</ref><box>(40,40),(240,240)</box>"
                                    "<ref>Aortic enlargement</ref><box>(400,400),(480,480)</box>"]
  assert records["merge-pg1"]["responses"] == [
      "<ref>Cardiomegaly</ref><box>(40,40),(200,200)</box>"
      "<ref>Cardiomegaly</ref><box>(180,180),(340,340)</box>"]
  diagnosis = sorted((r["responses"][0], r["instructions"][0].split(": ")[1])
                     for i, r in records.items() if i.startswith("merge-gd"))
  assert diagnosis == [("Aortic enlargement", "<box>(40,40),(240,240)</box>"),
                       ("Aortic enlargement", "<box>(400,400),(480,480)</box>"),
                       ("Cardiomegaly", "<box>(180,180),(340,340)</box>"),
                       ("Cardiomegaly", "<box>(40,40),(200,200)</box>")]


def test_vindr_box_count_rules(vindr_built):
  records = _by_id(vindr_built[1])
  # "many": 6 boxes → no detection; Nodule/Mass has 3 boxes → neither grounding nor diagnosis.
  assert "many-ad" not in records
  many = [r for i, r in records.items() if i.startswith("many-")]
  assert {r["meta"]["class"] for r in many} == {"Aortic enlargement", "Pleural effusion"}
  assert sum(r["task"] == "Grounded Diagnosis" for r in many) == 3
  # "five": exactly 5 boxes → detection kept, sorted by x1 (0, 40, 80, 120, 160 after ×4).
  assert re.findall(r"<ref>(.*?)</ref>", records["five-ad"]["responses"][0]) == TEST_CLASSES[:5]


def test_vindr_negatives_capped_and_missing_image_counted(vindr_built):
  counts, records = vindr_built
  test = records["test"]
  assert counts["skipped_missing_image"] == 1 and counts["skipped_unreadable_image"] == 0
  assert not any(r["meta"]["image_id"] == "gone" for r in test)
  detection = [r for r in test if r["task"] == "Abnormality Detection"]
  grounding = [r for r in test if r["task"] == "Phrase Grounding"]
  # 6 positive images, 4 normal ones: 6 // 3 = 2 normals kept.
  no_abnormal = [r for r in detection if r["responses"] == ["No abnormalities detected."]]
  assert len(detection) == 8 and len(no_abnormal) == 2
  assert {r["meta"]["image_id"] for r in no_abnormal} < {"q0", "q1", "q2", "q3"}
  # 6 positives + 6 "No {class} detected." → 2 negatives kept; the class lower-cased.
  negatives = [r for r in grounding if r["responses"][0].startswith("No ")]
  assert len(grounding) == 8 and len(negatives) == 2
  for r in negatives:
    assert r["responses"] == [f"No {r['meta']['class'].lower()} detected."]
  assert sum(r["task"] == "Grounded Diagnosis" for r in test) == 6
  assert counts["test"] == 22
  for split in ("train", "validate"):  # the cap holds in every split
    for task in ("Abnormality Detection", "Phrase Grounding"):
      rs = [r for r in records[split] if r["task"] == task]
      neg = sum("<box>" not in r["responses"][0] for r in rs)
      assert neg <= (len(rs) - neg) // 3


def test_vindr_deterministic_and_absent_negatives(vindr_inputs, vindr_built, tmp_path):
  again = str(tmp_path / "again")
  vindr.build(vindr_inputs, again, seed=2025)
  assert _read(again, "vindr_instruct") == vindr_built[1]
  absent = str(tmp_path / "absent")
  vindr.build(vindr_inputs, absent, seed=2025, negatives="absent")
  classes = {i: {c for c, _ in v[2]} for i, v in {**VINDR_TRAIN, **VINDR_TEST}.items()}
  negatives = [r for s in _read(absent, "vindr_instruct").values() for r in s
               if r["task"] == "Phrase Grounding" and r["meta"]["negative"]]
  assert negatives
  for r in negatives:
    assert r["meta"]["class"] not in classes[r["meta"]["image_id"]]
    assert r["meta"]["class"] in classes[r["meta"]["paired_with"]]


def test_vindr_bad_schema_names_the_column(vindr_inputs, tmp_path):
  path = tmp_path / "bad.csv"
  _csv(path, ["image_id", "rad_id", "x_min", "y_min", "x_max", "y_max"], [["a", "R1", 1, 2, 3, 4]])
  with pytest.raises(schema.SchemaError, match=r"bad\.csv.*class_name"):
    vindr.build({**vindr_inputs, "annotations_train": str(path)}, str(tmp_path / "o"))
  _csv(path, VINDR_HEADER, [["wide", "R1", "Cardiomegaly", "abc", 2, 3, 4]])
  with pytest.raises(schema.SchemaError, match=r"bad\.csv:2: 'x_min' is not a number"):
    vindr.build({**vindr_inputs, "annotations_train": str(path)}, str(tmp_path / "o"))
  _csv(path, VINDR_HEADER, [["wide", "R1", "Cardiomegaly", 30, 2, 3, 4]])
  with pytest.raises(schema.SchemaError, match=r"bad\.csv:2: bad box"):
    vindr.build({**vindr_inputs, "annotations_train": str(path)}, str(tmp_path / "o"))


def test_vindr_dicom_without_pydicom_says_what_to_do(tmp_path, monkeypatch):
  root = tmp_path / "dcm"
  (root / "train").mkdir(parents=True)
  (root / "test").mkdir()
  (root / "train" / "a.dicom").write_bytes(b"\0" * 132 + b"DICM")
  _csv(root / "train.csv", VINDR_HEADER, [["a", "R1", "No finding", "", "", "", ""]])
  _csv(root / "test.csv", VINDR_HEADER, [])
  monkeypatch.setitem(__import__("sys").modules, "pydicom", None)  # import pydicom fails
  with pytest.raises(ImportError, match=r"a\.dicom.*pip install pydicom.*PNG"):
    vindr.build({"annotations_train": str(root / "train.csv"),
                 "annotations_test": str(root / "test.csv"), "image_dir": str(root)},
                str(tmp_path / "o"))


# --- MS-CXR --------------------------------------------------------------------------------------

MSCXR_HEADER = ["dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h",
                "image_width", "image_height", "split"]
D1 = "files/p10/p10000032/s50414267/d1.jpg"
MSCXR_ROWS = [
    # d1: 2000 high × 1000 wide → 500 columns of padding each side, scale 1024 / 2000 = 0.512.
    ["d1", "Pleural effusion", "Left pleural effusion", D1, 100, 200, 300, 400, 1000, 2000,
     "train"],
    ["d1", "Cardiomegaly", "Cardiomegaly is seen", D1, 0, 0, 1000, 2000, 1000, 2000, "train"],
    ["d1", "Pleural effusion", "Left pleural effusion", D1, 50, 1000, 100, 100, 1000, 2000,
     "train"],
    ["d2", "Pneumonia", "Right lower lobe pneumonia", "files/p11/p11000011/s51000011/d2.jpg",
     10, 10, 20, 20, 100, 100, "val"],
    ["d3", "Edema", "Mild edema", "files/p12/p12000012/s52000012/d3.jpg", 10, 10, 20, 20, 100,
     100, "test"],  # image missing
]


@pytest.fixture()
def mscxr_inputs(tmp_path):
  root = tmp_path / "mimic-cxr-jpg"
  for path in (D1, MSCXR_ROWS[3][3]):
    _png(str(root / path), 8, 8)  # sizes come from the CSV, the file only has to exist
  _csv(tmp_path / "MS_CXR_Local_Alignment_v1.1.0.csv", MSCXR_HEADER, MSCXR_ROWS)
  return {"mscxr_csv": str(tmp_path / "MS_CXR_Local_Alignment_v1.1.0.csv"),
          "mimic_dir": str(root)}


def test_mscxr_records(mscxr_inputs, tmp_path):
  out = str(tmp_path / "out")
  counts = mscxr.build(mscxr_inputs, out)
  assert counts == {"train": 6, "validate": 3, "test": 0, "skipped_missing_image": 1}
  records = _read(out, "mscxr")
  # Groups sorted by (dicom_id, label_text); per split all PG, then all GC, then all GD.
  assert [(r["task"], r["meta"]["label_text"]) for r in records["train"]] == [
      (t, p) for t in ("Phrase Grounding", "Grounded Captioning", "Grounded Diagnosis")
      for p in ("Cardiomegaly is seen", "Left pleural effusion")]
  by_id = _by_id(records)
  # (100,200,400,600) → ((100+500)·0.512, 200·0.512, (400+500)·0.512, 600·0.512)
  #                   = (307.2, 102.4, 460.8, 307.2) → (307,102,461,307);
  # (50,1000,150,1100) → (281.6, 512, 332.8, 563.2) → (282,512,333,563), sorted first by x1.
  effusion = by_id["d1-pg1"]
  assert effusion["image"] == D1 and effusion["split"] == "train"
  assert effusion["meta"]["study_id"] == "50414267"
  assert effusion["instructions"] == [
      "Please locate the following phrase: Left pleural effusion",
      "Identify the position of the following finding in the CXR: Left pleural effusion"]
  assert effusion["responses"] == [
      "<ref>Left pleural effusion</ref><box>(282,512),(333,563)</box>"
      "<ref>Left pleural effusion</ref><box>(307,102),(461,307)</box>"]
  boxes = "<box>(282,512),(333,563)</box><box>(307,102),(461,307)</box>"
  assert by_id["d1-gc1"]["instructions"] == [
      f"Please generate a caption for the following region(s): {boxes}",
      f"Describe the content of the following region(s): {boxes}"]
  assert by_id["d1-gc1"]["responses"] == ["Left pleural effusion"]
  assert by_id["d1-gd1"]["instructions"][0] == (
      f"Please give the corresponding diagnosis for the following region(s): {boxes}")
  assert by_id["d1-gd1"]["responses"] == ["Pleural effusion"]
  # The whole 1000×2000 image → (256, 0, 768, 1024).
  assert by_id["d1-pg0"]["responses"] == ["<ref>Cardiomegaly is seen</ref><box>(256,0),(768,1024)"
                                          "</box>"]
  assert {r["meta"]["dicom_id"] for r in records["validate"]} == {"d2"}  # "val" → validate


def test_mscxr_bad_schema(mscxr_inputs, tmp_path):
  bad = tmp_path / "bad.csv"
  _csv(bad, [c for c in MSCXR_HEADER if c != "label_text"], [])
  with pytest.raises(schema.SchemaError, match=r"bad\.csv.*label_text"):
    mscxr.build({**mscxr_inputs, "mscxr_csv": str(bad)}, str(tmp_path / "o"))
  row = list(MSCXR_ROWS[0])
  row[6] = -5
  _csv(bad, MSCXR_HEADER, [row])
  with pytest.raises(schema.SchemaError, match=r"bad\.csv:2: bad box"):
    mscxr.build({**mscxr_inputs, "mscxr_csv": str(bad)}, str(tmp_path / "o"))
  row = list(MSCXR_ROWS[0])
  row[10] = "dev"
  _csv(bad, MSCXR_HEADER, [row])
  with pytest.raises(schema.SchemaError, match=r"bad\.csv:2: 'split'"):
    mscxr.build({**mscxr_inputs, "mscxr_csv": str(bad)}, str(tmp_path / "o"))


# --- PadChest-GR ----------------------------------------------------------------------------------

PC_QUESTIONS = ("Please locate the following sentence: {}",
                "Identify the position of the following phrase in the CXR: {}",
                "Please show me the location of: {}",
                "Highlight the area of the following observation on the image: {}",
                "Where on the image can you see the following observation: {}",
                "Find the region corresponding to: {}",
                "Please indicate where this finding is located: {}",
                "Mark the area where you observe: {}")
PC_ANSWERS = ("This sentence is located at the coordinates {} on the image.",
              "You'll find it at {} in the CXR.",
              "This phrase can be observed at {} on the image.",
              "The bounding box for this observation is {}.",
              "Its location is given by {}.",
              "It is displayed at {} in the radiograph.",
              "The area specified is at coordinates {}.",
              "This finding is located at {} in the image.")
PC_JSON = [
    {"ImageID": "a.png", "StudyID": "sa", "findings": [
        {"sentence_en": "Cardiomegaly.", "sentence_es": "Cardiomegalia.", "abnormal": True,
         "boxes": [[0.25, 0.5, 0.75, 1.0], [0.0, 0.0, 0.1, 0.1]], "labels": ["cardiomegaly"]},
        {"sentence_en": "No other findings.", "abnormal": False, "boxes": []},
        {"sentence_en": "COPD", "abnormal": True, "boxes": [[0.0, 0.0, 0.5, 0.5]]}]},
    {"ImageID": "lat.png", "findings": [{"sentence_en": "Scoliosis.", "boxes": [[0, 0, 1, 1]]}]},
    {"ImageID": "b.png", "findings": [{"sentence_en": "Nodule.", "boxes": [[0, 0, 1, 1]]}]},
    {"ImageID": "c.png", "findings": [{"sentence_en": "Pleural effusion",
                                       "boxes": [[0.1, 0.2, 0.3, 0.4]]}]},
]


@pytest.fixture()
def padchest_inputs(tmp_path):
  root = tmp_path / "padchest"
  _png(str(root / "PadChest_GR" / "a.png"), 40, 80)
  _png(str(root / "PadChest_GR" / "lat.png"), 40, 40)
  _png(str(root / "PadChest_GR" / "c.png"), 60, 60)
  (root / "grounded_reports_20240819.json").write_text(json.dumps(PC_JSON))
  _csv(root / "master_table.csv", ["ImageID", "StudyID", "PatientSex_DICOM", "split"],
       [["a.png", "sa", "F", "train"], ["lat.png", "sl", "M", "train"],
        ["b.png", "sb", "M", "validation"], ["c.png", "sc", "F", "test"]])
  _csv(root / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv",
       ["ImageID", "StudyID", "Projection", "Report"],
       [["a.png", "sa", "AP", "cardiomegalia"], ["lat.png", "sl", "L", "escoliosis"],
        ["b.png", "sb", "PA", "nodulo"], ["c.png", "sc", "PA", "derrame"]])
  return {"grounded_reports": str(root / "grounded_reports_20240819.json"),
          "master_table": str(root / "master_table.csv"),
          "reports_csv": str(root / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"),
          "image_dir": str(root / "PadChest_GR")}


def test_padchest_records(padchest_inputs, tmp_path):
  out = str(tmp_path / "out")
  counts = padchest_gr.build(padchest_inputs, out, seed=2025)
  assert counts == {"train": 2, "validate": 0, "test": 1, "skipped_missing_image": 1,
                    "skipped_unreadable_image": 0}
  records = _read(out, "padchest_gr")
  found = records["train"] + records["test"]
  # a.png 40 high × 80 wide: 20 rows of padding on top, scale 1024 / 80 = 12.8. First box only:
  # (0.25·80, 0.5·40, 0.75·80, 1·40) = (20, 20, 60, 40) → (256, 512, 768, 768);
  # (0, 0, 40, 20) → (0, 256, 512, 512). c.png 60×60, scale 17.0667: (6, 12, 18, 24) →
  # (102.4, 204.8, 307.2, 409.6) → (102, 205, 307, 410).
  expected = [("cardiomegaly.", "<box>(256,512),(768,768)</box>"),  # lower-cased
              ("COPD", "<box>(0,256),(512,512)</box>"),  # all upper case: kept
              ("pleural effusion", "<box>(102,205),(307,410)</box>")]
  rng = random.Random(2025)  # one question, then one answer, per record in file order
  for record, (sentence, box) in zip(found, expected):
    assert record["task"] == "Phrase Grounding"
    assert record["instructions"] == [rng.choice(PC_QUESTIONS).format(sentence)]
    assert record["responses"] == [rng.choice(PC_ANSWERS).format(box)]
  assert [r["image"] for r in found] == ["a.png", "a.png", "c.png"]
  assert len({r["id"] for r in found}) == 3


def test_padchest_bad_schema(padchest_inputs, tmp_path):
  bad = tmp_path / "bad.json"
  bad.write_text('[{"ImageID": "a.png", "findings": [')
  with pytest.raises(schema.SchemaError, match=r"bad\.json: not valid JSON"):
    padchest_gr.build({**padchest_inputs, "grounded_reports": str(bad)}, str(tmp_path / "o"))
  bad.write_text(json.dumps([{"ImageID": "a.png", "findings": [
      {"sentence_en": "x", "boxes": [[0.1, 0.2, 0.3]]}]}]))
  with pytest.raises(schema.SchemaError, match=r"bad\.json: \[0\]\.findings\[0\]\.boxes\[0\]"):
    padchest_gr.build({**padchest_inputs, "grounded_reports": str(bad)}, str(tmp_path / "o"))
  bad.write_text(json.dumps([{"ImageID": "a.png", "findings": [{"boxes": [[0, 0, 1, 1]]}]}]))
  with pytest.raises(schema.SchemaError, match=r"sentence_en"):
    padchest_gr.build({**padchest_inputs, "grounded_reports": str(bad)}, str(tmp_path / "o"))
  table = tmp_path / "master.csv"
  _csv(table, ["ImageID", "StudyID"], [["a.png", "sa"]])
  with pytest.raises(schema.SchemaError, match=r"master\.csv.*'split'"):
    padchest_gr.build({**padchest_inputs, "master_table": str(table)}, str(tmp_path / "o"))


# --- MIMIC-CXR reports + Chest ImaGenome (synthetic dataset) ------------------------------------

REPORT = (" FINAL REPORT\n EXAMINATION:  CHEST (PA AND LAT)\n \n INDICATION:  ___F with cough\n \n"
          " COMPARISON:  None.\n \n FINDINGS:\n \n The heart  size is normal.  Lungs are\n clear."
          "\n \n IMPRESSION:\n \n 1. No acute process. 2. Stable AP, line.\n")


def test_report_sectioning_and_cleaning():
  # Whitespace collapsed, newlines dropped (lines start with a space); "1. ", "2. " and "AP," go.
  assert mimic.report_target(REPORT) == ("Findings:\nThe heart size is normal. Lungs are clear."
                                         "\n\nImpression:\nNo acute process. Stable line.")
  # Only the sections present; "CONCLUSION" is an impression; an empty FINDINGS loses to a full one.
  assert mimic.report_target(" FINAL REPORT\n CONCLUSION:  Normal.\n") == "Impression:\nNormal."
  assert mimic.report_target(" X\n FINDINGS:\n \n \n FINDINGS:  Heart normal.\n") == (
      "Findings:\nHeart normal.")
  assert mimic.report_target("no section headers. just text.\n") == ""


def _gz_table(path):
  with gzip.open(path, "rt", newline="") as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("synthetic"))
  return generator.generate(root, 4, 2, 2, seed=5, min_size=64, max_size=96, workers=1)


def _section(report, header):
  """The line after a header and its blank line, read without the project's code, less what RGRG's
  list removes from synthetic text: its "1. " … "5. " entries are regular expressions, so a digit
  1-5, any character and a space go ("A 12 mm nodule" → "A mm nodule", as in the reference)."""
  lines = report.split("\n")
  start = lines.index(f" {header}:") + 2
  return re.sub(r"[1-5]. ", "", lines[start].strip())


def test_mimic_report_and_anatomy_records(synthetic, tmp_path):
  out = str(tmp_path / "out")
  counts = mimic.build(synthetic, out, seed=2025)
  split_rows = _gz_table(synthetic["split_csv"])
  per_split = {s: [r for r in split_rows if r["split"] == s] for s in schema.SPLITS}
  assert counts == {
      **{f"mimic_report_gen/{s}": len(per_split[s]) for s in schema.SPLITS},
      **{f"anatomy_grounding/{s}": 2 * len(per_split[s]) for s in schema.SPLITS},
      "mimic_report_gen/skipped_missing_image": 0, "mimic_report_gen/skipped_missing_report": 0,
      "mimic_report_gen/dropped_empty_report": 0, "anatomy_grounding/skipped_missing_image": 0}
  reports = _read(out, "mimic_report_gen")
  grounding = _read(out, "anatomy_grounding")
  for split in schema.SPLITS:
    assert [r["id"] for r in reports[split]] == [r["dicom_id"] for r in per_split[split]]
    for row, record in zip(per_split[split], reports[split]):
      subject, study = row["subject_id"], row["study_id"]
      assert record["image"] == f"files/p{subject[:2]}/p{subject}/s{study}/{row['dicom_id']}.jpg"
      assert os.path.isfile(os.path.join(synthetic["mimic_dir"], record["image"]))
      with open(os.path.join(synthetic["reports_dir"], "files", f"p{subject[:2]}", f"p{subject}",
                             f"s{study}.txt")) as f:
        text = f.read()
      assert record["responses"] == [f"Findings:\n{_section(text, 'FINDINGS')}\n\n"
                                     f"Impression:\n{_section(text, 'IMPRESSION')}"]
      assert record["instructions"] == ["Generate report:\n", "Write a comprehensive report:\n",
                                        "Write findings and impressions:\n",
                                        "Generate findings and impressions:\n"]
    for row in per_split[split]:
      path = os.path.join(synthetic["imagenome_dir"], "silver_dataset", "scene_graph",
                          f"{row['dicom_id']}_SceneGraph.json")
      with open(path) as f:
        objects = {o["name"]: o for o in json.load(f)["objects"]}
      mine = [r for r in grounding[split] if r["meta"]["dicom_id"] == row["dicom_id"]]
      assert len(mine) == 2 and mine[0]["meta"]["anatomy"] != mine[1]["meta"]["anatomy"]
      for r in mine:
        obj = objects[r["meta"]["anatomy"]]  # drawn among the anatomies the scene graph has
        assert r["boxes"] == [[float(int(obj[k] * 1024 / 224)) for k in ("x1", "y1", "x2", "y2")]]
        assert len(r["instructions"]) == len(set(r["instructions"])) == 2
        assert len(r["responses"]) == len(set(r["responses"])) == 2
        for answer in r["responses"]:
          assert "<box>__BOX0__</box>" in answer and "<ref>" in answer


def test_anatomy_grounding_reproduces_the_reference_draws(synthetic, tmp_path):
  out = str(tmp_path / "out")
  mimic.build_anatomy_grounding(synthetic, out, seed=2025, include_absent=True)
  records = _read(out, "anatomy_grounding")
  assert mimic.QUESTION_TEMPLATES[7] == "Show me the {}'s location on this CXR."
  assert mimic.ANSWER_TEMPLATES[1] == "You'll find the <ref>{0}</ref> at {1} in the X-ray."
  # The reference: per split random.seed(2025); per image random.sample(36 (name, placeholder)
  # pairs, 2); per anatomy random.sample(20 questions, 2), then random.sample(20 answers, 2).
  for rs in records.values():
    rng = random.Random(2025)
    for first, second in zip(rs[::2], rs[1::2]):
      assert first["id"][:-1] == second["id"][:-1]  # the same image
      assert [first["meta"]["anatomy_index"], second["meta"]["anatomy_index"]] == rng.sample(
          range(36), 2)
      for r in (first, second):
        name = anatomy.DISPLAY_NAMES[r["meta"]["anatomy_index"]]
        assert r["instructions"] == [mimic.QUESTION_TEMPLATES[q].format(name)
                                     for q in rng.sample(range(20), 2)]
        assert r["responses"] == [mimic.ANSWER_TEMPLATES[a].format(name, "<box>__BOX0__</box>")
                                  for a in rng.sample(range(20), 2)]
  again = str(tmp_path / "again")
  mimic.build_anatomy_grounding(synthetic, again, seed=2025, include_absent=True)
  assert _read(again, "anatomy_grounding") == records
  mimic.build_anatomy_grounding(synthetic, again, seed=7, include_absent=True)
  assert _read(again, "anatomy_grounding") != records


def test_mimic_skips_and_bad_table(synthetic, tmp_path):
  root = str(tmp_path / "copy")
  shutil.copytree(synthetic["root"], root)
  paths = generator.layout(root)
  rows = _gz_table(paths["split_csv"])
  gone, no_report, empty = rows[0], rows[1], rows[2]
  os.remove(os.path.join(paths["mimic_dir"], "files", f"p{gone['subject_id'][:2]}",
                         f"p{gone['subject_id']}", f"s{gone['study_id']}",
                         f"{gone['dicom_id']}.jpg"))
  report_dir = os.path.join(paths["reports_dir"], "files")
  os.remove(os.path.join(report_dir, f"p{no_report['subject_id'][:2]}",
                         f"p{no_report['subject_id']}", f"s{no_report['study_id']}.txt"))
  with open(os.path.join(report_dir, f"p{empty['subject_id'][:2]}", f"p{empty['subject_id']}",
                         f"s{empty['study_id']}.txt"), "w") as f:
    f.write(" FINAL REPORT\n INDICATION:  Cough.\n \n COMPARISON:  None.\n")
  out = str(tmp_path / "out")
  counts = mimic.build(paths, out)
  assert counts["mimic_report_gen/skipped_missing_image"] == 1
  assert counts["mimic_report_gen/skipped_missing_report"] == 1
  assert counts["mimic_report_gen/dropped_empty_report"] == 1
  assert sum(counts[f"mimic_report_gen/{s}"] for s in schema.SPLITS) == len(rows) - 3
  assert counts["anatomy_grounding/skipped_missing_image"] == 1
  assert sum(counts[f"anatomy_grounding/{s}"] for s in schema.SPLITS) == 2 * (len(rows) - 1)
  with gzip.open(paths["split_csv"], "wt", newline="") as f:
    f.write("dicom_id,study_id,subject_id\n")
  with pytest.raises(schema.SchemaError, match=r"split\.csv\.gz.*'split'"):
    mimic.build(paths, out)
