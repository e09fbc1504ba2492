"""RAG retrieval latency, and what the sentence-embedding cache saves per stage-1 step.

Prints one JSON object per measurement:

* ``retrieval``: jitted top-k for 48 images × 36 anatomies (16-d), next to a NumPy brute force of
  the same search, for two databases: ``uniform`` (every anatomy a table of ``--table_size``
  sentences, the worst case) and ``skewed`` (REFERENCE.md §3's shape: the two lungs
  ``--table_size`` each, 8 anatomies 6,000, 16 anatomies 1,000, 10 anatomies a single sentence).
* ``text_encoder``: frozen-encoder throughput (sentences/s, mean-pooled, 32-token sentences) for the
  MiniLM-L6 shape and the BERT-base (PubMedBERT) shape, random weights.
* ``stage1_step_text``: the demo model's train step with the contrastive term, fed from the cache
  (a table lookup), against the same step plus re-encoding the batch's B·36 sentences, as the
  reference does every step (its encoder is frozen, so re-encoding is a forward pass that adds to
  the step; measured here on the MiniLM shape, and projected for BERT-base from its throughput).

  python benchmarks/rag_and_text.py [--repeats=7] [--table_size=60000]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from anatomix_jax.models import apm, bert  # noqa: E402
from anatomix_jax.rag import retrieval  # noqa: E402
from anatomix_jax.core import sharding, state as state_lib  # noqa: E402
from anatomix_jax.stage1 import steps
from configs import stage1  # noqa: E402
import timing  # noqa: E402  (benchmarks/timing.py, beside this script)

SHAPES = {"minilm_l6": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                            intermediate_size=1536),
          "bert_base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                            intermediate_size=3072)}


def bench_retrieval(layout: str, table_size: int, repeats: int, batch: int = 48, dim: int = 16
                    ) -> dict:
  rng = np.random.default_rng(0)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
  sizes = ([table_size] * 36 if layout == "uniform" else
           [table_size] * 2 + [6000] * 8 + [1000] * 16 + [1] * 10)
  tables_np = [unit(rng.normal(size=(s, dim)).astype(np.float32)) for s in sizes]
  tables = tuple(jnp.asarray(t) for t in tables_np)
  queries = rng.normal(size=(batch, 36, dim)).astype(np.float32)
  out = {"name": f"retrieval_{layout}", "images": batch, "anatomies": 36,
         "largest_table": max(sizes), "database_size": sum(sizes), "dim": dim}
  fn = jax.jit(retrieval.top_k, static_argnames="k")
  for k in (1, 5):
    median = timing.timed(lambda: jax.block_until_ready(fn(jnp.asarray(queries), tables, k=k)),
                          repeats)["median_s"]
    out[f"jax_top{k}_ms_median"] = round(1e3 * median, 2)

  def numpy_top1():
    q = unit(queries)
    return np.stack([np.argmax(q[:, a] @ tables_np[a].T, axis=1) for a in range(36)], 1)

  median = timing.timed(numpy_top1, repeats)["median_s"]
  out["numpy_top1_ms_median"] = round(1e3 * median, 2)
  out["speedup_vs_numpy_top1"] = round(out["numpy_top1_ms_median"] / out["jax_top1_ms_median"], 2)
  ids = np.asarray(fn(jnp.asarray(queries), tables, k=1)[1])[..., 0]
  out["agrees_with_numpy"] = bool(np.array_equal(ids, numpy_top1()))
  return out


def _encoder(shape: str, tokens: int, rows: int):
  config = bert.BertConfig(vocab_size=30522, max_position_embeddings=512, **SHAPES[shape])
  model = bert.BertModel(config)
  ids = jnp.ones((rows, tokens), jnp.int32)
  params = jax.jit(lambda r: model.init(r, ids, ids))(jax.random.key(0))["params"]
  forward = jax.jit(lambda p, i, m: bert.mean_pool(model.apply({"params": p}, i, m), m))
  return lambda: jax.block_until_ready(forward(params, ids, ids))


def bench_encoder(repeats: int, tokens: int = 32, rows: int = 64) -> dict:
  out = {"name": "text_encoder", "tokens": tokens, "rows_per_call": rows}
  for shape in SHAPES:
    median = timing.timed(_encoder(shape, tokens, rows), max(3, repeats // 2))["median_s"]
    out[f"{shape}_sentences_per_s"] = round(rows / median, 1)
  return out


def bench_step(repeats: int, encoder_throughput: dict, tokens: int = 32) -> dict:
  config = stage1.get_config("demo")
  size, batch = config.data.image_size, config.train.batch_size
  text_dim = SHAPES["minilm_l6"]["hidden_size"]
  mesh = sharding.make_mesh(config.mesh)
  rules = tuple(config.sharding_rules)
  model = apm.APM(dataclasses.replace(apm.APMConfig.from_config(config.model), text_dim=text_dim))
  tx = state_lib.make_optimizer(config.optim, 1000)
  init_vars = lambda r: model.init({"params": r}, jnp.zeros((1, size, size, 1)))  # noqa: E731
  _, shardings, init = state_lib.train_state_factory(init_vars, tx, jax.random.key(0), mesh, rules)
  batch_sh = sharding.batch_sharding(mesh, rules)
  step_fn = steps.jit_train_step(steps.make_train_step(model, tx, config.loss, config.optim),
                                 shardings, batch_sh, mesh)
  rng = np.random.default_rng(0)
  table = rng.normal(size=(300, text_dim)).astype(np.float32)
  ids = rng.integers(0, 300, (batch, 36))
  host = {"image": rng.random((batch, size, size, 1), np.float32),
          "boxes": np.tile(np.array([0.5, 0.5, 0.2, 0.2], np.float32), (batch, 36, 1)),
          "box_mask": np.ones((batch, 36), np.float32), "labels": np.zeros((batch, 14), np.float32),
          "valid": np.ones((batch,), np.float32), "index": np.arange(batch, dtype=np.int32),
          "sentence_ids": ids.astype(np.int32)}
  encode = _encoder("minilm_l6", tokens, batch * 36)
  state = init(jax.random.key(0))
  with jax.set_mesh(mesh):
    def cached():
      nonlocal state
      b = sharding.host_to_global({**host, "text_pooled": table[ids]}, batch_sh)
      state, metrics = step_fn(state, b, jax.random.key(1))
      jax.block_until_ready(metrics)

    def re_encoded():
      encode()  # the reference's per-step forward of the frozen encoder over B·36 sentences
      cached()

    step_cached = timing.timed(cached, repeats)["median_s"]
    step_encoded = timing.timed(re_encoded, repeats)["median_s"]
  sentences = batch * 36
  base = encoder_throughput["bert_base_sentences_per_s"]
  return {"name": "stage1_step_text", "model": "demo", "batch": batch, "sentences_per_step": sentences,
          "step_cached_s_median": round(step_cached, 4),
          "step_reencoding_minilm_s_median": round(step_encoded, 4),
          "minilm_slowdown": round(step_encoded / step_cached, 2),
          "step_reencoding_bert_base_s_projected": round(step_cached + sentences / base, 3),
          "bert_base_slowdown_projected": round((step_cached + sentences / base) / step_cached, 1)}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--table_size", type=int, default=60000)
  args = parser.parse_args()
  for layout in ("uniform", "skewed"):
    print(json.dumps(bench_retrieval(layout, args.table_size, args.repeats)), flush=True)
  encoder = bench_encoder(args.repeats)
  print(json.dumps(encoder), flush=True)
  print(json.dumps(bench_step(args.repeats, encoder)), flush=True)
  print(json.dumps({"devices": jax.device_count(), "platform": jax.devices()[0].platform}))


if __name__ == "__main__":
  main()
