"""Pure stage-1 step functions and their jitted, sharded forms.

``train_step(state, batch, rng) -> (state, metrics)``; ``eval_step(state, batch) -> (outputs, parts)``.
Batch keys (global arrays, B = global batch): ``image [B, H, W, 1]``, ``boxes [B, N, 4]``,
``box_mask [B, N]``, ``labels [B, C]``, ``valid [B]``, ``index [B]``, and with the contrastive
term ``text_pooled [B, N, D_text]`` (the frozen encoder's sentence embeddings).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from anatomix_jax.stage1 import losses
from anatomix_jax.core.state import TrainState, param_groups


def _apply(model: nn.Module, params: Any, consts: Any, batch: dict, **kwargs) -> dict:
  return model.apply({"params": params, "batch_stats": consts}, batch["image"],
                     text_pooled=batch.get("text_pooled"), **kwargs)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, loss_cfg: Any,
                    optim_cfg: Any) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]:
  """Builds the pure training step (losses as ``loss_cfg`` configures, extra terms included).

  Frozen parameters (``optim_cfg.frozen``) enter the loss through ``stop_gradient``, so XLA never
  computes their weight gradients (the optimizer would discard them anyway).

  A step whose loss or gradient is not finite leaves params and optimizer state unchanged (the
  step counter still advances, keeping data and dropout streams aligned) and reports
  ``nonfinite = 1``; the loop stops with an error on it, so a NaN never reaches a checkpoint.
  """
  extra_terms = losses.configured_terms(loss_cfg)

  def train_step(state: TrainState, batch: dict, rng: jax.Array) -> tuple[TrainState, dict]:
    dropout_rng = jax.random.fold_in(rng, state.step)
    groups = param_groups(state.params, optim_cfg)

    def loss_fn(params):
      params = jax.tree.map(lambda p, g: jax.lax.stop_gradient(p) if g == "frozen" else p,
                            params, groups)
      outputs = _apply(model, params, state.consts, batch, train=True, rngs={"dropout": dropout_rng})
      return losses.stage1_losses(outputs, batch, loss_cfg, extra_terms)

    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state, guard = apply_if_finite(state, tx, loss, grads)
    return new_state, {**parts, **guard}

  return train_step


def apply_if_finite(state: Any, tx: optax.GradientTransformation, loss: jax.Array,
                    grads: Any) -> tuple[Any, dict]:
  """One optimizer update of ``state.params``/``state.opt_state``, kept only if the loss and the
  gradient norm are finite; the step counter advances either way.

  Returns:
    ``(new_state, {"grad_norm", "nonfinite"})``.
  """
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
  new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                            opt_state=keep(opt_state, state.opt_state))
  return new_state, {"grad_norm": grad_norm, "nonfinite": 1 - finite.astype(jnp.int32)}


def make_eval_step(model: nn.Module, loss_cfg: Any) -> Callable[[TrainState, dict], tuple[dict, dict]]:
  """Builds the pure evaluation step: predictions for metrics plus the loss parts of the batch."""
  extra_terms = losses.configured_terms(loss_cfg)

  def eval_step(state: TrainState, batch: dict) -> tuple[dict, dict]:
    outputs = _apply(model, state.params, state.consts, batch, train=False)
    _, parts = losses.stage1_losses(outputs, batch, loss_cfg, extra_terms)
    keep = ("boxes", "image_logits", "anatomy_embeddings")
    return {k: outputs[k] for k in keep}, parts

  return eval_step


def jit_train_step(train_step: Callable, state_shardings: Any, batch_sharding: NamedSharding,
                   mesh: Mesh) -> Callable:
  """``jax.jit`` with explicit in/out shardings and the state donated (pjit)."""
  replicated = NamedSharding(mesh, P())
  return jax.jit(train_step, in_shardings=(state_shardings, batch_sharding, replicated),
                 out_shardings=(state_shardings, replicated), donate_argnums=0)


def jit_eval_step(eval_step: Callable, state_shardings: Any, batch_sharding: NamedSharding) -> Callable:
  """``jax.jit`` of the eval step; outputs keep the batch sharding, nothing is donated."""
  replicated = NamedSharding(batch_sharding.mesh, P())
  return jax.jit(eval_step, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(batch_sharding, replicated))
