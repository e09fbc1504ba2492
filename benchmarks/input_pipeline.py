"""Stage-1 input pipeline throughput: images/s at 1024² from 1024² records, train + augmentation.

Writes ``--num_records`` synthetic radiograph-like records (smooth structures plus noise, so the
PNGs compress like real ones) into a temporary directory, then times ``stage1_dataset`` with
each worker count in ``--workers`` and prints one JSON line.

  python benchmarks/input_pipeline.py [--workers=0,2] [--batches=12]
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time

from absl import app
from absl import flags
import cv2
import numpy as np

from anatomix_jax import anatomy
from anatomix_jax.data import augment
from anatomix_jax.stage1 import data as pipeline
from anatomix_jax.data import records

_NUM_RECORDS = flags.DEFINE_integer("num_records", 64, "synthetic records to write")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 1024, "stored and output image side")
_BATCH = flags.DEFINE_integer("batch_size", 8, "per-host batch size")
_BATCHES = flags.DEFINE_integer("batches", 12, "timed batches per setting (after 2 warm-up)")
_WORKERS = flags.DEFINE_list("workers", ["0", "2"], "Grain worker counts to time")


def _synthetic_png(rng: np.random.Generator, size: int) -> bytes:
  coarse = rng.uniform(0, 255, (size // 16, size // 16)).astype(np.float32)
  small = cv2.GaussianBlur(coarse, (0, 0), 2)
  img = cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)
  img += rng.normal(0, 6, (size, size)).astype(np.float32)
  return cv2.imencode(".png", np.clip(img, 0, 255).astype(np.uint8))[1].tobytes()


def _write_records(directory: str, n: int, size: int) -> float:
  rng = np.random.default_rng(0)
  raw = []
  for i in range(n):
    xy = rng.uniform(50, 600, (anatomy.NUM_ANATOMIES, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(50, 350, xy.shape)], 1).astype(np.float32)
    raw.append(records.encode({
        "id": f"syn{i}", "study_id": "s", "subject_id": "p", "view": "PA",
        "image_png": _synthetic_png(rng, size), "boxes": boxes,
        "box_present": np.ones(anatomy.NUM_ANATOMIES, np.uint8),
        "sentences": [""] * anatomy.NUM_ANATOMIES,
        "labels": np.zeros(anatomy.NUM_LABELS, np.float32)}))
  records.write_split(directory, "train", raw, num_shards=2)
  records.write_metadata(directory, image_size=size)
  return sum(len(r) for r in raw) / n


def _time(directory: str, workers: int) -> float:
  ds = pipeline.stage1_dataset(directory, "train", image_size=_IMAGE_SIZE.value,
                               batch_size=_BATCH.value, train=True, seed=0,
                               augment=augment.DEFAULT_AUGMENT, num_workers=workers)
  it = iter(ds)
  try:
    for _ in range(2):  # warm-up: worker start-up and first reads
      next(it)
    start = time.perf_counter()
    for _ in range(_BATCHES.value):
      batch = next(it)
      assert batch["image"].shape[0] == _BATCH.value
    elapsed = time.perf_counter() - start
  finally:
    it.close()
  return _BATCHES.value * _BATCH.value / elapsed


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as d:
    record_bytes = _write_records(d, _NUM_RECORDS.value, _IMAGE_SIZE.value)
    result = {"benchmark": "stage1_input_pipeline", "image_size": _IMAGE_SIZE.value,
              "batch_size": _BATCH.value, "augment": True, "num_records": _NUM_RECORDS.value,
              "mean_record_kib": round(record_bytes / 1024, 1), "cpus": os.cpu_count(),
              "machine": platform.machine()}
    for w in _WORKERS.value:
      result[f"images_per_s_workers_{int(w)}"] = round(_time(d, int(w)), 2)
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
