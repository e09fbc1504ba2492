"""``--mode=build_rag``: the sentence database from a trained APM, and its retrieval metrics.

1. Restore the workdir's checkpoint (``eval.checkpoint``: latest or best); it must have the text
   projection head (trained with ``loss.contrastive > 0``).
2. Embed every distinct sentence of ``rag.splits`` per anatomy: cached frozen-encoder embedding →
   the trained projection head → L2 norm; keep how often each occurs (the sentence prior).
3. The prior weight w of ``score = cos/τ + w·log p(s | anatomy)`` (``rag/retrieval.py``):
   ``rag.prior_weight`` as given, or ("auto") chosen on the training images (at most
   ``rag.prior_fit_images`` of them; never the evaluation split) with ``rag.prior_keep``
   (``retrieval.choose_prior_weight``);
   recorded with τ in the database, whose every retriever (stage 2's too) then uses it. Save
   ``rag.safetensors`` + ``rag.json``.
4. Retrieve for every image of ``rag.eval_split`` with the APM's anatomy embeddings and score
   where each anatomy's true sentence ranks: R@1/3/5 and MRR per anatomy and overall, with the
   prior and without it (``cosine/…``), next to a random ranking's and to always retrieving the
   anatomy's most frequent sentence, overall and on the pairs whose true sentence is not that one
   (``nonmajority_…``); written to ``{rag dir}/retrieval_{split}_step{N}.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from anatomix_jax import anatomy
from anatomix_jax.data import sentences as sentences_lib
from anatomix_jax.models import bert
from anatomix_jax.rag import database, retrieval
from anatomix_jax.core import sharding as sharding_lib
from anatomix_jax.stage1 import task as task_lib


def _projector(run: task_lib.Stage1Task, params: Any):
  """Sentence ids ``[S]`` → trained text projections ``[S, proj_dim]`` (NumPy)."""
  cfg = run.model.config
  head = bert.TextProjection(cfg.text_hidden, cfg.proj_dim, cfg.compute_dtype)
  apply = jax.jit(lambda p, x: head.apply({"params": p}, x))
  head_params = jax.device_get(params["text_projection"])

  def embed(ids: np.ndarray) -> np.ndarray:
    return np.asarray(apply(head_params, jnp.asarray(run.text_table[ids])), np.float32)

  return embed


def prior_weight_setting(value: Any) -> float | None:
  """``rag.prior_weight`` → a weight ≥ 0, or ``None`` for ``"auto"`` (chosen on train)."""
  if isinstance(value, str) and value.strip().lower() == "auto":
    return None
  try:
    weight = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"rag.prior_weight must be 'auto' or a number ≥ 0, got {value!r}") from None
  if not weight >= 0:
    raise ValueError(f"rag.prior_weight must be 'auto' or a number ≥ 0, got {value!r}")
  return weight


@dataclasses.dataclass
class _Split:
  """An evaluation pass: anatomy embeddings ``[Q, 36, d]``, true rows ``[Q, 36]`` (−1: not in
  the database), which rows are real images ``[Q]``."""
  embeddings: np.ndarray
  true_rows: np.ndarray
  valid: np.ndarray


def build_and_evaluate(config: Any, workdir: str) -> dict:
  """Builds the database from the workdir's checkpoint and scores retrieval; returns the metrics."""
  rag = config.rag
  fixed_weight = prior_weight_setting(rag.get("prior_weight", "auto"))  # fail before any work
  keep = float(rag.get("prior_keep", 0.5))
  if not 0 <= keep <= 1:
    raise ValueError(f"rag.prior_keep must be in [0, 1], got {keep}")
  temperature = float(config.loss.contrastive_temperature)
  run = task_lib.Stage1Task(config, workdir, text=True)
  state, step = run.restore_for_eval()
  rag_dir = rag.dir or os.path.join(workdir, "rag")
  try:
    index = sentences_lib.with_counts(run.sentence_index, run.records_dir)
    db = database.build(index, tuple(rag.splits), _projector(run, state.params),
                        meta={"step": int(step), "records_dir": run.records_dir,
                              "text_dim": run.model.config.text_dim})
    logging.info("RAG database: %d sentences over %d anatomies from %s", sum(db.sizes),
                 len(db.sizes), list(rag.splits))
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
      eval_step = run.eval_step()
      if fixed_weight is None:
        train_split = config.data.train_split
        fit = _collect(run, eval_step, state, db, train_split, int(rag.get("prior_fit_images", 0)))
        choice = retrieval.choose_prior_weight(
            fit.embeddings, fit.true_rows, db.embeddings, database.log_prior(db), temperature,
            mask=fit.valid, keep=keep)
        prior = {"weight": choice.weight, "temperature": temperature, "chosen_on": train_split,
                 "train_images": int(fit.valid.sum()), **choice.meta()}
        _log_choice(choice, train_split)
      else:
        prior = {"weight": fixed_weight, "temperature": temperature, "objective": "configured"}
      db = dataclasses.replace(db, meta={**db.meta, "prior": prior})
      if jax.process_index() == 0:
        database.save(db, rag_dir)
      logging.info("RAG database → %s (prior weight %g)", rag_dir, prior["weight"])
      evaluation = _collect(run, eval_step, state, db, rag.eval_split)
  finally:
    run.checkpointer.close()
  out = evaluate(db, evaluation)
  out.update({"step": int(step), "num_images": int(evaluation.valid.sum()),
              "database_size": int(sum(db.sizes)), "prior_objective": prior["objective"]})
  _report(out, rag_dir, rag.eval_split)
  return out


def evaluate(db: database.RagDatabase, split: _Split) -> dict:
  """Retrieval metrics of ``split`` with the database's prior weight, and (``cosine/…``) without."""
  mask = np.broadcast_to(split.valid[:, None], split.true_rows.shape)
  majority_hits = None
  if db.counts is not None:  # the most frequent sentence (ties: the first row), as the prior's
    majority_rows = np.array([int(np.argmax(c)) if len(c) else -1 for c in db.counts])
    majority_hits = (split.true_rows == majority_rows[None, :]) & (split.true_rows >= 0)
  out = {}
  for prefix, weight in (("", None), ("cosine/", 0.0)):
    retriever = retrieval.Retriever(db, prior_weight=weight)
    ranks = np.concatenate([retriever.ranks(split.embeddings[i:i + 1024],
                                            split.true_rows[i:i + 1024])
                            for i in range(0, len(split.true_rows), 1024)])
    metrics = retrieval.retrieval_metrics(ranks, db.sizes, mask, majority_hits=majority_hits)
    out.update({prefix + k: v for k, v in metrics.items()})
    if not prefix:
      out["prior_weight"], out["prior_temperature"] = retriever.prior_weight, retriever.temperature
  return out


def _collect(run: task_lib.Stage1Task, eval_step, state, db: database.RagDatabase, split: str,
             limit: int = 0) -> _Split:
  """Anatomy embeddings and true database rows of ``split``'s images (the first ``limit`` real
  images if ``limit > 0``)."""
  sentences = run.sentence_index.sentences
  rows = [{s: r for r, s in enumerate(per)} for per in db.sentences]
  embeddings, true_rows, valid = [], [], []
  seen = 0
  for local in run.eval_dataset(split):
    batch = sharding_lib.host_to_global(run.with_text(local), run.batch_sharding)
    outputs, _ = eval_step(state, batch)
    embeddings.append(np.asarray(sharding_lib.to_host(outputs["anatomy_embeddings"]), np.float32))
    ids = sharding_lib.to_host(batch["sentence_ids"])
    true_rows.append(np.array([[rows[a].get(sentences[i], -1) if i >= 0 else -1
                                for a, i in enumerate(row)] for row in ids], np.int32))
    valid.append(sharding_lib.to_host(batch["valid"]) > 0)
    seen += int(valid[-1].sum())
    if 0 < limit <= seen:
      break
  return _Split(np.concatenate(embeddings), np.concatenate(true_rows), np.concatenate(valid))


def _log_choice(choice: retrieval.PriorChoice, split: str) -> None:
  rows = [f"  w={w:<5g} R@1 {r:.3f}  non-majority pairs R@1 {n:.3f}  balanced {b:.3f}"
          for w, r, n, b in zip(choice.grid, choice.table["r@1"], choice.table["nonmajority_r@1"],
                                choice.table["balanced_r@1"])]
  logging.info("sentence-prior weight on %s (%d pairs; always the majority sentence: R@1 %.3f):\n"
               "%s\nchosen by %s: w = %g", split, choice.num_pairs, choice.majority_r1,
               "\n".join(rows), choice.objective, choice.weight)
  if max(choice.table["r@1"]) <= choice.majority_r1:
    logging.warning("on %s no prior weight makes retrieval beat always retrieving the anatomy's "
                    "most frequent sentence: the APM's anatomy embeddings carry too little "
                    "about the findings", split)


def _report(out: dict, rag_dir: str, split: str) -> None:
  if jax.process_index() != 0:
    return
  nan = float("nan")
  rows = [f"  {name[:44]:<44} R@1 {out[f'r@1/{a}']:.3f} (cosine {out[f'cosine/r@1/{a}']:.3f}, "
          f"random {out[f'random_r@1/{a}']:.3f}, majority {out.get(f'majority_r@1/{a}', nan):.3f})"
          + (f" | non-majority R@1 {out[f'nonmajority_r@1/{a}']:.3f} (cosine "
             f"{out[f'cosine/nonmajority_r@1/{a}']:.3f}, random "
             f"{out[f'nonmajority_random_r@1/{a}']:.3f})" if f"nonmajority_r@1/{a}" in out else "")
          for a, name in enumerate(anatomy.ANATOMY_NAMES) if f"r@1/{a}" in out]
  logging.info("retrieval on %s, per anatomy:\n%s", split, "\n".join(rows))
  logging.info("retrieval on %s (step %d, %d images, %d sentences; score cos/τ + w·log p, w=%g, "
               "τ=%g, %s): R@1 %.3f R@3 %.3f R@5 %.3f MRR %.3f | pure cosine (w=0): R@1 %.3f R@3 "
               "%.3f R@5 %.3f MRR %.3f | random ranking: R@1 %.3f R@3 %.3f R@5 %.3f MRR %.3f | "
               "always the anatomy's most frequent sentence: R@1 %.3f | true sentence in the "
               "database: %.3f",
               split, out["step"], out["num_images"], out["database_size"], out["prior_weight"],
               out["prior_temperature"], out["prior_objective"], out["r@1"], out["r@3"],
               out["r@5"], out["mrr"], out["cosine/r@1"], out["cosine/r@3"], out["cosine/r@5"],
               out["cosine/mrr"], out["random_r@1"], out["random_r@3"], out["random_r@5"],
               out["random_mrr"], out.get("majority_r@1", nan), out["coverage"])
  if "nonmajority_r@1" in out:
    logging.info("retrieval on %s, non-majority pairs (%.1f%% of pairs: the true sentence is not "
                 "the anatomy's most frequent): R@1 %.3f (pure cosine %.3f) | random ranking %.3f "
                 "| most frequent sentence 0 | balanced R@1 %.3f (pure cosine %.3f)", split,
                 100 * out["nonmajority_fraction"], out["nonmajority_r@1"],
                 out["cosine/nonmajority_r@1"], out["nonmajority_random_r@1"],
                 out["balanced_r@1"], out["cosine/balanced_r@1"])
  path = os.path.join(rag_dir, f"retrieval_{split}_step{out['step']}.json")
  with open(path, "w") as f:
    json.dump(out, f, indent=2)
