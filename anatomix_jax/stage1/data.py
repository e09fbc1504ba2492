"""Stage-1 (APM) input pipeline: Grain Dataset API over a records directory (``records.py``).

Training (``train=True``)::

  ArrayRecordDataSource → map_with_index(decode) → shuffle(seed) → repeat(num_epochs)
  → random_map(augment) → map(finalize) → batch(drop_remainder) → [p::P] host slice
  → to_iter_dataset → mp_prefetch(num_workers)

* Decoding sits before the shuffle only so the record index travels with the example; MapDataset
  is lazy, so only the records actually requested are read and decoded.
* ``shuffle`` then ``repeat`` gives a different permutation per epoch: grain 0.2.18's
  ``ShuffleMapDataset`` receives the repeated (global) index, splits it into
  ``(epoch, index_in_epoch)`` and shuffles with seed ``seed + epoch``.
* Augmentation comes BEFORE the host slice, so Grain seeds each example's generator with its global
  position in the repeated stream: position ``g`` gets the same image and the same augmentation
  whatever the process count, worker count or restart history, and every epoch is augmented anew.
* The host slice takes whole batches: step ``s``'s global batch is positions ``[s·P·b, (s+1)·P·b)``
  in order, process ``p`` holding the block ``[p·b, (p+1)·b)`` of it. So the global batch, row
  order included (which dropout masks depend on), is the same for any process count.
* ``mp_prefetch`` slices the batched MapDataset over the workers and interleaves them round-robin,
  so the batches are identical with 0 or N workers. Iterator ``get_state``/``set_state`` restore
  the exact following batches in both cases (with workers the state holds each worker's position).
  Save it with Orbax as ``grain.checkpoint.CheckpointSave(iterator)`` inside a Composite. The
  state's structure depends on ``num_workers``: resume with the worker count it was saved with.
* Resources: Grain's default ``ReadOptions`` (16 threads, 500-element buffer) would buffer 500
  BATCHES (16 GB at 1024², b=8); here ``read_threads``/``prefetch_buffer_size`` default to 2.
  With workers, call ``iterator.close()`` when done: it unlinks the batches still waiting in
  shared memory (else Python warns about leaked shared_memory objects at exit). Worker processes
  are spawned: the calling script needs an ``if __name__ == "__main__"`` guard and parsed absl
  flags (``absl.app.run`` or ``flags.FLAGS.mark_as_parsed()``).

Evaluation (``train=False``): no shuffle or augmentation, one pass. The split is padded with
placeholder rows (``valid = 0``, ``index = −1``) up to ``num_batches · P · b`` and batched by
``b``; host ``p`` takes batches ``p, p+P, …``. Every host yields the same number of batches, global
batch ``k`` (host batches ``k`` concatenated in host order) is positions ``[k·P·b, (k+1)·P·b)``,
and every record is seen exactly once.

Batches are dicts of NumPy arrays (``b`` = per-host batch, ``S`` = ``image_size``):

* ``image``    float32 ``[b, S, S, 1]`` in [0, 1];
* ``boxes``    float32 ``[b, 36, 4]`` normalized cxcywh (xyxy on the canvas ÷ canvas); 0 if absent;
* ``box_mask`` float32 ``[b, 36]``: 1 = anatomy present AND box non-degenerate after augmentation;
* ``labels``   float32 ``[b, 14]`` CheXpert labels;
* ``sentence_ids`` int32 ``[b, 36]``: each anatomy's sentence in the ``sentence_ids`` mapping given
  to :func:`stage1_dataset` (``data/sentences.py``); −1 without a mapping and in placeholders;
* ``index``    int32 ``[b]``: record index within the split; −1 for eval padding;
* ``valid``    float32 ``[b]``: 0 for eval padding and for skipped corrupt records.

Corrupt records (bad msgpack, undecodable or non-square PNG) raise :class:`records.RecordError`
naming the split, record index and id. With ``skip_bad=True`` such a record becomes a
placeholder row instead: ``valid = 0`` but ``index`` = the bad record's index, so it is masked
out of losses/metrics like padding while the batch keeps its static shape (no recompilation, no
dependence on the worker count, checkpointable). Counting: worker processes cannot share a Python
counter, so the exact count is taken in the consumer from the batches — :func:`count_skipped`
(``valid == 0 and index >= 0``). Each skip is also logged with absl ``logging.warning`` in the
process that decoded it, and :func:`skipped_in_this_process` counts the skips decoded in the
calling process (exact with ``num_workers=0``; workers keep their own counts).
"""

from __future__ import annotations

import threading
from typing import Any, Mapping

from absl import logging
import cv2
import grain
import numpy as np

from anatomix_jax import anatomy
from anatomix_jax.data import augment as augment_lib
from anatomix_jax.data import records

BATCH_KEYS = ("image", "boxes", "box_mask", "labels", "sentence_ids", "index", "valid")

_skip_lock = threading.Lock()
_skipped = 0  # corrupt records replaced by placeholders in THIS process (see module docstring)


def skipped_in_this_process() -> int:
  """Corrupt records skipped by decoders running in the calling process (not its workers)."""
  return _skipped


def count_skipped(batch: dict[str, np.ndarray]) -> int:
  """Number of skipped corrupt records in a batch: rows with ``valid == 0`` and ``index >= 0``."""
  return int(np.sum((np.asarray(batch["valid"]) == 0) & (np.asarray(batch["index"]) >= 0)))


def _placeholder(image_size: int, index: int) -> dict[str, Any]:
  """An all-masked example (eval padding, skipped record); ``index`` −1 marks padding."""
  return {"image": np.zeros((image_size, image_size), np.uint8),
          "boxes": np.zeros((anatomy.NUM_ANATOMIES, 4), np.float32),
          "present": np.zeros((anatomy.NUM_ANATOMIES,), bool),
          "labels": np.zeros((anatomy.NUM_LABELS,), np.float32),
          "sentence_ids": np.full((anatomy.NUM_ANATOMIES,), -1, np.int32),
          "index": np.int32(index), "valid": np.float32(0.0)}


def decode_image(png: bytes, image_size: int) -> np.ndarray:
  """Decodes a square grayscale PNG and resizes it to ``image_size`` (INTER_AREA) if needed.

  Returns:
    uint8 ``[image_size, image_size]``. 16-bit PNGs are scaled to 8 bits.

  Raises:
    ValueError: undecodable, not 2-D grayscale, or not square.
  """
  image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
  if image is None:
    raise ValueError("PNG could not be decoded")
  if image.ndim == 3 and image.shape[2] == 1:
    image = image[..., 0]
  if image.ndim != 2:
    raise ValueError(f"expected a grayscale PNG, got shape {image.shape}")
  if image.shape[0] != image.shape[1]:
    raise ValueError(f"expected a square (letterboxed) PNG, got {image.shape[1]}x{image.shape[0]}")
  if image.dtype == np.uint16:
    image = (image.astype(np.float32) * (255.0 / 65535.0) + 0.5).astype(np.uint8)
  elif image.dtype != np.uint8:
    raise ValueError(f"unsupported PNG dtype {image.dtype}")
  if image.shape[0] != image_size:
    image = cv2.resize(image, (image_size, image_size), interpolation=cv2.INTER_AREA)
  return image


class DecodeRecord(grain.transforms.MapWithIndex):
  """Raw record bytes → example dict with the image at ``image_size`` and boxes in its pixels."""

  def __init__(self, split: str, num_records: int, image_size: int, canvas: int, skip_bad: bool,
               sentence_ids: Mapping[str, int] | None = None):
    self.split, self.num_records = split, num_records
    self.image_size, self.canvas, self.skip_bad = image_size, canvas, skip_bad
    self.sentence_ids = sentence_ids

  def _sentence_ids(self, sentences: list[str]) -> np.ndarray:
    if self.sentence_ids is None:
      return np.full((anatomy.NUM_ANATOMIES,), -1, np.int32)
    try:
      return np.array([self.sentence_ids[s] for s in sentences], np.int32)
    except KeyError as e:
      raise records.RecordError(f"sentence {e.args[0]!r} is not in the sentence index (rebuild "
                                f"it: delete sentences.json in the records directory)") from e

  def map_with_index(self, index: int, raw: bytes) -> dict[str, Any]:
    # Grain passes the index of the repeated stream (epoch · n + i) here: keep the record index.
    index %= self.num_records
    example_id = None
    try:
      obj = records.decode(raw)
      example_id = obj.get("id")
      image = decode_image(obj["image_png"], self.image_size)
      boxes = np.asarray(obj["boxes"], np.float32) * np.float32(self.image_size / self.canvas)
      present = np.asarray(obj["box_present"]).astype(bool)
      # Non-finite coordinates would poison the losses: treat such anatomies as absent.
      present &= np.isfinite(boxes).all(axis=1)
      boxes = np.where(present[:, None], boxes, 0.0).astype(np.float32)
      return {"image": image, "boxes": boxes, "present": present,
              "labels": np.asarray(obj["labels"], np.float32),
              "sentence_ids": self._sentence_ids(obj["sentences"]),
              "index": np.int32(index), "valid": np.float32(1.0)}
    except Exception as e:  # anything wrong with one record is reported as that record's error
      message = f"split {self.split!r}, record {index}, id {example_id!r}: {e}"
      if not self.skip_bad:
        raise records.RecordError(f"corrupt record in {message}") from e
      global _skipped
      with _skip_lock:
        _skipped += 1
      logging.warning("skipping corrupt record in %s", message)
      return _placeholder(self.image_size, index)


class PaddingElement(grain.transforms.Map):
  """Any element → an eval padding placeholder (``index`` −1, ``valid`` 0)."""

  def __init__(self, image_size: int):
    self.image_size = image_size

  def map(self, element: Any) -> dict[str, Any]:
    del element
    return _placeholder(self.image_size, -1)


class Augment(grain.transforms.RandomMap):
  """The reference's joint RandomAffine + horizontal flip (``augment.py``) on one example."""

  def __init__(self, cfg: dict[str, Any]):
    self.cfg = cfg

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    if element["valid"] == 0:  # placeholders stay placeholders
      return element
    image, boxes, present = augment_lib.random_augment(
        element["image"], element["boxes"], rng, self.cfg, element["present"])
    return {**element, "image": image, "boxes": boxes, "present": present}


class Finalize(grain.transforms.Map):
  """Example → model format: image float32 [S,S,1] in [0,1], normalized cxcywh boxes, masks."""

  def __init__(self, image_size: int):
    self.image_size = image_size

  def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
    s = np.float32(self.image_size)
    xyxy = element["boxes"].astype(np.float32)
    mask = element["present"] & augment_lib.nondegenerate(xyxy)
    cxcywh = np.stack([(xyxy[:, 0] + xyxy[:, 2]) / 2, (xyxy[:, 1] + xyxy[:, 3]) / 2,
                       xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]], axis=1) / s
    # Absent anatomies get all-zero targets (what the reference regresses them to); degenerate
    # present boxes keep their coordinates but are masked.
    cxcywh = np.where(element["present"][:, None], cxcywh, 0.0).astype(np.float32)
    image = element["image"]
    image = (image.astype(np.float32) * np.float32(1.0 / 255.0))[..., None]
    return {"image": image, "boxes": cxcywh, "box_mask": mask.astype(np.float32),
            "labels": element["labels"].astype(np.float32),
            "sentence_ids": element["sentence_ids"],
            "index": np.int32(element["index"]), "valid": np.float32(element["valid"])}


class CopyOut(grain.transforms.Map):
  """Copies every array so batches no longer reference a worker's shared memory."""

  def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.array(v, copy=True) for k, v in batch.items()}


def stage1_dataset(records_dir: str, split: str, *, image_size: int, batch_size: int, train: bool,
                   seed: int = 0, augment: Any = None, process_index: int = 0,
                   process_count: int = 1, num_workers: int = 0, num_epochs: int | None = None,
                   skip_bad: bool = False, sentence_ids: Mapping[str, int] | None = None,
                   read_threads: int = 2,
                   prefetch_buffer_size: int = 2) -> grain.IterDataset:
  """Builds the host-local stage-1 input pipeline (see the module docstring).

  Args:
    records_dir: directory with ``{split}.array_record-*`` shards and ``metadata.json``.
    split: split name, e.g. ``"train"``.
    image_size: output side ``S``; stored images of another size are resized (INTER_AREA).
    batch_size: per-host batch ``b`` (see ``core.sharding.host_batch_size``).
    train: shuffle + repeat + augmentation + drop_remainder; else one padded eval pass.
    seed: shuffle and augmentation seed (training), in ``[0, 2**32)``.
    augment: None (no augmentation) or a mapping/ConfigDict with ``enabled``, ``degrees``,
      ``translate``, ``scale_min``, ``scale_max``, ``hflip_prob`` (and optional
      ``interpolation``); missing keys take the reference's values. Ignored when not training.
    process_index: this host's JAX process index.
    process_count: number of JAX processes.
    num_workers: Grain worker processes (0: decode in the calling process, with threads).
    num_epochs: training epochs (None: repeat forever). The stream is truncated to a multiple of
      ``process_count · batch_size`` so every host yields the same number of batches.
    skip_bad: replace corrupt records by masked placeholder rows instead of raising.
    sentence_ids: sentence → id (``sentences.SentenceIndex.ids()``), for the ``sentence_ids``
      batch field; None: that field is all −1.
    read_threads: threads per process producing batches (``grain.ReadOptions.num_threads``).
    prefetch_buffer_size: batches buffered per process (``grain.ReadOptions``).

  Returns:
    A ``grain.IterDataset`` of batch dicts (keys :data:`BATCH_KEYS`, shapes in the module
    docstring). Its iterators support ``get_state``/``set_state``.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  if batch_size <= 0 or image_size <= 0:
    raise ValueError(f"batch_size ({batch_size}) and image_size ({image_size}) must be positive")
  meta = records.read_metadata(records_dir)
  canvas = int(meta.get("canvas", records.CANVAS))
  source = grain.sources.ArrayRecordDataSource(records.shard_paths(records_dir, split))
  n = len(source)
  if n == 0:
    raise records.RecordError(f"split {split!r} in {records_dir!r} has no records")
  ds = grain.MapDataset.source(source).map_with_index(
      DecodeRecord(split, n, image_size, canvas, skip_bad, sentence_ids))

  if train:
    ds = ds.shuffle(seed=seed).repeat(num_epochs)
    aug = augment_lib.augment_params(augment)
    if aug is not None:
      ds = ds.random_map(Augment(aug), seed=augment_lib.derived_seed(seed, 1))
    ds = ds.map(Finalize(image_size))
    if num_epochs is not None:
      per_step = process_count * batch_size
      usable = len(ds) // per_step * per_step
      if usable == 0:
        raise ValueError(f"{num_epochs} epoch(s) of {n} examples do not fill one global batch of "
                         f"{per_step}")
      ds = ds[:usable]
    ds = ds.batch(batch_size, drop_remainder=True)[process_index::process_count]
  else:
    per_step = process_count * batch_size
    padded = -(-n // per_step) * per_step
    if padded > n:
      padding = grain.MapDataset.range(padded - n).map(PaddingElement(image_size))
      ds = grain.MapDataset.concatenate([ds, padding])
    ds = ds.map(Finalize(image_size)).batch(batch_size)
    ds = ds[process_index::process_count]

  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                               prefetch_buffer_size=prefetch_buffer_size))
  if num_workers > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    # Batches from workers may live in shared memory that the worker recycles: own them here.
    it_ds = it_ds.map(CopyOut())
  return it_ds


def num_eval_batches(num_examples: int, batch_size: int, process_count: int = 1) -> int:
  """Batches each host yields in an eval pass over ``num_examples`` records."""
  return -(-num_examples // (batch_size * process_count))
