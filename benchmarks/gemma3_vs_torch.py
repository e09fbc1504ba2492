"""Gemma3 in JAX (``models.gemma3`` + ``models.generate``) against transformers' torch Gemma3.

Both run in this process, one after the other, on the same random weights: a
``transformers.Gemma3ForCausalLM`` is built, saved with ``save_pretrained`` and loaded with
``convert.hf_gemma3.load_gemma3``. Mid-size float32 config: hidden 512, FFN 2048, 8 layers (the
6th full attention, the others sliding), 8 query / 4 KV heads of 64, vocabulary 32000, window 128.

* ``train``: tokens/s of one training step (forward + backward + AdamW, lr 1e-4, weight decay
  0.01; next-token cross-entropy over the batch) at batch 2 × 512: a jitted, donating JAX step vs
  torch ``loss.backward(); opt.step()``; the first step's losses are printed as a weight check.
* ``decode_b1`` / ``decode_b8``: greedy tokens/s, 128 new tokens after a 64-token prompt, batch 1
  and 8: ``generate.generate`` vs torch ``generate(do_sample=False, use_cache=True)`` (eos off, so
  both produce every token); ``greedy_match`` is the fraction of ids on which they agree.

Times are medians of ``--repeats`` (≥ 3) runs after a warm-up. JAX compile time is reported
apart: the train step is compiled ahead of time (``lower().compile()``); for ``generate`` it is
the first call minus the median. ``ratio`` = JAX tokens/s ÷ torch tokens/s. torch uses
``--threads`` (2) intra-op threads and its default attention (sdpa).

  python benchmarks/gemma3_vs_torch.py [--quick] [--repeats=3] [--threads=2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from anatomix_jax.convert import hf_gemma3  # noqa: E402
from anatomix_jax.models import gemma3  # noqa: E402
from anatomix_jax.models import generate as gen  # noqa: E402
import timing  # noqa: E402  (benchmarks/timing.py, beside this script)

S, F = gemma3.SLIDING, gemma3.FULL
SIZES = {
    "full": dict(model=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                            num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                            vocab_size=32000, sliding_window=128, query_pre_attn_scalar=64),
                 train=(2, 512), prompt=64, new=128),
    "quick": dict(model=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                             vocab_size=4096, sliding_window=32, query_pre_attn_scalar=32,
                             layer_types=[S, F]),
                  train=(2, 128), prompt=16, new=32),
}
LR, WEIGHT_DECAY = 1e-4, 0.01


def _round(d: dict) -> dict:
  return {k: (round(v, 4) if isinstance(v, float) else [round(x, 4) for x in v]
              if isinstance(v, list) else v) for k, v in d.items()}


def build(size: dict, path: str):
  """(torch model, jax config, numpy params): the same random weights through save/load."""
  torch.manual_seed(0)
  config = transformers.Gemma3TextConfig(max_position_embeddings=2048, **size["model"])
  model = transformers.Gemma3ForCausalLM(config)
  assert next(model.parameters()).dtype == torch.float32
  model.save_pretrained(path)
  model.generation_config.eos_token_id = None  # never stop early: every run makes N tokens
  jax_config, params = hf_gemma3.load_gemma3(path)
  return model, jax_config, params


def bench_train(model, config, params_np, batch: int, seq: int, repeats: int) -> dict:
  ids_np = np.random.default_rng(0).integers(1, config.vocab_size, (batch, seq))
  # JAX: a jitted step that donates params and optimizer state.
  module = gemma3.Gemma3(config)
  tx = optax.adamw(LR, b1=0.9, b2=0.999, eps=1e-8, weight_decay=WEIGHT_DECAY)

  def loss_fn(p, ids):
    mask = jnp.ones_like(ids)
    logits, _ = module.apply({"params": p}, ids, positions=gemma3.positions_from_mask(mask),
                             attention_mask=mask)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

  def step(p, s, ids):
    loss, grads = jax.value_and_grad(loss_fn)(p, ids)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  params = jax.device_put(params_np)
  opt_state = tx.init(params)
  ids = jnp.asarray(ids_np, jnp.int32)
  t0 = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, ids).compile()
  compile_s = time.perf_counter() - t0
  state = {"p": params, "s": opt_state, "losses": []}

  def jax_step():
    state["p"], state["s"], loss = compiled(state["p"], state["s"], ids)
    state["losses"].append(float(loss))  # blocks

  jax_t = timing.timed(jax_step, repeats)
  # torch: loss.backward(); opt.step().
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8,
                          weight_decay=WEIGHT_DECAY)
  ids_t = torch.tensor(ids_np)
  losses = []

  def torch_step():
    opt.zero_grad(set_to_none=True)
    loss = model(input_ids=ids_t, labels=ids_t).loss
    loss.backward()
    opt.step()
    losses.append(float(loss.detach()))

  torch_t = timing.timed(torch_step, repeats)
  model.eval()
  tokens = batch * seq
  out = {"batch": batch, "seq": seq, "jax_compile_s": compile_s,
         "jax_step_s": jax_t["median_s"], "torch_step_s": torch_t["median_s"],
         "jax_tokens_per_s": tokens / jax_t["median_s"],
         "torch_tokens_per_s": tokens / torch_t["median_s"],
         "first_loss_jax": state["losses"][0], "first_loss_torch": losses[0],
         "jax_times_s": jax_t["times_s"], "torch_times_s": torch_t["times_s"]}
  out["ratio"] = out["jax_tokens_per_s"] / out["torch_tokens_per_s"]
  return _round(out)


def bench_decode(model, config, params, batch: int, prompt: int, new: int, repeats: int) -> dict:
  ids_np = np.random.default_rng(batch).integers(1, config.vocab_size, (batch, prompt))
  mask = np.ones_like(ids_np, dtype=np.int32)
  result = {}

  def jax_run():
    out = gen.generate(config, params, tokens=ids_np, attention_mask=mask, max_new_tokens=new)
    result["jax"] = np.asarray(out["tokens"])  # blocks

  def torch_run():
    with torch.no_grad():
      out = model.generate(input_ids=torch.tensor(ids_np), attention_mask=torch.tensor(mask),
                           do_sample=False, use_cache=True, max_new_tokens=new, pad_token_id=0)
    result["torch"] = out[:, prompt:].numpy()

  jax_t = timing.timed(jax_run, repeats)
  torch_t = timing.timed(torch_run, repeats)
  assert result["torch"].shape == result["jax"].shape == (batch, new), result["torch"].shape
  tokens = batch * new
  out = {"batch": batch, "prompt": prompt, "new_tokens": new,
         "jax_compile_s": jax_t["first_s"] - jax_t["median_s"],
         "jax_s": jax_t["median_s"], "torch_s": torch_t["median_s"],
         "jax_tokens_per_s": tokens / jax_t["median_s"],
         "torch_tokens_per_s": tokens / torch_t["median_s"],
         "greedy_match": float(np.mean(result["jax"] == result["torch"])),
         "jax_times_s": jax_t["times_s"], "torch_times_s": torch_t["times_s"]}
  out["ratio"] = out["jax_tokens_per_s"] / out["torch_tokens_per_s"]
  return _round(out)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="a small config, to check it runs")
  parser.add_argument("--repeats", type=int, default=3, help="timed runs (≥ 3)")
  parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
  args = parser.parse_args()
  repeats = max(3, args.repeats)
  torch.set_num_threads(args.threads)
  size = SIZES["quick" if args.quick else "full"]
  with tempfile.TemporaryDirectory() as path:
    model, config, params_np = build(size, path)
  params = jax.device_put(params_np)
  report = {
      "name": "gemma3_vs_torch", "size": "quick" if args.quick else "full",
      "model": dict(size["model"], layer_types=list(config.layer_types), dtype="float32",
                    params=gemma3.param_count(config)),
      "jax": jax.__version__, "jax_backend": jax.default_backend(), "torch": torch.__version__,
      "transformers": transformers.__version__, "torch_threads": torch.get_num_threads(),
      "torch_attention": model.config._attn_implementation, "cpu_count": os.cpu_count(),
      "machine": platform.machine(), "repeats": repeats}
  for b in (1, 8):  # decode first: training changes the weights
    report[f"decode_b{b}"] = bench_decode(model, config, params, b, size["prompt"], size["new"],
                                          repeats)
  report["train"] = bench_train(model, config, params_np, *size["train"], repeats)
  report["targets"] = {"train_ratio_ge_1.5": report["train"]["ratio"] >= 1.5,
                       "decode_ratio_ge_2": all(report[f"decode_b{b}"]["ratio"] >= 2
                                                for b in (1, 8))}
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  main()
