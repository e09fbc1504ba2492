"""The project's stage-1 record format: ArrayRecord shards of msgpack-encoded examples.

One example per radiograph (one Chest ImaGenome scene graph), already letterboxed:

  ============  =====================  =====================================================
  key           type                   meaning
  ============  =====================  =====================================================
  id            str                    dicom_id (the scene graph's image_id)
  study_id      str                    MIMIC study id
  subject_id    str                    MIMIC subject (patient) id
  view          str                    scene-graph viewpoint (PA, AP, ...)
  image_png     bytes                  8-bit grayscale PNG, S×S, zero-padded to a centred square
  boxes         float32 [36, 4]        xyxy on the CANVAS×CANVAS (1024) letterboxed frame
  box_present   uint8 [36]             1 where the scene graph has the anatomy
  sentences     list[str] (36)         per-anatomy finding sentence (REFERENCE.md §3)
  labels        float32 [14]           CheXpert labels (NaN→0, −1→0), CHEXPERT_LABELS order
  ============  =====================  =====================================================

Files in a records directory:
  ``{split}.array_record-{i:05d}-of-{n:05d}``  and ``metadata.json``
(``image_size``, ``canvas``, anatomy and label names, per-split counts and skips).
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Iterable

import msgpack
import numpy as np

from anatomix_jax import anatomy

FORMAT_VERSION = 1
CANVAS = 1024  # the reference's letterbox size: boxes always live on this frame
METADATA_FILE = "metadata.json"
_ARRAY_KEYS = {"boxes": (np.float32, (anatomy.NUM_ANATOMIES, 4)),
               "box_present": (np.uint8, (anatomy.NUM_ANATOMIES,)),
               "labels": (np.float32, (anatomy.NUM_LABELS,))}
_STR_KEYS = ("id", "study_id", "subject_id", "view")


class RecordError(ValueError):
  """A record or records directory that does not follow the format above."""


def encode(example: dict[str, Any]) -> bytes:
  """Serializes one example dict (keys as in the module docstring) to bytes."""
  missing = set(_ARRAY_KEYS) | set(_STR_KEYS) | {"image_png", "sentences"}
  missing -= set(example)
  if missing:
    raise RecordError(f"example {example.get('id')!r} lacks fields {sorted(missing)}")
  out = {"v": FORMAT_VERSION, "image_png": bytes(example["image_png"])}
  for key in _STR_KEYS:
    out[key] = str(example[key])
  for key, (dtype, shape) in _ARRAY_KEYS.items():
    arr = np.asarray(example[key], dtype)
    if arr.shape != shape:
      raise RecordError(f"example {example['id']!r}: field {key!r} has shape {arr.shape}, "
                        f"expected {shape}")
    out[key] = arr.tobytes()
  sentences = [str(s) for s in example["sentences"]]
  if len(sentences) != anatomy.NUM_ANATOMIES:
    raise RecordError(f"example {example['id']!r}: {len(sentences)} sentences, expected "
                      f"{anatomy.NUM_ANATOMIES}")
  out["sentences"] = sentences
  return msgpack.packb(out, use_bin_type=True)


def decode(raw: bytes) -> dict[str, Any]:
  """Inverse of :func:`encode`; arrays come back as NumPy arrays, the image still PNG-encoded."""
  try:
    obj = msgpack.unpackb(raw, raw=False)
  except Exception as e:  # msgpack raises several unrelated exception types
    raise RecordError(f"record is not valid msgpack: {e}") from e
  if not isinstance(obj, dict) or obj.get("v") != FORMAT_VERSION:
    raise RecordError(f"record has format version {obj.get('v') if isinstance(obj, dict) else None}"
                      f", expected {FORMAT_VERSION}")
  for key, (dtype, shape) in _ARRAY_KEYS.items():
    obj[key] = np.frombuffer(obj[key], dtype).reshape(shape)
  return obj


def shard_paths(records_dir: str, split: str) -> list[str]:
  """Sorted shard files of one split; raises if there are none."""
  paths = sorted(glob.glob(os.path.join(records_dir, f"{split}.array_record-*")))
  if not paths:
    raise RecordError(f"no '{split}' records in {records_dir!r} (expected files "
                      f"'{split}.array_record-*'); run the preprocessing first")
  return paths


def write_split(records_dir: str, split: str, examples: Iterable[bytes], num_shards: int = 1) -> int:
  """Writes encoded examples round-robin into ``num_shards`` ArrayRecord files; returns the count.

  Files are written under temporary names and renamed at the end, so an interrupted run leaves no
  half-written shard that a reader could mistake for a complete one.
  """
  from array_record.python import array_record_module  # heavy import, only for writers

  os.makedirs(records_dir, exist_ok=True)
  final = [os.path.join(records_dir, f"{split}.array_record-{i:05d}-of-{num_shards:05d}")
           for i in range(num_shards)]
  tmp = [p + ".tmp" for p in final]
  writers = [array_record_module.ArrayRecordWriter(p, "group_size:1") for p in tmp]
  count = 0
  try:
    for count, raw in enumerate(examples, start=1):
      writers[(count - 1) % num_shards].write(raw)
  finally:
    for w in writers:
      w.close()
  for old in glob.glob(os.path.join(records_dir, f"{split}.array_record-*")):
    if old not in tmp:
      os.remove(old)
  for t, f in zip(tmp, final):
    os.replace(t, f)
  return count


def read_metadata(records_dir: str) -> dict[str, Any]:
  """Loads and checks ``metadata.json`` (anatomy list and format version must match this code)."""
  path = os.path.join(records_dir, METADATA_FILE)
  if not os.path.exists(path):
    raise RecordError(f"{path} does not exist: not a records directory")
  with open(path) as f:
    meta = json.load(f)
  if meta.get("format_version") != FORMAT_VERSION:
    raise RecordError(f"{path}: format_version {meta.get('format_version')}, expected "
                      f"{FORMAT_VERSION}")
  if tuple(meta.get("anatomies", ())) != anatomy.ANATOMY_NAMES:
    raise RecordError(f"{path}: anatomy list differs from anatomix_jax.anatomy.ANATOMY_NAMES")
  return meta


def write_metadata(records_dir: str, **fields: Any) -> None:
  """Writes ``metadata.json`` atomically with the format version and the anatomy/label names."""
  meta = {"format_version": FORMAT_VERSION, "canvas": CANVAS,
          "anatomies": list(anatomy.ANATOMY_NAMES), "labels": list(anatomy.CHEXPERT_LABELS),
          **fields}
  path = os.path.join(records_dir, METADATA_FILE)
  with open(path + ".tmp", "w") as f:
    json.dump(meta, f, indent=2)
  os.replace(path + ".tmp", path)
