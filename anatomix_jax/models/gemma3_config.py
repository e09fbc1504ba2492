"""Gemma3 text-model configuration: ``Gemma3Config`` and the Hugging Face ``config.json`` mapping.

``Gemma3Config`` holds the fields of HF's ``Gemma3TextConfig`` that ``models.gemma3.Gemma3`` uses,
plus our own (dtypes, remat, LoRA, scanned layers). ``Gemma3Config.from_hf_dict`` reads a
``Gemma3TextConfig`` or multimodal ``Gemma3Config`` dict (absent fields take ``HF_TEXT_DEFAULTS``,
RoPE settings from ``rope_parameters`` or the pre-v5 fields); ``to_hf_dict`` writes one back.
``medgemma_4b`` is the text model of MedGemma-4B.

Layer kinds: ``SLIDING`` ("sliding_attention", causal within ``sliding_window``) and ``FULL``
("full_attention", causal); ``default_layer_types`` is HF's every-6th-layer-full pattern.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from anatomix_jax.models import lora as lora_lib
from anatomix_jax.models.attention import KINDS as ATTENTION_KINDS
from anatomix_jax.models.transformer import DTYPES

SLIDING = "sliding_attention"
FULL = "full_attention"
LAYER_TYPES = (SLIDING, FULL)
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
    tie_word_embeddings: the output logits use the input embedding table (Gemma3's default);
      False: a separate output table ``embedder/lm_head`` [V, H] (HF's ``lm_head.weight``, e.g.
      PEFT's ``modules_to_save`` copies trained apart).
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
    attention: how attention is computed (``models.attention.KINDS``): "xla" (einsums, any
      mask), "splash" (Pallas kernel, TPU), "cudnn" (GPU) or "auto" (the platform's kernel).
      The kernels serve full-sequence calls; generation always takes the XLA path.
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
  tie_word_embeddings: bool = True
  max_position_embeddings: int = 131_072
  pad_token_id: int = 0
  bos_token_id: int = 2
  eos_token_id: int | tuple[int, ...] = 1
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False
  lora: lora_lib.LoraSpec = lora_lib.LoraSpec()
  scan_layers: bool = False
  attention: str = "xla"

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
      if getattr(self, name) not in DTYPES:
        problems.append(f"{name} must be one of {DTYPES}, got {getattr(self, name)!r}")
    if self.attention not in ATTENTION_KINDS:
      problems.append(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
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
        RoPE type, bidirectional attention, attention bias, a missing field, or
        ``tie_word_embeddings=True`` overriding an untied config: untying a tied one is allowed).
    """
    model_type = d.get("model_type")
    if model_type == HF_MULTIMODAL_MODEL_TYPE or "text_config" in d:
      text = d.get("text_config")
      if not isinstance(text, Mapping):
        raise ValueError(f"multimodal Gemma3 config (model_type {model_type!r}) has no "
                         "text_config dict")
      tied = hf_ties_embeddings(d)
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
    if overrides.get("tie_word_embeddings") and not hf_ties_embeddings(d):
      raise ValueError("tie_word_embeddings=True cannot override an untied config (its separate "
                       "lm_head would be dropped)")
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
    values["tie_word_embeddings"] = hf_ties_embeddings(d)
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
        "eos_token_id": eos, "tie_word_embeddings": self.tie_word_embeddings,
        "attention_bias": False, "attention_dropout": 0.0, "use_bidirectional_attention": False,
        "initializer_range": INIT_STD, "dtype": "float32",
    }


def hf_ties_embeddings(d: Mapping[str, Any]) -> bool:
  """HF's ``tie_word_embeddings`` of a ``config.json`` dict (default True). A multimodal config's
  top-level value wins over its ``text_config``'s, as in ``Gemma3ForConditionalGeneration``."""
  value = d.get("tie_word_embeddings")
  if value is None and isinstance(d.get("text_config"), Mapping):
    value = d["text_config"].get("tie_word_embeddings")
  return True if value is None else bool(value)


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
