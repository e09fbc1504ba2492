"""The stage-2 demo's instruction data, built once from the stage-1 demo's synthetic radiographs.

With ``data.dir`` empty in a demo config, the stage-2 run reads the synthetic MIMIC-CXR-JPG +
Chest ImaGenome tree that the stage-1 demo generated (``{apm.workdir}/data/raw``, or the stage-1
config's ``synthetic.dir``) and writes, under ``{that root}/instructions``:
  * Report Generation and Anatomy Grounding records, by the real MIMIC processors
    (``instruct.mimic``), exactly as they would run on MIMIC-CXR + Chest ImaGenome;
  * the other task types from the synthetic findings (``synthetic.instructions``).
Both steps of the demo share the directory; it is written to a temporary name and renamed, so an
interrupted build is redone rather than half-used.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import ml_collections
from absl import logging

from anatomix_jax.instruct import mimic
from anatomix_jax.stage1 import load as stage1_load
from anatomix_jax.synthetic import generator, instructions

DIR_NAME = "instructions"


def synthetic_root(apm_workdir: str) -> str:
  """Where the stage-1 demo keeps its generated raw dataset."""
  meta, _ = stage1_load.read_meta(apm_workdir)
  config = ml_collections.ConfigDict(meta["config"])
  if config.data.records_dir:
    raise ValueError(f"the stage-1 run in {apm_workdir} trained on real records "
                     f"({config.data.records_dir}); set data.dir to real instruction data")
  return os.path.join(config.data.synthetic.dir or os.path.join(apm_workdir, "data"), "raw")


def prepare(apm_workdir: str, seed: int) -> tuple[str, str]:
  """Builds the demo instruction data if needed; returns ``(data_dir, image_root)``."""
  raw = synthetic_root(apm_workdir)
  paths = generator.layout(raw)
  out = os.path.join(os.path.dirname(raw), DIR_NAME)
  if not os.path.isdir(out):
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    inputs = {"mimic_dir": paths["mimic_dir"], "imagenome_dir": paths["imagenome_dir"],
              "reports_dir": paths["reports_dir"]}
    counts = {"mimic_report_gen": mimic.build_report_gen(inputs, tmp, seed=seed),
              "anatomy_grounding": mimic.build_anatomy_grounding(inputs, tmp, seed=seed),
              **instructions.build(raw, tmp, seed=seed)}
    os.replace(tmp, out)
    logging.info("demo instruction data in %s: %s", out, counts)
  return out, paths["mimic_dir"]


def configure(config: Any) -> None:
  """Fills ``data.dir`` and the default image root of a demo config (in place)."""
  data_dir, image_root = prepare(config.apm.workdir, config.seed)
  with config.unlocked():
    config.data.dir = data_dir
    if not config.data.image_roots.get("default"):
      config.data.image_roots.default = image_root
    # The synthetic data has no PadChest-GR or SLAKE counterpart: those sources leave the mix.
    for source, weight in config.data.weights.items():
      path = os.path.join(data_dir, source, f"{config.data.train_split}.jsonl")
      if weight > 0 and not os.path.isfile(path):
        logging.info("demo: no synthetic %s data; its mixture weight %s → 0", source, weight)
        config.data.weights[source] = 0.0
