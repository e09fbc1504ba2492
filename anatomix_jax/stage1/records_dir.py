"""Where stage-1 records come from: configured real data, or the embedded synthetic default.

With ``data.records_dir`` empty, the synthetic radiographs are generated (once, deterministically) in
the real on-disk formats under ``{synthetic.dir or workdir/data}/raw`` and turned into records by the
same preprocessing as real data, so the real readers run on them.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from anatomix_jax import anatomy
from anatomix_jax.data import preprocess, records
from anatomix_jax.ops import boxes as box_ops
from anatomix_jax.synthetic import generator


def resolve_records_dir(data_cfg: Any, workdir: str) -> str:
  """Returns the records directory, generating the synthetic default first if none is configured.

  Only process 0 writes; the others wait at a barrier and then read the same files (the data
  directory must be on a filesystem that all hosts share, as the workdir is).
  """
  if data_cfg.records_dir:
    records.read_metadata(data_cfg.records_dir)  # fail early, naming the file, if it is not one
    return data_cfg.records_dir
  syn = data_cfg.synthetic
  root = syn.dir or os.path.join(workdir, "data")
  out_dir = os.path.join(root, f"records_{data_cfg.image_size}")
  if jax.process_index() == 0:
    paths = generator.generate(os.path.join(root, "raw"), num_train=syn.num_train,
                               num_val=syn.num_val, num_test=syn.num_test, seed=syn.seed,
                               min_size=syn.min_size, max_size=syn.max_size)
    if not _records_match(out_dir, data_cfg.image_size, paths):
      logging.info("preprocessing synthetic radiographs into %s", out_dir)
      preprocess.preprocess(paths["mimic_dir"], paths["imagenome_dir"], out_dir,
                            image_size=data_cfg.image_size)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("anatomix_jax.stage1_data")
  return out_dir


def _records_match(out_dir: str, image_size: int, paths: dict) -> bool:
  try:
    meta = records.read_metadata(out_dir)
  except records.RecordError:
    return False
  return meta.get("image_size") == image_size and meta.get("source") == paths["mimic_dir"]


def split_count(records_dir: str, split: str) -> int:
  """Number of examples of ``split`` according to the records metadata."""
  meta = records.read_metadata(records_dir)
  try:
    return int(meta["splits"][split]["count"])
  except KeyError as e:
    raise records.RecordError(f"{records_dir}/{records.METADATA_FILE} has no count for split "
                              f"{split!r} (splits: {sorted(meta.get('splits', {}))})") from e


def mean_train_boxes(records_dir: str, split: str, max_examples: int = 5000) -> np.ndarray:
  """Per-anatomy mean normalized cxcywh box over (up to ``max_examples`` evenly spaced) records.

  The "mean-box baseline" predicts this box for every image; an APM must beat it to have learned
  anything image-specific.

  Returns:
    ``[N, 4]`` normalized cxcywh.
  """
  source = grain.sources.ArrayRecordDataSource(records.shard_paths(records_dir, split))
  indices = np.linspace(0, len(source) - 1, min(len(source), max_examples)).astype(int)
  total = np.zeros((anatomy.NUM_ANATOMIES, 4))
  count = np.zeros((anatomy.NUM_ANATOMIES, 1))
  for i in np.unique(indices):
    ex = records.decode(source[int(i)])
    present = ex["box_present"][:, None] > 0
    total += np.where(present, box_ops.xyxy_to_cxcywh(ex["boxes"] / records.CANVAS), 0.0)
    count += present
  return (total / np.maximum(count, 1)).astype(np.float32)
