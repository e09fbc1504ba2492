"""Gemma3 decoder-only language model: exactly the math of HF ``transformers.Gemma3ForCausalLM``.

The text model of MedGemma-4B (the AnatomiX stage-2 language model; REFERENCE.md §1.4):

  x      = embed[tokens] · √H                       (the scale rounded to the compute dtype, as HF)
  layer  = x ← x + PostAttnNorm(Attn(InputNorm(x)))
           x ← x + PostFFWNorm(Down(gelu_tanh(Gate(h)) · Up(h))),  h = PreFFWNorm(x)
  logits = softcap(FinalNorm(x) · embedᵀ)           (tied output embedding; softcap optional;
                                                     untied: ``lm_head`` instead of embed)

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
  ``embedder/lm_head`` [V, H] ('vocab', 'embed') [lm_head.weight], only if untied;
  ``layers_{i}/attn/q_proj/kernel`` [H, N, D] ('embed', 'heads', 'kv') [self_attn.q_proj.weight],
  ``…/{k,v}_proj/kernel`` [H, KV, D] ('embed', 'kv_heads', 'kv'),
  ``…/o_proj/kernel`` [N, D, H] ('heads', 'kv', 'embed'), ``…/{q,k}_norm/scale`` [D] ('kv',);
  ``layers_{i}/mlp/{gate,up}_proj/kernel`` [H, F] ('embed', 'mlp'), ``…/down_proj/kernel`` [F, H];
  ``layers_{i}/{input,post_attention,pre_feedforward,post_feedforward}_layernorm/scale`` [H];
  ``final_norm/scale`` [H] ('embed',).
Initialisers follow HF's ``_init_weights``: N(0, 0.02) matrices and embedding (padding row 0),
zero norm weights.

The config (``Gemma3Config``, HF ``config.json`` parsing) is in ``models.gemma3_config``; its
public names are re-exported here. Memory estimates are in ``aot.memory``.

Axis letters: B batch, T new tokens, S keys (T, or the cache length), H hidden size, N query
heads, KV key/value heads, G = N / KV, D head dim, F FFN size, V vocabulary, L layers.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from anatomix_jax.core.sharding import unbox
from anatomix_jax.models import attention as attention_lib, lora as lora_lib
# The config lives in gemma3_config; its public names are re-exported here for existing callers.
from anatomix_jax.models.gemma3_config import (  # noqa: F401
    FULL, HF_MULTIMODAL_MODEL_TYPE, HF_TEXT_DEFAULTS, HF_TEXT_MODEL_TYPE, INIT_STD, LAYER_TYPES,
    SLIDING, SUPPORTED_ACTIVATIONS, Gemma3Config, default_layer_types, medgemma_4b)
from anatomix_jax.models.transformer import TOKEN_AXES

Array = jax.Array


# --- Building blocks ------------------------------------------------------------------------------

def _normal_init(axes: tuple[str | None, ...]) -> nn.initializers.Initializer:
  return nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), axes)


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
  """The token embedding [V, H], used for input (scaled by √H) and, tied, for the output logits;
  with ``tie_word_embeddings=False`` the logits use a separate table ``lm_head`` [V, H] (HF's
  ``lm_head.weight``, initialised N(0, 0.02) as HF's linear layers)."""

  config: Gemma3Config

  def setup(self):
    cfg = self.config
    normal = nn.initializers.normal(INIT_STD)

    def init(key, shape, dtype=jnp.float32):
      table = normal(key, shape, dtype)
      return table.at[cfg.pad_token_id].set(0) if 0 <= cfg.pad_token_id < shape[0] else table

    self.embedding = self.param("embedding", nn.with_logical_partitioning(init, ("vocab", "embed")),
                                (cfg.vocab_size, cfg.hidden_size), cfg.params_dtype)
    if not cfg.tie_word_embeddings:
      self.lm_head = self.param("lm_head", _normal_init(("vocab", "embed")),
                                (cfg.vocab_size, cfg.hidden_size), cfg.params_dtype)

  def encode(self, tokens: Array) -> Array:
    """int[B, T] → float[B, T, H] = embedding[tokens] · √H (scale rounded to the compute dtype)."""
    dtype = self.config.compute_dtype
    x = jnp.take(self.embedding, tokens, axis=0).astype(dtype)
    return x * jnp.asarray(math.sqrt(self.config.hidden_size), dtype)

  def decode(self, x: Array) -> Array:
    """float[B, T, H] → float32[B, T, V] logits (the tied table or ``lm_head``, optional final
    softcap)."""
    table = self.embedding if self.config.tie_word_embeddings else self.lm_head
    table = table.astype(self.config.compute_dtype)
    logits = jnp.einsum("bth,vh->btv", x, table, preferred_element_type=jnp.float32)
    return attention_lib.apply_softcap(logits.astype(jnp.float32),
                                       self.config.final_logit_softcapping)


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
               cache_index: Array | None, is_full: Array | None = None,
               valid: Array | None = None) -> tuple[Array, dict[str, Array] | None]:
    """Attends from the T new tokens over the keys.

    Args:
      x: float[B, T, H] normed hidden states.
      positions: int32[B, T] RoPE positions.
      mask: bool[B, T, S], True where query t may attend to key slot s.
      cache: None (S = T) or this layer's ``{"k", "v"}`` [B, KV, S, D].
      cache_index: int32 scalar write offset (with a cache).
      is_full: with ``layer_type`` None (scanned layers): bool scalar, full-attention layer.
      valid: [B, T] nonzero for real tokens, where ``mask`` is the plain causal/sliding padding
        mask (no cache, no bidirectional spans): ``config.attention``'s kernel may serve the
        call (``models.attention``); None: the XLA path with ``mask``.

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
    scale, softcap = cfg.query_pre_attn_scalar ** -0.5, cfg.attn_logit_softcapping
    if cache is None:
      def fused(window):
        return attention_lib.attend(q, k, v, mask, valid, kind=cfg.attention, scale=scale,
                                    window=window, softcap=softcap)
      if self.layer_type is None and valid is not None and attention_lib.resolve(
          cfg.attention) != "xla":  # scanned: the kernel's mask is static, pick it per kind
        out = jax.lax.cond(is_full, lambda: fused(None)[0],
                           lambda: fused(cfg.sliding_window)[0])
        weights = None
      else:
        out, weights = fused(cfg.sliding_window if self.layer_type == SLIDING else None)
      new_cache = None
    else:  # the cache holds [B, KV, S, D]
      new_cache = {name: jax.lax.dynamic_update_slice(
          cache[name], new.transpose(0, 2, 1, 3).astype(cache[name].dtype),
          (0, 0, cache_index, 0)) for name, new in (("k", k), ("v", v))}
      out, weights = attention_lib.xla_attention(
          q.reshape(*q.shape[:2], cfg.num_key_value_heads, cfg.num_groups, cfg.head_dim),
          new_cache["k"].astype(dtype), new_cache["v"].astype(dtype), mask, scale=scale,
          softcap=softcap, keys="bksd")
    if weights is not None:
      # Diagnostics only (``stage2.diagnose``): the attention weights [B, KV, G, T, S] are kept
      # when ``apply(..., mutable=["intermediates"])`` asks for them; otherwise a no-op.
      self.sow("intermediates", "attention_weights", weights)
    b, t = q.shape[:2]
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
               cache_index: Array | None, valid: Array | None = None
               ) -> tuple[Array, dict[str, Array] | None]:
    """float[B, T, H] → (float[B, T, H], updated layer cache or None); see ``Attention``."""
    cfg = self.config
    norm = functools.partial(RMSNorm, cfg.rms_norm_eps, "embed", cfg.params_dtype)
    h, new_cache = Attention(cfg, self.layer_type, name="attn")(
        norm(name="input_layernorm")(x), positions, mask, cache, cache_index, valid=valid)
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
               sliding_mask: Array, valid: Array | None) -> tuple[Array, None]:
    cfg = self.config
    norm = functools.partial(RMSNorm, cfg.rms_norm_eps, "embed", cfg.params_dtype)
    mask = jnp.where(is_full, full_mask, sliding_mask)
    h, _ = Attention(cfg, None, name="attn")(norm(name="input_layernorm")(x), positions, mask,
                                             None, None, is_full, valid)
    x = x + norm(name="post_attention_layernorm")(h)
    h = MLP(cfg, name="mlp")(norm(name="pre_feedforward_layernorm")(x))
    x = x + norm(name="post_feedforward_layernorm")(h)
    return nn.with_logical_constraint(x, TOKEN_AXES), None


def _scanned_layers(config: Gemma3Config) -> nn.Module:
  body = nn.remat(ScannedLayer) if config.remat else ScannedLayer
  return nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                 in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
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
    # A fused kernel may serve full-sequence calls whose mask is plain causal/sliding + padding.
    valid = attention_mask if cache is None and token_groups is None else None
    x = nn.with_logical_constraint(x, TOKEN_AXES)
    if cfg.scan_layers:
      if cache is not None:
        raise ValueError("scan_layers=True runs without a KV cache; for generation use the "
                         "per-layer layout (unstack_layers, scan_layers=False)")
      is_full = jnp.asarray([kind == FULL for kind in cfg.layer_types])
      x, _ = self.layers(x, is_full, positions, masks[FULL], masks[SLIDING], valid)
      hidden = self.final_norm(x)
      logits = self.embedder.decode(hidden)
      return (logits, None, hidden) if return_hidden else (logits, None)
    new_cache = None if cache is None else {"pos": key_positions}
    for i, (layer, kind) in enumerate(zip(self.layers, cfg.layer_types)):
      layer_cache = None if cache is None else cache[f"layers_{i}"]
      x, updated = layer(x, positions, masks[kind], layer_cache,
                         None if cache is None else offset, valid)
      if new_cache is not None:
        new_cache[f"layers_{i}"] = updated
    hidden = self.final_norm(x)
    logits = self.embedder.decode(hidden)
    return (logits, new_cache, hidden) if return_hidden else (logits, new_cache)


# --- Shapes and parameter counts ------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def abstract_variables(config: Gemma3Config) -> dict[str, Any]:
  """``Gemma3(config).init`` evaluated abstractly (boxed ShapeDtypeStructs; nothing allocated)."""
  one = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  init = lambda r, x: Gemma3(config).init(r, x, positions=x, attention_mask=x)  # noqa: E731
  return jax.eval_shape(init, jax.random.key(0), one)


def abstract_params(config: Gemma3Config) -> dict[str, Any]:
  """Our param shapes (unboxed ShapeDtypeStructs)."""
  return unbox(abstract_variables(config)["params"])


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
