"""Ahead-of-time TPU compiles of the paper's training steps, and the memory/throughput model.

For each case: the stage-1 step at the paper setting (1024², global batch 48) or the stage-2
finetune step (MedGemma-4B text model, LoRA r16 + embedding + projection heads, 1,024 image tokens
in 3,072-token rows, global batch 32) is compiled for a TPU topology with libtpu (no TPU needed;
``pip install -e .[tpu]``), and ``anatomix_jax.aot.compile_check`` reports per-device memory,
FLOPs and a roofline step time / MFU. 8×H100 rows reuse the 8-device v5e compiles with the H100's
figures (an estimate: no GPU compiler here). Per target (v5e-8, v5p-8, 8×H100) the fastest case
that fits is the recommendation.

  python benchmarks/compile_check.py [--only=NAME,...] [--out=benchmarks/results/compile_check]

Writes ``{out}.json`` (every report) and ``{out}.md`` (the table); a case that fails to compile is
recorded with its error. Compiles take minutes each on a 2-core CPU (the unrolled 34-layer
MedGemma step ~8 min; scanned layers ~2 min).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from anatomix_jax.aot import compile_check, hardware  # noqa: E402
from configs import stage1, stage2_finetune  # noqa: E402

PAPER_S2 = {"lm.remat": True, "lm.scan_layers": True}
XLA_ATTENTION = {"lm.attention": "xla"}  # the einsum path; the stage-2 default "auto" is splash
F32 = {"model.dtype": "float32"}  # stage 1's activations as before the paper config took bf16
BF16 = {"model.dtype": "bfloat16"}
# name → (stage, topology, config overrides, options shown in the table)
CASES = {
    "s1_v5e8": ("stage1", "v5e:2x4", F32, "f32, data 8"),
    "s1_v5e8_bf16": ("stage1", "v5e:2x4", BF16, "bf16, data 8"),
    "s1_v5p8": ("stage1", "v5p:2x2x1", F32, "f32, data 4"),
    "s1_v5p8_bf16": ("stage1", "v5p:2x2x1", BF16, "bf16, data 4"),
    "s1_v4_8": ("stage1", "v4:2x2x1", F32, "f32, data 8"),
    "s1_v5e256": ("stage1", "v5e:16x16", {**F32, "train.batch_size": 256},
                  "f32, data 256, batch 256"),
    "s2_v5p8_unrolled": ("stage2", "v5p:2x2x1", {"mesh.shape": (1, -1, 1), "lm.remat": True},
                         "fsdp 4, remat, splash"),
    "s2_v5p8_unrolled_xla": ("stage2", "v5p:2x2x1", {"mesh.shape": (1, -1, 1), "lm.remat": True,
                                                     **XLA_ATTENTION},
                             "fsdp 4, remat, XLA attention"),
    "s2_v5p8": ("stage2", "v5p:2x2x1", {"mesh.shape": (1, -1, 1), **PAPER_S2},
                "fsdp 4, remat, scan, splash"),
    "s2_v5p8_xla": ("stage2", "v5p:2x2x1", {"mesh.shape": (1, -1, 1), **PAPER_S2, **XLA_ATTENTION},
                    "fsdp 4, remat, scan, XLA attention"),
    "s2_v5e8": ("stage2", "v5e:2x4", {"mesh.shape": (1, -1, 1), **PAPER_S2},
                "fsdp 8, remat, scan, splash"),
    "s2_v5e8_xla": ("stage2", "v5e:2x4", {"mesh.shape": (1, -1, 1), **PAPER_S2, **XLA_ATTENTION},
                    "fsdp 8, remat, scan, XLA attention"),
    "s2_v5e8_tp2": ("stage2", "v5e:2x4", {"mesh.shape": (1, -1, 2), **PAPER_S2},
                    "fsdp 4 × tensor 2, remat, scan, splash"),
    "s2_v5e8_noremat": ("stage2", "v5e:2x4", {"mesh.shape": (1, -1, 1), "lm.scan_layers": True,
                                                "lm.remat": False},
                        "fsdp 8, scan, no remat, splash"),
    "s2_v5e8_fulllogits": ("stage2", "v5e:2x4", {"mesh.shape": (1, -1, 1), **PAPER_S2,
                                                 "train.loss_chunk": 0},
                           "fsdp 8, remat, scan, unchunked logits, splash"),
    "s2_v5e256": ("stage2", "v5e:16x16", {"mesh.shape": (1, -1, 1), **PAPER_S2,
                                          "train.batch_size": 256},
                  "fsdp 256, remat, scan, batch 256, splash"),
    "s2_v5e256_xla": ("stage2", "v5e:16x16", {"mesh.shape": (1, -1, 1), **PAPER_S2,
                                              "train.batch_size": 256, **XLA_ATTENTION},
                      "fsdp 256, remat, scan, batch 256, XLA attention"),
}
TARGETS = {"v5e-8": "v5e:2x4", "v5p-8": "v5p:2x2x1"}


def build_config(stage: str, overrides: dict):
  config = stage1.get_config() if stage == "stage1" else stage2_finetune.get_config()
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def run_case(name: str) -> dict:
  stage, topology, overrides, options = CASES[name]
  t0 = time.time()
  try:
    report = compile_check.check(build_config(stage, overrides), topology, require_fit=False)
  except compile_check.DoesNotFitError as err:  # XLA itself refused: it names the allocations
    return {"case": name, "topology": topology, "options": options, "fits": False,
            "error": str(err), "compile_s": round(time.time() - t0, 1)}
  except Exception as err:  # pylint: disable=broad-except
    return {"case": name, "topology": topology, "options": options, "error": repr(err),
            "traceback": traceback.format_exc()[-3000:]}
  return {"case": name, "options": options, **report}


def recommendations(rows: list[dict]) -> dict:
  """Per target and program: the fitting case with the shortest roofline step."""
  out = {}
  for target, topology in {**TARGETS, "8×H100": "8×h100"}.items():
    for program in ("stage1 train", "stage2 finetune"):
      fitting = [r for r in rows if r.get("program") == program and r.get("fits")
                 and (r["topology"] == topology or r["topology"].startswith(topology))]
      if fitting:
        best = min(fitting, key=lambda r: r["roofline_step_s"])
        out[f"{target} {program}"] = {"case": best["case"], "mesh": best["mesh"],
                                      "options": best["options"],
                                      "roofline_step_s": best["roofline_step_s"],
                                      "total_gib": best["total_gib"]}
  return out


def where_the_bytes_go(rows: list[dict]) -> str:
  """Per compiled case: the source ops moving the most bytes (``aot.op_bytes``)."""
  lines = ["Where the bytes go (per device, optimized HLO; loop bodies counted once):"]
  for r in rows:
    if r.get("bytes_by_source") and not r["case"].endswith("_as_h100"):
      top = "; ".join(f"{s['source']} {s['share']:.0%}" for s in r["bytes_by_source"][:4])
      lines.append(f"- {r['case']} ({r['bytes_accessed_gib_per_device']:.1f} GiB accessed): {top}")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--only", default="", help="comma-separated case names")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "compile_check"))
  parser.add_argument("--merge", action="store_true",
                      help="keep {out}.json's other cases (rerun only --only's)")
  args = parser.parse_args()
  names = [n for n in args.only.split(",") if n] or list(CASES)
  unknown = sorted(set(names) - set(CASES))
  if unknown:
    parser.error(f"unknown cases {unknown}; known: {sorted(CASES)}")
  rows = []
  for name in names:
    row = run_case(name)
    print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
    rows.append(row)
    if row.get("program") and row["devices"] == 8 and row["topology"].startswith("v5e"):
      h100 = compile_check.on_other_chip(row, hardware.CHIPS["h100"])
      rows.append({**h100, "case": name + "_as_h100"})
  if args.merge and os.path.isfile(args.out + ".json"):
    with open(args.out + ".json", encoding="utf-8") as f:
      previous = json.load(f)["cases"]
    rerun = {r["case"] for r in rows}
    order = list(CASES)
    rows = sorted([r for r in previous if r["case"] not in rerun
                   and r["case"].removesuffix("_as_h100") in CASES] + rows,
                  key=lambda r: (order.index(r["case"].removesuffix("_as_h100")), r["case"]))
  result = {"cases": rows, "recommended": recommendations(rows),
            "chips": {k: vars(v) for k, v in hardware.CHIPS.items()}}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out + ".json", "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
  ok = [r for r in rows if "program" in r]
  failed = [f"- {r['case']} ({r['topology']}, {r['options']}): {r['error'].splitlines()[0]}"
            for r in rows if "error" in r]
  recommended = [f"- {k}: {v['case']} — mesh {v['mesh']}, {v['options']}: {v['total_gib']:.1f} "
                 f"GiB/device, ~{v['roofline_step_s']:.2f} s/step" for k, v in
                 result["recommended"].items()]
  with open(args.out + ".md", "w", encoding="utf-8") as f:
    f.write(compile_check.table(ok) + "\n\n" + "\n".join(failed + [""] + recommended) + "\n\n"
            + where_the_bytes_go(ok) + "\n")
  print(compile_check.table(ok))
  print("\n".join(failed + recommended))


if __name__ == "__main__":
  main()
