"""The stage-2 demo's base LM: a tiny Gemma3 and a tokenizer trained on the synthetic corpus.

The paper starts from MedGemma-4B; a CPU demo cannot. The align demo instead makes a small
Gemma3 (``lm.demo`` sizes) with a tokenizer trained on the demo's own text (instruction and answer
variants, the RAG sentences, the prompt template), and writes both as a Hugging Face directory —
the same format MedGemma arrives in — so everything downstream (loading, LoRA, export) runs the
real code path. Standing in for MedGemma's pretraining, the tiny LM is first trained as a plain
language model (all weights, ``lm.demo.pretrain_steps``) on the demo's conversations without
images or context, so that the align and finetune steps start from a model that knows the
language of the answers, as the paper's do.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from anatomix_jax.convert import hf_gemma3
from anatomix_jax.instruct import schema
from anatomix_jax.models import anatomix, gemma3
from anatomix_jax.stage2 import data, prompt, tokenizer


PRETRAIN_LEN = 128
PRETRAIN_BATCH = 16


def conversations(config: Any) -> list[str]:
  """Chat-formatted (instruction, answer) pairs of the train records, without images/context."""
  out = []
  for source in schema.SOURCES:
    path = data.jsonl_path(config.data.dir, source, config.data.train_split)
    if not os.path.isfile(path):
      continue
    for record in schema.read_jsonl(path):
      response = prompt.fill_placeholders(record["responses"][0], record.get("boxes"),
                                          record["id"])
      out.append(prompt.render_chat(None, record["instructions"][0], response))
  return out


def pretrain(params: Any, lm: gemma3.Gemma3Config, tok: Any, texts: list[str], steps: int,
             lr: float, seed: int) -> Any:
  """Trains all weights as a causal LM on ``texts`` packed into rows of PRETRAIN_LEN tokens."""
  ids = []
  for text in texts:
    ids.extend(tok.tokenizer(text, add_special_tokens=False)["input_ids"] + [tok.eos_id])
  rows = np.asarray(ids[:len(ids) // PRETRAIN_LEN * PRETRAIN_LEN], np.int32).reshape(
      -1, PRETRAIN_LEN)
  if len(rows) < PRETRAIN_BATCH:
    raise ValueError(f"{len(rows)} rows of {PRETRAIN_LEN} tokens are too few to pretrain on")
  model = gemma3.Gemma3(lm)
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, steps // 10 + 1, steps), b2=0.98)
  mask = jnp.ones((PRETRAIN_BATCH, PRETRAIN_LEN), jnp.int32)
  positions = gemma3.positions_from_mask(mask)

  @jax.jit
  def step(params, opt_state, batch):
    def loss_fn(p):
      logits, _ = model.apply({"params": p}, batch, positions=positions, attention_mask=mask)
      total, count = anatomix.cross_entropy(logits[:, :-1], batch[:, 1:], mask[:, 1:])
      return total / count
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  opt_state = tx.init(params)
  for i in range(steps):
    batch = jnp.asarray(rows[rng.integers(0, len(rows), PRETRAIN_BATCH)])
    params, opt_state, loss = step(params, opt_state, batch)
    if i % 100 == 0 or i == steps - 1:
      logging.info("demo LM pretraining step %d/%d: loss %.3f", i + 1, steps, float(loss))
  return params


def corpus(config: Any, sentences: list[list[str]]) -> list[str]:
  """Every text the demo's prompts and answers are made of."""
  texts = list(config.data.system_prompts) + [prompt.default_context()]
  for source in schema.SOURCES:
    path = data.jsonl_path(config.data.dir, source, config.data.train_split)
    if os.path.isfile(path):
      for record in schema.read_jsonl(path):
        texts += record["instructions"] + record["responses"]
  texts += [s for per_anatomy in sentences for s in per_anatomy]
  # Box coordinates appear in every prompt; make sure every number 0..1024 is seen.
  texts.append(" ".join(schema.box_text((i, i, i, i)) for i in range(schema.CANVAS + 1)))
  return texts


def make_base(out_dir: str, config: Any, apm: Any) -> str:
  """Writes the demo base LM directory (tokenizer + config.json + model.safetensors) atomically.

  Args:
    out_dir: the directory to create.
    config: the stage-2 config (``lm.demo`` sizes, ``data.dir``, ``seed``).
    apm: the frozen APM (its RAG database's sentences join the corpus).

  Returns:
    ``out_dir``.
  """
  demo = config.lm.demo
  tmp = out_dir + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  tokenizer.train_demo_tokenizer(corpus(config, apm.retriever.db.sentences), tmp,
                                 demo.vocab_size)
  tok = tokenizer.load_tokenizer(tmp)
  vocab = -(-tok.vocab_size // 64) * 64  # a multiple of 64, as model vocabularies usually are
  lm = gemma3.Gemma3Config(
      vocab_size=vocab, hidden_size=demo.hidden_size, intermediate_size=demo.intermediate_size,
      num_hidden_layers=demo.num_hidden_layers, num_attention_heads=demo.num_attention_heads,
      num_key_value_heads=demo.num_key_value_heads, head_dim=demo.head_dim,
      sliding_window=demo.sliding_window, query_pre_attn_scalar=float(demo.head_dim),
      pad_token_id=tok.pad_id, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
  params = gemma3.init_params(lm, jax.random.key(config.seed))
  if demo.pretrain_steps > 0:
    params = pretrain(params, lm, tok, conversations(config), demo.pretrain_steps,
                      demo.pretrain_lr, config.seed)
  hf_gemma3.export_gemma3(params, lm, tmp)
  os.replace(tmp, out_dir)
  return out_dir
