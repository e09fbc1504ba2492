"""The stage-2 demo's base LM: a tiny Gemma3 and a tokenizer trained on the synthetic corpus.

The paper starts from MedGemma-4B; a CPU demo cannot. The align demo instead makes a small
Gemma3 (``lm.demo`` sizes) with a tokenizer trained on the demo's own text (instruction and answer
variants, the RAG sentences, the prompt template), and writes both as a Hugging Face directory —
the same format MedGemma arrives in — so everything downstream (loading, LoRA, export) runs the
real code path. Standing in for MedGemma's pretraining, the tiny LM is first trained as a plain
language model (all weights, ``lm.demo.pretrain_steps``) on the demo's conversations without
images or context, so that the align and finetune steps start from a model that knows the
language of the answers, as the paper's do; then (``lm.demo.context_pretrain_steps``) on text-only
prompts in the stage-2 format with a few context lines (the frozen APM's boxes and retrieved
sentences, the asked anatomy's line holding its true box), with the loss on the answer: MedGemma
brings the ability to read a context and copy from it; a tiny LM has to be taught it, and long
stage-2 prompts are too slow a way to do that on a CPU.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from anatomix_jax.convert import hf_gemma3
from anatomix_jax.instruct import schema
from anatomix_jax.models import anatomix, gemma3
from anatomix_jax.stage2 import data, grounding, prompt, tokenizer


PRETRAIN_LEN = 128
CONTEXT_LEN = 448  # padded length of a context-pretraining row (longer examples are dropped)
LENGTH_STEP = 64  # a batch is cut to its rows' length bucket (a multiple of this): less padding


def conversations(config: Any) -> list[str]:
  """Chat-formatted (instruction, answer) pairs of the train records, without images/context."""
  out = []
  for source in schema.SOURCES:
    path = data.jsonl_path(config.data.dir, source, config.data.train_split)
    if not os.path.isfile(path):
      continue
    for record in schema.read_jsonl(path):
      out.append(prompt.render_chat(None, record["instructions"][0],
                                    prompt.first_response(record)))
  return out


def stretched_positions(input_ids: np.ndarray, mask: np.ndarray, line_start_id: int,
                        max_position: int, rng: np.random.Generator) -> np.ndarray:
  """RoPE positions with random gaps before context lines: int[B, L].

  A short training prompt then spans the relative distances of a long one (the stage-2 prompt's
  36 lines reach ~1,400 tokens back from the answer, and lie beyond the sliding window of the
  local layers), while the tokens within a line stay adjacent. Per row, a total gap drawn
  uniformly in [0, max_position − length) is split over its line starts (``line_start_id``
  tokens) by a flat Dirichlet draw.

  Args:
    input_ids, mask: int[B, L] (right-padded rows).
  """
  positions = np.array(gemma3.positions_from_mask(mask))
  for row in range(len(input_ids)):
    starts = np.flatnonzero(input_ids[row] == line_start_id)
    extra = int(rng.integers(0, max(max_position - int(mask[row].sum()), 1)))
    if len(starts):
      gaps = np.zeros(input_ids.shape[1], np.int64)
      gaps[starts] = np.round(rng.dirichlet(np.ones(len(starts))) * extra)
      positions[row] += np.cumsum(gaps)
  return positions.astype(np.int32)


def _train(params: Any, lm: gemma3.Gemma3Config, rows: dict[str, np.ndarray], steps: int,
           lr: float, seed: int, what: str, batch_size: int,
           stretch: tuple[int, int] | None = None) -> Any:
  """Trains all weights with the weighted next-token loss on random batches of ``rows``.

  With ``stretch``, short rows stand in for long prompts, so they should also be cheap: each batch
  is then drawn from one length bucket (rows whose real length rounds up to the same multiple of
  ``LENGTH_STEP``; a bucket picked in proportion to its rows) and cut to that length (one compile
  per bucket). Without it, batches are uniform draws of whole rows.

  Args:
    rows: ``input_ids``, ``targets``, ``weights``, ``attention_mask``, each [R, L] (right-padded);
      optionally ``digits`` [R, L] (the weighted targets that are digits, i.e. box coordinates),
      whose teacher-forced accuracy is logged beside the loss: how well the LM copies boxes from
      its prompt.
    stretch: ``(line_start_id, max_position)``: positions from ``stretched_positions``; None:
      consecutive.
  """
  model = gemma3.Gemma3(lm)
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, steps // 10 + 1, steps), b2=0.98)
  rows = dict(rows)
  digits = rows.pop("digits", None)

  @jax.jit
  def step(params, opt_state, batch, digits):
    def loss_fn(p):
      mask = batch["attention_mask"]
      positions = batch.get("positions", gemma3.positions_from_mask(mask))
      logits, _ = model.apply({"params": p}, batch["input_ids"], positions=positions,
                              attention_mask=mask)
      total, count = anatomix.cross_entropy(logits, batch["targets"], batch["weights"])
      if digits is None:
        return total / jnp.maximum(count, 1.0), jnp.zeros(())
      hits = jnp.sum((jnp.argmax(logits, -1) == batch["targets"]) * digits)
      return total / jnp.maximum(count, 1.0), hits / jnp.maximum(jnp.sum(digits), 1.0)
    (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, accuracy

  rng = np.random.default_rng(seed)
  opt_state = tx.init(params)
  count, full = rows["input_ids"].shape
  if stretch is not None:
    lengths = -(-rows["attention_mask"].sum(1) // LENGTH_STEP) * LENGTH_STEP
    buckets = {int(n): np.flatnonzero(lengths == n) for n in np.unique(lengths)}
    sizes = np.asarray([len(v) for v in buckets.values()], np.float64)
  recent = []  # the last 50 steps' accuracies, on device until logged (no per-step sync)
  for i in range(steps):
    if stretch is None:
      length, pick = full, rng.integers(0, count, batch_size)
    else:
      length = list(buckets)[rng.choice(len(buckets), p=sizes / sizes.sum())]
      pick = rng.choice(buckets[length], batch_size)
    batch = {k: v[pick, :length] for k, v in rows.items()}
    if stretch is not None:
      batch["positions"] = stretched_positions(batch["input_ids"], batch["attention_mask"],
                                               *stretch, rng)
    params, opt_state, loss, accuracy = step(
        params, opt_state, {k: jnp.asarray(v) for k, v in batch.items()},
        None if digits is None else jnp.asarray(digits[pick, :length]))
    recent = (recent + [accuracy])[-50:]
    if i % 100 == 0 or i == steps - 1:
      accuracy = ("" if digits is None else ", answer-digit accuracy (last 50 steps) "
                  f"{np.mean([float(a) for a in recent]):.3f}")
      logging.info("demo LM %s step %d/%d: loss %.3f%s", what, i + 1, steps, float(loss), accuracy)
  return params


def pretrain(params: Any, lm: gemma3.Gemma3Config, tok: Any, texts: list[str], steps: int,
             lr: float, seed: int, batch_size: int) -> Any:
  """Trains all weights as a causal LM on ``texts`` packed into rows of PRETRAIN_LEN tokens."""
  ids = []
  for text in texts:
    ids.extend(tok.tokenizer(text, add_special_tokens=False)["input_ids"] + [tok.eos_id])
  packed = np.asarray(ids[:len(ids) // PRETRAIN_LEN * PRETRAIN_LEN], np.int32).reshape(
      -1, PRETRAIN_LEN)
  if len(packed) < batch_size:
    raise ValueError(f"{len(packed)} rows of {PRETRAIN_LEN} tokens are too few to pretrain on")
  weights = np.ones(packed.shape, np.float32)
  weights[:, -1] = 0.0  # the last position has no next token in its row
  rows = {"input_ids": packed, "targets": np.roll(packed, -1, axis=1), "weights": weights,
          "attention_mask": np.ones(packed.shape, np.int32)}
  return _train(params, lm, rows, steps, lr, seed, "pretraining", batch_size)


def context_rows(config: Any, apm: Any, tok: Any, seed: int) -> dict[str, np.ndarray]:
  """Text-only stage-2 prompts with short contexts, tokenized and padded to CONTEXT_LEN.

  Per train record of the demo's sources (at most ``lm.demo.context_examples``, anatomy
  grounding first): the frozen APM's 36 boxes and retrieved sentences for its image; for anatomy
  grounding the asked anatomy's box replaced by the true one (so the answer's box is in the
  context, verbatim); ``lm.demo.context_lines`` random lines kept in order, the asked anatomy's
  among them; one ``<image>`` token; no system prompt; the loss on the answer (``prompt.encode``).

  Returns:
    ``input_ids``, ``targets``, ``weights``, ``attention_mask``, ``digits`` (the answer's
    digit targets): [R, CONTEXT_LEN].
  """
  demo, c = config.lm.demo, config
  rng = np.random.default_rng([seed, 7])
  records = []
  for source in schema.SOURCES:  # every source (the align step's own mix is reports only)
    path = data.jsonl_path(c.data.dir, source, c.data.train_split)
    if os.path.isfile(path):
      records += schema.read_jsonl(path)
  asks = [r for r in records if r["task"] == "Anatomy Grounding"]
  others = [r for r in records if r["task"] != "Anatomy Grounding"]
  rng.shuffle(others)
  records = (asks + others)[:demo.context_examples]
  low, high = demo.context_lines
  out = {k: [] for k in ("input_ids", "targets", "weights", "attention_mask", "digits")}
  is_digit = digit_ids(tok)
  ds = data.batches(grain.MapDataset.source(records), image_roots=c.data.image_roots.to_dict(),
                    image_size=apm.image_size, batch_size=64, train=False)
  for batch in ds:
    features = apm(batch["image"])
    oracle = grounding.with_true_boxes(batch["records"], features["boxes"])
    for j, record in enumerate(batch["records"]):
      if not batch["valid"][j]:
        continue
      boxes, asked = oracle[j], grounding.asked_anatomy(record)
      example = prompt.build_example(record, boxes, features["sentences"][j], rng,
                                     system_prompts=("",), context_drop_ratio=0.0,
                                     num_image_tokens=1, named_lines=c.data.line_names)
      lines = set(rng.choice(len(boxes), size=int(rng.integers(low, high + 1)), replace=False))
      if asked is not None:
        lines.add(int(asked))
      example = dataclasses.replace(
          example, findings=tuple(example.findings[i] for i in sorted(lines)))
      encoded = prompt.encode(tok, example, max_len=CONTEXT_LEN, truncation="drop")
      if encoded is None:
        continue
      n = len(encoded)
      pad = lambda x, fill: np.pad(x, (0, CONTEXT_LEN - n), constant_values=fill)  # noqa: E731
      out["input_ids"].append(pad(encoded.input_ids, tok.pad_id))
      out["targets"].append(pad(encoded.targets, tok.pad_id))
      out["weights"].append(pad(encoded.loss_mask.astype(np.float32), 0.0))
      out["attention_mask"].append(pad(np.ones(n, np.int32), 0))
      out["digits"].append(out["weights"][-1] * is_digit[out["targets"][-1]])
  if len(out["input_ids"]) < demo.context_batch_size:
    raise ValueError(f"only {len(out['input_ids'])} context-pretraining examples fit in "
                     f"{CONTEXT_LEN} tokens")
  return {k: np.stack(v) for k, v in out.items()}


def digit_ids(tok: Any) -> np.ndarray:
  """[V] bool: the ids whose text is a digit (the tokens box coordinates are written with)."""
  return np.asarray([tok.tokenizer.decode([i]).strip().isdigit() for i in range(tok.vocab_size)])


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
      layer_types=gemma3.default_layer_types(demo.num_hidden_layers, demo.full_attention_every),
      pad_token_id=tok.pad_id, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
  params = gemma3.init_params(lm, jax.random.key(config.seed))
  if demo.pretrain_steps > 0:
    params = pretrain(params, lm, tok, conversations(config), demo.pretrain_steps,
                      demo.pretrain_lr, config.seed, demo.pretrain_batch_size)
  if demo.context_pretrain_steps > 0:
    rows = context_rows(config, apm, tok, config.seed)
    logging.info("demo LM context pretraining on %d prompts (%.0f tokens on average)",
                 len(rows["input_ids"]), rows["attention_mask"].sum(1).mean())
    stretch = (tok.emb_id, demo.context_max_position) if demo.context_max_position else None
    params = _train(params, lm, rows, demo.context_pretrain_steps, demo.pretrain_lr,
                    config.seed + 1, "context pretraining", demo.context_batch_size, stretch)
  hf_gemma3.export_gemma3(params, lm, tmp)
  os.replace(tmp, out_dir)
  return out_dir
