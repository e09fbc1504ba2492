"""``--mode=build_rag``: the sentence database from a trained APM, and its retrieval metrics.

1. Restore the workdir's checkpoint (``eval.checkpoint``: latest or best); it must have the text
   projection head (trained with ``loss.contrastive > 0``).
2. Embed every distinct sentence of ``rag.splits`` per anatomy: cached frozen-encoder embedding →
   the trained projection head → L2 norm; save ``rag.safetensors`` + ``rag.json``.
3. Retrieve for every image of ``rag.eval_split`` with the APM's anatomy embeddings and score
   where each anatomy's true sentence ranks: R@1/3/5 and MRR per anatomy and overall, next to a
   random ranking's, written to ``{rag dir}/retrieval_{split}_step{N}.json``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from anatomix_jax import anatomy
from anatomix_jax.models import bert
from anatomix_jax.rag import database, retrieval
from anatomix_jax.stage1 import task as loop, steps as steps_lib
from anatomix_jax.core import sharding as sharding_lib


def _projector(run: loop.Stage1, params: Any):
  """Sentence ids ``[S]`` → trained text projections ``[S, proj_dim]`` (NumPy)."""
  cfg = run.model.config
  head = bert.TextProjection(cfg.text_hidden, cfg.proj_dim, cfg.compute_dtype)
  apply = jax.jit(lambda p, x: head.apply({"params": p}, x))
  head_params = jax.device_get(params["text_projection"])

  def embed(ids: np.ndarray) -> np.ndarray:
    return np.asarray(apply(head_params, jnp.asarray(run.text_table[ids])), np.float32)

  return embed


def build_and_evaluate(config: Any, workdir: str) -> dict:
  """Builds the database from the workdir's checkpoint and scores retrieval; returns the metrics."""
  run = loop.Stage1(config, workdir, text=True)
  state, step = run.restore_for_eval()
  rag_dir = config.rag.dir or os.path.join(workdir, "rag")
  try:
    db = database.build(run.sentence_index, tuple(config.rag.splits),
                        _projector(run, state.params),
                        meta={"step": int(step), "records_dir": run.records_dir,
                              "text_dim": run.model.config.text_dim})
    if jax.process_index() == 0:
      database.save(db, rag_dir)
    logging.info("RAG database: %d sentences over %d anatomies from %s → %s", sum(db.sizes),
                 len(db.sizes), list(config.rag.splits), rag_dir)
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
      eval_step = steps_lib.jit_eval_step(steps_lib.make_eval_step(run.model, config.loss),
                                          run.state_shardings, run.batch_sharding)
      ranks, mask, true_ids = _rank_true_sentences(run, eval_step, state,
                                                   retrieval.Retriever(db), config.rag.eval_split)
  finally:
    run.checkpointer.close()
  majority = run.sentence_index.majority.get(config.rag.splits[0])
  majority_hits = None if majority is None else true_ids == np.asarray(majority)[None, :]
  out = retrieval.retrieval_metrics(ranks, db.sizes, mask, majority_hits=majority_hits)
  out.update({"step": int(step), "num_images": int(mask[:, 0].sum()),
              "database_size": int(sum(db.sizes))})
  _report(out, rag_dir, config.rag.eval_split)
  return out


def _rank_true_sentences(run: loop.Stage1, eval_step, state, retriever: retrieval.Retriever,
                         split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Ranks ``[Q, 36]`` of each image's true sentences, which rows are real images, and the true
  sentence ids ``[Q, 36]``."""
  sentences = run.sentence_index.sentences
  all_ranks, all_valid, all_ids = [], [], []
  for local in run.eval_dataset(split):
    batch = sharding_lib.host_to_global(run.with_text(local), run.batch_sharding)
    outputs, _ = eval_step(state, batch)
    embeddings = loop.to_host(outputs["anatomy_embeddings"])
    ids = loop.to_host(batch["sentence_ids"])
    true_rows = retriever.true_rows([[sentences[i] if i >= 0 else "" for i in row] for row in ids])
    all_ranks.append(retriever.ranks(embeddings, true_rows))
    all_valid.append(loop.to_host(batch["valid"]) > 0)
    all_ids.append(ids)
  valid = np.concatenate(all_valid)
  mask = np.broadcast_to(valid[:, None], (len(valid), anatomy.NUM_ANATOMIES))
  return np.concatenate(all_ranks), mask, np.concatenate(all_ids)


def _report(out: dict, rag_dir: str, split: str) -> None:
  if jax.process_index() != 0:
    return
  rows = [f"  {name[:44]:<44} R@1 {out[f'r@1/{a}']:.3f}  (random {out[f'random_r@1/{a}']:.3f}, "
          f"majority {out.get(f'majority_r@1/{a}', float('nan')):.3f})"
          for a, name in enumerate(anatomy.ANATOMY_NAMES) if f"r@1/{a}" in out]
  logging.info("retrieval on %s, per anatomy:\n%s", split, "\n".join(rows))
  logging.info("retrieval on %s (step %d, %d images, %d sentences): R@1 %.3f R@3 %.3f R@5 %.3f "
               "MRR %.3f | random ranking: R@1 %.3f R@3 %.3f R@5 %.3f MRR %.3f | always the "
               "anatomy's most frequent sentence: R@1 %.3f | true sentence in the database: %.3f",
               split, out["step"], out["num_images"], out["database_size"], out["r@1"],
               out["r@3"], out["r@5"], out["mrr"], out["random_r@1"], out["random_r@3"],
               out["random_r@5"], out["random_mrr"], out.get("majority_r@1", float("nan")),
               out["coverage"])
  path = os.path.join(rag_dir, f"retrieval_{split}_step{out['step']}.json")
  with open(path, "w") as f:
    json.dump(out, f, indent=2)
