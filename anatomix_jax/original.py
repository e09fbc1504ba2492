"""``--mode=import`` / ``--mode=export_original`` (configs/original.py): the original AnatomiX's
checkpoint files in and out, through ``stage1.original`` (APM + sentence database) and
``stage2.original`` (the LM's LoRA, embedding table and projection heads)."""

from __future__ import annotations

import os
from typing import Any

from absl import logging

from anatomix_jax.stage1 import original as stage1_original
from anatomix_jax.stage2 import original as stage2_original


def run_import(config: Any, workdir: str) -> dict[str, Any]:
  """The given original files → ``{workdir}/stage1`` and/or ``{workdir}/stage2``."""
  if not (config.apm_checkpoint or config.lm_checkpoint):
    raise ValueError("--mode=import needs --config.apm_checkpoint and/or --config.lm_checkpoint")
  if config.emb_db and not config.apm_checkpoint:
    raise ValueError("config.emb_db is imported with its APM: set config.apm_checkpoint too")
  written: dict[str, Any] = {}
  apm_workdir = config.stage1_workdir
  if config.apm_checkpoint:
    apm_workdir = os.path.join(workdir, "stage1")
    written["stage1"] = stage1_original.import_apm(
        config.apm_checkpoint, apm_workdir, emb_db_path=config.emb_db or None)
  if config.lm_checkpoint:
    if not apm_workdir:
      raise ValueError("a stage-2 import needs an APM: config.apm_checkpoint (imported with it) "
                       "or config.stage1_workdir")
    if not config.lm_model_dir:
      raise ValueError("a stage-2 import needs config.lm_model_dir (the local MedGemma/Gemma3 "
                       "directory the original was trained from)")
    written["stage2"] = stage2_original.import_lm(
        config.lm_checkpoint, config.lm_model_dir, apm_workdir, os.path.join(workdir, "stage2"),
        table=config.lm_table)
  logging.info("imported: %s", written)
  return written


def run_export(config: Any, workdir: str) -> dict[str, Any]:
  """Workdirs trained here → the original's file kinds under ``workdir``."""
  if not (config.stage1_workdir or config.stage2_workdir):
    raise ValueError("--mode=export_original needs --config.stage1_workdir and/or "
                     "--config.stage2_workdir")
  os.makedirs(workdir, exist_ok=True)
  written: dict[str, Any] = {}
  if config.stage1_workdir:
    written["stage1"] = stage1_original.export_apm(config.stage1_workdir, workdir)
  if config.stage2_workdir:
    written["stage2"] = stage2_original.export_lm(config.stage2_workdir,
                                                  os.path.join(workdir, "model.pt"))
  logging.info("exported: %s", written)
  return written
