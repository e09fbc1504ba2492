"""The per-anatomy sentence database (RAG, REFERENCE.md §3): build, save, load.

For each of the 36 anatomies, the distinct finding sentences seen for it (by default in the training
split only; the reference also adds validate and test, which leaks evaluation text into retrieval)
and their embeddings under the trained APM text branch (frozen BERT mean-pool → projection head),
L2-normalised, and how often each sentence occurs in those splits (the sentence prior
p(s | anatomy) that retrieval may add to the image evidence, ``rag/retrieval.py``). Saved as two
files in one directory, no pickle:

  ``rag.safetensors``  one float32 tensor ``anatomy_{i:02d}`` ``[S_i, d]`` per anatomy
  ``rag.json``         ``{"version", "anatomies": [36 names], "sentences": [[...] × 36],
                         "counts": [[records per sentence] × 36], "meta"}``

``meta["prior"]`` (written by ``--mode=build_rag``) holds the prior weight retrieval uses by
default. Version-1 databases (no counts) still load, with ``counts = None``: retrieval from them is
pure cosine, and asking for a prior weight raises :class:`DatabaseError`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Sequence

import numpy as np
import safetensors.numpy

from anatomix_jax import anatomy
from anatomix_jax.data.sentences import SentenceIndex

VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: no "counts"
TENSORS_FILE = "rag.safetensors"
INDEX_FILE = "rag.json"


class DatabaseError(ValueError):
  """A RAG database that is missing, malformed or made for another anatomy list."""


@dataclasses.dataclass(frozen=True)
class RagDatabase:
  """Per-anatomy sentences and their unit-norm embeddings (``embeddings[i]`` is ``[S_i, d]``);
  ``counts[i]`` int64 ``[S_i]``: in how many records of the database's splits each occurs (``None``:
  unknown, a version-1 database or an index without counts)."""
  anatomies: tuple[str, ...]
  sentences: tuple[tuple[str, ...], ...]
  embeddings: tuple[np.ndarray, ...]
  meta: dict[str, Any]
  counts: tuple[np.ndarray, ...] | None = None

  @property
  def sizes(self) -> tuple[int, ...]:
    return tuple(len(s) for s in self.sentences)


def log_prior(db: RagDatabase) -> tuple[np.ndarray, ...]:
  """Per anatomy, ``log p(s | anatomy)`` ``[S_i]`` float32 from the database's counts.

  A sentence with count 0 (possible only when counts and sentences came from different splits)
  counts as half an occurrence, so that its log-probability stays finite.

  Raises:
    DatabaseError: the database has no counts (built before they were kept): rebuild it with
      ``--mode=build_rag``, or retrieve without a prior (weight 0).
  """
  if db.counts is None:
    raise DatabaseError("this RAG database has no sentence counts (built by an older version): "
                        "rebuild it with --mode=build_rag to retrieve with a sentence prior, or "
                        "set the prior weight to 0")
  out = []
  for c in db.counts:
    c = np.maximum(np.asarray(c, np.float64), 0.5)
    out.append((np.log(c) - np.log(c.sum())).astype(np.float32) if len(c) else
               np.zeros((0,), np.float32))
  return tuple(out)


def _normalize(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def build(index: SentenceIndex, splits: Sequence[str],
          embed: Callable[[np.ndarray], np.ndarray], meta: dict[str, Any] | None = None
          ) -> RagDatabase:
  """Collects each anatomy's sentences over ``splits`` and embeds them.

  Args:
    index: the records' sentence index (``data/sentences.py``).
    splits: which splits' sentences enter the database.
    embed: sentence ids ``[S]`` int → embeddings ``[S, d]`` (the trained text branch).
    meta: provenance stored with the database (checkpoint step, encoder, ...).

  Returns:
    The database, sentences sorted within each anatomy, embeddings L2-normalised, counts summed
    over ``splits`` (``None`` if the index has no counts for one of them).
  """
  missing = [s for s in splits if s not in index.by_split]
  if missing:
    raise DatabaseError(f"splits {missing} not in the sentence index (has {sorted(index.by_split)})")
  per_anatomy = [sorted(set().union(*(index.by_split[s][a] for s in splits)))
                 for a in range(anatomy.NUM_ANATOMIES)]
  all_ids = np.array(sorted(set().union(*per_anatomy)), np.int64)
  if not len(all_ids):
    raise DatabaseError(f"splits {list(splits)} hold no sentences")
  table = dict(zip(all_ids.tolist(), _normalize(np.asarray(embed(all_ids), np.float32))))
  embeddings = tuple(np.stack([table[i] for i in ids]) if ids else
                     np.zeros((0, next(iter(table.values())).shape[-1]), np.float32)
                     for ids in per_anatomy)
  sentences = tuple(tuple(index.sentences[i] for i in ids) for ids in per_anatomy)
  counts = None
  if all(s in index.counts for s in splits):
    per_split = [[dict(zip(index.by_split[s][a], index.counts[s][a]))
                  for a in range(anatomy.NUM_ANATOMIES)] for s in splits]
    counts = tuple(np.array([sum(p[a].get(i, 0) for p in per_split) for i in ids], np.int64)
                   for a, ids in enumerate(per_anatomy))
  return RagDatabase(anatomy.ANATOMY_NAMES, sentences, embeddings,
                     {**(meta or {}), "splits": list(splits)}, counts)


def save(db: RagDatabase, directory: str) -> None:
  """Writes ``rag.safetensors`` + ``rag.json`` (each via a temporary file and a rename)."""
  os.makedirs(directory, exist_ok=True)
  tensors = {f"anatomy_{i:02d}": np.ascontiguousarray(e, np.float32)
             for i, e in enumerate(db.embeddings)}
  path = os.path.join(directory, TENSORS_FILE)
  safetensors.numpy.save_file(tensors, path + ".tmp")
  os.replace(path + ".tmp", path)
  path = os.path.join(directory, INDEX_FILE)
  obj = {"version": VERSION, "anatomies": list(db.anatomies),
         "sentences": [list(s) for s in db.sentences], "meta": db.meta}
  if db.counts is not None:
    obj["counts"] = [[int(n) for n in c] for c in db.counts]
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f)
  os.replace(path + ".tmp", path)


def load(directory: str, anatomies: Sequence[str] = anatomy.ANATOMY_NAMES) -> RagDatabase:
  """Reads a database and checks it against the model's anatomy list.

  Raises:
    DatabaseError: missing files, an unknown version, another anatomy list or order, or sentence,
      embedding and count rows that disagree — each naming the file.
  """
  index_path = os.path.join(directory, INDEX_FILE)
  tensors_path = os.path.join(directory, TENSORS_FILE)
  for path in (index_path, tensors_path):
    if not os.path.exists(path):
      raise DatabaseError(f"{path} does not exist: build the database with --mode=build_rag")
  with open(index_path) as f:
    obj = json.load(f)
  if obj.get("version") not in READABLE_VERSIONS:
    raise DatabaseError(f"{index_path}: version {obj.get('version')}, expected one of "
                        f"{READABLE_VERSIONS}")
  if tuple(obj["anatomies"]) != tuple(anatomies):
    diff = next(((i, a, b) for i, (a, b) in enumerate(zip(obj["anatomies"], anatomies)) if a != b),
                (min(len(obj["anatomies"]), len(anatomies)), "(end)", "(end)"))
    raise DatabaseError(
        f"{index_path}: built for another anatomy list than the model's ({len(obj['anatomies'])} "
        f"vs {len(anatomies)} anatomies; first difference at {diff[0]}: {diff[1]!r} vs "
        f"{diff[2]!r})")
  tensors = safetensors.numpy.load_file(tensors_path)
  embeddings = []
  for i, sentences in enumerate(obj["sentences"]):
    key = f"anatomy_{i:02d}"
    if key not in tensors or tensors[key].shape[0] != len(sentences):
      got = tensors[key].shape if key in tensors else "missing"
      raise DatabaseError(f"{tensors_path}: tensor {key} is {got}, expected {len(sentences)} rows")
    embeddings.append(tensors[key].astype(np.float32))
  counts = None
  if obj.get("counts") is not None:
    if len(obj["counts"]) != len(obj["sentences"]) or any(
        len(c) != len(s) or any(not isinstance(n, int) or n < 0 for n in c)
        for c, s in zip(obj["counts"], obj["sentences"])):
      raise DatabaseError(f"{index_path}: field counts does not give one count ≥ 0 per sentence")
    counts = tuple(np.asarray(c, np.int64).reshape(-1) for c in obj["counts"])
  return RagDatabase(tuple(obj["anatomies"]), tuple(tuple(s) for s in obj["sentences"]),
                     tuple(embeddings), obj.get("meta", {}), counts)
