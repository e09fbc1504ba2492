"""MIMIC-CXR-JPG + Chest ImaGenome → records, on a hand-made tree in the released layouts."""

import csv
import gzip
import io
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from array_record.python import array_record_module

from anatomix_jax import anatomy
from anatomix_jax.data import images, preprocess, records, scene_graph

A = "0a1b2c3d-4e5f6a7b-8c9d0e1f-2a3b4c5d-6e7f8a9b"   # train, 30 high × 20 wide
B = "1b2c3d4e-5f6a7b8c-9d0e1f2a-3b4c5d6e-7f8a9b0c"   # validate, 21 high × 36 wide
C = "2c3d4e5f-6a7b8c9d-0e1f2a3b-4c5d6e7f-8a9b0c1d"   # train, but no CheXpert row → dropped
D = "3d4e5f6a-7b8c9d0e-1f2a3b4c-5d6e7f8a-9b0c1d2e"   # test, no scene graph → excluded
IDS = {A: ("10000032", "50414267", "train", (30, 20), 200),
       B: ("10000764", "57375967", "validate", (21, 36), 100),
       C: ("10000898", "50771383", "train", (25, 25), 150),
       D: ("10001217", "58913004", "test", (20, 20), 50)}
RIGHT_LUNG = anatomy.NAME_TO_INDEX["Right lung"]
HEART = anatomy.NAME_TO_INDEX["Cardiac shadow viewed radiologically;;Heart"]


def _obj(name, bbox_name, grid, original, hw):
  keys = ("x1", "y1", "x2", "y2")
  return {"object_id": bbox_name, "name": name, "bbox_name": bbox_name, "synsets": [],
          **dict(zip(keys, grid)), **{f"original_{k}": v for k, v in zip(keys, original)},
          "width": grid[2] - grid[0], "height": grid[3] - grid[1],
          "original_width": hw[1], "original_height": hw[0]}


def _graph(dicom):
  subject, study, _, hw, _ = IDS[dicom]
  objects = [_obj("Right lung", "right lung", (10, 20, 100, 200), (2, 3, 12, 27), hw),
             _obj("Cardiac shadow viewed radiologically;;Heart", "cardiac silhouette",
                  (90, 110, 150, 170), (9, 14, 16, 22), hw)]
  attributes = [{"name": "Right lung", "bbox_name": "right lung",
                 "attributes": [["anatomicalfinding|yes|pleural effusion", "nlp|yes|abnormal"]]}]
  return {"image_id": dicom, "viewpoint": "PA", "patient_id": int(subject), "study_id": int(study),
          "gender": "F", "age_decile": "60-70", "reason_for_exam": "x", "objects": objects,
          "attributes": attributes, "relationships": []}


def _write_csv(path, header, rows, gzipped):
  text = io.StringIO()
  csv.writer(text, lineterminator="\n").writerows([header] + rows)
  data = text.getvalue().encode()
  with (gzip.open(path, "wb") if gzipped else open(path, "wb")) as f:
    f.write(data)


def make_tree(root):
  """Writes the hand-made MIMIC-CXR-JPG and Chest ImaGenome roots; returns their paths."""
  mimic, imagenome = root / "mimic", root / "imagenome"
  graphs = imagenome / "silver_dataset" / "scene_graph"
  graphs.mkdir(parents=True)
  for dicom, (subject, study, _, hw, value) in IDS.items():
    path = preprocess.image_path(str(mimic), subject, study, dicom)
    os.makedirs(os.path.dirname(path))
    cv2.imwrite(path, np.full(hw, value, np.uint8))
    if dicom != D:
      (graphs / f"{dicom}_SceneGraph.json").write_text(json.dumps(_graph(dicom)))
  _write_csv(mimic / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"],
             [[d, s, p, split] for d, (p, s, split, _, _) in IDS.items()], gzipped=True)
  labels = {name: "" for name in anatomy.CHEXPERT_LABELS}
  row_a = {**labels, "Cardiomegaly": "1.0", "Edema": "-1.0", "Pleural Effusion": "0.0",
           "Support Devices": "1.0"}
  row_b = {**labels, "No Finding": "1.0", "Pneumonia": "-1.0"}
  row_d = {**labels, "Fracture": "1.0"}
  header = ["subject_id", "study_id", *anatomy.CHEXPERT_LABELS]
  rows = [[IDS[d][0], IDS[d][1], *[r[n] for n in anatomy.CHEXPERT_LABELS]]
          for d, r in ((A, row_a), (B, row_b), (D, row_d))]
  _write_csv(mimic / "mimic-cxr-2.0.0-chexpert.csv", header, rows, gzipped=False)
  return str(mimic), str(imagenome)


def read_split(out_dir, split):
  """All decoded records of one split, in order."""
  examples = []
  for path in records.shard_paths(out_dir, split):
    reader = array_record_module.ArrayRecordReader(path)
    examples += [records.decode(raw) for raw in reader.read_all()]
    reader.close()
  return examples


def test_end_to_end_records(tmp_path):
  mimic, imagenome = make_tree(tmp_path)
  out = str(tmp_path / "records")
  summary = preprocess.preprocess(mimic, imagenome, out, image_size=64, intensity="raw")
  assert summary["train"]["count"] == 1 and summary["validate"]["count"] == 1
  assert summary["test"]["count"] == 0
  assert summary["train"]["excluded"] == {"no_labels": 1, "no_scene_graph": 0}
  assert summary["test"]["excluded"] == {"no_labels": 0, "no_scene_graph": 1}
  meta = records.read_metadata(out)
  assert meta["image_size"] == 64 and meta["box_source"] == "grid224" and meta["source"] == mimic
  assert meta["splits"]["train"]["skipped"] == {}

  (a,) = read_split(out, "train")
  assert (a["id"], a["subject_id"], a["study_id"], a["view"]) == (A, "10000032", "50414267", "PA")
  expected = np.zeros(14, np.float32)  # NaN → 0, −1 → 0
  expected[[anatomy.CHEXPERT_LABELS.index(n) for n in ("Cardiomegaly", "Support Devices")]] = 1
  np.testing.assert_array_equal(a["labels"], expected)
  # int(v·1024/224): (10, 20, 100, 200) → (45, 91, 457, 914).
  np.testing.assert_array_equal(a["boxes"][RIGHT_LUNG], [45, 91, 457, 914])
  np.testing.assert_array_equal(a["boxes"][HEART], [411, 502, 685, 777])
  assert a["box_present"].sum() == 2 and a["box_present"][[RIGHT_LUNG, HEART]].all()
  assert a["sentences"][RIGHT_LUNG] == "Right lung shows pleural effusion."
  assert a["sentences"][0] == "Abdominal cavity is healthy."

  # 30×20 image, pad 5 columns each side → 30×30 → 64: columns 0–9 and 54–63 are padding.
  pixels = images.decode_png(a["image_png"])
  assert pixels.shape == (64, 64)
  assert pixels[:, :10].max() == 0 and pixels[:, 54:].max() == 0
  assert np.abs(pixels[:, 12:52].astype(int) - 200).max() <= 2

  (b,) = read_split(out, "validate")
  assert b["id"] == B and b["labels"][anatomy.CHEXPERT_LABELS.index("No Finding")] == 1
  assert b["labels"].sum() == 1  # Pneumonia −1 → 0
  pixels = images.decode_png(b["image_png"])  # 21×36: pad 7 rows each side → 35×36 → 64×64
  assert pixels[:12].max() == 0 and pixels[-12:].max() == 0 and pixels[20:44].min() >= 98


def test_original_boxes_and_minmax_intensity(tmp_path):
  mimic, imagenome = make_tree(tmp_path)
  out = str(tmp_path / "records")
  preprocess.preprocess(mimic, imagenome, out, image_size=32, box_source="original",
                        splits=("train",))
  (a,) = read_split(out, "train")
  # (2, 3, 12, 27) in a 30×20 image: x + 5, scaled by 1024/30.
  np.testing.assert_allclose(a["boxes"][RIGHT_LUNG], np.array([7, 3, 17, 27]) * 1024 / 30,
                             rtol=1e-6)
  pixels = images.decode_png(a["image_png"])
  assert pixels.max() == 255 and pixels.min() == 0  # the reference's per-image stretch
  assert records.read_metadata(out)["intensity"] == "minmax"
  assert list(records.read_metadata(out)["splits"]) == ["train"]


def _truncate_image(mimic, imagenome):
  path = preprocess.image_path(mimic, *IDS[A][:2], A)
  data = open(path, "rb").read()
  open(path, "wb").write(data[: len(data) // 2])


def _graph_file(imagenome):
  return scene_graph.scene_graph_path(imagenome, A)


def _rewrite_graph(imagenome, mutate):
  graph = _graph(A)
  mutate(graph)
  with open(_graph_file(imagenome), "w") as f:
    json.dump(graph, f)


BREAKAGES = {
    "unreadable_image": (_truncate_image, ".jpg"),
    "missing_image": (lambda m, i: os.remove(preprocess.image_path(m, *IDS[A][:2], A)), ".jpg"),
    "bad_json": (lambda m, i: open(_graph_file(i), "w").write('{"image_id": '), "SceneGraph.json"),
    "missing_field": (lambda m, i: _rewrite_graph(i, lambda g: g.pop("objects")),
                      "SceneGraph.json"),
    "bad_coordinates": (lambda m, i: _rewrite_graph(
        i, lambda g: g["objects"][0].update(x1=float("nan"))), "SceneGraph.json"),
    "box_outside": (lambda m, i: _rewrite_graph(
        i, lambda g: g["objects"][1].update(y1=230, y2=260)), "SceneGraph.json"),
}


@pytest.mark.parametrize("reason", sorted(BREAKAGES))
def test_bad_inputs_raise_naming_the_file_or_are_counted(tmp_path, reason):
  mimic, imagenome = make_tree(tmp_path)
  breakage, suffix = BREAKAGES[reason]
  breakage(mimic, imagenome)
  with pytest.raises((images.ImageError, scene_graph.SceneGraphError)) as e:
    preprocess.preprocess(mimic, imagenome, str(tmp_path / "r1"), image_size=16)
  assert f"{A}{'_' if suffix.startswith('S') else ''}{suffix}" in str(e.value)
  assert e.value.reason == reason
  out = str(tmp_path / "r2")
  summary = preprocess.preprocess(mimic, imagenome, out, image_size=16, on_error="skip")
  assert summary["train"] == {"count": 0, "skipped": {reason: 1},
                              "excluded": {"no_labels": 1, "no_scene_graph": 0},
                              "clipped_boxes": 0}
  assert records.read_metadata(out)["splits"]["train"]["skipped"] == {reason: 1}
  assert [ex["id"] for ex in read_split(out, "validate")] == [B]


def test_bad_tables_name_the_file(tmp_path):
  mimic, imagenome = make_tree(tmp_path)
  path = os.path.join(mimic, "mimic-cxr-2.0.0-chexpert.csv")
  text = open(path).read().replace("-1.0", "maybe", 1)
  open(path, "w").write(text)
  with pytest.raises(preprocess.DataError, match=r"chexpert\.csv:2: column 'Edema'"):
    preprocess.preprocess(mimic, imagenome, str(tmp_path / "r"))
  os.remove(path)
  with pytest.raises(preprocess.DataError, match="chexpert.csv"):
    preprocess.preprocess(mimic, imagenome, str(tmp_path / "r"))


def test_workers_keep_order_and_bytes(tmp_path):
  mimic, imagenome = make_tree(tmp_path)
  # More images: copies of A under new ids, so chunks interleave across workers.
  split_rows = [["dicom_id", "study_id", "subject_id", "split"]]
  chexpert = open(os.path.join(mimic, "mimic-cxr-2.0.0-chexpert.csv")).read().splitlines()
  for k in range(24):
    dicom, subject, study = f"{k:08x}-00000000-00000000-00000000-00000000", f"1{k:07d}", \
        f"5{k:07d}"
    path = preprocess.image_path(mimic, subject, study, dicom)
    os.makedirs(os.path.dirname(path))
    cv2.imwrite(path, np.full((20 + k, 30), 10 * k, np.uint8))
    graph = _graph(A)
    graph["image_id"] = dicom
    with open(scene_graph.scene_graph_path(imagenome, dicom), "w") as f:
      json.dump(graph, f)
    split_rows.append([dicom, study, subject, "train"])
    chexpert.append(f"{subject},{study}" + ",1.0" * 14)
  _write_csv(os.path.join(mimic, "mimic-cxr-2.0.0-split.csv.gz"), split_rows[0], split_rows[1:],
             gzipped=True)
  open(os.path.join(mimic, "mimic-cxr-2.0.0-chexpert.csv"), "w").write("\n".join(chexpert))
  preprocess.preprocess(mimic, imagenome, str(tmp_path / "one"), image_size=24, splits=["train"])
  preprocess.preprocess(mimic, imagenome, str(tmp_path / "two"), image_size=24, splits=["train"],
                        workers=2, num_shards=2)
  one = read_split(str(tmp_path / "one"), "train")
  two = [None] * len(one)
  two[0::2], two[1::2] = (
      [records.decode(r) for r in array_record_module.ArrayRecordReader(p).read_all()]
      for p in records.shard_paths(str(tmp_path / "two"), "train"))  # round-robin shards
  assert [e["id"] for e in one] == [e["id"] for e in two] == [r[0] for r in split_rows[1:]]
  assert all(x["image_png"] == y["image_png"] for x, y in zip(one, two))


def test_cli(tmp_path):
  mimic, imagenome = make_tree(tmp_path)
  out = str(tmp_path / "cli")
  result = subprocess.run(
      [sys.executable, "-m", "anatomix_jax.data.preprocess", f"--mimic_dir={mimic}",
       f"--imagenome_dir={imagenome}", f"--out_dir={out}", "--image_size=32",
       "--splits=train,validate", "--box_source=original", "--on_error=skip", "--limit=1"],
      capture_output=True, text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr
  meta = records.read_metadata(out)
  assert meta["box_source"] == "original" and meta["image_size"] == 32
  assert {s: v["count"] for s, v in meta["splits"].items()} == {"train": 1, "validate": 1}
