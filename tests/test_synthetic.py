"""The synthetic dataset: determinism, real on-disk formats, learnable but varied geometry, findings
that agree across labels, sentences and pixels, and the real preprocessing running on it."""

import csv
import filecmp
import gzip
import json
import os
import re

import numpy as np
import pytest
from array_record.python import array_record_module

from anatomix_jax import anatomy
from anatomix_jax.data import images, preprocess, records, scene_graph
from anatomix_jax.ops import boxes as box_ops
from anatomix_jax.synthetic import generator
from anatomix_jax import synthetic

NUM_TRAIN, NUM_VAL, NUM_TEST = 300, 100, 10
LABEL = {name: i for i, name in enumerate(anatomy.CHEXPERT_LABELS)}
# Words each positive label puts into the reference sentences (and nothing else does).
KEYWORDS = {
    "Atelectasis": ("atelectasis",), "Cardiomegaly": ("enlarged cardiac silhouette",),
    "Consolidation": ("consolidation",), "Edema": ("pulmonary edema",),
    "Enlarged Cardiomediastinum": ("mediastinal widening",), "Fracture": ("fracture",),
    "Lung Lesion": ("mass/nodule",), "Lung Opacity": ("lung opacity",),
    "Pleural Effusion": ("pleural effusion",), "Pleural Other": ("pleural/parenchymal scarring",),
    "Pneumonia": ("pneumonia",), "Pneumothorax": ("pneumothorax",),
    "Support Devices": ("endotracheal tube", "ij line", "cardiac pacer", "enteric tube"),
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("synthetic"))
  return generator.generate(root, NUM_TRAIN, NUM_VAL, NUM_TEST, seed=0, workers=2)


@pytest.fixture(scope="module")
def records_dir(dataset, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("records"))
  summary = preprocess.preprocess(dataset["mimic_dir"], dataset["imagenome_dir"], out,
                                  image_size=64, on_error="raise")
  assert {s: v["count"] for s, v in summary.items()} == {
      "train": NUM_TRAIN, "validate": NUM_VAL, "test": NUM_TEST}
  return out


def _records(records_dir, split):
  out = []
  for path in records.shard_paths(records_dir, split):
    out += [records.decode(r) for r in array_record_module.ArrayRecordReader(path).read_all()]
  return out


def _files(root):
  return sorted(os.path.relpath(os.path.join(d, f), root)
                for d, _, fs in os.walk(root) for f in fs)


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
  a = generator.generate(str(tmp_path / "a"), 5, 2, 2, seed=7, workers=1)
  b = generator.generate(str(tmp_path / "b"), 5, 2, 2, seed=7, workers=2)
  c = generator.generate(str(tmp_path / "c"), 5, 2, 2, seed=8, workers=1)
  files = _files(a["root"])
  assert len(files) == 9 * 3 + 3 and files == _files(b["root"])  # jpg+json+txt, 2 tables, marker
  _, mismatch, errors = filecmp.cmpfiles(a["root"], b["root"], files, shallow=False)
  assert not mismatch and not errors
  assert open(a["chexpert_csv"], "rb").read() != open(c["chexpert_csv"], "rb").read()
  jpgs = [f for f in _files(c["root"]) if f.endswith(".jpg")]
  assert not set(jpgs) & set(f for f in files if f.endswith(".jpg"))  # other ids, other images


def test_done_marker_interruption_and_foreign_data(tmp_path):
  root = str(tmp_path / "d")
  paths = generator.generate(root, 3, 1, 1, seed=0, gzip_tables=False)
  assert paths["split_csv"].endswith(".csv") and os.path.exists(paths["chexpert_csv"])
  image = next(os.path.join(root, f) for f in _files(root) if f.endswith(".jpg"))
  stamp = os.stat(image).st_mtime_ns
  assert generator.generate(root, 3, 1, 1, seed=0, gzip_tables=False) == paths
  assert os.stat(image).st_mtime_ns == stamp  # nothing rewritten
  # An interrupted run (busy marker left, done marker missing) is redone from scratch.
  os.remove(os.path.join(root, generator.DONE_MARKER))
  open(os.path.join(root, generator.BUSY_MARKER), "w").write("{}")
  os.remove(image)
  generator.generate(root, 3, 1, 1, seed=0, gzip_tables=False)
  assert os.path.exists(image) and not os.path.exists(os.path.join(root, generator.BUSY_MARKER))
  # Other parameters: regenerated, old files gone.
  generator.generate(root, 2, 1, 1, seed=0, gzip_tables=False)
  assert sum(f.endswith(".jpg") for f in _files(root)) == 4
  # Plain tables are read like gzipped ones.
  index, _ = preprocess.build_index(paths["mimic_dir"], paths["imagenome_dir"])
  assert [len(index[s]) for s in preprocess.SPLITS] == [2, 1, 1]
  foreign = tmp_path / "foreign"
  (foreign / "mimic-cxr-jpg").mkdir(parents=True)
  with pytest.raises(FileExistsError, match="refusing"):
    generator.generate(str(foreign), 1, 1, 1)


def test_real_formats_ids_and_splits(dataset):
  with gzip.open(dataset["split_csv"], "rt") as f:
    split_rows = list(csv.DictReader(f))
  with gzip.open(dataset["chexpert_csv"], "rt") as f:
    label_rows = list(csv.DictReader(f))
  assert list(split_rows[0]) == ["dicom_id", "study_id", "subject_id", "split"]
  assert list(label_rows[0]) == ["subject_id", "study_id", *anatomy.CHEXPERT_LABELS]
  assert {r["split"] for r in split_rows} == {"train", "validate", "test"}
  assert len({r["study_id"] for r in split_rows}) == len(split_rows)  # one image per study
  subject_splits = {}
  for r in split_rows:
    assert re.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{8}){4}", r["dicom_id"])
    assert re.fullmatch(r"1\d{7}", r["subject_id"]) and re.fullmatch(r"5\d{7}", r["study_id"])
    subject_splits.setdefault(r["subject_id"], set()).add(r["split"])
  assert all(len(s) == 1 for s in subject_splits.values())
  assert len(subject_splits) < len(split_rows)  # some subjects have several studies
  cells = {v for r in label_rows for k, v in r.items() if k in LABEL}
  assert cells == {"", "0.0", "-1.0", "1.0"}  # negatives spelled every way the release does

  shapes = set()
  for r in split_rows[:40]:
    path = preprocess.image_path(dataset["mimic_dir"], r["subject_id"], r["study_id"], r["dicom_id"])
    shapes.add(images.read_image(path).shape)
    graph = json.load(open(scene_graph.scene_graph_path(dataset["imagenome_dir"], r["dicom_id"])))
    assert graph["image_id"] == r["dicom_id"] and str(graph["patient_id"]) == r["subject_id"]
    assert {"viewpoint", "study_id", "objects", "attributes", "relationships"} <= set(graph)
    for obj in graph["objects"]:
      assert {"object_id", "x1", "y1", "x2", "y2", "width", "height", "bbox_name", "name",
              "synsets", "original_x1", "original_y1", "original_x2", "original_y2",
              "original_width", "original_height"} <= set(obj)
    for entry in graph["attributes"]:
      for group in entry["attributes"]:
        assert all(re.fullmatch(r"[a-z]+\|(yes|no)\|[^|]+", item) for item in group)
    report = open(os.path.join(dataset["reports_dir"], "files", f"p{r['subject_id'][:2]}",
                               f"p{r['subject_id']}", f"s{r['study_id']}.txt")).read()
    assert " FINDINGS:" in report and " IMPRESSION:" in report
  assert all(256 <= s <= 352 for shape in shapes for s in shape)
  assert len({h / w for h, w in shapes}) > 20 and any(h != w for h, w in shapes)


def test_mean_box_baseline_is_poor(records_dir):
  train, val = _records(records_dir, "train"), _records(records_dir, "validate")
  def stack(exs):
    return (np.stack([e["boxes"] for e in exs]) / records.CANVAS,
            np.stack([e["box_present"] for e in exs]).astype(bool))
  train_boxes, train_present = stack(train)
  val_boxes, val_present = stack(val)
  cxcywh = box_ops.xyxy_to_cxcywh(train_boxes)
  mean = (cxcywh * train_present[..., None]).sum(0) / train_present.sum(0)[:, None]
  iou = box_ops.iou(val_boxes, box_ops.cxcywh_to_xyxy(mean)[None])
  mean_iou = iou[val_present].mean()
  print(f"mean-box baseline val IoU: {mean_iou:.3f}")
  assert mean_iou <= 0.5
  # Still anatomy: a lung is found where lungs usually are, far better than chance.
  assert iou[:, anatomy.NAME_TO_INDEX["Right lung"]].mean() > 0.3
  # Every present box spans ≥ 6% of the letterboxed side, so small anatomies stay learnable.
  sizes = (val_boxes[..., 2:] - val_boxes[..., :2])[val_present]
  assert sizes.min() >= 0.06
  absent = 1 - np.concatenate([train_present, val_present]).mean()
  assert 0.005 < absent < 0.04  # ~2% of anatomies missing, like the real scene graphs


def test_grid_and_original_coordinates_agree(dataset):
  index, _ = preprocess.build_index(dataset["mimic_dir"], dataset["imagenome_dir"])
  for item in index["validate"][:30]:
    path = scene_graph.scene_graph_path(dataset["imagenome_dir"], item.dicom_id)
    hw = images.read_image(preprocess.image_path(dataset["mimic_dir"], item.subject_id,
                                                 item.study_id, item.dicom_id)).shape
    grid = scene_graph.read_scene_graph(path)
    original = scene_graph.read_scene_graph(path, box_source="original", image_hw=hw)
    np.testing.assert_array_equal(grid.present, original.present)
    # One 224-grid step is 4.6 canvas pixels; rounding both ways stays within that.
    assert np.abs(grid.boxes - original.boxes).max() <= 1024 / 224 + 1


def test_labels_and_sentences_agree(records_dir):
  examples = _records(records_dir, "train") + _records(records_dir, "validate")
  labels = np.stack([e["labels"] for e in examples])
  assert set(np.unique(labels)) == {0.0, 1.0}
  others = np.delete(labels, LABEL["No Finding"], axis=1)
  np.testing.assert_array_equal(labels[:, LABEL["No Finding"]], others.max(1) == 0)
  val_labels = labels[NUM_TRAIN:]
  assert (val_labels.sum(0) >= 5).all(), dict(zip(anatomy.CHEXPERT_LABELS, val_labels.sum(0)))
  assert ((labels.mean(0) > 0.08) & (labels.mean(0) < 0.4)).all()
  found = {name: 0 for name in KEYWORDS}
  for ex, row in zip(examples, labels):
    text = " ".join(ex["sentences"])
    for name, words in KEYWORDS.items():
      said = any(w in text for w in words)
      assert said <= bool(row[LABEL[name]]), (name, ex["id"])  # no sentence without its label
      found[name] += said
    if row[LABEL["No Finding"]]:
      assert all(s.endswith(" is healthy.") for s in ex["sentences"])
  positives = dict(zip(anatomy.CHEXPERT_LABELS, labels.sum(0)))
  for name, count in found.items():  # a positive is described unless its anatomies are missing
    assert count >= 0.9 * positives[name], name
  all_sentences = {s for ex in examples for s in ex["sentences"]}
  assert "Right lower lung zone shows lung opacity and pneumonia." in all_sentences


def _box_means(dataset, items, bbox_name):
  """Mean raw intensity inside one anatomy's original box, per image (NaN where absent)."""
  out = []
  for item in items:
    graph = json.load(open(scene_graph.scene_graph_path(dataset["imagenome_dir"], item.dicom_id)))
    obj = next((o for o in graph["objects"] if o["bbox_name"] == bbox_name), None)
    if obj is None:
      out.append(np.nan)
      continue
    pixels = images.read_image(preprocess.image_path(dataset["mimic_dir"], item.subject_id,
                                                     item.study_id, item.dicom_id))
    x1, y1, x2, y2 = (obj[f"original_{k}"] for k in ("x1", "y1", "x2", "y2"))
    out.append(pixels[y1:y2, x1:x2].mean())
  return np.array(out)


def _sentence_has(dataset, items, name, word):
  index = anatomy.NAME_TO_INDEX[name]
  return np.array([word in scene_graph.read_scene_graph(scene_graph.scene_graph_path(
      dataset["imagenome_dir"], it.dicom_id)).sentences[index] for it in items])


def test_findings_are_visible_where_the_sentences_put_them(dataset):
  index, _ = preprocess.build_index(dataset["mimic_dir"], dataset["imagenome_dir"])
  items = index["train"]
  for side in ("right", "left"):
    # Effusion: the costophrenic angle fills with fluid (brighter).
    name = f"{side} costophrenic sulcus;;{side.capitalize()} costodiaphragmatic recess"
    has = _sentence_has(dataset, items, name, "pleural effusion")
    means = _box_means(dataset, items, f"{side} costophrenic angle")
    assert has.sum() >= 10
    assert np.nanmean(means[has]) > np.nanmean(means[~has]) + 20
    # Pneumothorax: the apex is darker air without lung markings.
    has = _sentence_has(dataset, items, f"Apical zone of {side} lung", "pneumothorax")
    means = _box_means(dataset, items, f"{side} apical zone")
    assert has.sum() >= 5 and np.nanmean(means[has]) < np.nanmean(means[~has]) - 8
  # Opacity, consolidation or pneumonia make their lung zone denser.
  for zone in ("Right lower lung zone", "Left mid lung zone"):
    has = _sentence_has(dataset, items, zone, "lung opacity")
    means = _box_means(dataset, items, zone.lower())
    assert has.sum() >= 5 and np.nanmean(means[has]) > np.nanmean(means[~has]) + 8
  # Edema: perihilar haze makes the hila brighter.
  has = _sentence_has(dataset, items, "Hilar Area of the Right Lung", "vascular congestion")
  means = _box_means(dataset, items, "right hilar structure")
  assert np.nanmean(means[has]) > np.nanmean(means[~has]) + 5
  # Cardiomegaly: cardiothoracic ratio (heart box width / lungs' span) above 0.5 exactly then.
  cardio = np.array([it.labels[LABEL["Cardiomegaly"]] for it in items]).astype(bool)
  ratios, spine_side = [], []
  for it in items:
    g = scene_graph.read_scene_graph(scene_graph.scene_graph_path(dataset["imagenome_dir"],
                                                                  it.dicom_id))
    heart, right, left, spine = (g.boxes[anatomy.NAME_TO_INDEX[n]] for n in (
        "Cardiac shadow viewed radiologically;;Heart", "Right lung", "Left lung",
        "Vertebral column"))
    ok = g.present[[anatomy.NAME_TO_INDEX[n] for n in ("Right lung", "Left lung")]].all()
    ratios.append((heart[2] - heart[0]) / (left[2] - right[0]) if ok else np.nan)
    # Left-heavy heart: its centre lies on the image right of the spine (patient's left).
    spine_side.append((heart[0] + heart[2]) / 2 - (spine[0] + spine[2]) / 2)
  ratios = np.array(ratios)
  found = np.isfinite(ratios)
  assert ratios[cardio & found].min() > 0.5 and np.mean(ratios[~cardio & found] < 0.5) > 0.97
  assert np.mean(np.array(spine_side) > 0) > 0.95


def test_package_exports():
  assert synthetic.generate is generator.generate
  assert synthetic.layout("/r")["imagenome_dir"] == "/r/chest-imagenome"
