"""``--mode=predict`` latency per image at the demo size: APM only, and APM + full generation.

Uses a trained stage-2 workdir (e.g. the README's finetune demo) and images of its stage-1
synthetic test split. Per image (batch 1; then a batch of 4 for throughput), timed after a warm-up:
  read_s      decode + letterbox + stretch (``predict.load_model_input``)
  apm_s       the frozen APM + retrieval (``FrozenAPM``)
  generate_s  APM + prompt + greedy generation of up to ``--max_new_tokens`` (the reference: 350)

    python benchmarks/predict_latency.py --workdir=runs/demo_finetune [--repeats=5]

Prints one JSON object and writes ``benchmarks/results/predict_latency.json``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import jax
import ml_collections
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import timing  # noqa: E402  (benchmarks/timing.py)
from anatomix_jax.core import config as config_lib  # noqa: E402
from anatomix_jax.stage2 import inference, predict  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--workdir", required=True, help="a trained stage-2 workdir")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--max_new_tokens", type=int, nargs="+", default=[64, 350])
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "predict_latency.json"))
  args = parser.parse_args()
  config = ml_collections.ConfigDict({"mesh": config_lib.mesh_config(),
                                      "sharding_rules": config_lib.DEFAULT_RULES})
  trained = inference.load(config, args.workdir)
  run = trained.run
  root = os.path.dirname(run.config.data.dir)  # the demo: {data}/instructions beside {data}/raw
  files = sorted(glob.glob(os.path.join(root, "raw", "**", "*.jpg"), recursive=True))[:4]
  if len(files) < 4:
    raise SystemExit(f"need 4 images under {root}/raw; got {len(files)}")
  size, intensity = run.apm.image_size, run.config.data.intensity
  images = [predict.load_model_input(f, size, intensity)[0] for f in files]
  _, question = predict.instruction("report", "")
  record = {"id": "bench", "source": "predict", "task": "Report Generation",
            "instructions": [question], "responses": ["-"]}

  def apm(batch):
    out = run.apm(np.stack(batch))
    jax.block_until_ready(out["memory"])

  result = {"device": str(jax.devices()[0]), "workdir": args.workdir, "image": files[0],
            "apm_image_size": size, "lm_layers": run.model_config.lm.num_hidden_layers,
            "lm_hidden": run.model_config.lm.hidden_size,
            "read_s": timing.timed(lambda: predict.load_model_input(files[0], size, intensity),
                                   args.repeats)["median_s"],
            "apm_s": timing.timed(lambda: apm(images[:1]), args.repeats)["median_s"],
            "apm_batch4_s_per_image": timing.timed(lambda: apm(images), args.repeats)["median_s"]
            / 4}
  for n in args.max_new_tokens:
    answers = []

    def generate(batch, n=n, answers=answers):
      _, _, out = trained.answer(np.stack(batch), [record] * len(batch), n)
      answers[:] = out

    t1 = timing.timed(lambda: generate(images[:1]), max(args.repeats // 2, 1))
    t4 = timing.timed(lambda: generate(images), max(args.repeats // 2, 1))
    result[f"generate{n}_s"] = t1["median_s"]
    result[f"generate{n}_batch4_s_per_image"] = t4["median_s"] / 4
    result[f"generate{n}_answer_tokens"] = len(run.tok.tokenizer(answers[0])["input_ids"])
  print(json.dumps(result, indent=1))
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
