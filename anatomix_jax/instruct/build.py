"""Command line: released datasets → instruction records (``{out_dir}/{source}/{split}.jsonl``).

  python -m anatomix_jax.instruct.build --source=mscxr --out_dir=/data/instructions \\
      --input=mscxr_csv=/data/ms-cxr/MS_CXR_Local_Alignment_v1.1.0.csv \\
      --input=mimic_dir=/data/physionet.org/files/mimic-cxr-jpg/2.1.0

``--source=all_mimic`` runs the MIMIC-derived sources together (report generation, anatomy
grounding, classification). Each source's ``build`` docstring lists the inputs it needs; a missing
one is named in the error. Prints the per-split counts (and counted skips) as JSON.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping

from absl import app, flags

from anatomix_jax.instruct import classification, mimic, mscxr, padchest_gr, vindr, vqa

BUILDERS: dict[str, Callable[..., Mapping]] = {
    "mimic_report_gen": mimic.build_report_gen,
    "anatomy_grounding": mimic.build_anatomy_grounding,
    "mscxr": mscxr.build,
    "vindr_instruct": vindr.build,
    "padchest_gr": padchest_gr.build,
    "mimic_vqa": vqa.build_mimic_vqa,
    "slake": vqa.build_slake,
    "radialog_instruct": vqa.build_radialog_instruct,
    "mimic_cxr_classification": classification.build,
}
MIMIC_SOURCES = ("mimic_report_gen", "anatomy_grounding", "mimic_cxr_classification")

_SOURCE = flags.DEFINE_enum("source", None, [*BUILDERS, "all_mimic"], "Which source to build.")
_OUT = flags.DEFINE_string("out_dir", None, "Directory of {source}/{split}.jsonl files.")
_INPUTS = flags.DEFINE_multi_string("input", [], "key=path inputs of the source's build().")
_SEED = flags.DEFINE_integer("seed", 2025, "Sampling seed (the reference's 2025).")
flags.mark_flags_as_required(["source", "out_dir"])


def parse_inputs(items: list[str]) -> dict[str, str]:
  """``["key=path", ...]`` → dict; a malformed item raises naming it."""
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key or not value:
      raise app.UsageError(f"--input={item!r}: expected key=path")
    out[key.strip()] = value.strip()
  return out


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  inputs = parse_inputs(_INPUTS.value)
  sources = MIMIC_SOURCES if _SOURCE.value == "all_mimic" else (_SOURCE.value,)
  counts = {s: BUILDERS[s](inputs, _OUT.value, seed=_SEED.value) for s in sources}
  print(json.dumps(counts, indent=2, default=str))


if __name__ == "__main__":
  app.run(main)
