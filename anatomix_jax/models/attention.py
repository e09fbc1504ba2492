"""Gemma3's masked softmax attention, by XLA einsums or by a fused kernel (``lm.attention``).

One function, ``attend``, computes ``softmax(softcap(q·kᵀ·scale) + mask)·v`` with grouped query
heads for the decoder (``models.gemma3``), choosing among:
  * ``"xla"``: einsums and a float32 softmax over the materialised [B, KV, G, T, S] scores. Any
    mask (KV cache, bidirectional image spans); the parity reference; what runs on CPU.
  * ``"splash"``: the Pallas splash-attention kernel (TPU; ``jax.experimental.pallas.ops.tpu.
    splash_attention``), blockwise with an online softmax, never materialising the scores. Its
    mask is static: causal (full-attention layers) or causal within the sliding window, AND-ed
    with segment ids that keep padding apart. On other platforms it runs in Pallas interpret
    mode (slow; for parity tests).
  * ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (cuDNN flash
    attention on NVIDIA GPUs): causal, the sliding window as ``local_window_size``, padding as
    per-row key lengths (rows must be right-padded, as the training batches are). Elsewhere the
    same call with XLA's implementation (for parity tests).
  * ``"auto"``: splash on TPU, cudnn on GPU, xla otherwise (``resolve``).
The fused kernels serve full-sequence calls (training, scoring) with the causal/sliding masks;
calls with a KV cache (generation), bidirectional image spans (``token_groups``), an attention
softcap under cudnn, or a sequence the kernel's blocks do not tile fall back to ``"xla"`` (same
result, more memory).

The mask semantics are the decoder's (``gemma3.attention_masks``): causal by slot, sliding window
``pos_q - pos_k < window`` (on right- or left-padded rows equal to the slot distance among real
tokens), padded keys removed. Query rows at padded slots differ between implementations (they are
never read: their loss weight is 0).

Axis letters as in ``models.gemma3``: B batch, T queries, S keys, N query heads, KV key/value
heads, G = N / KV, D head dim.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

Array = jax.Array
KINDS = ("auto", "xla", "splash", "cudnn")
# Splash's block edge (queries and keys): 512 is what MaxText uses on v5; sequences not a multiple
# of SPLASH_MIN_BLOCK fall back to XLA.
SPLASH_BLOCK = 512
SPLASH_MIN_BLOCK = 128


def apply_softcap(x: Array, cap: float | None) -> Array:
  """``tanh(x / cap) · cap`` (identity for ``cap`` None)."""
  return x if cap is None else jnp.tanh(x / cap) * cap


def check_kind(kind: str) -> str:
  """``kind`` if it is one of ``KINDS``, else ValueError naming ``lm.attention``."""
  if kind not in KINDS:
    raise ValueError(f"lm.attention must be one of {KINDS}, got {kind!r}")
  return kind


def platform() -> str:
  """The platform the program is being built for: the current mesh's (``jax.set_mesh``; a TPU
  topology when compiling ahead of time on a CPU host), else JAX's default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else mesh.abstract_device
  return device.platform if device is not None else jax.default_backend()


def resolve(kind: str, on: str | None = None) -> str:
  """``"auto"`` → the fused kernel of platform ``on`` (default ``platform()``); others unchanged."""
  if check_kind(kind) != "auto":
    return kind
  return {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn"}.get(on or platform(), "xla")


def xla_attention(q: Array, k: Array, v: Array, mask: Array, *, scale: float,
                  softcap: float | None, keys: str = "bskd") -> tuple[Array, Array]:
  """The einsum path.

  Args:
    q: [B, T, KV, G, D] (already rotated).
    k, v: [B, S, KV, D] (``keys="bskd"``) or [B, KV, S, D] (``"bksd"``, the KV cache layout).
    mask: bool[B, T, S], True where query t may attend to key s.
    scale: multiplies the scores (``query_pre_attn_scalar ** -0.5``).
    softcap: ``tanh(s / c) · c`` on the scaled scores; None: off.

  Returns:
    ``(out [B, T, KV, G, D], weights [B, KV, G, T, S])`` (the weights for diagnostics).
  """
  dtype = q.dtype
  scores = jnp.einsum(f"btkgd,{keys}->bkgts", q, k) * jnp.asarray(scale, dtype)
  scores = apply_softcap(scores, softcap).astype(jnp.float32)
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(scores, axis=-1).astype(dtype)
  if q.shape[1] == 1 and keys == "bksd":
    # One decode token: multiply-and-sum over the slots. As a dot, XLA:CPU runs it as B·KV tiny
    # [G, S]·[S, D] matmuls, which cost ~3x more per decode step.
    out = jnp.sum(weights[:, :, :, 0, :, None] * v[:, :, None], axis=-2)[:, None]
  else:
    out = jnp.einsum(f"bkgts,{keys}->btkgd", weights, v)
  return out, weights


def splash_supported(t: int) -> bool:
  """Whether splash's blocks tile a sequence of ``t`` tokens."""
  return t % SPLASH_MIN_BLOCK == 0


def _splash_kernel(heads: int, t: int, window: int | None, softcap: float | None,
                   interpret: bool):
  # pylint: disable=import-outside-toplevel
  from jax.experimental.pallas.ops.tpu.splash_attention import (
      splash_attention_kernel as kernel_lib, splash_attention_mask as mask_lib)
  if window is None:
    one = mask_lib.CausalMask((t, t))
  else:  # splash's window is inclusive: (left, right) = (window - 1, 0) keeps q - k < window
    one = mask_lib.LocalMask((t, t), (window - 1, 0), offset=0)
  block = max(b for b in (SPLASH_BLOCK, 256, SPLASH_MIN_BLOCK) if t % b == 0)
  sizes = kernel_lib.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                                block_q_dkv=block, block_kv_dkv=block,
                                block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  # Made inside each trace, not cached: the kernel holds its mask's block tables as arrays, which
  # are that trace's values (and cannot be made concrete on a mesh of compile-only devices).
  kernel = kernel_lib.make_splash_mha(
      mask_lib.MultiHeadMask([one] * heads), block_sizes=sizes, head_shards=1, q_seq_shards=1,
      attn_logits_soft_cap=softcap, interpret=interpret)
  return kernel, kernel_lib.SegmentIds


def _mesh_specs(batch: int, heads: int, kv_heads: int) -> tuple[object, P, P, P] | None:
  """(mesh, q spec [B, N, T, D], kv spec [B, KV, T, D], segment spec [B, T]) from the logical
  rules, or None without a multi-device mesh. An axis that does not divide its dimension (e.g. a
  scoring batch of one) is left unsharded there."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return None

  def axis(name: str, size: int):
    names = nn.logical_to_mesh_axes((name,))[0]
    parts = (names,) if isinstance(names, str) else tuple(names or ())
    shards = int(np.prod([mesh.shape[n] for n in parts])) if parts else 1
    return names if size % shards == 0 else None

  rows, kv_axis = axis("activation_batch", batch), axis("kv_heads", kv_heads)
  # Query heads split only alongside their KV heads (or a single KV head): each shard's kernel
  # maps its local query head i to local KV head i // G.
  q_axis = axis("heads", heads) if kv_axis is not None or kv_heads == 1 else None
  return (mesh, P(rows, q_axis, None, None), P(rows, kv_axis, None, None), P(rows, None))


def splash_attention(q: Array, k: Array, v: Array, valid: Array, *, scale: float,
                     window: int | None, softcap: float | None = None,
                     interpret: bool | None = None) -> Array:
  """Splash attention over a full sequence.

  Args:
    q: [B, T, N, D] (rotated); k, v: [B, T, KV, D].
    valid: [B, T] nonzero for real tokens (segment 1; padding is segment 0).
    scale: the score scale (applied to q: the kernel does not scale).
    window: the sliding window, or None for full causal attention.
    softcap: the attention logit softcap, or None.
    interpret: run the kernel in Pallas interpret mode; None: unless the platform is TPU.

  Returns:
    [B, T, N, D].
  """
  b, t, n, d = q.shape
  if interpret is None:
    interpret = platform() != "tpu"
  segments = (valid != 0).astype(jnp.int32)
  q = (q * jnp.asarray(scale, q.dtype)).transpose(0, 2, 1, 3)
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  specs = _mesh_specs(b, n, k.shape[1])

  def run(q, k, v, segments):
    kernel, segment_ids = _splash_kernel(q.shape[1], t, window, softcap, interpret)
    one = lambda q, k, v, s: kernel(q, k, v, segment_ids=segment_ids(s, s))  # noqa: E731
    return jax.vmap(one)(q, k, v, segments)

  if specs is None:
    out = run(q, k, v, segments)
  else:  # the kernel is a custom call XLA cannot partition: run it per shard
    mesh, q_spec, kv_spec, segment_spec = specs
    out = jax.shard_map(run, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, segment_spec),
                        out_specs=q_spec, check_vma=False)(q, k, v, segments)
  return out.transpose(0, 2, 1, 3)


def cudnn_attention(q: Array, k: Array, v: Array, valid: Array, *, scale: float,
                    window: int | None, implementation: str | None = None) -> Array:
  """``jax.nn.dot_product_attention`` over a full, right-padded sequence.

  Args:
    q: [B, T, N, D] (rotated); k, v: [B, T, KV, D].
    valid: [B, T] nonzero for real tokens, which come first in each row.
    scale: the score scale.
    window: the sliding window, or None for full causal attention.
    implementation: "cudnn", "xla" (JAX's reference, for tests); None: cudnn on GPU, else xla.

  Returns:
    [B, T, N, D].
  """
  if implementation is None:
    implementation = "cudnn" if platform() in ("gpu", "cuda") else "xla"
  lengths = jnp.sum(valid != 0, axis=-1).astype(jnp.int32)
  return jax.nn.dot_product_attention(
      q, k, v, scale=scale, is_causal=True, key_value_seq_lengths=lengths,
      local_window_size=None if window is None else (window - 1, 0),
      implementation=implementation)


def attend(q: Array, k: Array, v: Array, mask: Array, valid: Array | None, *, kind: str,
           scale: float, window: int | None, softcap: float | None
           ) -> tuple[Array, Array | None]:
  """Attention by ``kind`` (``resolve``d), falling back to XLA where the kernel cannot serve.

  Args:
    q: [B, T, N, D]; k, v: [B, S, KV, D] (S = T: no cache).
    mask: bool[B, T, S], the full mask (the XLA path's; unused, hence free, under a kernel).
    valid: [B, S] nonzero for real keys, given only when ``mask`` is the plain causal/sliding
      padding mask (no KV cache, no bidirectional spans), which the kernels can build; None: XLA.
    kind: ``KINDS``.
    window: the layer's sliding window (None: a full-attention layer).

  Returns:
    ``(out [B, T, N, D], weights [B, KV, G, T, S] or None under a kernel)``.
  """
  kind = resolve(kind)
  b, t, n, d = q.shape
  fused_ok = valid is not None
  if fused_ok and kind == "splash" and splash_supported(t):
    return splash_attention(q, k, v, valid, scale=scale, window=window, softcap=softcap), None
  if fused_ok and kind == "cudnn" and softcap is None:
    return cudnn_attention(q, k, v, valid, scale=scale, window=window), None
  kv = k.shape[2]
  out, weights = xla_attention(q.reshape(b, t, kv, n // kv, d), k, v, mask, scale=scale,
                               softcap=softcap)
  return out.reshape(b, t, n, d), weights

