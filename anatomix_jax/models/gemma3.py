"""Gemma3 decoder-only language model: exactly the math of HF ``transformers.Gemma3ForCausalLM``.

The text model of MedGemma-4B (the AnatomiX stage-2 language model; REFERENCE.md §1.4):

  x      = embed[tokens] · √H                       (the scale rounded to the compute dtype, as HF)
  layer  = x ← x + PostAttnNorm(Attn(InputNorm(x)))
           x ← x + PostFFWNorm(Down(gelu_tanh(Gate(h)) · Up(h))),  h = PreFFWNorm(x)
  logits = softcap(FinalNorm(x) · embedᵀ)           (tied output embedding; softcap optional)

RMSNorm is ``x · rsqrt(mean(x²) + eps) · (1 + w)`` in float32, cast back to the input dtype
(HF stores ``w``; it is zero-initialised, so no ±1 conversion hooks are needed).
Attention: q/k/v projections → RMSNorm over the head dim (q_norm, k_norm) → RoPE with the layer
kind's base and linear scaling factor → scores ``q·kᵀ · query_pre_attn_scalar^-½`` with grouped
query heads (query head n reads KV head n // (N / KV), HF's ``repeat_kv``) → optional tanh
softcap (off for HF checkpoints: transformers' Gemma3 ignores ``attn_logit_softcapping``) → mask →
softmax in float32 → weighted values → output projection. ``layer_types[i]`` is
"sliding_attention" (causal, and the key's position within ``sliding_window`` of the query's:
``pos_q - pos_k < window``, HF's ``kv_idx > q_idx - sliding_window``) or "full_attention" (causal).

Masks: causality compares key and query SLOTS (the index along the sequence or KV cache), the
sliding window compares their ``positions``; ``attention_mask`` removes padded keys. For left- or
right-padded rows with positions counted over real tokens (``positions_from_mask``) this equals HF.

KV cache (``init_cache``): ``{"pos": int32[B, S], "layers_{i}": {"k", "v": [B, KV, S, D]}}`` (slots
next to head_dim, so a decode step reads each head's keys contiguously, without a transposing copy). A
call with a cache writes its T new keys/values/positions at slots ``cache_index … cache_index+T-1``
(the same offset for every row: callers left-pad prompts so rows stay aligned) and attends over all
S slots, with ``attention_mask`` [B, S] marking the filled, non-padding slots.

Parameter layout (logical axis names in parentheses; HF key in brackets):
  ``embedder/embedding`` [V, H] ('vocab', 'embed') [embed_tokens.weight];
  ``layers_{i}/attn/q_proj/kernel`` [H, N, D] ('embed', 'heads', 'kv') [self_attn.q_proj.weight],
  ``…/{k,v}_proj/kernel`` [H, KV, D] ('embed', 'kv_heads', 'kv'),
  ``…/o_proj/kernel`` [N, D, H] ('heads', 'kv', 'embed'), ``…/{q,k}_norm/scale`` [D] ('kv',);
  ``layers_{i}/mlp/{gate,up}_proj/kernel`` [H, F] ('embed', 'mlp'), ``…/down_proj/kernel`` [F, H];
  ``layers_{i}/{input,post_attention,pre_feedforward,post_feedforward}_layernorm/scale`` [H];
  ``final_norm/scale`` [H] ('embed',).
Initialisers follow HF's ``_init_weights``: N(0, 0.02) matrices and embedding (padding row 0),
zero norm weights.

Axis letters: B batch, T new tokens, S keys (T, or the cache length), H hidden size, N query
heads, KV key/value heads, G = N / KV, D head dim, F FFN size, V vocabulary, L layers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from anatomix_jax.core import config as config_lib
from anatomix_jax.models import lora as lora_lib
from anatomix_jax.models.transformer import TOKEN_AXES
from anatomix_jax.core.sharding import _fit_to_shape, unbox as _unbox

Array = jax.Array

SLIDING = "sliding_attention"
FULL = "full_attention"
LAYER_TYPES = (SLIDING, FULL)
_DTYPES = ("float32", "bfloat16", "float16")
SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh",)  # gelu with the tanh approximation
_ROPE_TYPES = ("default", "linear")
HF_TEXT_MODEL_TYPE = "gemma3_text"
HF_MULTIMODAL_MODEL_TYPE = "gemma3"
INIT_STD = 0.02  # HF initializer_range
# transformers' Gemma3TextConfig defaults (used for fields a config.json leaves out).
HF_TEXT_DEFAULTS = dict(
    vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256,
    hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131_072, rms_norm_eps=1e-6,
    pad_token_id=0, eos_token_id=1, bos_token_id=2, query_pre_attn_scalar=256,
    sliding_window=4096)


@dataclasses.dataclass(frozen=True)
class Gemma3Config:
  """Gemma3 text-model hyper-parameters (the fields of HF's ``Gemma3TextConfig`` that matter).

  Attributes:
    vocab_size: V.
    hidden_size: H.
    intermediate_size: F, the GeGLU hidden size.
    num_hidden_layers: L.
    num_attention_heads: N query heads.
    num_key_value_heads: KV heads; N must be a multiple.
    head_dim: D (not necessarily H / N).
    layer_types: L entries, "sliding_attention" or "full_attention"; None: every 6th layer full
      (HF's default pattern).
    sliding_window: keys at ``pos_q - pos_k >= sliding_window`` are masked in sliding layers.
    rms_norm_eps: RMSNorm epsilon.
    rope_local_theta: RoPE base of sliding layers.
    rope_local_factor: linear RoPE scaling factor of sliding layers (positions / factor).
    rope_global_theta: RoPE base of full-attention layers.
    rope_global_factor: linear RoPE scaling factor of full-attention layers.
    query_pre_attn_scalar: scores are scaled by ``query_pre_attn_scalar ** -0.5``.
    attn_logit_softcapping: ``tanh(s / c) · c`` on attention scores; None: off (HF's Gemma3
      ignores this setting; ``from_hf_dict`` leaves it None).
    final_logit_softcapping: the same on the output logits; None: off (HF's
      ``Gemma3ForCausalLM`` applies it, ``Gemma3ForConditionalGeneration`` does not).
    max_position_embeddings: the longest context the checkpoint was trained for (informative).
    pad_token_id: padding token (its embedding row is 0 at init).
    bos_token_id: beginning-of-sequence token.
    eos_token_id: end-of-sequence token(s).
    dtype: compute dtype name.
    param_dtype: parameter dtype name (float32 by default; bfloat16 halves the weights' memory).
    remat: recompute each decoder layer in the backward pass (``nn.remat``).
    lora: LoRA adapters on the decoder's linear layers (rank 0: none; ``models/lora.py``).
    scan_layers: run the layers as one ``nn.scan`` over parameters stacked on a leading
      ``layers`` axis (``layers/…`` instead of ``layers_{i}/…``; one compiled layer body, which
      keeps compile time flat in L). Each layer's kind picks its mask and RoPE inside the body.
      Training and full forwards only: a KV cache needs the per-layer layout
      (``unstack_layers`` converts the params).
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  layer_types: tuple[str, ...] | None = None
  sliding_window: int = 4096
  rms_norm_eps: float = 1e-6
  rope_local_theta: float = 10_000.0
  rope_local_factor: float = 1.0
  rope_global_theta: float = 1_000_000.0
  rope_global_factor: float = 1.0
  query_pre_attn_scalar: float = 256.0
  attn_logit_softcapping: float | None = None
  final_logit_softcapping: float | None = None
  max_position_embeddings: int = 131_072
  pad_token_id: int = 0
  bos_token_id: int = 2
  eos_token_id: int | tuple[int, ...] = 1
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False
  lora: lora_lib.LoraSpec = lora_lib.LoraSpec()
  scan_layers: bool = False

  def __post_init__(self):
    if self.layer_types is None:
      object.__setattr__(self, "layer_types", default_layer_types(self.num_hidden_layers))
    object.__setattr__(self, "layer_types", tuple(self.layer_types))
    if isinstance(self.eos_token_id, list):
      object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
    problems = []
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "sliding_window"):
      if getattr(self, name) < 1:
        problems.append(f"{name} must be positive, got {getattr(self, name)}")
    if not problems and self.num_attention_heads % self.num_key_value_heads:
      problems.append(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                      f"num_key_value_heads {self.num_key_value_heads}")
    if self.head_dim % 2:
      problems.append(f"head_dim {self.head_dim} must be even (RoPE rotates pairs)")
    if len(self.layer_types) != self.num_hidden_layers:
      problems.append(f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is "
                      f"{self.num_hidden_layers}")
    bad = sorted({t for t in self.layer_types if t not in LAYER_TYPES})
    if bad:
      problems.append(f"layer_types {bad} are not supported; supported: {list(LAYER_TYPES)}")
    for name in ("rope_local_theta", "rope_global_theta", "rope_local_factor",
                 "rope_global_factor", "query_pre_attn_scalar", "rms_norm_eps"):
      if not getattr(self, name) > 0:
        problems.append(f"{name} must be positive, got {getattr(self, name)}")
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
      value = getattr(self, name)
      if value is not None and not value > 0:
        problems.append(f"{name} must be positive or None, got {value}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in _DTYPES:
        problems.append(f"{name} must be one of {_DTYPES}, got {getattr(self, name)!r}")
    if problems:
      raise ValueError("invalid Gemma3Config: " + "; ".join(problems))

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def params_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)

  @property
  def num_groups(self) -> int:
    """G, query heads per KV head."""
    return self.num_attention_heads // self.num_key_value_heads

  def rope(self, layer_type: str) -> tuple[float, float]:
    """(theta, linear scaling factor) of a layer kind."""
    if layer_type == SLIDING:
      return self.rope_local_theta, self.rope_local_factor
    return self.rope_global_theta, self.rope_global_factor

  @classmethod
  def from_hf_dict(cls, d: Mapping[str, Any], **overrides: Any) -> Gemma3Config:
    """Builds the config from a HF ``config.json`` dict.

    Accepts a ``Gemma3TextConfig`` dict (model_type "gemma3_text") or a multimodal
    ``Gemma3Config`` dict (model_type "gemma3"; its ``text_config`` is used). RoPE settings come
    from ``rope_parameters`` (transformers 5) or the older ``rope_theta`` /
    ``rope_local_base_freq`` / ``rope_scaling`` fields (the scaling applies to full-attention
    layers only, as in HF). ``attn_logit_softcapping`` is ignored with a warning, because
    transformers' Gemma3 ignores it (set the field directly to use it).

    Args:
      d: the parsed ``config.json``.
      **overrides: our own fields (``dtype``, ``param_dtype``, ``remat``, ``scan_layers``).

    Returns:
      The config.

    Raises:
      ValueError: naming the offending setting (unknown model_type, unsupported activation,
        RoPE type, bidirectional attention, attention bias or untied embeddings, a missing field).
    """
    model_type = d.get("model_type")
    if model_type == HF_MULTIMODAL_MODEL_TYPE or "text_config" in d:
      text = d.get("text_config")
      if not isinstance(text, Mapping):
        raise ValueError(f"multimodal Gemma3 config (model_type {model_type!r}) has no "
                         "text_config dict")
      tied = d.get("tie_word_embeddings", text.get("tie_word_embeddings", True))
      # Token ids may sit at the top level only (e.g. eos_token_id [1, 106] in MedGemma).
      ids = {k: d[k] for k in ("pad_token_id", "bos_token_id", "eos_token_id")
             if d.get(k) is not None and text.get(k) is None}
      d = dict(text, tie_word_embeddings=tied, **ids)
      model_type = d.get("model_type", HF_TEXT_MODEL_TYPE)
    if model_type not in (None, HF_TEXT_MODEL_TYPE):
      raise ValueError(f"model_type {model_type!r} is not a Gemma3 text model (expected "
                       f"{HF_TEXT_MODEL_TYPE!r} or a {HF_MULTIMODAL_MODEL_TYPE!r} config)")
    # Absent fields take Gemma3TextConfig's defaults, as transformers does (the text_config of
    # Google's Gemma3 / MedGemma config.json files lists only the fields that differ).
    d = {**HF_TEXT_DEFAULTS, **{k: v for k, v in d.items() if v is not None}}
    act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in SUPPORTED_ACTIVATIONS:
      raise ValueError(f"hidden_activation {act!r} is not supported; supported: "
                       f"{list(SUPPORTED_ACTIVATIONS)}")
    for name in ("use_bidirectional_attention", "attention_bias"):
      if d.get(name):
        raise ValueError(f"{name}=True is not supported")
    if d.get("tie_word_embeddings", True) is False:
      raise ValueError("tie_word_embeddings=False is not supported (Gemma3 ties the output "
                       "embedding to the input embedding)")
    layer_types = d.get("layer_types")
    if layer_types is None:
      pattern = d.get("sliding_window_pattern") or d.get("_sliding_window_pattern") or 6
      layer_types = default_layer_types(d["num_hidden_layers"], pattern)
    rope = _rope_from_hf(d)
    names = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "head_dim", "sliding_window",
             "rms_norm_eps", "query_pre_attn_scalar", "max_position_embeddings", "pad_token_id",
             "bos_token_id", "eos_token_id")
    values = {name: d[name] for name in names}
    values["final_logit_softcapping"] = d.get("final_logit_softcapping")
    if d.get("attn_logit_softcapping") is not None:
      # transformers' Gemma3Attention stores the setting but never passes it to the attention
      # function, so HF checkpoints run without it; so do we, to match them.
      warnings.warn(f"attn_logit_softcapping={d['attn_logit_softcapping']} is ignored, as "
                    "transformers' Gemma3 ignores it", stacklevel=2)
    values.update(rope, layer_types=tuple(layer_types))
    values.update(overrides)
    return cls(**values)

  def to_hf_dict(self) -> dict[str, Any]:
    """A HF ``Gemma3TextConfig`` dict (``config.json`` of a ``Gemma3ForCausalLM``)."""
    rope = {}
    for kind in LAYER_TYPES:
      theta, factor = self.rope(kind)
      rope[kind] = ({"rope_type": "default", "rope_theta": theta} if factor == 1.0 else
                    {"rope_type": "linear", "rope_theta": theta, "factor": factor})
    eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
    return {
        "architectures": ["Gemma3ForCausalLM"], "model_type": HF_TEXT_MODEL_TYPE,
        "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
        "num_attention_heads": self.num_attention_heads,
        "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
        "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": self.rms_norm_eps,
        "sliding_window": self.sliding_window, "layer_types": list(self.layer_types),
        "rope_parameters": rope, "query_pre_attn_scalar": _int_if_whole(self.query_pre_attn_scalar),
        "attn_logit_softcapping": self.attn_logit_softcapping,
        "final_logit_softcapping": self.final_logit_softcapping,
        "max_position_embeddings": self.max_position_embeddings,
        "pad_token_id": self.pad_token_id, "bos_token_id": self.bos_token_id,
        "eos_token_id": eos, "tie_word_embeddings": True, "attention_bias": False,
        "attention_dropout": 0.0, "use_bidirectional_attention": False,
        "initializer_range": INIT_STD, "dtype": "float32",
    }


def default_layer_types(num_layers: int, pattern: int = 6) -> tuple[str, ...]:
  """HF's default: every ``pattern``-th layer (1-based) is full attention, the others sliding."""
  return tuple(FULL if (i + 1) % pattern == 0 else SLIDING for i in range(num_layers))


def _int_if_whole(x: float) -> int | float:
  """transformers' Gemma3TextConfig validates ``query_pre_attn_scalar`` as an int."""
  return int(x) if float(x).is_integer() else x


def _rope_from_hf(d: Mapping[str, Any]) -> dict[str, float]:
  """(theta, factor) per layer kind from ``rope_parameters`` or the pre-v5 fields."""
  params = d.get("rope_parameters")
  if params is None or not any(k in params for k in LAYER_TYPES):
    scaling = d.get("rope_scaling") or (params if params else None)
    params = {
        FULL: dict(scaling or {}, rope_theta=d.get("rope_theta", 1_000_000.0)),
        SLIDING: {"rope_type": "default", "rope_theta": d.get("rope_local_base_freq", 10_000.0)},
    }
  out = {}
  for kind, prefix, default_theta in ((SLIDING, "rope_local", 10_000.0),
                                      (FULL, "rope_global", 1_000_000.0)):
    p = params.get(kind) or {}
    rope_type = p.get("rope_type", p.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
      raise ValueError(f"rope_parameters[{kind!r}] rope_type {rope_type!r} is not supported; "
                       f"supported: {list(_ROPE_TYPES)}")
    out[f"{prefix}_theta"] = float(p.get("rope_theta", default_theta))
    out[f"{prefix}_factor"] = float(p.get("factor", 1.0)) if rope_type == "linear" else 1.0
  return out


def medgemma_4b(**overrides: Any) -> Gemma3Config:
  """The text model of MedGemma-4B (= Gemma3-4B): 34 layers, every 6th full attention."""
  values = dict(
      vocab_size=262_208, hidden_size=2560, intermediate_size=10_240, num_hidden_layers=34,
      num_attention_heads=8, num_key_value_heads=4, head_dim=256, sliding_window=1024,
      rms_norm_eps=1e-6, query_pre_attn_scalar=256.0, rope_local_theta=10_000.0,
      rope_global_theta=1_000_000.0, rope_global_factor=8.0, max_position_embeddings=131_072,
      pad_token_id=0, bos_token_id=2, eos_token_id=1)
  values.update(overrides)
  return Gemma3Config(**values)


# --- Building blocks ------------------------------------------------------------------------------

def _normal_init(axes: tuple[str | None, ...]) -> nn.initializers.Initializer:
  return nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), axes)


def softcap(x: Array, cap: float | None) -> Array:
  """``tanh(x / cap) · cap`` (identity for ``cap`` None)."""
  return x if cap is None else jnp.tanh(x / cap) * cap


def positions_from_mask(attention_mask: Array) -> Array:
  """RoPE positions counted over real tokens: int32[B, T] = max(cumsum(mask) - 1, 0).

  Works for left and right padding (padding slots get a position that is never attended to).
  """
  mask = jnp.asarray(attention_mask).astype(jnp.int32)
  return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)


def rope(x: Array, positions: Array, theta: float, factor: float) -> Array:
  """HF's rotary embedding (``rotate_half`` convention) with linear position scaling.

  Args:
    x: float[B, T, n, D].
    positions: int[B, T].
    theta: the RoPE base.
    factor: linear scaling: inverse frequencies are divided by it.

  Returns:
    float[B, T, n, D] in x's dtype (cos/sin computed in float32 and cast, as HF).
  """
  dim = x.shape[-1]
  inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim)) / factor
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, D]
  cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=-1)
  return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class RMSNorm(nn.Module):
  """Gemma RMSNorm over the last axis: ``x · rsqrt(mean(x²) + eps) · (1 + w)`` in float32.

  Attributes:
    eps: epsilon.
    axis_name: the logical name of the normalised axis (for the scale's sharding).
    param_dtype: the scale's dtype.
  """

  eps: float
  axis_name: str = "embed"
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """float[..., C] → float[..., C] in x's dtype."""
    w = self.param("scale", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                         (self.axis_name,)),
                   (x.shape[-1],), self.param_dtype)
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (y * (1.0 + w.astype(jnp.float32))).astype(x.dtype)


class Embedder(nn.Module):
  """The token embedding [V, H], used for input (scaled by √H) and tied output logits."""

  config: Gemma3Config

  def setup(self):
    cfg = self.config
    normal = nn.initializers.normal(INIT_STD)

    def init(key, shape, dtype=jnp.float32):
      table = normal(key, shape, dtype)
      return table.at[cfg.pad_token_id].set(0) if 0 <= cfg.pad_token_id < shape[0] else table

    self.embedding = self.param("embedding", nn.with_logical_partitioning(init, ("vocab", "embed")),
                                (cfg.vocab_size, cfg.hidden_size), cfg.params_dtype)

  def encode(self, tokens: Array) -> Array:
    """int[B, T] → float[B, T, H] = embedding[tokens] · √H (scale rounded to the compute dtype)."""
    dtype = self.config.compute_dtype
    x = jnp.take(self.embedding, tokens, axis=0).astype(dtype)
    return x * jnp.asarray(math.sqrt(self.config.hidden_size), dtype)

  def decode(self, x: Array) -> Array:
    """float[B, T, H] → float32[B, T, V] logits (tied weights, optional final softcap)."""
    table = self.embedding.astype(self.config.compute_dtype)
    logits = jnp.einsum("bth,vh->btv", x, table, preferred_element_type=jnp.float32)
    return softcap(logits.astype(jnp.float32), self.config.final_logit_softcapping)


class HeadsProjection(nn.Module):
  """[B, T, H] → [B, T, n, D] without bias (HF's q/k/v_proj, split by head), optional LoRA."""

  num_heads: int
  head_dim: int
  heads_axis: str
  dtype: Any
  param_dtype: Any
  lora: lora_lib.LoraSpec | None = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    axes = ("embed", self.heads_axis, "kv")
    shape = (x.shape[-1], self.num_heads, self.head_dim)
    kernel = self.param("kernel", _normal_init(axes), shape, self.param_dtype)
    y = jnp.einsum("bth,hnd->btnd", x, kernel.astype(self.dtype))
    if self.lora is not None:
      y += lora_lib.adapter(self, self.lora, x, shape[:1], shape[1:], axes[:1], axes[1:],
                            self.dtype, self.param_dtype)
    return y


class HeadsMerge(nn.Module):
  """[B, T, N, D] → [B, T, H] without bias (HF's o_proj), optional LoRA."""

  features: int
  dtype: Any
  param_dtype: Any
  lora: lora_lib.LoraSpec | None = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    axes = ("heads", "kv", "embed")
    shape = (x.shape[-2], x.shape[-1], self.features)
    kernel = self.param("kernel", _normal_init(axes), shape, self.param_dtype)
    y = jnp.einsum("btnd,ndh->bth", x, kernel.astype(self.dtype))
    if self.lora is not None:
      y += lora_lib.adapter(self, self.lora, x, shape[:2], shape[2:], axes[:2], axes[2:],
                            self.dtype, self.param_dtype)
    return y


class Dense(nn.Module):
  """Bias-free linear layer with logical axes ``axes`` for its [in, out] kernel, optional LoRA."""

  features: int
  axes: tuple[str, str]
  dtype: Any
  param_dtype: Any
  lora: lora_lib.LoraSpec | None = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    shape = (x.shape[-1], self.features)
    kernel = self.param("kernel", _normal_init(self.axes), shape, self.param_dtype)
    y = jnp.einsum("...i,io->...o", x, kernel.astype(self.dtype))
    if self.lora is not None:
      y += lora_lib.adapter(self, self.lora, x, shape[:1], shape[1:], self.axes[:1],
                            self.axes[1:], self.dtype, self.param_dtype)
    return y


def _lora_for(config: Gemma3Config, name: str) -> lora_lib.LoraSpec | None:
  return config.lora if config.lora.applies_to(name) else None


class Attention(nn.Module):
  """Gemma3 self-attention of one layer kind, with an optional KV cache.

  Attributes:
    config: the hyper-parameters.
    layer_type: "sliding_attention" or "full_attention" (picks the RoPE base and scaling; the
      caller passes the matching mask).
  """

  config: Gemma3Config
  layer_type: str | None

  @nn.compact
  def __call__(self, x: Array, positions: Array, mask: Array, cache: Mapping[str, Array] | None,
               cache_index: Array | None, is_full: Array | None = None
               ) -> tuple[Array, dict[str, Array] | None]:
    """Attends from the T new tokens over the keys.

    Args:
      x: float[B, T, H] normed hidden states.
      positions: int32[B, T] RoPE positions.
      mask: bool[B, T, S], True where query t may attend to key slot s.
      cache: None (S = T) or this layer's ``{"k", "v"}`` [B, KV, S, D].
      cache_index: int32 scalar write offset (with a cache).
      is_full: with ``layer_type`` None (scanned layers): bool scalar, full-attention layer.

    Returns:
      (float[B, T, H], the updated ``{"k", "v"}`` or None).
    """
    cfg = self.config
    dtype, pdtype = cfg.compute_dtype, cfg.params_dtype
    project = lambda n, axis, name: HeadsProjection(  # noqa: E731
        n, cfg.head_dim, axis, dtype, pdtype, _lora_for(cfg, name), name=name)(x)
    q = project(cfg.num_attention_heads, "heads", "q_proj")  # [B, T, N, D]
    k = project(cfg.num_key_value_heads, "kv_heads", "k_proj")  # [B, T, KV, D]
    v = project(cfg.num_key_value_heads, "kv_heads", "v_proj")
    q = RMSNorm(cfg.rms_norm_eps, "kv", pdtype, name="q_norm")(q)
    k = RMSNorm(cfg.rms_norm_eps, "kv", pdtype, name="k_norm")(k)
    if self.layer_type is None:  # scanned: this layer's kind is the traced flag ``is_full``
      rotate = lambda x: jnp.where(is_full, rope(x, positions, *cfg.rope(FULL)),  # noqa: E731
                                   rope(x, positions, *cfg.rope(SLIDING)))
      q, k = rotate(q), rotate(k)
    else:
      theta, factor = cfg.rope(self.layer_type)
      q, k = rope(q, positions, theta, factor), rope(k, positions, theta, factor)
    new_cache = None
    b, t = q.shape[:2]
    q = q.reshape(b, t, cfg.num_key_value_heads, cfg.num_groups, cfg.head_dim)
    keys = "bskd"  # k, v: [B, S, KV, D]
    if cache is not None:  # the cache holds [B, KV, S, D]
      keys, start = "bksd", (0, 0, cache_index, 0)
      new_cache = {name: jax.lax.dynamic_update_slice(
          cache[name], new.transpose(0, 2, 1, 3).astype(cache[name].dtype), start)
                   for name, new in (("k", k), ("v", v))}
      k, v = new_cache["k"].astype(dtype), new_cache["v"].astype(dtype)
    scores = jnp.einsum(f"btkgd,{keys}->bkgts", q, k) * jnp.asarray(
        cfg.query_pre_attn_scalar ** -0.5, dtype)
    scores = softcap(scores, cfg.attn_logit_softcapping).astype(jnp.float32)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(dtype)
    if cache is not None and t == 1:
      # One decode token: multiply-and-sum over the slots. As a dot, XLA:CPU runs it as B·KV tiny
      # [G, S]·[S, D] matmuls, which cost ~3x more per decode step.
      out = jnp.sum(weights[:, :, :, 0, :, None] * v[:, :, None], axis=-2)[:, None]  # [B,1,KV,G,D]
    else:
      out = jnp.einsum(f"bkgts,{keys}->btkgd", weights, v)
    out = out.reshape(b, t, cfg.num_attention_heads, cfg.head_dim)
    return HeadsMerge(cfg.hidden_size, dtype, pdtype, _lora_for(cfg, "o_proj"),
                      name="o_proj")(out), new_cache


class MLP(nn.Module):
  """GeGLU: down(gelu_tanh(gate(x)) · up(x))."""

  config: Gemma3Config

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    dense = lambda f, axes, name: Dense(  # noqa: E731
        f, axes, cfg.compute_dtype, cfg.params_dtype, _lora_for(cfg, name), name=name)
    gate = dense(cfg.intermediate_size, ("embed", "mlp"), "gate_proj")(x)
    up = dense(cfg.intermediate_size, ("embed", "mlp"), "up_proj")(x)
    return dense(cfg.hidden_size, ("mlp", "embed"), "down_proj")(
        jax.nn.gelu(gate, approximate=True) * up)


class DecoderLayer(nn.Module):
  """One Gemma3 decoder layer (HF ``Gemma3DecoderLayer``): sandwich norms around attention/MLP."""

  config: Gemma3Config
  layer_type: str

  @nn.compact
  def __call__(self, x: Array, positions: Array, mask: Array, cache: Mapping[str, Array] | None,
               cache_index: Array | None) -> tuple[Array, dict[str, Array] | None]:
    """float[B, T, H] → (float[B, T, H], updated layer cache or None); see ``Attention``."""
    cfg = self.config
    norm = functools.partial(RMSNorm, cfg.rms_norm_eps, "embed", cfg.params_dtype)
    h, new_cache = Attention(cfg, self.layer_type, name="attn")(
        norm(name="input_layernorm")(x), positions, mask, cache, cache_index)
    x = x + norm(name="post_attention_layernorm")(h)
    h = MLP(cfg, name="mlp")(norm(name="pre_feedforward_layernorm")(x))
    x = x + norm(name="post_feedforward_layernorm")(h)
    return nn.with_logical_constraint(x, TOKEN_AXES), new_cache


class ScannedLayer(nn.Module):
  """The ``nn.scan`` body: one decoder layer whose kind comes in as the scanned flag ``is_full``
  (selecting the mask and the RoPE base), parameters stacked on the leading ``layers`` axis."""

  config: Gemma3Config

  @nn.compact
  def __call__(self, x: Array, is_full: Array, positions: Array, full_mask: Array,
               sliding_mask: Array) -> tuple[Array, None]:
    cfg = self.config
    norm = functools.partial(RMSNorm, cfg.rms_norm_eps, "embed", cfg.params_dtype)
    mask = jnp.where(is_full, full_mask, sliding_mask)
    h, _ = Attention(cfg, None, name="attn")(norm(name="input_layernorm")(x), positions, mask,
                                             None, None, is_full)
    x = x + norm(name="post_attention_layernorm")(h)
    h = MLP(cfg, name="mlp")(norm(name="pre_feedforward_layernorm")(x))
    x = x + norm(name="post_feedforward_layernorm")(h)
    return nn.with_logical_constraint(x, TOKEN_AXES), None


def _scanned_layers(config: Gemma3Config) -> nn.Module:
  body = nn.remat(ScannedLayer) if config.remat else ScannedLayer
  return nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                 in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
                 length=config.num_hidden_layers,
                 metadata_params={nn.PARTITION_NAME: "layers"})(config, name="layers")


def stack_layers(params: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
  """Per-layer params (``layers_{i}/…``) → the scanned layout (``layers/…``, leading axis L)."""
  per_layer = [params[f"layers_{i}"] for i in range(num_layers)]
  out = {k: v for k, v in params.items() if not k.startswith("layers_")}
  out["layers"] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *per_layer)
  return out


def unstack_layers(params: Mapping[str, Any]) -> dict[str, Any]:
  """The scanned layout → per-layer params (the inverse of ``stack_layers``)."""
  stacked = params["layers"]
  num = jax.tree.leaves(stacked)[0].shape[0]
  out = {k: v for k, v in params.items() if k != "layers"}
  for i in range(num):
    out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return out


def attention_masks(attention_mask: Array, positions: Array, key_positions: Array,
                    offset: Array | int, window: int, groups: Array | None = None,
                    key_groups: Array | None = None) -> dict[str, Array]:
  """The boolean masks of both layer kinds.

  Args:
    attention_mask: [B, S], nonzero for keys that may be attended to.
    positions: int[B, T] query positions.
    key_positions: int[B, S] key positions.
    offset: the slot of the first query (0 without a cache, ``cache_index`` with one).
    window: the sliding window.
    groups / key_groups: optional int[B, T] / int[B, S]: a query and a key of the same nonzero
      group see each other regardless of order and window (HF Gemma3's bidirectional image
      attention, ``token_type_ids``: OR-ed onto the causal and sliding masks).

  Returns:
    ``{"full_attention": bool[B, T, S], "sliding_attention": bool[B, T, S]}``.
  """
  t, s = positions.shape[1], attention_mask.shape[1]
  q_slot = offset + jnp.arange(t, dtype=jnp.int32)
  causal = (jnp.arange(s, dtype=jnp.int32)[None, :] <= q_slot[:, None])[None]  # [1, T, S]
  valid = (attention_mask != 0)[:, None, :]
  near = (positions[:, :, None] - key_positions[:, None, :]) < window
  together = False
  if groups is not None:
    together = (groups[:, :, None] == key_groups[:, None, :]) & (groups != 0)[:, :, None]
  return {FULL: (causal | together) & valid, SLIDING: ((causal & near) | together) & valid}


def init_cache(config: Gemma3Config, batch: int, max_len: int,
               dtype: Any = None) -> dict[str, Any]:
  """A zero KV cache: ``{"pos": int32[B, S], "layers_{i}": {"k", "v": dtype[B, KV, S, D]}}``.

  Args:
    config: the model's config.
    batch: B.
    max_len: S, the number of slots (prompt + generated tokens).
    dtype: the keys'/values' dtype; None: the compute dtype.
  """
  dtype = config.compute_dtype if dtype is None else jnp.dtype(dtype)
  shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
  cache: dict[str, Any] = {"pos": jnp.zeros((batch, max_len), jnp.int32)}
  for i in range(config.num_hidden_layers):
    cache[f"layers_{i}"] = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
  return cache


def _check_cache(cache: Mapping[str, Any], config: Gemma3Config, batch: int, length: int,
                 cache_index: Any) -> None:
  """Static checks of a cache call (shapes, and the write range when ``cache_index`` is known)."""
  if cache_index is None:
    raise ValueError("cache_index is required with a cache (the slot of the first new token)")
  pos = cache.get("pos")
  if pos is None or pos.ndim != 2 or pos.shape[0] != batch:
    raise ValueError(f"cache['pos'] must be int32[{batch}, S], got "
                     f"{None if pos is None else pos.shape}")
  slots = pos.shape[1]
  if length > slots:
    raise ValueError(f"{length} new tokens do not fit the KV cache of {slots} slots (cache "
                     "length / max_len too small)")
  missing = [f"layers_{i}" for i in range(config.num_hidden_layers) if f"layers_{i}" not in cache]
  if missing:
    raise ValueError(f"cache lacks {', '.join(missing)}")
  want = (batch, config.num_key_value_heads, slots, config.head_dim)
  for i in range(config.num_hidden_layers):
    for kv in ("k", "v"):
      shape = tuple(cache[f"layers_{i}"][kv].shape)
      if shape != want:
        raise ValueError(f"cache['layers_{i}']['{kv}'] has shape {shape}, expected "
                         f"[B, KV, S, D] = {want} (init_cache builds it)")
  try:
    start = int(cache_index)
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError,
          TypeError):
    return  # traced under jit: the caller keeps cache_index + T within the cache
  if start < 0 or start + length > slots:
    raise ValueError(f"cache_index {start} + {length} new tokens exceeds the KV cache of "
                     f"{slots} slots")


class Gemma3(nn.Module):
  """HF ``Gemma3ForCausalLM`` in Linen.

  Attributes:
    config: the hyper-parameters.
  """

  config: Gemma3Config

  def setup(self):
    cfg = self.config
    layer_cls = nn.remat(DecoderLayer) if cfg.remat else DecoderLayer
    self.embedder = Embedder(cfg)
    if cfg.scan_layers:
      self.layers = _scanned_layers(cfg)
    else:
      self.layers = [layer_cls(cfg, kind) for kind in cfg.layer_types]
    self.final_norm = RMSNorm(cfg.rms_norm_eps, "embed", cfg.params_dtype)

  def embed(self, tokens: Array) -> Array:
    """int[B, T] → float[B, T, H], the scaled input embeddings (HF's ``inputs_embeds``)."""
    return self.embedder.encode(tokens)

  def logits(self, hidden: Array) -> Array:
    """Final-normed hidden states float[B, T, H] → float32[B, T, V] (e.g. for a chunked loss)."""
    return self.embedder.decode(hidden)

  def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> dict[str, Any]:
    """See the module-level ``init_cache`` (needs no parameters: call it on an unbound module)."""
    return init_cache(self.config, batch, max_len, dtype)

  def __call__(self, tokens: Array | None = None, *, embeddings: Array | None = None,
               positions: Array, attention_mask: Array, cache: Mapping[str, Any] | None = None,
               cache_index: Array | int | None = None, token_groups: Array | None = None,
               return_hidden: bool = False) -> tuple:
    """Runs the language model on T new tokens.

    Args:
      tokens: int[B, T] token ids, or None when ``embeddings`` are given.
      embeddings: float[B, T, H] input embeddings, already scaled (what ``embed`` returns).
      positions: int32[B, T] RoPE positions (e.g. ``positions_from_mask``).
      attention_mask: [B, S] bool/int, nonzero for real keys; S = T without a cache, the cache
        length with one (the new tokens' slots included).
      cache: None, or a cache from ``init_cache`` (previous calls' outputs).
      cache_index: int32 scalar, the slot of the first new token (same for all rows).
      token_groups: optional int[B, T]: tokens of the same nonzero group attend to each other
        bidirectionally (e.g. an image span); keys already in the cache count as group 0.
      return_hidden: also return the final-normed hidden states.

    Returns:
      ``(logits float32[B, T, V], new_cache)`` (new_cache None without a cache), plus
      ``hidden`` float[B, T, H] last when ``return_hidden`` (unused logits cost nothing under jit).

    Raises:
      ValueError: both or neither of tokens/embeddings, mismatched shapes, or new tokens that do
        not fit the cache.
    """
    cfg = self.config
    if (tokens is None) == (embeddings is None):
      raise ValueError("pass exactly one of tokens and embeddings")
    x = self.embed(tokens) if tokens is not None else embeddings.astype(cfg.compute_dtype)
    b, t = x.shape[:2]
    if positions.shape != (b, t):
      raise ValueError(f"positions has shape {positions.shape}, expected {(b, t)}")
    positions = positions.astype(jnp.int32)
    if cache is None:
      slots, key_positions, offset = t, positions, 0
    else:
      _check_cache(cache, cfg, b, t, cache_index)
      offset = jnp.asarray(cache_index, jnp.int32)
      slots = cache["pos"].shape[1]
      key_positions = jax.lax.dynamic_update_slice(cache["pos"], positions, (0, offset))
    if attention_mask.shape != (b, slots):
      raise ValueError(f"attention_mask has shape {attention_mask.shape}, expected {(b, slots)} "
                       f"({'the cache length' if cache is not None else 'the input length'})")
    key_groups = token_groups
    if token_groups is not None and cache is not None:
      key_groups = jax.lax.dynamic_update_slice(
          jnp.zeros((b, slots), jnp.int32), token_groups.astype(jnp.int32), (0, offset))
    masks = attention_masks(attention_mask, positions, key_positions, offset, cfg.sliding_window,
                            token_groups, key_groups)
    x = nn.with_logical_constraint(x, TOKEN_AXES)
    if cfg.scan_layers:
      if cache is not None:
        raise ValueError("scan_layers=True runs without a KV cache; for generation use the "
                         "per-layer layout (unstack_layers, scan_layers=False)")
      is_full = jnp.asarray([kind == FULL for kind in cfg.layer_types])
      x, _ = self.layers(x, is_full, positions, masks[FULL], masks[SLIDING])
      hidden = self.final_norm(x)
      logits = self.embedder.decode(hidden)
      return (logits, None, hidden) if return_hidden else (logits, None)
    new_cache = None if cache is None else {"pos": key_positions}
    for i, (layer, kind) in enumerate(zip(self.layers, cfg.layer_types)):
      layer_cache = None if cache is None else cache[f"layers_{i}"]
      x, updated = layer(x, positions, masks[kind], layer_cache,
                         None if cache is None else offset)
      if new_cache is not None:
        new_cache[f"layers_{i}"] = updated
    hidden = self.final_norm(x)
    logits = self.embedder.decode(hidden)
    return (logits, new_cache, hidden) if return_hidden else (logits, new_cache)


# --- Shapes, parameter counts and memory ----------------------------------------------------------

@functools.lru_cache(maxsize=16)
def abstract_variables(config: Gemma3Config) -> dict[str, Any]:
  """``Gemma3(config).init`` evaluated abstractly (boxed ShapeDtypeStructs; nothing allocated)."""
  one = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  init = lambda r, x: Gemma3(config).init(r, x, positions=x, attention_mask=x)  # noqa: E731
  return jax.eval_shape(init, jax.random.key(0), one)


def abstract_params(config: Gemma3Config) -> dict[str, Any]:
  """Our param shapes (unboxed ShapeDtypeStructs)."""
  return _unbox(abstract_variables(config)["params"])


def init_params(config: Gemma3Config, rng: Array) -> dict[str, Any]:
  """Random params (HF's init) on the default device, unboxed."""
  one = jnp.zeros((1, 1), jnp.int32)
  variables = Gemma3(config).init(rng, one, positions=one, attention_mask=one)
  return nn.unbox(variables["params"])


def init_lora_params(config: Gemma3Config, rng: Array,
                     shardings: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Fresh LoRA leaves for ``config.lora`` (A uniform, B zero), without materialising the base.

  Under ``jax.jit`` the unused base-parameter initialisers are dead code, so this costs only the
  adapters' memory even for the 4B model.

  Args:
    config: the model, with ``config.lora.rank > 0``.
    rng: init key.
    shardings: optional ``NamedSharding`` tree for the LoRA leaves (``lora.lora_leaves`` of the
      full param shardings).

  Returns:
    A nested dict holding only ``…/lora_a`` and ``…/lora_b`` leaves; merge it into base params
    with ``flax.core`` or ``add_lora_params``.
  """
  if not config.lora.rank:
    raise ValueError("config.lora.rank is 0: no adapters to initialise")

  def init(key):
    one = jnp.zeros((1, 1), jnp.int32)
    params = nn.unbox(Gemma3(config).init(key, one, positions=one, attention_mask=one)["params"])
    return lora_lib.lora_leaves(params)

  return jax.jit(init, out_shardings=shardings)(rng)


def add_lora_params(params: Mapping[str, Any], adapters: Mapping[str, Any]) -> dict[str, Any]:
  """Base params + LoRA leaves (from ``init_lora_params`` or a checkpoint) as one tree."""
  out = dict(params)
  for key, value in adapters.items():
    if isinstance(value, Mapping):
      if key not in out or not isinstance(out[key], Mapping):
        raise KeyError(f"adapter branch {key!r} has no matching module in the base params")
      out[key] = add_lora_params(out[key], value)
    else:
      out[key] = value
  return out


def param_count(config: Gemma3Config) -> int:
  """Number of parameters, from ``eval_shape`` (no allocation, fine for the 4B model)."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(config)))


OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd": 0, "momentum": 1, "none": 0}


def _per_device_elements(shape: Sequence[int], spec: Any, mesh_shape: Mapping[str, int]) -> int:
  """Elements of one device's shard of an array with logical partition ``spec``."""
  fitted = _fit_to_shape(spec, shape, types.SimpleNamespace(shape=dict(mesh_shape)))
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
  ``train.sharding``). Activations are a rough count of what the backward pass keeps, with
  b = ⌈batch / (data·fsdp)⌉ rows, t = seq_len, tp = the tensor axis, a = compute-dtype bytes:

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
  leaves = jax.tree.leaves(_unbox(variables["params"]))
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
