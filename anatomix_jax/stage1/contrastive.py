"""Stage-1 contrastive alignment loss between anatomy object embeddings and their sentences.

Axis letters: B batch, A anatomies (36), N = B·A objects of the (global) batch, D embedding
width (16), E frozen text-encoder width (e.g. 768).

Reference: AnatomiX ``ContrastiveLoss`` with ``cl_loss_type: kl``, ``cl_temp: 0.01`` (multiplier
1/τ = 100), bidirectional. With ``v``, ``t``, ``r`` the L2-normalised object embeddings, text
projections and mean-pooled frozen BERT sentence embeddings::

  logits = v tᵀ / τ                        # [N, N]
  P      = softmax_row(r rᵀ / τ_target)    # soft targets, row-stochastic
  L      = ½ [KL_bm(P ‖ softmax_row(logits)) + KL_bm(Pᵀ ‖ softmax_row(logitsᵀ))]

where ``KL_bm(T ‖ q) = (1/N) Σ_ij T_ij (log T_ij − log q_ij)`` (torch ``F.kl_div(log q, T,
reduction="batchmean")``, 0·log 0 = 0). The rows of ``Pᵀ`` are columns of ``P`` and need not sum to
1; this is reproduced as is. ``kind="clip"`` replaces the soft targets by the identity (symmetric
InfoNCE).

Masking (not in the reference): objects with ``mask == 0`` are removed from the problem — their
rows and columns — so the loss equals the unmasked formula on the real objects only, normalised
by their count. Implemented with large-negative logits and zeroed targets (static shapes).

Groups (not in the reference): with ``groups`` only objects of the same group are compared — with
the anatomy index as the group, each anatomy embedding is contrasted with the same anatomy's
sentences in the other images of the batch, which is the choice the per-anatomy sentence
database makes at retrieval. Across anatomies the loss is solved by telling anatomies apart, which
the detector already does, and the embeddings barely separate a finding from "… is healthy".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import xlogy

from anatomix_jax.ops.vectors import l2_normalize

Array = jax.Array

_NEG = -1e30  # Masked logit: exp(_NEG − max) == 0 in float32, but finite (no 0·inf = NaN).
_HIGHEST = jax.lax.Precision.HIGHEST  # logits are scaled by 1/τ = 100: no bf16/tf32 matmul passes.


def _flatten(x: Array, dtype: jnp.dtype) -> Array:
  """``[..., d]`` → ``[N, d]`` in ``dtype``."""
  return x.reshape(-1, x.shape[-1]).astype(dtype)


def similarity(a: Array, b: Array, temperature: float) -> Array:
  """Scaled cosine ``a bᵀ / τ`` of unit-norm rows: ``[N, d]``, ``[N, d]`` → ``[N, N]``."""
  return jnp.matmul(a, b.T, precision=_HIGHEST) / temperature


def masked_log_softmax(logits: Array, pair_mask: Array) -> Array:
  """Row log-softmax over unmasked columns: ``[N, N]``, ``[N, N]`` (bool) → ``[N, N]``.

  Masked entries get a huge finite negative log-probability; fully masked rows are uniform.
  """
  return jax.nn.log_softmax(jnp.where(pair_mask, logits, _NEG), axis=-1)


def kl_batchmean(target: Array, log_q: Array, n: Array) -> Array:
  """``Σ_ij T_ij (log T_ij − log q_ij) / n`` with ``0·log 0 = 0``.

  Args:
    target: ``[N, N]`` targets T (zero where masked).
    log_q: ``[N, N]`` row log-probabilities.
    n: scalar normaliser (torch ``batchmean``: the number of real rows).

  Returns:
    Scalar.
  """
  return jnp.sum(xlogy(target, target) - target * log_q) / n


def soft_targets(text_pooled: Array, pair_mask: Array, temperature: float) -> Array:
  """Row-stochastic targets ``softmax_row(r rᵀ / τ)`` over real objects, zero elsewhere.

  Args:
    text_pooled: ``[N, E]`` frozen sentence embeddings (constant: no gradient).
    pair_mask: ``[N, N]`` bool, both objects real.
    temperature: τ_target.

  Returns:
    ``[N, N]``; rows of real objects sum to 1, masked rows and columns are 0.
  """
  r = l2_normalize(jax.lax.stop_gradient(text_pooled))
  log_p = masked_log_softmax(similarity(r, r, temperature), pair_mask)
  return jnp.where(pair_mask, jnp.exp(log_p), 0.0)


def contrastive_loss(obj_emb: Array, text_proj: Array, text_pooled: Array,
                     mask: Array | None = None, *, kind: str = "kl", temperature: float = 0.01,
                     target_temperature: float | None = None, bidirectional: bool = True,
                     groups: Array | None = None) -> Array:
  """Contrastive object↔sentence alignment loss over all objects of the batch.

  Args:
    obj_emb: ``[B, A, D]`` or ``[N, D]`` object embeddings.
    text_proj: ``[B, A, D]`` or ``[N, D]`` projected sentence embeddings.
    text_pooled: ``[B, A, E]`` or ``[N, E]`` mean-pooled frozen text-encoder embeddings (soft
      targets for ``kind="kl"``; unused by ``"clip"``; never differentiated).
    mask: optional ``[B, A]`` or ``[N]``, 1 for real objects; others are dropped entirely.
    kind: ``"kl"`` (soft BERT-similarity targets, the reference) or ``"clip"`` (identity targets).
    temperature: τ of the logits (multiplier 1/τ).
    target_temperature: τ of the soft targets; defaults to ``temperature``.
    bidirectional: average the object→text and text→object terms; else object→text only.
    groups: optional ``[B, A]`` or ``[N]`` ints; only pairs within one group are compared (each
      group its own softmax), e.g. the anatomy index (module docstring).

  Returns:
    Scalar loss in float32 (float64 if an input is float64 with x64 enabled). 0 if no object is
    real.
  """
  if kind not in ("kl", "clip"):
    raise ValueError(f"kind must be 'kl' or 'clip', got {kind!r}")
  dtype = jnp.result_type(jnp.float32, obj_emb.dtype, text_proj.dtype, text_pooled.dtype)
  v = l2_normalize(_flatten(obj_emb, dtype))
  t = l2_normalize(_flatten(text_proj, dtype))
  n_obj = v.shape[0]
  m = jnp.ones((n_obj,), bool) if mask is None else mask.reshape(-1).astype(bool)
  pair_mask = m[:, None] & m[None, :]
  if groups is not None:
    g = groups.reshape(-1)
    pair_mask &= g[:, None] == g[None, :]
  n_real = jnp.maximum(jnp.sum(m.astype(dtype)), 1.0)

  logits = similarity(v, t, temperature)
  if kind == "kl":
    tau_t = temperature if target_temperature is None else target_temperature
    target = soft_targets(_flatten(text_pooled, dtype), pair_mask, tau_t)
  else:
    target = jnp.where(pair_mask, jnp.eye(n_obj, dtype=dtype), 0.0)

  loss = kl_batchmean(target, masked_log_softmax(logits, pair_mask), n_real)
  if bidirectional:
    loss_t = kl_batchmean(target.T, masked_log_softmax(logits.T, pair_mask.T), n_real)
    loss = 0.5 * (loss + loss_t)
  return loss
