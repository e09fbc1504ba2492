"""The per-anatomy finding sentences of a records directory, de-duplicated and numbered.

Every record carries one sentence per anatomy (REFERENCE.md §3: ``"{Anatomy} shows …"`` or
``"{Anatomy} is healthy."``). Most repeat: the index numbers each distinct sentence once, so the
frozen text encoder runs once per sentence (not once per anatomy per step, as in the reference) and
the pipeline ships integer ids instead of strings. It also lists, per split and anatomy, which
sentences occur, which is what the RAG database is built from.

Stored beside the records as ``sentences.json`` (built by scanning the records on first use)::

  {"version": 1, "anatomies": [36 names],
   "sentences": [sorted distinct sentences],
   "by_split": {split: [[sentence ids of anatomy 0], ..., [... of anatomy 35]]},
   "counts": {split: [[records with each of those sentences, aligned with by_split] × 36]},
   "majority": {split: [the most frequent sentence id of each anatomy, −1 if none]}}

``counts`` (the RAG database's sentence prior) is newer than the rest: an index file without it
still loads, with ``counts == {}``; :func:`with_counts` rescans the records for it, in memory.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os

from absl import logging

from anatomix_jax import anatomy
from anatomix_jax.data import records

INDEX_FILE = "sentences.json"
VERSION = 1


@dataclasses.dataclass(frozen=True)
class SentenceIndex:
  """Distinct sentences (``ids`` index them) and their per-split, per-anatomy occurrence."""
  sentences: tuple[str, ...]
  by_split: dict[str, tuple[tuple[int, ...], ...]]  # split → 36 sorted id tuples
  # split → 36 ids: each anatomy's most frequent sentence (ties: the smallest id), −1 if none.
  majority: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
  # split → 36 tuples aligned with ``by_split``: in how many records each sentence occurs; {}: an
  # index file written before counts were kept.
  counts: dict[str, tuple[tuple[int, ...], ...]] = dataclasses.field(default_factory=dict)

  def ids(self) -> dict[str, int]:
    """sentence → id."""
    return {s: i for i, s in enumerate(self.sentences)}


def build(records_dir: str) -> SentenceIndex:
  """Scans every split of ``records_dir`` (only the msgpack fields; images stay encoded)."""
  from array_record.python import array_record_data_source  # heavy import, only here

  splits = sorted(records.read_metadata(records_dir).get("splits", {}))
  per_split: dict[str, list[collections.Counter]] = {}
  for split in splits:
    per_anatomy = [collections.Counter() for _ in range(anatomy.NUM_ANATOMIES)]
    source = array_record_data_source.ArrayRecordDataSource(records.shard_paths(records_dir, split))
    for i in range(len(source)):
      for a, sentence in enumerate(records.decode(source[i])["sentences"]):
        per_anatomy[a][sentence] += 1
    per_split[split] = per_anatomy
  sentences = tuple(sorted(set().union(*(c for counts in per_split.values() for c in counts))))
  ids = {s: i for i, s in enumerate(sentences)}
  by_split = {split: tuple(tuple(sorted(ids[s] for s in c)) for c in per_anatomy)
              for split, per_anatomy in per_split.items()}
  majority = {split: tuple(_most_common(c, ids) for c in per_anatomy)
              for split, per_anatomy in per_split.items()}
  counts = {split: tuple(tuple(c[sentences[i]] for i in per) for c, per in
                         zip(per_split[split], by_split[split])) for split in per_split}
  return SentenceIndex(sentences, by_split, majority, counts)


def _most_common(counts: collections.Counter, ids: dict[str, int]) -> int:
  """The id of the most frequent sentence (ties: the smallest id); −1 for no sentences."""
  return ids[min(counts, key=lambda s: (-counts[s], ids[s]))] if counts else -1


def save(index: SentenceIndex, path: str) -> None:
  tmp = f"{path}.tmp{os.getpid()}"  # several hosts may write the same file
  with open(tmp, "w") as f:
    json.dump({"version": VERSION, "anatomies": list(anatomy.ANATOMY_NAMES),
               "sentences": list(index.sentences),
               "by_split": {k: [list(v) for v in per] for k, per in index.by_split.items()},
               "majority": {k: list(v) for k, v in index.majority.items()},
               "counts": {k: [list(v) for v in per] for k, per in index.counts.items()}}, f)
  os.replace(tmp, path)


def load(path: str) -> SentenceIndex:
  """Reads a ``sentences.json``; raises ``RecordError`` naming the file on any inconsistency."""
  with open(path) as f:
    obj = json.load(f)
  if obj.get("version") != VERSION:
    raise records.RecordError(f"{path}: version {obj.get('version')}, expected {VERSION}")
  if tuple(obj.get("anatomies", ())) != anatomy.ANATOMY_NAMES:
    raise records.RecordError(f"{path}: anatomy list differs from anatomix_jax.anatomy")
  sentences = tuple(obj["sentences"])
  by_split = {}
  for split, per in obj["by_split"].items():
    if len(per) != anatomy.NUM_ANATOMIES or any(not 0 <= i < len(sentences) for ids in per
                                                 for i in ids):
      raise records.RecordError(f"{path}: field by_split[{split!r}] is malformed")
    by_split[split] = tuple(tuple(ids) for ids in per)
  majority = {}
  for split, ids in obj.get("majority", {}).items():
    if len(ids) != anatomy.NUM_ANATOMIES or any(not -1 <= i < len(sentences) for i in ids):
      raise records.RecordError(f"{path}: field majority[{split!r}] is malformed")
    majority[split] = tuple(ids)
  counts = {}
  for split, per in obj.get("counts", {}).items():
    if (split not in by_split or len(per) != anatomy.NUM_ANATOMIES
        or any(len(c) != len(ids) or any(not isinstance(n, int) or n < 1 for n in c)
               for c, ids in zip(per, by_split[split]))):
      raise records.RecordError(f"{path}: field counts[{split!r}] is malformed")
    counts[split] = tuple(tuple(c) for c in per)
  return SentenceIndex(sentences, by_split, majority, counts)


def load_or_build(records_dir: str) -> SentenceIndex:
  """The index of ``records_dir``, built and saved there on first use."""
  path = os.path.join(records_dir, INDEX_FILE)
  if os.path.exists(path) and os.path.getmtime(path) >= _records_mtime(records_dir):
    return load(path)
  logging.info("indexing the anatomy sentences of %s", records_dir)
  index = build(records_dir)
  try:
    save(index, path)
  except OSError as e:  # a read-only records directory: keep the index in memory only
    logging.warning("could not write %s (%s); the index is rebuilt on each run", path, e)
  logging.info("%d distinct sentences (%s)", len(index.sentences), ", ".join(
      f"{split}: {sum(len(ids) for ids in per)} anatomy/sentence pairs"
      for split, per in index.by_split.items()))
  return index


def with_counts(index: SentenceIndex, records_dir: str) -> SentenceIndex:
  """``index`` itself if it has ``counts``, else ``records_dir`` rescanned in memory (nothing is
  written: an older ``sentences.json`` stays as it is) and checked to number the same sentences."""
  if index.counts:
    return index
  logging.info("%s predates sentence counts: rescanning the records for them", records_dir)
  fresh = build(records_dir)
  if fresh.sentences != index.sentences or fresh.by_split != index.by_split:
    raise records.RecordError(f"{os.path.join(records_dir, INDEX_FILE)} no longer matches the "
                              "records: delete it to rebuild it")
  return dataclasses.replace(index, counts=fresh.counts)


def _records_mtime(records_dir: str) -> float:
  return os.path.getmtime(os.path.join(records_dir, records.METADATA_FILE))
