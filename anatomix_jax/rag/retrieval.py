"""Retrieval from the RAG database: top-k sentences per anatomy, and its quality metrics.

Score = cosine(anatomy embedding, sentence embedding), as in the reference (its ×0.01 temperature
does not change the ranking). Each anatomy searches only its own table, so the work is
``B · Σ_i S_i · d`` multiply-adds, not ``B · 36 · max_i S_i · d``: the 36 tables are separate
arguments of one jitted function (static shapes per database), which also lets each table be
sharded over its rows on a mesh.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from anatomix_jax.stage1.contrastive import l2_normalize
from anatomix_jax.rag.database import RagDatabase

Array = jax.Array


def top_k(queries: Array, tables: Sequence[Array], k: int) -> tuple[Array, Array]:
  """Top-``k`` sentences per anatomy.

  Args:
    queries: anatomy embeddings ``[B, A, d]`` (any norm).
    tables: ``A`` unit-norm tables ``[S_i, d]``.
    k: results per anatomy.

  Returns:
    ``(scores [B, A, k], ids [B, A, k])``: cosines, best first, and row ids into each anatomy's
    table; an anatomy with fewer than ``k`` sentences is padded with score −inf and id −1.
  """
  q = l2_normalize(queries.astype(jnp.float32))
  scores, ids = [], []
  for a, table in enumerate(tables):
    s = q[:, a] @ table.astype(jnp.float32).T  # [B, S_a]
    if s.shape[1] < k:
      s = jnp.pad(s, ((0, 0), (0, k - s.shape[1])), constant_values=-jnp.inf)
    top_scores, top_ids = jax.lax.top_k(s, k)
    scores.append(top_scores)
    ids.append(jnp.where(top_ids < table.shape[0], top_ids, -1))
  return jnp.stack(scores, 1), jnp.stack(ids, 1)


def ranks(queries: Array, tables: Sequence[Array], true_rows: Array) -> Array:
  """1-based rank of each anatomy's true sentence among its table (ties count in its favour).

  Args:
    queries: ``[B, A, d]``.
    tables: ``A`` unit-norm tables ``[S_i, d]``.
    true_rows: int ``[B, A]``: the true sentence's row in anatomy ``i``'s table, −1 if absent.

  Returns:
    int32 ``[B, A]``: the rank, or 0 where the true sentence is not in the table.
  """
  q = l2_normalize(queries.astype(jnp.float32))
  out = []
  for a, table in enumerate(tables):
    s = q[:, a] @ table.astype(jnp.float32).T  # [B, S_a]
    row = true_rows[:, a]
    true_score = jnp.take_along_axis(s, jnp.maximum(row, 0)[:, None], axis=1)
    rank = 1 + jnp.sum(s > true_score, axis=1)
    out.append(jnp.where(row >= 0, rank, 0))
  return jnp.stack(out, 1).astype(jnp.int32)


class Retriever:
  """The database on device plus jitted :func:`top_k` / :func:`ranks` over it."""

  def __init__(self, db: RagDatabase, k: int = 1, sharding: jax.sharding.Sharding | None = None):
    self.db, self.k = db, k
    tables = [np.asarray(e, np.float32) for e in db.embeddings]
    self.tables = tuple(jax.device_put(t, sharding) if sharding is not None else jnp.asarray(t)
                        for t in tables)
    self._top_k = jax.jit(top_k, static_argnames="k")
    self._ranks = jax.jit(ranks)
    self._rows = [{s: r for r, s in enumerate(sentences)} for sentences in db.sentences]

  def __call__(self, queries: Array) -> tuple[Array, Array]:
    """``[B, A, d]`` → ``(scores, ids)`` ``[B, A, k]`` (see :func:`top_k`)."""
    return self._top_k(queries, self.tables, k=self.k)

  def sentences(self, ids: np.ndarray) -> list[list[list[str]]]:
    """``ids [B, A, k]`` → the sentences (``""`` for padding)."""
    ids = np.asarray(ids)
    return [[[self.db.sentences[a][i] if i >= 0 else "" for i in ids[b, a]]
             for a in range(ids.shape[1])] for b in range(ids.shape[0])]

  def true_rows(self, sentences: Sequence[Sequence[str]]) -> np.ndarray:
    """Per image, per anatomy true sentence → its row in that anatomy's table (−1: absent)."""
    return np.array([[self._rows[a].get(s, -1) for a, s in enumerate(per_image)]
                     for per_image in sentences], np.int32)

  def ranks(self, queries: Array, true_rows: np.ndarray) -> np.ndarray:
    return np.asarray(self._ranks(queries, self.tables, jnp.asarray(true_rows)))


def retrieval_metrics(ranks: np.ndarray, sizes: Sequence[int], mask: np.ndarray | None = None,
                      ks: Sequence[int] = (1, 3, 5), majority_hits: np.ndarray | None = None
                      ) -> dict[str, float]:
  """Recall@k and MRR of ranked retrieval, and the same for a uniformly random ranking.

  Args:
    ranks: int ``[Q, A]`` from :func:`ranks` (0: the true sentence is not in the table, a miss).
    sizes: ``A`` table sizes.
    mask: ``[Q, A]`` which queries count (default all).
    ks: the recall cut-offs (must include 1).
    majority_hits: optional bool ``[Q, A]``: whether each anatomy's most frequent database
      sentence is the true one, giving ``majority_r@1`` (overall and per anatomy), the R@1 of a
      retriever that ignores the image.

  Returns:
    ``r@k``, ``mrr``, ``random_r@k``, ``random_mrr`` overall and per anatomy
    (``r@1/{anatomy index}``), ``coverage`` (the fraction of true sentences present in the tables).
    A random ranking puts the true sentence at each of the ``S`` ranks with probability ``1/S``:
    R@k = min(k, S)/S and MRR = H(S)/S (H the harmonic number); misses score 0 in both.
  """
  ranks = np.asarray(ranks)
  mask = np.ones(ranks.shape, bool) if mask is None else np.asarray(mask, bool)
  sizes = np.asarray(sizes, np.float64)
  found = (ranks > 0) & mask
  harmonic = np.array([np.sum(1.0 / np.arange(1, int(s) + 1)) for s in sizes])
  per_query = {f"r@{k}": (found & (ranks <= k)).astype(np.float64) for k in ks}
  per_query["mrr"] = np.where(found, 1.0 / np.maximum(ranks, 1), 0.0)
  for k in ks:
    per_query[f"random_r@{k}"] = np.where(found, np.minimum(k, sizes) / np.maximum(sizes, 1), 0.0)
  per_query["random_mrr"] = np.where(found, harmonic / np.maximum(sizes, 1), 0.0)
  if majority_hits is not None:
    per_query["majority_r@1"] = np.asarray(majority_hits, np.float64)
  out = {}
  count = max(int(mask.sum()), 1)
  for name, values in per_query.items():
    out[name] = float(values[mask].sum() / count)
  per_anatomy = np.maximum(mask.sum(0), 1)
  for a in range(ranks.shape[1]):
    if mask[:, a].any():
      out[f"r@1/{a}"] = float(per_query["r@1"][:, a][mask[:, a]].sum() / per_anatomy[a])
      for name in ("random_r@1", "majority_r@1"):
        if name in per_query:
          out[f"{name}/{a}"] = float(per_query[name][:, a][mask[:, a]].sum() / per_anatomy[a])
  out["coverage"] = float(found.sum() / count)
  return out

