"""LoRA (Hu et al. 2021) as extra leaves of a linear layer's param dict, PEFT's math and init.

A targeted linear map ``y = x · W`` (``W`` with input dims I… and output dims O…, e.g. q_proj's
[H, N, D]) gains ``lora_a`` [I…, r] and ``lora_b`` [r, O…] beside its ``kernel``:

  y = x · W + dropout(x) · A · B · (alpha / r)

``A`` starts as PEFT's ``kaiming_uniform_(a=√5)`` (uniform ±1/√fan_in), ``B`` as zeros, so a fresh
adapter leaves the model's outputs unchanged. Dropout (on the adapter's input only, as PEFT's
``lora_dropout``) is active when the caller provides a ``"dropout"`` rng and the rate is positive,
so evaluation and generation are deterministic without extra flags.

The leaves sit in the same dict as the kernel (``…/q_proj/{kernel, lora_a, lora_b}``), so an
optimizer mask or a checkpoint filter selects them by name (``is_lora_path``), and ``merge``
folds them into the kernels for export.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# PEFT's target_modules="all-linear" on a Gemma3 decoder (the output embedding is tied and not a
# LoRA target; AnatomiX trains it fully instead).
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_LEAVES = ("lora_a", "lora_b")


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """LoRA hyper-parameters (PEFT ``LoraConfig`` fields).

  Attributes:
    rank: r; 0 disables LoRA.
    alpha: the update is scaled by ``alpha / rank``.
    dropout: dropout rate on the adapter input.
    targets: names of the linear layers that get adapters (``ALL_LINEAR`` = PEFT's "all-linear").
  """

  rank: int = 0
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = ALL_LINEAR

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(self.targets))
    if self.rank < 0:
      raise ValueError(f"LoRA rank must be >= 0, got {self.rank}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
    unknown = sorted(set(self.targets) - set(ALL_LINEAR))
    if unknown:
      raise ValueError(f"LoRA targets {unknown} are not linear layers of the decoder; "
                       f"choose from {list(ALL_LINEAR)}")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank if self.rank else 0.0

  def applies_to(self, name: str) -> bool:
    return self.rank > 0 and name in self.targets


def _kaiming_uniform(fan_in: int):
  """PEFT/torch ``kaiming_uniform_(a=√5)``: uniform(−1/√fan_in, 1/√fan_in)."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def adapter(module: nn.Module, spec: LoraSpec, x: Array, in_shape: Sequence[int],
            out_shape: Sequence[int], in_axes: Sequence[str | None],
            out_axes: Sequence[str | None], dtype: Any, param_dtype: Any) -> Array:
  """The LoRA update of a linear layer; call inside the layer's ``@nn.compact`` method.

  Args:
    module: the linear layer (its ``lora_a``/``lora_b`` params are created on it).
    spec: the LoRA settings.
    x: float[..., *in_shape], the layer input.
    in_shape / out_shape: the kernel's input and output dims (I…, O…).
    in_axes / out_axes: their logical axis names (the rank axis is never sharded).
    dtype: compute dtype.
    param_dtype: dtype of the new params.

  Returns:
    float[..., *out_shape] = dropout(x) · A · B · alpha / r.
  """
  in_shape, out_shape = tuple(in_shape), tuple(out_shape)
  a = module.param("lora_a", nn.with_logical_partitioning(
      _kaiming_uniform(math.prod(in_shape)), tuple(in_axes) + (None,)),
                   in_shape + (spec.rank,), param_dtype)
  b = module.param("lora_b", nn.with_logical_partitioning(
      nn.initializers.zeros_init(), (None,) + tuple(out_axes)), (spec.rank,) + out_shape,
                   param_dtype)
  if spec.dropout > 0 and module.has_rng("dropout"):
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - spec.dropout, x.shape)
    x = jnp.where(keep, x / (1.0 - spec.dropout), 0).astype(x.dtype)
  xa = jnp.tensordot(x, a.astype(dtype), axes=len(in_shape))  # [..., r]
  return jnp.tensordot(xa, b.astype(dtype), axes=1) * jnp.asarray(spec.scale, dtype)


def is_lora_path(path: Sequence[Any]) -> bool:
  """True for a param path (tuple of keys / key entries) that ends in a LoRA leaf."""
  last = path[-1]
  return getattr(last, "key", last) in LORA_LEAVES


def merge(params: Mapping[str, Any], spec: LoraSpec) -> dict[str, Any]:
  """Folds every adapter into its kernel: ``W + (alpha / r) · A · B``; drops the LoRA leaves.

  Args:
    params: a param tree with LoRA leaves (host or device arrays).
    spec: the settings the adapters were trained with (for the scale).

  Returns:
    A param tree of the same structure without ``lora_a``/``lora_b``; merged kernels keep their
    dtype (the product is formed in float32).
  """
  out: dict[str, Any] = {}
  for key, value in params.items():
    if not isinstance(value, Mapping):
      out[key] = value
      continue
    if "lora_a" in value:
      kernel = value["kernel"]
      a = jnp.asarray(value["lora_a"], jnp.float32)
      b = jnp.asarray(value["lora_b"], jnp.float32)
      if a.ndim + b.ndim - 2 == kernel.ndim + 1:  # stacked over scanned layers: [L, …]
        delta = jax.vmap(lambda x, y: jnp.tensordot(x, y, axes=1))(a, b)
      else:
        delta = jnp.tensordot(a, b, axes=1)
      merged = jnp.asarray(kernel, jnp.float32) + spec.scale * delta
      rest = {k: v for k, v in value.items() if k not in LORA_LEAVES and k != "kernel"}
      out[key] = dict(rest, kernel=merged.astype(kernel.dtype))
    else:
      out[key] = merge(value, spec)
  return out


def lora_leaves(params: Mapping[str, Any]) -> dict[str, Any]:
  """Only the LoRA leaves of a param tree (nested dicts, empty branches dropped)."""
  out: dict[str, Any] = {}
  for key, value in params.items():
    if isinstance(value, Mapping):
      sub = lora_leaves(value)
      if sub:
        out[key] = sub
    elif key in LORA_LEAVES:
      out[key] = value
  return out


def num_params(params: Mapping[str, Any]) -> int:
  """Number of LoRA parameters in a tree."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(lora_leaves(params)))
