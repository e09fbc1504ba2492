"""Vector helpers shared by the contrastive loss (stage 1) and RAG retrieval, in JAX."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

NORM_EPS = 1e-12  # torch F.normalize default.


def l2_normalize(x: Array, eps: float = NORM_EPS) -> Array:
  """``x / max(‖x‖, eps)`` along the last axis, with a finite gradient at ``x = 0``.

  Args:
    x: ``[..., d]`` (e.g. ``[N, d]``).
    eps: lower bound on the norm (torch ``F.normalize`` semantics).

  Returns:
    ``[..., d]`` rows of unit norm (zero rows stay zero).
  """
  sq = jnp.sum(x * x, axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))
