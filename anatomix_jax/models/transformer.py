"""DETR post-norm transformer with a prepended CLS token (the reference's ``TransformerWithCLS``).

Exactly the math of the reference (REFERENCE.md §1.2; ``src/models/transformer.py`` at e33cfc1):

  encoder input  = [cls_token; src] with positions [cls_pos; sine(H, W)]   (1 + HW tokens)
  encoder layer  = x ← LN(x + Drop(SelfAttn(q = k = x + pos, v = x)));  x ← LN(x + Drop(FFN(x)))
                   (no final encoder norm)
  memory         = encoder output without token 0; token 0 is the CLS embedding
  decoder input  = zeros, query positions = learned query embeddings
  decoder layer  = t ← LN(t + Drop(SelfAttn(q = k = t + qpos, v = t)))
                   t ← LN(t + Drop(CrossAttn(q = t + qpos, k = memory + pos, v = memory)))
                   t ← LN(t + Drop(FFN(t)))
  decoder output = the shared final LayerNorm applied to every layer's output (intermediates)

The decoder never sees the CLS token or its position. FFN = Linear → ReLU → Dropout → Linear.
Attention is ``torch.nn.MultiheadAttention``: per-head projections of the model dim (head-major
feature order), softmax(q·kᵀ/√d_head) with dropout on the weights, then an output projection.

Parameter layout (logical axis names in parentheses):
  ``{self_attn,cross_attn}/{query,key,value}/kernel`` [D, heads, d_head] ('embed', 'heads', 'kv'),
  ``…/bias`` [heads, d_head]; ``…/out/kernel`` [heads, d_head, D]; ``linear{1,2}/kernel``
  [D, F] / [F, D] ('embed', 'mlp'); LayerNorms ``norm{1,2,3}/{scale,bias}`` ('embed').

Axis letters: B batch, H/W spatial, L tokens, N queries, D model dim, F FFN hidden dim.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

TOKEN_AXES = ("activation_batch", "activation_length", "activation_embed")
LN_EPS = 1e-5  # torch.nn.LayerNorm default
DTYPES = ("float32", "bfloat16", "float16")  # the compute/param dtype names models accept


# --- PyTorch-equivalent initialisers -------------------------------------------------------------

def uniform_init(bound: float) -> nn.initializers.Initializer:
  """U(−bound, bound), whatever the shape (fan sizes are decided by the caller, as in torch)."""

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def xavier_bound(fan_in: int, fan_out: int) -> float:
  """Bound of torch's ``xavier_uniform_`` for a tensor with these fans."""
  return math.sqrt(6.0 / (fan_in + fan_out))


def torch_linear_init(fan_in: int) -> nn.initializers.Initializer:
  """torch's default Linear/Conv weight and bias init: U(−1/√fan_in, 1/√fan_in)."""
  return uniform_init(1.0 / math.sqrt(fan_in))


def layer_norm(name: str, dtype: Dtype) -> nn.LayerNorm:
  """torch-equivalent LayerNorm (eps 1e-5, two-pass variance) with logical axis names."""
  return nn.LayerNorm(
      epsilon=LN_EPS, use_fast_variance=False, dtype=dtype, param_dtype=jnp.float32,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)), name=name)


def dense(features: int, fan_in: int, axes: tuple[str, str], name: str, dtype: Dtype,
          kernel_init: nn.initializers.Initializer | None = None) -> nn.Dense:
  """Linear layer; default init is torch's Linear default (kernel and bias U(±1/√fan_in))."""
  default = torch_linear_init(fan_in)
  return nn.Dense(
      features, dtype=dtype, param_dtype=jnp.float32,
      kernel_init=nn.with_logical_partitioning(kernel_init or default, axes),
      bias_init=nn.with_logical_partitioning(default, (axes[1],)), name=name)


# --- Position encoding ----------------------------------------------------------------------------

def sine_position_encoding(height: int, width: int, dim: int, temperature: float = 10000.0,
                           scale: float = 2 * math.pi) -> Array:
  """DETR's ``PositionEmbeddingSine(dim // 2, normalize=True)`` for an unpadded H×W map.

  Row and column indices (1-based cumulative sums of the all-valid mask) are normalised to
  (0, 2π]; feature j of each half is sin (j even) or cos (j odd) of ``coord / T^(2⌊j/2⌋/F)``.

  Args:
    height: H.
    width: W.
    dim: D, the model dim; must be divisible by 4 (two halves with sin/cos pairs).
    temperature: T.
    scale: the range the normalised coordinates are scaled to.

  Returns:
    float32[H·W, D], rows in row-major (h, w) order, features [pos_y; pos_x].
  """
  if dim % 4:
    raise ValueError(f"sine position encoding needs a model dim divisible by 4, got {dim}")
  feats = dim // 2
  eps = 1e-6
  y = jnp.arange(1, height + 1, dtype=jnp.float32) / (height + eps) * scale  # [H]
  x = jnp.arange(1, width + 1, dtype=jnp.float32) / (width + eps) * scale  # [W]
  dim_t = temperature ** (2 * (jnp.arange(feats) // 2).astype(jnp.float32) / feats)  # [F]
  even = (jnp.arange(feats) % 2) == 0

  def encode(coord):  # [n] → [n, F]
    angle = coord[:, None] / dim_t
    return jnp.where(even, jnp.sin(angle), jnp.cos(angle))

  pos_y = jnp.broadcast_to(encode(y)[:, None, :], (height, width, feats))
  pos_x = jnp.broadcast_to(encode(x)[None, :, :], (height, width, feats))
  return jnp.concatenate([pos_y, pos_x], axis=-1).reshape(height * width, dim)


# --- Attention ------------------------------------------------------------------------------------

class HeadsProjection(nn.Module):
  """[B, L, D] → [B, L, heads, d_head] (one of torch's packed q/k/v projections, split by head).

  Parameters are declared directly rather than through ``nn.DenseGeneral``, whose flattening init
  would apply a 3-axis logical constraint to a 2-D array under a mesh.
  """

  num_heads: int
  head_dim: int
  kernel_init: nn.initializers.Initializer
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """float[B, L, D] → float[B, L, heads, d_head]."""
    shape = (x.shape[-1], self.num_heads, self.head_dim)
    kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init,
                                                               ("embed", "heads", "kv")),
                        shape, jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                           ("heads", "kv")), shape[1:], jnp.float32)
    y = jnp.einsum("bld,dhk->blhk", x.astype(self.dtype), kernel.astype(self.dtype))
    return y + bias.astype(self.dtype)


class HeadsMerge(nn.Module):
  """[B, L, heads, d_head] → [B, L, D] (torch's ``out_proj`` over the concatenated heads)."""

  features: int
  kernel_init: nn.initializers.Initializer
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """float[B, L, heads, d_head] → float[B, L, D]."""
    shape = (x.shape[-2], x.shape[-1], self.features)
    kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init,
                                                               ("heads", "kv", "embed")),
                        shape, jnp.float32)
    bias_init = nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",))
    bias = self.param("bias", bias_init, (self.features,), jnp.float32)
    return jnp.einsum("blhk,hkd->bld", x, kernel.astype(self.dtype)) + bias.astype(self.dtype)


class MultiHeadAttention(nn.Module):
  """``torch.nn.MultiheadAttention`` (batch-first, no masks) with split q/k/v parameters.

  Attributes:
    num_heads: heads; the model dim must divide evenly.
    dropout: dropout rate on the attention weights.
    out_kernel_init: init of the output projection (torch's MHA default or the transformer's xavier).
    dtype: compute dtype.
  """

  num_heads: int
  dropout: float = 0.0
  out_kernel_init: nn.initializers.Initializer | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, query: Array, key: Array, value: Array, deterministic: bool = True) -> Array:
    """Attends from ``query`` float[B, Lq, D] over ``key``/``value`` float[B, Lk, D] → [B, Lq, D]."""
    d_model = query.shape[-1]
    if d_model % self.num_heads:
      raise ValueError(f"model dim {d_model} is not divisible by {self.num_heads} heads")
    head_dim = d_model // self.num_heads
    # torch initialises the packed [3D, D] in_proj with xavier: fans (D, 3D); biases are zero.
    in_init = uniform_init(xavier_bound(d_model, 3 * d_model))
    project = lambda x, name: HeadsProjection(  # noqa: E731
        self.num_heads, head_dim, in_init, self.dtype, name=name)(x)
    q = project(query, "query") * jnp.asarray(head_dim ** -0.5, self.dtype)  # [B, Lq, h, d]
    k = project(key, "key")
    v = project(value, "value")
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    if self.dropout > 0.0:
      weights = nn.Dropout(self.dropout)(weights, deterministic=deterministic)
    heads = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    out_init = self.out_kernel_init or torch_linear_init(d_model)
    return HeadsMerge(d_model, out_init, self.dtype, name="out")(heads)


# --- Layers ---------------------------------------------------------------------------------------

class FeedForward(nn.Module):
  """Linear(D→F) → ReLU → Dropout → Linear(F→D), xavier-initialised kernels as in the reference."""

  ffn_dim: int
  dropout: float = 0.1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    """float[B, L, D] → float[B, L, D]."""
    d_model = x.shape[-1]
    xavier = uniform_init(xavier_bound(d_model, self.ffn_dim))
    h = dense(self.ffn_dim, d_model, ("embed", "mlp"), "linear1", self.dtype, xavier)(x)
    h = nn.Dropout(self.dropout)(nn.relu(h), deterministic=deterministic)
    return dense(d_model, self.ffn_dim, ("mlp", "embed"), "linear2", self.dtype, xavier)(h)


def _transformer_attention(num_heads: int, dropout: float, d_model: int, name: str,
                           dtype: Dtype) -> MultiHeadAttention:
  # TransformerWithCLS re-initialises every matrix (out_proj included) with xavier.
  return MultiHeadAttention(num_heads, dropout, uniform_init(xavier_bound(d_model, d_model)), dtype,
                            name=name)


class EncoderLayer(nn.Module):
  """DETR post-norm encoder layer (``TransformerEncoderLayer.forward_post``)."""

  num_heads: int
  ffn_dim: int
  dropout: float = 0.1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, pos: Array, deterministic: bool) -> Array:
    """Encodes ``x`` float[B, L, D] with positions ``pos`` float[B or 1, L, D] → [B, L, D]."""
    d_model = x.shape[-1]
    drop = lambda y: nn.Dropout(self.dropout)(y, deterministic=deterministic)  # noqa: E731
    q = x + pos
    attn = _transformer_attention(self.num_heads, self.dropout, d_model, "self_attn", self.dtype)
    x = layer_norm("norm1", self.dtype)(x + drop(attn(q, q, x, deterministic)))
    ffn = FeedForward(self.ffn_dim, self.dropout, self.dtype, name="ffn")(x, deterministic)
    x = layer_norm("norm2", self.dtype)(x + drop(ffn))
    return nn.with_logical_constraint(x, TOKEN_AXES)


class DecoderLayer(nn.Module):
  """DETR post-norm decoder layer (``TransformerDecoderLayer.forward_post``)."""

  num_heads: int
  ffn_dim: int
  dropout: float = 0.1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tgt: Array, memory: Array, pos: Array, query_pos: Array,
               deterministic: bool) -> Array:
    """Decodes ``tgt`` float[B, N, D] against ``memory`` float[B, L, D].

    ``pos`` float[1, L, D] are the memory positions, ``query_pos`` float[1, N, D] the query ones.
    """
    d_model = tgt.shape[-1]
    drop = lambda y: nn.Dropout(self.dropout)(y, deterministic=deterministic)  # noqa: E731
    q = tgt + query_pos
    self_attn = _transformer_attention(self.num_heads, self.dropout, d_model, "self_attn",
                                       self.dtype)
    tgt = layer_norm("norm1", self.dtype)(tgt + drop(self_attn(q, q, tgt, deterministic)))
    cross_attn = _transformer_attention(self.num_heads, self.dropout, d_model, "cross_attn",
                                        self.dtype)
    attended = cross_attn(tgt + query_pos, memory + pos, memory, deterministic)
    tgt = layer_norm("norm2", self.dtype)(tgt + drop(attended))
    ffn = FeedForward(self.ffn_dim, self.dropout, self.dtype, name="ffn")(tgt, deterministic)
    tgt = layer_norm("norm3", self.dtype)(tgt + drop(ffn))
    return nn.with_logical_constraint(tgt, TOKEN_AXES)


class TransformerWithCLS(nn.Module):
  """Encoder with a prepended learned CLS token + decoder over learned queries.

  Parameters: ``cls_token``, ``cls_pos`` [1, 1, D] (xavier, as the reference overwrites their randn
  init), ``encoder_layer_{i}``, ``decoder_layer_{i}``, ``decoder_norm``.

  Attributes:
    num_heads: attention heads.
    enc_layers: encoder layers.
    dec_layers: decoder layers.
    ffn_dim: F.
    dropout: dropout rate (residual branches, FFN hidden, attention weights).
    dtype: compute dtype.
    remat: rematerialise each layer in the backward pass.
  """

  num_heads: int = 4
  enc_layers: int = 4
  dec_layers: int = 4
  ffn_dim: int = 1024
  dropout: float = 0.1
  dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, src: Array, pos: Array, query_pos: Array,
               deterministic: bool = True) -> tuple[Array, Array, Array]:
    """Runs encoder and decoder.

    Args:
      src: float[B, L, D] flattened feature tokens (row-major over H, W).
      pos: float[L, D] their position encodings.
      query_pos: float[N, D] learned query embeddings (used as query positions).
      deterministic: disables dropout.

    Returns:
      ``(hs, memory, cls)``: hs float[L_dec, B, N, D] (every decoder layer's output after the final
      decoder norm), memory float[B, L, D] (encoder output without CLS), cls float[B, D].
    """
    batch, _, d_model = src.shape
    token_init = nn.with_logical_partitioning(
        uniform_init(xavier_bound(d_model, d_model)), (None, None, "embed"))
    cls_token = self.param("cls_token", token_init, (1, 1, d_model), jnp.float32)
    cls_pos = self.param("cls_pos", token_init, (1, 1, d_model), jnp.float32)
    pos = pos.astype(self.dtype)[None]
    query_pos = query_pos.astype(self.dtype)[None]

    encoder_cls = nn.remat(EncoderLayer, static_argnums=(3,)) if self.remat else EncoderLayer
    decoder_cls = nn.remat(DecoderLayer, static_argnums=(5,)) if self.remat else DecoderLayer

    cls_tokens = jnp.broadcast_to(cls_token.astype(self.dtype), (batch, 1, d_model))
    x = jnp.concatenate([cls_tokens, src.astype(self.dtype)], axis=1)
    x = nn.with_logical_constraint(x, TOKEN_AXES)
    enc_pos = jnp.concatenate([cls_pos.astype(self.dtype), pos], axis=1)
    for i in range(self.enc_layers):
      x = encoder_cls(self.num_heads, self.ffn_dim, self.dropout, self.dtype,
                      name=f"encoder_layer_{i}")(x, enc_pos, deterministic)
    cls, memory = x[:, 0], x[:, 1:]
    memory = nn.with_logical_constraint(memory, TOKEN_AXES)

    # The decoder sees the memory and positions WITHOUT the CLS token.
    tgt = jnp.zeros((batch, query_pos.shape[1], d_model), self.dtype)
    decoder_norm = layer_norm("decoder_norm", self.dtype)
    hs = []
    for i in range(self.dec_layers):
      tgt = decoder_cls(self.num_heads, self.ffn_dim, self.dropout, self.dtype,
                        name=f"decoder_layer_{i}")(tgt, memory, pos, query_pos, deterministic)
      hs.append(decoder_norm(tgt))
    return jnp.stack(hs), memory, cls
