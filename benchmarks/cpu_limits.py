"""What this CPU allows the Gemma3 benchmark (``gemma3_vs_torch.py``): the bounds its ratios run into.

* ``matmul``: GFLOP/s of one float32 matmul of the train step's shapes (tokens 1024 = batch 2 × 512,
  hidden 512, FFN 2048, vocabulary 32000), jitted JAX vs torch (``--threads`` intra-op threads).
* ``stream``: the decode products alone: a ``fori_loop`` of ``--steps`` steps, each multiplying
  an [M, 512] activation through ``--layers`` GeGLU MLPs (gate/up [512, 2048], down [2048, 512]),
  so every step reads all their float32 weights once (16 layers: 201 MB, the size of the
  benchmark model's weights). GB/s = weight bytes per step ÷ step time, for M = 1 and 8.

Medians of ``--repeats`` runs after a warm-up.

  python benchmarks/cpu_limits.py [--repeats=15] [--threads=2] [--layers=16] [--steps=32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import timing  # noqa: E402  (benchmarks/timing.py, beside this script)

TRAIN_SHAPES = ((1024, 512, 2048), (1024, 2048, 512), (1024, 512, 32000))  # (M, K, N)
HIDDEN, FFN = 512, 2048


def matmul_rates(repeats: int) -> list[dict]:
  rng = np.random.default_rng(0)
  out = []
  for m, k, n in TRAIN_SHAPES:
    a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    f = jax.jit(jnp.matmul)
    jax_t = timing.timed(lambda: f(ja, jb).block_until_ready(), repeats)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    torch_t = timing.timed(lambda: torch.matmul(ta, tb), repeats)
    flop = 2 * m * k * n
    out.append({"shape": [m, k, n], "jax_gflop_per_s": round(flop / jax_t["median_s"] / 1e9, 1),
                "torch_gflop_per_s": round(flop / torch_t["median_s"] / 1e9, 1)})
  return out


def stream_rate(rows: int, layers: int, steps: int, repeats: int) -> dict:
  rng = np.random.default_rng(1)
  weights = [{name: jnp.asarray(rng.standard_normal(shape, np.float32) * 0.02)
              for name, shape in (("gate", (HIDDEN, FFN)), ("up", (HIDDEN, FFN)),
                                  ("down", (FFN, HIDDEN)))} for _ in range(layers)]

  @jax.jit
  def run(x, weights):
    def step(_, x):
      for w in weights:
        x = x + (jax.nn.gelu(x @ w["gate"]) * (x @ w["up"])) @ w["down"]
      return x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # keeps values bounded
    return jax.lax.fori_loop(0, steps, step, x)

  x = jnp.ones((rows, HIDDEN), jnp.float32)
  t = timing.timed(lambda: run(x, weights).block_until_ready(), repeats)
  weight_bytes = layers * 3 * HIDDEN * FFN * 4
  step_s = t["median_s"] / steps
  return {"rows": rows, "weight_mb": round(weight_bytes / 1e6, 1),
          "ms_per_step": round(step_s * 1e3, 3), "gb_per_s": round(weight_bytes / step_s / 1e9, 1)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=15)
  parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
  parser.add_argument("--layers", type=int, default=16, help="MLPs per step (12.6 MB each)")
  parser.add_argument("--steps", type=int, default=32)
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  report = {"name": "cpu_limits", "jax": jax.__version__, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "repeats": args.repeats,
            "matmul": matmul_rates(args.repeats),
            "stream": [stream_rate(m, args.layers, args.steps, args.repeats) for m in (1, 8)]}
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  main()
