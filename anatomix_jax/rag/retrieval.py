"""Retrieval from the RAG database: top-k sentences per anatomy, and its quality metrics.

Score: the image evidence, cosine(anatomy embedding a, sentence embedding t_s) as in the reference,
plus optionally the sentence prior of the anatomy's sentences in the database's records::

  score(s) / τ = cos(a, t_s) / τ + w · log p(s | anatomy)

τ the contrastive temperature the APM was trained with (its logits are cos/τ), w the prior weight.
w = 0 is the reference's pure cosine retrieval; w → ∞ always retrieves the anatomy's most frequent
sentence, ignoring the image. Under an InfoNCE-style objective cos/τ estimates log p(image | s) up
to a constant, so w = 1 would be the Bayes posterior; the demo's APM is far from calibrated, so
``--mode=build_rag`` chooses w on the training images (:func:`choose_prior_weight`) and records it in
the database, which every :class:`Retriever` (stage 2's included) then uses. The prior enters
:func:`top_k` / :func:`ranks` as per-sentence biases ``τ·w·log p(s)`` added to the cosines (scores
stay in cosine units).

Each anatomy searches only its own table, so the work is
``B · Σ_i S_i · d`` multiply-adds, not ``B · 36 · max_i S_i · d``: the 36 tables are separate
arguments of one jitted function (static shapes per database), which also lets each table be
sharded over its rows on a mesh.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from anatomix_jax.ops.vectors import l2_normalize
from anatomix_jax.rag import database as database_lib
from anatomix_jax.rag.database import RagDatabase

Array = jax.Array

# The prior weights --mode=build_rag tries (rag.prior_weight="auto"); beyond ~3 the demo's
# retrieval is the majority sentence everywhere.
PRIOR_GRID = tuple(round(0.05 * i, 2) for i in range(41)) + (3.0, 5.0, 10.0)


def _scores(q: Array, table: Array, bias: Array | None) -> Array:
  """Unit queries ``[B, d]`` × table ``[S, d]`` → ``[B, S]`` cosines (+ per-sentence bias)."""
  s = q @ table.astype(jnp.float32).T
  return s if bias is None else s + bias.astype(jnp.float32)[None, :]


def top_k(queries: Array, tables: Sequence[Array], k: int,
          biases: Sequence[Array] | None = None) -> tuple[Array, Array]:
  """Top-``k`` sentences per anatomy.

  Args:
    queries: anatomy embeddings ``[B, A, d]`` (any norm).
    tables: ``A`` unit-norm tables ``[S_i, d]``.
    k: results per anatomy.
    biases: optional ``A`` vectors ``[S_i]`` added to the cosines (the sentence prior
      ``τ·w·log p(s)``, :attr:`Retriever.biases`); ``None``: pure cosine.

  Returns:
    ``(scores [B, A, k], ids [B, A, k])``: scores (cosine + bias), best first, and row ids into
    each anatomy's table; an anatomy with fewer than ``k`` sentences is padded with score −inf and
    id −1.
  """
  q = l2_normalize(queries.astype(jnp.float32))
  scores, ids = [], []
  for a, table in enumerate(tables):
    s = _scores(q[:, a], table, None if biases is None else biases[a])  # [B, S_a]
    if s.shape[1] < k:
      s = jnp.pad(s, ((0, 0), (0, k - s.shape[1])), constant_values=-jnp.inf)
    top_scores, top_ids = jax.lax.top_k(s, k)
    scores.append(top_scores)
    ids.append(jnp.where(top_ids < table.shape[0], top_ids, -1))
  return jnp.stack(scores, 1), jnp.stack(ids, 1)


def ranks(queries: Array, tables: Sequence[Array], true_rows: Array,
          biases: Sequence[Array] | None = None) -> Array:
  """1-based rank of each anatomy's true sentence among its table (ties count in its favour).

  Args:
    queries: ``[B, A, d]``.
    tables: ``A`` unit-norm tables ``[S_i, d]``.
    true_rows: int ``[B, A]``: the true sentence's row in anatomy ``i``'s table, −1 if absent.
    biases: as in :func:`top_k`.

  Returns:
    int32 ``[B, A]``: the rank, or 0 where the true sentence is not in the table.
  """
  q = l2_normalize(queries.astype(jnp.float32))
  out = []
  for a, table in enumerate(tables):
    s = _scores(q[:, a], table, None if biases is None else biases[a])  # [B, S_a]
    row = true_rows[:, a]
    true_score = jnp.take_along_axis(s, jnp.maximum(row, 0)[:, None], axis=1)
    rank = 1 + jnp.sum(s > true_score, axis=1)
    out.append(jnp.where(row >= 0, rank, 0))
  return jnp.stack(out, 1).astype(jnp.int32)


def prior_biases(log_priors: Sequence[np.ndarray], weight: float, temperature: float
                 ) -> tuple[np.ndarray, ...]:
  """``τ·w·log p(s)`` per anatomy (float32 ``[S_i]``): the prior in the cosine units of
  :func:`top_k`'s scores; exact zeros for ``w = 0``."""
  if weight < 0 or temperature <= 0:
    raise ValueError(f"prior weight must be ≥ 0 and temperature > 0, got {weight}, {temperature}")
  return tuple((np.float32(temperature * weight) * np.asarray(lp, np.float32)) if weight else
               np.zeros(np.shape(lp), np.float32) for lp in log_priors)


def _prior_setting(db: RagDatabase, prior_weight: float | None, temperature: float | None
                   ) -> tuple[float, float]:
  """The (weight, τ) a retriever uses: the arguments, else the database's ``meta["prior"]``, else
  ``(0, 1)`` (pure cosine: a database built before priors were kept)."""
  stored = db.meta.get("prior") or {}
  weight = float(stored.get("weight", 0.0) if prior_weight is None else prior_weight)
  temperature = temperature if temperature is not None else stored.get("temperature")
  if weight and temperature is None:
    raise database_lib.DatabaseError(
        "a prior weight needs the contrastive temperature τ: pass it, or rebuild the database "
        "with --mode=build_rag (which records it)")
  return weight, float(temperature if temperature is not None else 1.0)


class Retriever:
  """The database on device plus jitted :func:`top_k` / :func:`ranks` over it.

  Args:
    db: the database.
    k: results per anatomy.
    sharding: optional placement of the tables.
    prior_weight: w of the sentence prior; ``None``: the database's (``meta["prior"]["weight"]``,
      chosen by ``--mode=build_rag``; 0 for a database without one).
    temperature: τ; ``None``: the database's.

  Raises:
    DatabaseError: a non-zero prior weight with a database that has no counts (or no τ).
  """

  def __init__(self, db: RagDatabase, k: int = 1, sharding: jax.sharding.Sharding | None = None,
               prior_weight: float | None = None, temperature: float | None = None):
    self.db, self.k = db, k
    self.prior_weight, self.temperature = _prior_setting(db, prior_weight, temperature)
    log_priors = (database_lib.log_prior(db) if self.prior_weight else
                  [np.zeros((n,), np.float32) for n in db.sizes])
    put = ((lambda t: jax.device_put(t, sharding)) if sharding is not None else jnp.asarray)
    self.tables = tuple(put(np.asarray(e, np.float32)) for e in db.embeddings)
    # Per-sentence score offsets (the prior; zeros without one), one [S_i] vector per anatomy:
    # pass them with the tables to top_k / ranks (stage 2's jitted forward does).
    self.biases = tuple(jnp.asarray(b) for b in prior_biases(log_priors, self.prior_weight,
                                                             self.temperature))
    self._top_k = jax.jit(top_k, static_argnames="k")
    self._ranks = jax.jit(ranks)
    self._rows = [{s: r for r, s in enumerate(sentences)} for sentences in db.sentences]

  def __call__(self, queries: Array) -> tuple[Array, Array]:
    """``[B, A, d]`` → ``(scores, ids)`` ``[B, A, k]`` (see :func:`top_k`)."""
    return self._top_k(queries, self.tables, k=self.k, biases=self.biases)

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
    return np.asarray(self._ranks(queries, self.tables, jnp.asarray(true_rows), self.biases))


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
      retriever that ignores the image, and the metrics of the "non-majority pairs" (those whose
      true sentence is not the anatomy's most frequent one; the majority retriever's R@1 there is
      0 by definition): ``nonmajority_r@1`` and ``nonmajority_random_r@1`` (overall and per
      anatomy), ``nonmajority_fraction`` (their share of the counted pairs), ``majority_pairs_r@1``
      (R@1 on the other pairs) and ``balanced_r@1`` (the mean of the two R@1s).

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
  if majority_hits is not None:
    rest = mask & ~np.asarray(majority_hits, bool)
    majority_pairs = mask & np.asarray(majority_hits, bool)
    r1_rest = float(per_query["r@1"][rest].sum() / max(int(rest.sum()), 1))
    r1_majority = float(per_query["r@1"][majority_pairs].sum() / max(int(majority_pairs.sum()), 1))
    out.update({"nonmajority_r@1": r1_rest,
                "nonmajority_random_r@1": float(per_query["random_r@1"][rest].sum()
                                                / max(int(rest.sum()), 1)),
                "nonmajority_fraction": float(rest.sum() / count),
                "majority_pairs_r@1": r1_majority,
                "balanced_r@1": (r1_rest + r1_majority) / 2})
    for a in range(ranks.shape[1]):
      if rest[:, a].any():
        for name in ("r@1", "random_r@1"):
          out[f"nonmajority_{name}/{a}"] = float(per_query[name][:, a][rest[:, a]].mean())
  return out



@dataclasses.dataclass(frozen=True)
class PriorChoice:
  """:func:`choose_prior_weight`'s result: the ``weight``, the ``keep`` it was chosen with, and per
  grid weight the split's ``r@1``, ``nonmajority_r@1``, ``majority_pairs_r@1`` and
  ``balanced_r@1`` (``table``, lists aligned with ``grid``); the majority sentence's R@1."""
  weight: float
  keep: float
  grid: tuple[float, ...]
  table: dict[str, list[float]]
  majority_r1: float
  num_pairs: int

  @property
  def objective(self) -> str:
    return f"balanced R@1, keeping {self.keep:g} of the R@1 gain over the majority sentence"

  def meta(self) -> dict[str, Any]:
    return {"objective": self.objective, "keep": self.keep, "grid": list(self.grid),
            "train_majority_r@1": self.majority_r1, "train_pairs": self.num_pairs,
            **{f"train_{k}": v for k, v in self.table.items()}}


def choose_prior_weight(queries: np.ndarray, true_rows: np.ndarray, tables: Sequence[np.ndarray],
                        log_priors: Sequence[np.ndarray], temperature: float,
                        mask: np.ndarray | None = None, grid: Sequence[float] = PRIOR_GRID,
                        keep: float = 0.5, chunk: int = 4096) -> PriorChoice:
  """Chooses the prior weight w on (training) images whose true sentences are known.

  For each w of ``grid``, every (image, anatomy) pair retrieves its top-1 sentence by
  ``cos/τ + w·log p``; ``hit``: it is the true one. The pairs split into those whose true sentence
  is the anatomy's most frequent one (largest count; ties: the first row) and the others, the
  "non-majority pairs". R@1 over all pairs alone is a poor criterion when the image evidence is
  weak: it is maximised by retrieving the majority sentence nearly everywhere (on the demo the
  R@1-best w leaves the non-majority pairs at chance). So:

  1. eligible weights keep at least ``keep`` of the best R@1 gain over always retrieving the
     majority sentence, ``R@1(w) ≥ R@1_maj + keep·(max_w R@1(w) − R@1_maj)``, and beat it
     (``R@1(w) > R@1_maj``);
  2. among them, the one with the best balanced R@1, the mean of R@1 on the majority pairs and on
     the non-majority pairs ("is the anatomy unremarkable?" and "which finding?" count equally).

  ``keep = 1``: the R@1-best weight; ``keep = 0``: the balanced-best that still beats the majority
  sentence. If no weight beats it, the R@1-best one. Ties go to the smaller weight (more image).
  Never call this with evaluation images.

  Args:
    queries: ``[N, A, d]`` anatomy embeddings (any norm).
    true_rows: int ``[N, A]``: each pair's true row (−1: not in the table, always a miss).
    tables: ``A`` unit-norm ``[S_i, d]``.
    log_priors: ``A`` ``[S_i]`` (``database.log_prior``).
    temperature: τ.
    mask: ``[N, A]`` or ``[N]`` which pairs count (default all).
    grid: candidate weights ≥ 0 (sorted and de-duplicated here).
    keep: in [0, 1], see above.
    chunk: queries scored at once (host memory).

  Returns:
    The :class:`PriorChoice`.
  """
  if not 0 <= keep <= 1:
    raise ValueError(f"keep must be in [0, 1], got {keep}")
  grid = tuple(sorted({float(w) for w in grid}))
  if not grid or min(grid) < 0:
    raise ValueError(f"the prior grid must be non-empty and ≥ 0, got {grid}")
  queries = np.asarray(queries, np.float32)
  queries = queries / np.maximum(np.linalg.norm(queries, axis=-1, keepdims=True), 1e-12)
  true_rows = np.asarray(true_rows)
  n, num_anatomies = true_rows.shape
  mask = np.ones((n, num_anatomies), bool) if mask is None else np.broadcast_to(
      np.asarray(mask, bool).reshape(n, -1), (n, num_anatomies))
  hits = np.zeros((len(grid), n, num_anatomies), bool)
  is_majority = np.zeros((n, num_anatomies), bool)
  weights = np.asarray(grid, np.float32)
  for a, (table, lp) in enumerate(zip(tables, log_priors)):
    table = np.asarray(table, np.float32)
    if not len(table):
      continue
    lp = np.asarray(lp, np.float32)
    is_majority[:, a] = true_rows[:, a] == int(np.argmax(lp))
    for lo in range(0, n, chunk):
      logits = queries[lo:lo + chunk, a] @ table.T / np.float32(temperature)  # [n, S]
      for g, w in enumerate(weights):
        best = np.argmax(logits + w * lp[None, :], axis=-1)  # [n]
        hits[g, lo:lo + chunk, a] = best == true_rows[lo:lo + chunk, a]
  count = max(int(mask.sum()), 1)
  maj, rest = mask & is_majority, mask & ~is_majority
  r1 = (hits & mask).sum((1, 2)) / count
  r1_maj = (hits & maj).sum((1, 2)) / max(int(maj.sum()), 1)
  r1_rest = (hits & rest).sum((1, 2)) / max(int(rest.sum()), 1)
  balanced = (r1_maj + r1_rest) / 2
  majority_r1 = float(maj.sum() / count)
  best_r1 = float(r1.max())
  if best_r1 > majority_r1:
    threshold = majority_r1 + keep * (best_r1 - majority_r1)
    eligible = (r1 > majority_r1) & (r1 >= threshold - 1e-12)
  else:  # the image never beats the majority sentence here
    eligible = r1 >= best_r1 - 1e-12
  pick = int(np.argmax(np.where(eligible, balanced, -np.inf)))  # first: the smallest weight
  table = {"r@1": r1.tolist(), "nonmajority_r@1": r1_rest.tolist(),
           "majority_pairs_r@1": r1_maj.tolist(), "balanced_r@1": balanced.tolist()}
  return PriorChoice(grid[pick], float(keep), grid, table, majority_r1, int(mask.sum()))
