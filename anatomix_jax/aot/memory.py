"""Analytic per-device memory of a Gemma3 full fine-tuning step (no compilation, nothing allocated).

A quick estimate beside ``aot.compile_check`` (which asks XLA): parameters, gradients and
optimizer state are exact for a sharding given by logical-axis rules on a mesh shape; activations
are a rough count of what the backward pass keeps (see ``estimate_memory``).
"""

from __future__ import annotations

import math
import types
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax

from anatomix_jax.core import config as config_lib
from anatomix_jax.core.sharding import fit_to_shape, unbox
from anatomix_jax.models.gemma3 import abstract_variables
from anatomix_jax.models.gemma3_config import Gemma3Config

OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd": 0, "momentum": 1, "none": 0}


def _per_device_elements(shape: Sequence[int], spec: Any, mesh_shape: Mapping[str, int]) -> int:
  """Elements of one device's shard of an array with logical partition ``spec``."""
  fitted = fit_to_shape(spec, shape, types.SimpleNamespace(shape=dict(mesh_shape)))
  n = 1
  for dim, axes in zip(shape, tuple(fitted) + (None,) * len(shape)):
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    n *= dim // math.prod(mesh_shape[a] for a in names)
  return n


def estimate_memory(config: Gemma3Config, mesh_shape: Mapping[str, int], batch: int,
                    seq_len: int, *, optimizer: str = "adamw", remat: bool | None = None,
                    rules: Sequence[tuple[str, Any]] | None = None) -> dict[str, int]:
  """Rough per-device memory of a full fine-tuning step, in bytes.

  Parameters, gradients and optimizer state are exact for the sharding that ``rules`` give on a
  mesh of ``mesh_shape`` (dimensions a mesh axis does not divide stay replicated, as in
  ``core.sharding.fit_to_shape``). Activations are a rough count of what the backward pass keeps,
  with b = ⌈batch / (data·fsdp)⌉ rows, t = seq_len, tp = the tensor axis, a = compute-dtype bytes:

    per layer (no remat): a·b·t·(8·H + 4·(N + KV)·D/tp + 4·F/tp) + 4·b·(N/tp)·t²·2
      (residual stream and its norms; q/k/v before/after norm+RoPE and the attention output;
      gate/up/activation/product; float32 scores and probabilities, materialised t×t)
    remat:  L·a·b·t·H (the layer inputs) + one layer's working set above (recomputed)
    logits: 2·4·b·t·V/tp (float32 logits and their softmax/gradient)

  Args:
    config: the model.
    mesh_shape: mesh axis name → size, e.g. ``{"data": 1, "fsdp": 8, "tensor": 1}``.
    batch: the global batch.
    seq_len: tokens per row.
    optimizer: an ``OPTIMIZER_STATES`` key (float32 moments per parameter).
    remat: per-layer rematerialisation; None: ``config.remat``.
    rules: the logical-axis rules; None: ``config_lib.DEFAULT_RULES``.

  Returns:
    ``{"params", "gradients", "optimizer", "activations", "total"}`` bytes per device.
  """
  if optimizer not in OPTIMIZER_STATES:
    raise ValueError(f"optimizer {optimizer!r} is not one of {sorted(OPTIMIZER_STATES)}")
  rules = config_lib.DEFAULT_RULES if rules is None else rules
  remat = config.remat if remat is None else remat
  variables = abstract_variables(config)
  specs = nn.get_partition_spec(variables)["params"]
  leaves = jax.tree.leaves(unbox(variables["params"]))
  spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  elements = sum(_per_device_elements(x.shape, nn.logical_to_mesh_axes(s, rules), mesh_shape)
                 for x, s in zip(leaves, spec_leaves))
  param_bytes = elements * config.params_dtype.itemsize
  get = lambda axis: int(mesh_shape.get(axis, 1))  # noqa: E731
  b = -(-batch // (get("data") * get("fsdp")))
  tp, t, a = get("tensor"), seq_len, config.compute_dtype.itemsize
  h, d, f = config.hidden_size, config.head_dim, config.intermediate_size
  n, kv = config.num_attention_heads, config.num_key_value_heads
  layer = (a * b * t * (8 * h + 4 * (n + kv) * d // tp + 4 * f // tp)
           + 4 * b * max(n // tp, 1) * t * t * 2)
  layers = config.num_hidden_layers
  acts = layers * a * b * t * h + layer if remat else layers * layer
  acts += 2 * 4 * b * t * -(-config.vocab_size // tp)
  out = {"params": param_bytes, "gradients": param_bytes,
         "optimizer": elements * 4 * OPTIMIZER_STATES[optimizer], "activations": acts}
  out["total"] = sum(out.values())
  return out
