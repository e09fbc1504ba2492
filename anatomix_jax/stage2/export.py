"""``--mode=export`` for stage 2: a checkpoint → files other tools load.

Writes, under ``{workdir}/export/step_{N}/``:
  ``lm/``          the language model with LoRA merged and the trained embedding table, as a
                   Hugging Face ``Gemma3ForCausalLM`` directory (config.json, model.safetensors) plus
                   the tokenizer — ``transformers.AutoModelForCausalLM.from_pretrained`` loads it;
  ``adapter/``     a PEFT adapter (finetune checkpoints): the LoRA matrices and the trained embedding
                   table as ``modules_to_save``, so ``peft.PeftModel.from_pretrained(base, adapter)``
                   equals ``lm/``;
  ``projection_heads.safetensors``  the image/object projection heads in the reference's naming
                   (``image_projectionhead.proj.{0,2,3}.{weight,bias}``, torch layout).
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from safetensors.numpy import save_file

from anatomix_jax.convert import hf_gemma3
from anatomix_jax.stage2 import task

# our head → the reference's module name (src/models/LM.py: MultiModalProjectionhead.proj)
HEAD_NAMES = {"image_projection": "image_projectionhead", "object_projection": "obj_projectionhead"}


def projection_head_tensors(params: Any) -> dict[str, np.ndarray]:
  """Our two heads → the reference's state-dict tensors (Linear weights transposed to [out, in])."""
  out = {}
  for ours, theirs in HEAD_NAMES.items():
    head = jax.device_get(params[ours])
    for index, layer in (("0", "fc_in"), ("3", "fc_out")):
      out[f"{theirs}.proj.{index}.weight"] = np.ascontiguousarray(head[layer]["kernel"].T)
      out[f"{theirs}.proj.{index}.bias"] = np.asarray(head[layer]["bias"])
    out[f"{theirs}.proj.2.weight"] = np.asarray(head["norm"]["scale"])
    out[f"{theirs}.proj.2.bias"] = np.asarray(head["norm"]["bias"])
  return out


def export(config: Any, workdir: str) -> dict:
  """Exports the latest checkpoint of a stage-2 workdir; returns the written paths."""
  run = task.Stage2Task(config, workdir, needs_data=False)
  try:
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
      params, step = run.restore_params()
  finally:
    run.checkpointer.close()
  out_dir = os.path.join(workdir, "export", f"step_{step}")
  lm_dir = os.path.join(out_dir, "lm")
  hf_gemma3.export_gemma3(params["lm"], run.model_config.lm, lm_dir)
  run.tok.tokenizer.save_pretrained(lm_dir)
  written = {"lm": lm_dir}
  if run.model_config.lm.lora.rank:
    written["adapter"] = hf_gemma3.export_peft_adapter(
        params["lm"], run.model_config.lm, os.path.join(out_dir, "adapter"),
        base_model=os.path.abspath(run.base_dir), embedding="embedding" in run.groups)
  heads = os.path.join(out_dir, "projection_heads.safetensors")
  save_file(projection_head_tensors(params), heads, metadata={"format": "pt"})
  written["projection_heads"] = heads
  logging.info("exported step %d: %s", step, written)
  return {"step": step, **written}
