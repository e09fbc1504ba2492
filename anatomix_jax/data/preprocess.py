"""MIMIC-CXR-JPG + Chest ImaGenome → stage-1 records (library function and CLI).

Reads the released layouts:
  * MIMIC-CXR-JPG root: ``files/pXX/pSUBJECT/sSTUDY/{dicom_id}.jpg``, ``mimic-cxr-2.0.0-split.csv[.gz]``
    (dicom_id, study_id, subject_id, split) and ``mimic-cxr-2.0.0-chexpert.csv[.gz]`` (subject_id,
    study_id, the 14 CheXpert columns with 1.0 / 0.0 / -1.0 / empty);
  * Chest ImaGenome root: ``silver_dataset/scene_graph/{dicom_id}_SceneGraph.json``.

and follows the reference (``data_split.py``, ``process_chest_imagenome.py``): split rows are joined to
the labels on (subject_id, study_id) with empty → 0 and −1 → 0, rows without a label row are dropped
(the reference's ``how='left'`` merge + ``dropna()``), and only images with a scene graph are kept.
Each image is letterboxed (:func:`images.letterbox`) to ``image_size``, optionally given the
reference's min–max intensity stretch, PNG-encoded and written with :mod:`records` (boxes always on
the 1024 canvas). Bad images or scene graphs raise, or with ``on_error="skip"`` are logged and counted
per reason in ``metadata.json``.

  python -m anatomix_jax.data.preprocess --mimic_dir=... --imagenome_dir=... --out_dir=...
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import concurrent.futures
import multiprocessing
import os
import sys
from typing import Any, Iterator, Sequence

import cv2
import numpy as np
from absl import app, flags, logging

from anatomix_jax import anatomy
from anatomix_jax.data import images, records, scene_graph

SPLIT_CSV = "mimic-cxr-2.0.0-split.csv"
CHEXPERT_CSV = "mimic-cxr-2.0.0-chexpert.csv"
SPLITS = ("train", "validate", "test")
INTENSITIES = ("minmax", "raw")
_MAX_LOGGED_SKIPS = 20


class DataError(ValueError):
  """A missing or malformed input table; the message names the file (and line/column)."""


@dataclasses.dataclass(frozen=True)
class Item:
  """One image to convert: ids and its merged CheXpert labels (float32 ``[14]``)."""
  dicom_id: str
  subject_id: str
  study_id: str
  split: str
  labels: np.ndarray


def find_table(root: str, name: str) -> str:
  """``root/name`` or ``root/name.gz``, whichever exists (the release ships the gzipped one)."""
  for candidate in (os.path.join(root, name + ".gz"), os.path.join(root, name)):
    if os.path.isfile(candidate):
      return candidate
  raise DataError(f"neither {os.path.join(root, name)} nor its .gz exists")


def _open_text(path: str) -> io.TextIOBase:
  with open(path, "rb") as f:
    gzipped = f.read(2) == b"\x1f\x8b"  # by content, so a misnamed file still reads
  raw = gzip.open(path, "rb") if gzipped else open(path, "rb")
  return io.TextIOWrapper(raw, encoding="utf-8", newline="")


def _read_rows(path: str, required: Sequence[str]) -> Iterator[tuple[int, dict[str, str]]]:
  try:
    with _open_text(path) as f:
      reader = csv.DictReader(f)
      missing = [c for c in required if c not in (reader.fieldnames or ())]
      if missing:
        raise DataError(f"{path}: missing columns {missing} (has {reader.fieldnames})")
      for row in reader:
        yield reader.line_num, row
  except (OSError, EOFError, UnicodeDecodeError, csv.Error) as e:
    raise DataError(f"{path}: cannot read table ({type(e).__name__}: {e})") from e


def _id(value: str, path: str, line: int, column: str) -> str:
  # Ids are integers; normalise "10000032" and "10000032.0" to the same key.
  try:
    number = float(value)
  except ValueError:
    raise DataError(f"{path}:{line}: column {column!r} is not an id: {value!r}") from None
  if not number.is_integer():
    raise DataError(f"{path}:{line}: column {column!r} is not an integer id: {value!r}")
  return str(int(number))


def read_split_table(path: str) -> list[dict[str, str]]:
  """Rows of ``mimic-cxr-2.0.0-split.csv[.gz]`` as dicts (dicom_id, study_id, subject_id, split)."""
  rows = []
  for line, row in _read_rows(path, ("dicom_id", "study_id", "subject_id", "split")):
    rows.append({"dicom_id": row["dicom_id"].strip(),
                 "study_id": _id(row["study_id"], path, line, "study_id"),
                 "subject_id": _id(row["subject_id"], path, line, "subject_id"),
                 "split": row["split"].strip()})
  return rows


def read_chexpert_table(path: str) -> dict[tuple[str, str], np.ndarray]:
  """``mimic-cxr-2.0.0-chexpert.csv[.gz]`` → {(subject_id, study_id): float32 ``[14]``}.

  Empty (NaN) and −1 (uncertain) become 0, as in the reference's ``data_split.py``. A repeated
  (subject, study) keeps its first row (the release has none).
  """
  table: dict[tuple[str, str], np.ndarray] = {}
  columns = ("subject_id", "study_id") + anatomy.CHEXPERT_LABELS
  for line, row in _read_rows(path, columns):
    key = (_id(row["subject_id"], path, line, "subject_id"),
           _id(row["study_id"], path, line, "study_id"))
    labels = np.zeros((anatomy.NUM_LABELS,), np.float32)
    for j, name in enumerate(anatomy.CHEXPERT_LABELS):
      text = (row[name] or "").strip()
      if not text:
        continue
      try:
        value = float(text)
      except ValueError:
        raise DataError(f"{path}:{line}: column {name!r} is not a number: {text!r}") from None
      if np.isnan(value) or value in (0.0, -1.0):
        continue
      if value != 1.0:
        raise DataError(f"{path}:{line}: column {name!r} must be 1, 0, -1 or empty, got {text!r}")
      labels[j] = 1.0
    table.setdefault(key, labels)
  return table


def image_path(mimic_dir: str, subject_id: str, study_id: str, dicom_id: str) -> str:
  """Path of one MIMIC-CXR-JPG image: ``files/p{first two digits}/p{subject}/s{study}/{dicom}.jpg``."""
  return os.path.join(mimic_dir, "files", f"p{subject_id[:2]}", f"p{subject_id}", f"s{study_id}",
                      f"{dicom_id}.jpg")


def build_index(mimic_dir: str, imagenome_dir: str, splits: Sequence[str] = SPLITS,
                limit: int | None = None) -> tuple[dict[str, list[Item]], dict[str, dict[str, int]]]:
  """Joins split rows, labels and scene graphs.

  Args:
    mimic_dir: MIMIC-CXR-JPG root (holds the two tables).
    imagenome_dir: Chest ImaGenome root.
    splits: split names to keep (the table's spelling: ``train``, ``validate``, ``test``).
    limit: keep at most this many images per split (after the filters).

  Returns:
    ``({split: [Item, ...]}, {split: {"no_labels": n, "no_scene_graph": n}})``, items in table order.
  """
  split_rows = read_split_table(find_table(mimic_dir, SPLIT_CSV))
  labels = read_chexpert_table(find_table(mimic_dir, CHEXPERT_CSV))
  graph_dir = os.path.dirname(scene_graph.scene_graph_path(imagenome_dir, "x"))
  if not os.path.isdir(graph_dir):
    raise DataError(f"{graph_dir} does not exist: not a Chest ImaGenome root ({imagenome_dir})")
  # One directory listing instead of ~240k stat calls.
  have_graph = {f[:-len("_SceneGraph.json")] for f in os.listdir(graph_dir)
                if f.endswith("_SceneGraph.json")}
  index: dict[str, list[Item]] = {s: [] for s in splits}
  excluded = {s: {"no_labels": 0, "no_scene_graph": 0} for s in splits}
  for row in split_rows:
    split = row["split"]
    if split not in index or (limit is not None and len(index[split]) >= limit):
      continue
    key = (row["subject_id"], row["study_id"])
    if key not in labels:
      excluded[split]["no_labels"] += 1
    elif row["dicom_id"] not in have_graph:
      excluded[split]["no_scene_graph"] += 1
    else:
      index[split].append(Item(row["dicom_id"], row["subject_id"], row["study_id"], split,
                               labels[key]))
  return index, excluded


@dataclasses.dataclass(frozen=True)
class ConvertOptions:
  """How :func:`convert_item` finds and converts an image (see :func:`preprocess`'s arguments)."""
  mimic_dir: str
  imagenome_dir: str
  image_size: int
  box_source: str
  intensity: str


def convert_item(item: Item, options: ConvertOptions) -> tuple[bytes, int]:
  """Reads, letterboxes and encodes one image with its scene graph.

  Returns:
    (encoded record, number of clipped boxes).

  Raises:
    images.ImageError, scene_graph.SceneGraphError: naming the bad file.
  """
  pixels = images.read_image(image_path(options.mimic_dir, item.subject_id, item.study_id,
                                        item.dicom_id))
  graph = scene_graph.read_scene_graph(
      scene_graph.scene_graph_path(options.imagenome_dir, item.dicom_id),
      box_source=options.box_source, image_hw=pixels.shape[:2])
  square, _ = images.letterbox(pixels, options.image_size)
  if options.intensity == "minmax":
    square = images.minmax_stretch(square)
  example = {
      "id": item.dicom_id, "study_id": item.study_id, "subject_id": item.subject_id,
      "view": graph.viewpoint, "image_png": images.encode_png(square), "boxes": graph.boxes,
      "box_present": graph.present, "sentences": list(graph.sentences), "labels": item.labels}
  return records.encode(example), graph.num_clipped


def _convert_or_report(args: tuple[Item, ConvertOptions]) -> tuple[str, Any, int]:
  """Pool worker: ("ok", record, clipped) or ("error", exception, 0) for a bad input file."""
  item, options = args
  try:
    raw, clipped = convert_item(item, options)
  except (images.ImageError, scene_graph.SceneGraphError) as e:
    return "error", e, 0
  return "ok", raw, clipped


def _init_worker() -> None:
  cv2.setNumThreads(1)  # one process per core already; OpenCV's own threads would oversubscribe


def process_pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
  """Worker processes for CPU-bound NumPy/OpenCV work (one OpenCV thread each).

  Processes are forked while JAX is not imported (fast, and any caller script works); once it is,
  a fork could copy locks held by XLA's threads, so a fork server starts them instead (which, like
  spawn, needs the caller's main module to be import-safe: ``if __name__ == "__main__":``). An
  executor rather than ``multiprocessing.Pool``, so a worker that dies raises ``BrokenProcessPool``
  instead of hanging.
  """
  method = "forkserver" if "jax" in sys.modules else "fork"
  return concurrent.futures.ProcessPoolExecutor(
      workers, mp_context=multiprocessing.get_context(method), initializer=_init_worker)


def preprocess(mimic_dir: str, imagenome_dir: str, out_dir: str, image_size: int = 1024,
               splits: Sequence[str] = SPLITS, box_source: str = "grid224",
               intensity: str = "minmax", num_shards: int = 1, on_error: str = "raise",
               workers: int = 1, limit: int | None = None) -> dict[str, Any]:
  """Converts the datasets into ``{out_dir}/{split}.array_record-*`` and ``metadata.json``.

  Args:
    mimic_dir: MIMIC-CXR-JPG root.
    imagenome_dir: Chest ImaGenome root.
    out_dir: records directory (created).
    image_size: stored image side (boxes stay on the 1024 canvas).
    splits: which splits to write, by the split table's names.
    box_source: ``"grid224"`` (reference) or ``"original"`` (see :mod:`scene_graph`).
    intensity: ``"minmax"`` (the reference's ``plt.imsave`` stretch) or ``"raw"``.
    num_shards: ArrayRecord files per split.
    on_error: ``"raise"`` (stop at the first bad image/scene graph) or ``"skip"`` (log and count).
    workers: processes; output order does not depend on it.
    limit: at most this many images per split (for quick runs).

  Returns:
    The per-split summary written to metadata (``{split: {count, skipped, excluded, clipped_boxes}}``).
  """
  if on_error not in ("raise", "skip"):
    raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
  if box_source not in scene_graph.BOX_SOURCES:
    raise ValueError(f"box_source must be one of {scene_graph.BOX_SOURCES}, got {box_source!r}")
  if intensity not in INTENSITIES:
    raise ValueError(f"intensity must be one of {INTENSITIES}, got {intensity!r}")
  index, excluded = build_index(mimic_dir, imagenome_dir, splits, limit)
  options = ConvertOptions(mimic_dir, imagenome_dir, image_size, box_source, intensity)
  pool = process_pool(workers) if workers > 1 else None
  summary: dict[str, Any] = {}
  try:
    for split in splits:
      tasks = [(item, options) for item in index[split]]
      if pool is None:
        results = map(_convert_or_report, tasks)
      else:  # map keeps the input order, so the records do not depend on the worker count
        results = pool.map(_convert_or_report, tasks, chunksize=8)
      skipped: dict[str, int] = {}
      clipped = [0]

      def good_records(results=results, skipped=skipped, clipped=clipped) -> Iterator[bytes]:
        for status, value, num_clipped in results:
          if status == "ok":
            clipped[0] += num_clipped
            yield value
            continue
          if on_error == "raise":
            raise value
          skipped[value.reason] = skipped.get(value.reason, 0) + 1
          if sum(skipped.values()) <= _MAX_LOGGED_SKIPS:
            logging.warning("skipped: %s", value)

      count = records.write_split(out_dir, split, good_records(), num_shards=num_shards)
      summary[split] = {"count": count, "skipped": skipped, "excluded": excluded[split],
                        "clipped_boxes": clipped[0]}
      logging.info("%s: %d records, skipped %s, excluded %s, %d clipped boxes", split, count,
                   skipped, excluded[split], clipped[0])
  finally:
    if pool is not None:
      pool.shutdown(cancel_futures=True)
  records.write_metadata(out_dir, image_size=image_size, splits=summary,
                         source=mimic_dir, imagenome_dir=imagenome_dir, box_source=box_source,
                         intensity=intensity)
  return summary


def _define_flags() -> None:
  # Defined on demand, so importing this module never claims flag names other programs may use.
  flags.DEFINE_string("mimic_dir", None, "MIMIC-CXR-JPG root (files/, the split and chexpert tables).")
  flags.DEFINE_string("imagenome_dir", None, "Chest ImaGenome root (silver_dataset/scene_graph/).")
  flags.DEFINE_string("out_dir", None, "Output records directory.")
  flags.DEFINE_integer("image_size", 1024, "Stored image side (boxes stay on the 1024 canvas).")
  flags.DEFINE_list("splits", list(SPLITS), "Splits to write (split-table names).")
  flags.DEFINE_enum("box_source", "grid224", scene_graph.BOX_SOURCES,
                    "grid224: the reference's int(v*1024/224); original: original_* coordinates "
                    "through the exact letterbox.")
  flags.DEFINE_enum("intensity", "minmax", INTENSITIES,
                    "minmax: the reference's per-image stretch (plt.imsave); raw: pixels as decoded.")
  flags.DEFINE_integer("num_shards", 1, "ArrayRecord files per split.")
  flags.DEFINE_enum("on_error", "raise", ["raise", "skip"], "Bad image/scene graph: stop or skip.")
  flags.DEFINE_integer("workers", 1, "Worker processes.")
  flags.DEFINE_integer("limit", None, "At most this many images per split.")
  for name in ("mimic_dir", "imagenome_dir", "out_dir"):
    flags.mark_flag_as_required(name)


def _main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  summary = preprocess(f.mimic_dir, f.imagenome_dir, f.out_dir, image_size=f.image_size,
                       splits=f.splits, box_source=f.box_source, intensity=f.intensity,
                       num_shards=f.num_shards, on_error=f.on_error, workers=f.workers,
                       limit=f.limit)
  for split, info in summary.items():
    print(f"{split}: {info}")


def main() -> None:
  """Console entry point."""
  _define_flags()
  app.run(_main)


if __name__ == "__main__":
  main()
