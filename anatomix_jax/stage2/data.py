"""Stage-2 input pipeline (Grain): instruction records → mixed, shuffled batches of images + records.

Per source: the JSON Lines files written by ``anatomix_jax.instruct`` (``{dir}/{source}/{split}.jsonl``)
→ a ``MapDataset`` (shuffled and repeated when training) → weighted ``MapDataset.mix`` over the
sources → per-host shard → image loading (letterbox to the 1024 canvas as the boxes' frame, the
stage-1 intensity stretch, resize to the APM input size) → augmentation (affine + flip, the
reference's, only for tasks whose answers hold no coordinates: ``schema.NO_AUG_TASKS``) → batches
``{"image": float32[b, S, S, 1], "valid": float32[b], "records": list[dict]}``.

The prompt itself is rendered later, on the host, once the frozen APM has produced the boxes and
retrieved sentences that go into the context (``stage2.batching``). Everything here is an index
transform of a ``MapDataset``, so the iterator state (mixture position included) is checkpointed
with the model and a resumed run continues exactly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import grain
import numpy as np
from absl import logging

from anatomix_jax.data import augment as augment_lib
from anatomix_jax.data import images
from anatomix_jax.instruct import schema

_MAX_LOGGED = 20


class InstructionDataError(ValueError):
  """Missing or inconsistent instruction data (names the file or setting)."""


def jsonl_path(data_dir: str, source: str, split: str) -> str:
  return os.path.join(data_dir, source, f"{split}.jsonl")


def load_records(data_dir: str, source: str, split: str,
                 tasks: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """Validated records of one source and split (optionally only some tasks).

  Raises:
    InstructionDataError: the file is missing, or a task name is unknown.
    schema.SchemaError: a malformed record (file and line named).
  """
  path = jsonl_path(data_dir, source, split)
  if source not in schema.SOURCES:
    raise InstructionDataError(f"unknown source {source!r}; known: {list(schema.SOURCES)}")
  if tasks:
    unknown = sorted(set(tasks) - set(schema.TASKS))
    if unknown:
      raise InstructionDataError(f"unknown task name(s) {unknown}; known: {list(schema.TASKS)}")
  if not os.path.isfile(path):
    raise InstructionDataError(f"{path}: no such instruction file (build it with "
                               "anatomix_jax.instruct or the synthetic instruction builder)")
  records = list(schema.read_jsonl(path))
  if tasks:
    records = [r for r in records if r["task"] in tasks]
  return records


def model_input(pixels: np.ndarray, image_size: int, intensity: str = "minmax") -> np.ndarray:
  """A decoded radiograph → the APM's input: letterbox to the canvas (the frame the boxes live
  on), the intensity stretch of the stage-1 records, resize to the APM's side.

  Args:
    pixels: [H, W] uint8 or float32 in [0, 1].
    image_size: S.
    intensity: "minmax" or "raw".

  Returns:
    [S, S] (uint8 with "minmax"; the input dtype with "raw").
  """
  square, _ = images.letterbox(pixels, schema.CANVAS)
  if intensity == "minmax":
    square = images.minmax_stretch(square)
  if image_size != schema.CANVAS:
    square = cv2.resize(square, (image_size,) * 2, interpolation=cv2.INTER_AREA)
  return square


class LoadImage(grain.transforms.Map):
  """Record → ``{"image": uint8[S, S], "valid", "record"}``; missing/corrupt images are counted
  skips (``valid`` 0, a black image) when ``skip_bad``, else errors naming the file."""

  def __init__(self, image_roots: Mapping[str, str], image_size: int, intensity: str,
               skip_bad: bool):
    self.image_roots = dict(image_roots)
    self.image_size = image_size
    self.intensity = intensity
    self.skip_bad = skip_bad
    self.skipped = 0

  def _path(self, record: Mapping[str, Any]) -> str:
    root = self.image_roots.get(record["source"], self.image_roots.get("default"))
    if root is None:
      raise InstructionDataError(f"no image root for source {record['source']!r} (set "
                                 f"data.image_roots.{record['source']} or .default)")
    return os.path.join(root, record["image"])

  def map(self, record: dict[str, Any]) -> dict[str, Any]:
    path = self._path(record)
    try:
      pixels = images.read_image(path)
    except images.ImageError as e:
      if not self.skip_bad:
        raise
      self.skipped += 1
      if self.skipped <= _MAX_LOGGED:
        logging.warning("skipping record %s/%s: %s", record["source"], record["id"], e)
      return {"image": np.zeros((self.image_size,) * 2, np.uint8), "valid": 0, "record": record}
    return {"image": model_input(pixels, self.image_size, self.intensity), "valid": 1,
            "record": record}


class AugmentImage(grain.transforms.RandomMap):
  """The reference's affine + flip on the image only, skipped for ``NO_AUG_TASKS``."""

  def __init__(self, cfg: dict[str, Any]):
    self.cfg = cfg

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    if not element["valid"] or element["record"]["task"] in schema.NO_AUG_TASKS:
      return element
    no_boxes = np.zeros((0, 4), np.float32)
    image, _, _ = augment_lib.random_augment(element["image"], no_boxes, rng, self.cfg)
    return {**element, "image": image}


def collate(elements: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Stacks images (float32 in [0, 1], ``[b, S, S, 1]``) and keeps the records as a list."""
  image = np.stack([e["image"] for e in elements]).astype(np.float32)[..., None] / np.float32(255)
  return {"image": image, "valid": np.array([e["valid"] for e in elements], np.float32),
          "records": [e["record"] for e in elements]}


def mixture(data_dir: str, split: str, weights: Mapping[str, float], *,
            tasks: Sequence[str] | None = None, seed: int = 0, train: bool = True,
            limit: int | None = None) -> grain.MapDataset:
  """The records of several sources, weighted (training) or concatenated (evaluation).

  Args:
    data_dir: directory of ``{source}/{split}.jsonl`` files.
    split: "train", "validate" or "test".
    weights: source → sampling weight (sources with weight 0 are left out).
    tasks: only these tasks (None: all).
    seed: shuffle seed.
    train: shuffle and repeat each source, then mix by weight (an infinite dataset); else one
      pass over each source in turn.
    limit: evaluation only: at most this many records in all, split evenly over the sources (the
      first ones of each file).

  Returns:
    A ``MapDataset`` of record dicts.
  """
  parts, part_weights = [], []
  for source, weight in sorted(weights.items()):
    if weight < 0:
      raise InstructionDataError(f"mixture weight of {source!r} is negative ({weight})")
    if weight == 0:
      continue
    records = load_records(data_dir, source, split, tasks)
    if not records:
      logging.warning("source %s has no %s records%s", source, split,
                      f" for tasks {list(tasks)}" if tasks else "")
      continue
    ds = grain.MapDataset.source(records)
    if train:
      ds = ds.shuffle(seed=augment_lib.derived_seed(seed, schema.SOURCES.index(source))).repeat()
    parts.append(ds)
    part_weights.append(float(weight))
  if not parts:
    raise InstructionDataError(f"no {split} records in {data_dir} for sources "
                               f"{sorted(weights)}{f' and tasks {list(tasks)}' if tasks else ''}")
  if train:
    return grain.MapDataset.mix(parts, part_weights)
  if limit is not None:
    per_source = -(-limit // len(parts))
    parts = [p[:per_source] for p in parts]
  return grain.MapDataset.concatenate(parts)


def instruction_dataset(data_dir: str, split: str, weights: Mapping[str, float], *,
                        image_roots: Mapping[str, str], image_size: int, batch_size: int,
                        train: bool, seed: int = 0, tasks: Sequence[str] | None = None,
                        augment: Any = None, intensity: str = "minmax", skip_bad: bool = True,
                        process_index: int = 0, process_count: int = 1,
                        limit: int | None = None) -> grain.IterDataset:
  """The host-local stage-2 pipeline (see the module docstring).

  Args:
    data_dir, split, weights, tasks, seed, train: see ``mixture``.
    image_roots: source → directory the records' ``image`` paths are relative to ("default" for
      the rest).
    image_size: APM input side S.
    batch_size: per-host batch b.
    augment: augmentation config (``data.augment`` keys); None/disabled: none. Training only.
    intensity: "minmax" (the stage-1 records' stretch) or "raw".
    skip_bad: unreadable images become ``valid`` 0 rows instead of errors.
    process_index / process_count: this host's shard.
    limit: evaluation only: at most about this many records, evenly from each source.

  Returns:
    A ``grain.IterDataset`` of batches (``collate``); evaluation batches are padded with
    ``valid`` 0 rows to a full batch.
  """
  ds = mixture(data_dir, split, weights, tasks=tasks, seed=seed, train=train,
               limit=None if train else limit)
  return batches(ds, image_roots=image_roots, image_size=image_size, batch_size=batch_size,
                 train=train, seed=seed, augment=augment, intensity=intensity, skip_bad=skip_bad,
                 process_index=process_index, process_count=process_count)


def batches(ds: grain.MapDataset, *, image_roots: Mapping[str, str], image_size: int,
            batch_size: int, train: bool, seed: int = 0, augment: Any = None,
            intensity: str = "minmax", skip_bad: bool = True, process_index: int = 0,
            process_count: int = 1) -> grain.IterDataset:
  """Records (a ``MapDataset`` of record dicts) → this host's batches of loaded images.

  Arguments as ``instruction_dataset``; ``--mode=eval`` passes its own record selection here.
  """
  if not train:
    per_step = batch_size * process_count
    missing = -len(ds) % per_step
    if missing:  # pad with copies of the first record, marked invalid after loading
      pad = grain.MapDataset.source([dict(ds[0], id="__padding__")] * missing)
      ds = grain.MapDataset.concatenate([ds, pad])
  ds = ds.map(LoadImage(image_roots, image_size, intensity, skip_bad))
  if not train:
    ds = ds.map(_MarkPadding())
  aug = augment_lib.augment_params(augment) if train else None
  if aug is not None:  # seeded by the global position: the same for any process count
    ds = ds.random_map(AugmentImage(aug), seed=augment_lib.derived_seed(seed, 101))
  # Whole batches per host (lazy: a host loads only its own): process p holds rows
  # [p·b, (p+1)·b) of each global batch, which is the same for any process count.
  ds = ds.batch(batch_size, drop_remainder=train, batch_fn=collate)[process_index::process_count]
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2))


class _MarkPadding(grain.transforms.Map):
  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    if element["record"]["id"] == "__padding__":
      return {**element, "valid": 0}
    return element
