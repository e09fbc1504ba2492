"""Deterministic synthetic MIMIC-CXR-JPG + Chest ImaGenome dataset, in the released on-disk formats.

``generate(root, ...)`` writes, under ``root``:

  mimic-cxr-jpg/files/pXX/pSUBJECT/sSTUDY/{dicom_id}.jpg      8-bit JPEG radiographs, non-square
  mimic-cxr-jpg/mimic-cxr-2.0.0-split.csv[.gz]               dicom_id,study_id,subject_id,split
  mimic-cxr-jpg/mimic-cxr-2.0.0-chexpert.csv[.gz]            subject_id,study_id,<14 labels>
  chest-imagenome/silver_dataset/scene_graph/{dicom_id}_SceneGraph.json
  mimic-cxr-reports/files/pXX/pSUBJECT/sSTUDY.txt             free-text report (FINDINGS/IMPRESSION)

so the real readers (:mod:`anatomix_jax.data.preprocess`) run on it unchanged. One image per study;
subjects have 1–3 studies and belong to one split ("train", "validate", "test"). Ids follow the
real formats (subject 8 digits starting with 1, study 8 digits starting with 5, dicom_id five groups
of 8 hex digits). Positive labels are "1.0"; negatives are "", "0.0" or "-1.0" (the readers' NaN/−1 → 0
rule makes them all 0). About 2% of anatomies per image are left out of the scene graph's objects,
as happens in the real data. Scene-graph ``synsets`` are placeholders, not real UMLS codes.

Everything is a function of the parameters: the same seed gives byte-identical files, whatever the
number of worker processes. A done-marker JSON holding the parameters makes a repeated call free; a
run that was interrupted (or had other parameters) is regenerated from scratch.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import shutil
from typing import Any

import cv2
import numpy as np

from anatomix_jax import anatomy
from anatomix_jax.data import images, preprocess
from anatomix_jax.synthetic import describe, phantom, render

VERSION = 1
DONE_MARKER = ".synthetic_done.json"
BUSY_MARKER = ".synthetic_incomplete.json"
SPLIT_CSV = "mimic-cxr-2.0.0-split.csv"
CHEXPERT_CSV = "mimic-cxr-2.0.0-chexpert.csv"
ABSENT_PROBABILITY = 0.02
_OWNED = ("mimic-cxr-jpg", "chest-imagenome", "mimic-cxr-reports")
_INDICATIONS = ("Shortness of breath.", "Cough and fever, evaluate for pneumonia.",
                "Chest pain.", "Preoperative evaluation.", "Line placement.", "Follow-up.")


def layout(root: str, gzip_tables: bool = True) -> dict[str, str]:
  """Paths of a generated dataset under ``root`` (directories and the two tables)."""
  mimic = os.path.join(root, "mimic-cxr-jpg")
  suffix = ".gz" if gzip_tables else ""
  return {"root": root, "mimic_dir": mimic,
          "imagenome_dir": os.path.join(root, "chest-imagenome"),
          "reports_dir": os.path.join(root, "mimic-cxr-reports"),
          "split_csv": os.path.join(mimic, SPLIT_CSV + suffix),
          "chexpert_csv": os.path.join(mimic, CHEXPERT_CSV + suffix)}


def _plan(seed: int, counts: dict[str, int]) -> list[dict[str, Any]]:
  """Ids, split and view of every image, in generation order."""
  rng = np.random.default_rng([seed, 0])
  total = sum(counts.values())
  subject_numbers = rng.choice(10_000_000, size=total, replace=False)  # ≥ subjects needed
  study_numbers = rng.choice(10_000_000, size=total, replace=False)
  plan, subject_index, dicoms = [], 0, set()
  for split, count in counts.items():
    made = 0
    while made < count:
      subject = f"{10_000_000 + int(subject_numbers[subject_index]):08d}"
      subject_index += 1
      for _ in range(min(int(rng.integers(1, 4)), count - made)):
        while True:
          dicom = "-".join(f"{int(v):08x}" for v in rng.integers(0, 2 ** 32, 5))
          if dicom not in dicoms:
            dicoms.add(dicom)
            break
        plan.append({"index": len(plan), "subject_id": subject,
                     "study_id": f"{50_000_000 + int(study_numbers[len(plan)]):08d}",
                     "dicom_id": dicom, "split": split,
                     "view": "PA" if rng.random() < 0.7 else "AP"})
        made += 1
  return plan


def _cui(index: int) -> str:
  return f"C{9_000_000 + 37 * index:07d}"  # placeholder synset, not a real UMLS concept


def _objects(dicom: str, boxes: np.ndarray, height: int, width: int,
             present: np.ndarray) -> list[dict[str, Any]]:
  """Scene-graph objects: integer original-pixel boxes and their 224-grid letterbox coordinates."""
  original = np.rint(boxes).astype(np.int64)
  original[:, 2:] = np.maximum(original[:, 2:], original[:, :2] + 1)
  grid = np.rint(images.letterbox_transform(height, width, 224).forward_boxes(original))
  grid = grid.astype(np.int64)
  grid[:, 2:] = np.maximum(grid[:, 2:], grid[:, :2] + 1)
  objects = []
  for a in anatomy.ANATOMIES:
    if not present[a.index]:
      continue
    x1, y1, x2, y2 = (int(v) for v in grid[a.index])
    ox1, oy1, ox2, oy2 = (int(v) for v in original[a.index])
    objects.append({
        "object_id": f"{dicom}_{a.bbox_name}", "x1": x1, "y1": y1, "x2": x2, "y2": y2,
        "width": x2 - x1, "height": y2 - y1, "bbox_name": a.bbox_name, "synsets": [_cui(a.index)],
        "name": a.name, "original_x1": ox1, "original_y1": oy1, "original_x2": ox2,
        "original_y2": oy2, "original_width": width, "original_height": height})
  return objects


def _attributes(dicom: str, d: describe.Description) -> list[dict[str, Any]]:
  entries = []
  for a in anatomy.ANATOMIES:  # anatomy order keeps the files reproducible
    groups = d.mentions.get(a.bbox_name)
    if not groups:
      continue
    entries.append({
        "name": a.name, "bbox_name": a.bbox_name, "synsets": [_cui(a.index)],
        "object_id": f"{dicom}_{a.bbox_name}",
        "attributes": [attrs for _, attrs in groups],
        "phrases": [phrase for phrase, _ in groups],
        "phrase_IDs": [f"{dicom}|{k}" for k in range(len(groups))],
        "sections": ["finalreport"] * len(groups),
        "comparison_cues": [[] for _ in groups], "temporal_cues": [[] for _ in groups],
        "severity_cues": [[] for _ in groups], "texture_cues": [[] for _ in groups]})
  return entries


def _label_cells(labels: np.ndarray, rng: np.random.Generator) -> list[str]:
  """CSV cells: "1.0" for positives; "", "0.0" or "-1.0" for negatives (all read back as 0)."""
  return ["1.0" if v else str(rng.choice(["", "", "", "0.0", "0.0", "-1.0"])) for v in labels]


def _make_image(args: tuple[int, dict[str, Any], str, int, int]) -> list[str]:
  """Renders and writes one image, its scene graph and report; returns its chexpert CSV row."""
  seed, item, root, min_size, max_size = args
  rng = np.random.default_rng([seed, 1, item["index"]])
  height, width = (int(v) for v in rng.integers(min_size, max_size + 1, 2))
  findings = phantom.sample_findings(rng)
  geometry = phantom.sample_geometry(rng, height, width, findings)
  pixels = render.render(geometry, findings, rng)
  boxes = phantom.anatomy_boxes(geometry)
  present = rng.random(anatomy.NUM_ANATOMIES) >= ABSENT_PROBABILITY
  text = describe.describe(findings, rng)
  subject, study, dicom = item["subject_id"], item["study_id"], item["dicom_id"]
  paths = layout(root)
  study_dir = os.path.join(paths["mimic_dir"], "files", f"p{subject[:2]}", f"p{subject}",
                           f"s{study}")
  os.makedirs(study_dir, exist_ok=True)
  ok, jpeg = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 93])
  if not ok:
    raise RuntimeError(f"JPEG encoding failed for {dicom}")
  with open(os.path.join(study_dir, f"{dicom}.jpg"), "wb") as f:
    f.write(jpeg.tobytes())
  indication = _INDICATIONS[int(rng.integers(len(_INDICATIONS)))]
  graph = {
      "image_id": dicom, "viewpoint": item["view"], "patient_id": int(subject),
      "study_id": int(study), "gender": "F" if rng.random() < 0.5 else "M",
      "age_decile": f"{int(rng.integers(2, 9)) * 10}-{int(rng.integers(2, 9)) * 10 + 10}",
      "reason_for_exam": indication, "StudyOrder": 1, "StudyDateTime": "2150-01-01 00:00:00",
      "objects": _objects(dicom, boxes, height, width, present),
      "attributes": _attributes(dicom, text), "relationships": []}
  graph_path = os.path.join(paths["imagenome_dir"], "silver_dataset", "scene_graph",
                            f"{dicom}_SceneGraph.json")
  with open(graph_path, "w") as f:
    f.write(json.dumps(graph))  # dumps (not dump, not indent) uses json's fast C encoder
  report_dir = os.path.join(paths["reports_dir"], "files", f"p{subject[:2]}", f"p{subject}")
  os.makedirs(report_dir, exist_ok=True)
  with open(os.path.join(report_dir, f"s{study}.txt"), "w") as f:
    f.write(describe.report_text(text, indication, item["view"]))
  return [subject, study] + _label_cells(text.labels, rng)


def _write_table(path: str, header: list[str], rows: list[list[str]]) -> None:
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator="\n")
  writer.writerow(header)
  writer.writerows(rows)
  data = buffer.getvalue().encode()
  if path.endswith(".gz"):
    # mtime=0 and no file name in the header: identical bytes on every run.
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw,
                                                mtime=0) as f:
      f.write(data)
  else:
    with open(path, "wb") as f:
      f.write(data)


def _prepare_root(root: str) -> None:
  """Removes an earlier (incomplete or different) generation; refuses to touch foreign data."""
  ours = os.path.exists(os.path.join(root, DONE_MARKER)) or os.path.exists(
      os.path.join(root, BUSY_MARKER))
  existing = [d for d in _OWNED if os.path.exists(os.path.join(root, d))]
  if existing and not ours:
    raise FileExistsError(f"{root} already holds {existing} that this generator did not write; "
                          "refusing to overwrite (choose an empty directory)")
  for d in existing:
    shutil.rmtree(os.path.join(root, d))
  if os.path.exists(os.path.join(root, DONE_MARKER)):
    os.remove(os.path.join(root, DONE_MARKER))


def generate(root: str, num_train: int, num_val: int, num_test: int, seed: int = 0,
             min_size: int = 256, max_size: int = 352, gzip_tables: bool = True,
             workers: int | None = None) -> dict[str, str]:
  """Writes (or finds already written) a synthetic dataset under ``root``.

  Args:
    root: output directory (created). Must be empty or hold an earlier output of this function.
    num_train, num_val, num_test: images (= studies) per split ("train", "validate", "test").
    seed: everything is a function of it.
    min_size, max_size: each image's height and width are drawn independently from this range.
    gzip_tables: write ``.csv.gz`` tables like the release (else plain ``.csv``).
    workers: processes; default: up to 4 for large sets, 1 for small. Output does not depend on it.
      Once JAX is imported the workers come from a fork server, so the calling script needs the
      usual ``if __name__ == "__main__":`` guard (see ``preprocess.process_pool``).

  Returns:
    The :func:`layout` paths (``root``, ``mimic_dir``, ``imagenome_dir``, ``reports_dir``,
    ``split_csv``, ``chexpert_csv``).
  """
  if not 16 <= min_size <= max_size:
    raise ValueError(f"need 16 <= min_size <= max_size, got {min_size}, {max_size}")
  params = {"version": VERSION, "num_train": num_train, "num_val": num_val,
            "num_test": num_test, "seed": seed, "min_size": min_size, "max_size": max_size,
            "gzip_tables": gzip_tables}
  paths = layout(root, gzip_tables)
  done = os.path.join(root, DONE_MARKER)
  if os.path.exists(done):
    with open(done) as f:
      if json.load(f) == params:
        return paths
  os.makedirs(root, exist_ok=True)
  _prepare_root(root)
  with open(os.path.join(root, BUSY_MARKER), "w") as f:
    json.dump(params, f)
  os.makedirs(os.path.join(paths["imagenome_dir"], "silver_dataset", "scene_graph"))
  os.makedirs(paths["mimic_dir"], exist_ok=True)

  plan = _plan(seed, {"train": num_train, "validate": num_val, "test": num_test})
  tasks = [(seed, item, root, min_size, max_size) for item in plan]
  if workers is None:
    workers = 1 if len(plan) < 200 else min(4, os.cpu_count() or 1)
  if workers > 1:
    with preprocess.process_pool(workers) as pool:
      label_rows = list(pool.map(_make_image, tasks, chunksize=16))
  else:
    label_rows = [_make_image(t) for t in tasks]

  # The released tables are sorted by subject and study.
  order = sorted(range(len(plan)), key=lambda i: (plan[i]["subject_id"], plan[i]["study_id"]))
  _write_table(paths["split_csv"], ["dicom_id", "study_id", "subject_id", "split"],
               [[plan[i]["dicom_id"], plan[i]["study_id"], plan[i]["subject_id"], plan[i]["split"]]
                for i in order])
  _write_table(paths["chexpert_csv"], ["subject_id", "study_id", *anatomy.CHEXPERT_LABELS],
               [label_rows[i] for i in order])
  with open(done + ".tmp", "w") as f:
    json.dump(params, f)
  os.replace(done + ".tmp", done)
  os.remove(os.path.join(root, BUSY_MARKER))
  return paths
