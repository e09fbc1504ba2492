"""Stage-1 train-step throughput: the full ResNet-50 APM at 512² (batch 2) and the demo model.

Prints one JSON object per setting, then one with the process's peak host memory. Steps run the same
code path as the trainer (optimizer with masks, jitted sharded step with donation, the contrastive
term with the text projection head) on random inputs; the frozen text encoder's cached sentence
embeddings are random vectors of its width (768 PubMedBERT for the paper, 384 MiniLM for the demo).

  python benchmarks/stage1_train_step.py [--steps=5] [--only=paper_512,demo]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from anatomix_jax.models import apm  # noqa: E402
from anatomix_jax.core import sharding, state as state_lib  # noqa: E402
from anatomix_jax.stage1 import steps
from configs import stage1  # noqa: E402  (configs/ is a plain folder beside the package)


def random_batch(rng: np.random.Generator, batch: int, size: int, text_dim: int) -> dict:
  centres = rng.uniform(0.3, 0.7, (batch, 36, 2))
  sizes = rng.uniform(0.1, 0.4, (batch, 36, 2))
  return {"text_pooled": rng.normal(size=(batch, 36, text_dim)).astype(np.float32),"image": rng.random((batch, size, size, 1), np.float32),
          "boxes": np.concatenate([centres, sizes], -1).astype(np.float32),
          "box_mask": np.ones((batch, 36), np.float32),
          "labels": rng.integers(0, 2, (batch, 14)).astype(np.float32),
          "valid": np.ones((batch,), np.float32), "index": np.arange(batch, dtype=np.int32)}


def bench(name: str, config, image_size: int, batch_size: int, num_steps: int, text_dim: int
          ) -> dict:
  config.data.image_size, config.train.batch_size = image_size, batch_size
  mesh = sharding.make_mesh(config.mesh)
  rules = tuple(config.sharding_rules)
  model = apm.APM(dataclasses.replace(apm.APMConfig.from_config(config.model), text_dim=text_dim))
  tx = state_lib.make_optimizer(config.optim, 1000)
  init_vars = lambda r: model.init({"params": r, "dropout": r},  # noqa: E731
                                   jnp.zeros((1, image_size, image_size, 1)), train=False)
  abstract, shardings, init = state_lib.train_state_factory(init_vars, tx, jax.random.key(0), mesh,
                                                            rules)
  state = init(jax.random.key(0))
  batch_sh = sharding.batch_sharding(mesh, rules)
  step_fn = steps.jit_train_step(steps.make_train_step(model, tx, config.loss, config.optim), shardings, batch_sh,
                                 mesh)
  batch = sharding.host_to_global(
      random_batch(np.random.default_rng(0), batch_size, image_size, text_dim), batch_sh)
  rng = jax.random.key(1)
  with jax.set_mesh(mesh):
    t0 = time.perf_counter()
    state, metrics = step_fn(state, batch, rng)
    jax.block_until_ready(metrics)
    compile_and_first = time.perf_counter() - t0
    times = []
    for _ in range(num_steps):
      t0 = time.perf_counter()
      state, metrics = step_fn(state, batch, rng)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t0)
  median = statistics.median(times)
  return {"name": name, "image_size": image_size, "batch": batch_size,
          "params": int(sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.params))),
          "compile_and_first_step_s": round(compile_and_first, 2),
          "step_s_median": round(median, 4), "step_s_all": [round(t, 4) for t in times],
          "images_per_s": round(batch_size / median, 2), "loss": float(metrics["loss"]),
          "devices": jax.device_count(), "platform": jax.devices()[0].platform}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--only", default="paper_512,demo")
  args = parser.parse_args()
  settings = {
      "paper_512": lambda: bench("paper_512", stage1.get_config(), 512, 2, args.steps, 768),
      "demo": lambda: bench("demo", stage1.get_config("demo"), 128, 16, args.steps, 384),
  }
  for name in args.only.split(","):
    print(json.dumps(settings[name]()), flush=True)
  peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  print(json.dumps({"name": "peak_host_memory", "peak_rss_mib": round(peak_kib / 1024, 1)}))


if __name__ == "__main__":
  main()
