"""Stage-2 train-step throughput, and where the time goes: the frozen APM forward vs the LM step.

Settings (each: the frozen APM's eval forward on the batch's images, then one jitted finetune step
of AnatomiX — LoRA + embedding + projection heads trainable — on a batch of the same shape the
loop builds: ``<image>`` ×P and 36 ``<obj_i>`` placeholders, assistant-only loss weights):

  demo: the stage-1 demo APM (128², 16 patches) + the stage-2 demo LM (hidden 64, 4 layers, 2 heads
        / 1 KV head, vocab 2048, LoRA r8), batch 2 × 1536 tokens (the demo's shapes);
  mid:  the same APM + a mid-size Gemma3 (hidden 512, 8 layers, 8 heads / 4 KV, head dim 64,
        vocab 32k, FFN 2048, LoRA r16), batch 2 × 1536 tokens.

Prints one JSON object per setting (medians of timed repeats after a warm-up):

  python benchmarks/stage2_train_step.py [--steps=5] [--only=demo,mid]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import timing  # noqa: E402  (benchmarks/timing.py)
from anatomix_jax.core import config as config_lib  # noqa: E402
from anatomix_jax.models import anatomix, apm, gemma3, lora  # noqa: E402
from anatomix_jax.stage2 import steps  # noqa: E402
from anatomix_jax.core import sharding  # noqa: E402
from configs import stage1  # noqa: E402

S, F = "sliding_attention", "full_attention"
LMS = {
    "demo": dict(vocab_size=2048, hidden_size=64, intermediate_size=192, num_hidden_layers=4,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=512,
                 lora=lora.LoraSpec(rank=8, alpha=16.0)),
    "mid": dict(vocab_size=32_000, hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=4, head_dim=64, sliding_window=512,
                lora=lora.LoraSpec(rank=16, alpha=16.0)),
}
BATCH = {"demo": 2, "mid": 2}
SEQ = 1536
OPTIM = ml_collections.ConfigDict(dict(lr=2e-4, warmup_ratio=0.03, clip_norm=0.3, b1=0.9,
                                       b2=0.999, eps=1e-8, weight_decay=0.0))


def make_batch(rng, b, t, patches, vocab, image_id, obj0, image_size):
  tokens = rng.integers(10, obj0 - 1, (b, t)).astype(np.int32)
  tokens[:, 5:5 + patches] = image_id
  start = 5 + patches + 10
  tokens[:, start:start + 36 * 20:20] = obj0 + np.arange(36)
  weights = np.zeros((b, t), np.float32)
  weights[:, -200:-1] = 1.0
  return {"tokens": tokens, "attention_mask": np.ones((b, t), np.int32),
          "targets": np.roll(tokens, -1, axis=1), "weights": weights,
          "images": rng.random((b, image_size, image_size, 1), np.float32)}


def bench(name: str, repeats: int) -> dict:
  s1 = stage1.get_config("demo")
  apm_model = apm.APM(apm.APMConfig.from_config(s1.model))
  size = s1.data.image_size
  apm_vars = apm_model.init(jax.random.key(0), jnp.zeros((1, size, size, 1)), train=False)
  apm_fwd = jax.jit(lambda v, x: apm_model.apply(v, x, train=False))
  patches = (size // 32) ** 2
  lm = gemma3.Gemma3Config(**LMS[name], layer_types=None)
  vocab = lm.vocab_size
  config = anatomix.AnatomiXConfig(lm, image_token_id=vocab - 40, first_object_token_id=vocab - 38,
                                   image_dim=s1.model.hidden_dim, object_dim=s1.model.proj_dim,
                                   projection_hidden=64 if name == "demo" else 512)
  mesh = sharding.make_mesh(config_lib.mesh_config())
  rules = config_lib.DEFAULT_RULES
  batch_sh = sharding.batch_sharding(mesh, rules)
  b = BATCH[name]
  host = make_batch(np.random.default_rng(0), b, SEQ, patches, vocab, config.image_token_id,
                    config.first_object_token_id, size)
  tx = steps.make_optimizer(OPTIM, 1000)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    params = anatomix.init_params(config, jax.random.key(1))
    trainable, frozen = steps.split(params, steps.PHASE_GROUPS["finetune"])
    state = steps.init_state(trainable, tx)
    step = jax.jit(steps.make_train_step(anatomix.AnatomiX(config), tx), donate_argnums=0)
    images = jnp.asarray(host["images"])
    out = apm_fwd(apm_vars, images)
    batch = sharding.host_to_global({k: v for k, v in host.items() if k != "images"}, batch_sh)
    batch["image_features"], batch["object_features"] = out["memory"], out["anatomy_embeddings"]
    holder = {"state": state}

    def run_step():
      holder["state"], m = step(holder["state"], frozen, batch, jax.random.key(2))
      jax.block_until_ready(m["loss"])

    apm_t = timing.timed(lambda: jax.block_until_ready(apm_fwd(apm_vars, images)["memory"]),
                         repeats)
    lm_t = timing.timed(run_step, repeats)
  tokens = b * SEQ
  n_frozen = sum(x.size for x in jax.tree.leaves(frozen))
  n_train = sum(x.size for x in jax.tree.leaves(trainable))
  total = apm_t["median_s"] + lm_t["median_s"]
  return {"setting": name, "batch": b, "seq_len": SEQ, "image_tokens": patches,
          "lm": dataclasses.asdict(lm) | {"lora": dataclasses.asdict(lm.lora)},
          "trainable_params": int(n_train), "frozen_params": int(n_frozen),
          "apm_forward_s": apm_t["median_s"], "lm_step_s": lm_t["median_s"],
          "lm_compile_and_first_s": lm_t["first_s"],
          "apm_fraction": apm_t["median_s"] / total,
          "tokens_per_s": tokens / total, "lm_tokens_per_s": tokens / lm_t["median_s"],
          "device": jax.devices()[0].device_kind, "repeats": repeats}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--only", default="demo,mid")
  args = parser.parse_args()
  for name in args.only.split(","):
    print(json.dumps(bench(name, args.steps), default=str), flush=True)


if __name__ == "__main__":
  main()
