"""Train state, optimizer (with freezing and per-group learning rates by masks) and sharded init."""

from __future__ import annotations

import re
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from anatomix_jax.core import sharding as sharding_lib


@flax.struct.dataclass
class TrainState:
  """Everything a training step reads and writes.

  Attributes:
    step: scalar int32, number of updates applied.
    params: trainable (and optimizer-frozen) parameters.
    consts: non-trained model variables (the frozen BatchNorm statistics, collection ``batch_stats``).
    opt_state: optimizer state.
  """
  step: jax.Array
  params: Any
  consts: Any
  opt_state: Any


def param_path(path: tuple) -> str:
  """'/'-joined dictionary keys of a pytree path (box wrappers such as ``.value`` are skipped)."""
  return "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def param_groups(params: Any, optim_cfg: Any) -> Any:
  """Tree of group labels for ``params``: ``frozen``, ``backbone`` or ``default``."""
  frozen = [re.compile(p) for p in optim_cfg.frozen]
  backbone = re.compile(optim_cfg.backbone) if optim_cfg.backbone else None

  def label(path, _):
    name = param_path(path)
    if any(p.search(name) for p in frozen):
      return "frozen"
    if backbone is not None and backbone.search(name):
      return "backbone"
    return "default"

  return jax.tree_util.tree_map_with_path(label, params)


def learning_rate_schedule(peak: float, optim_cfg: Any, num_steps: int) -> optax.Schedule:
  """Constant (the reference) or warm-up + cosine decay to 0 over ``num_steps``."""
  warmup = int(optim_cfg.warmup_steps)
  if optim_cfg.schedule == "constant":
    body = optax.constant_schedule(peak)
  elif optim_cfg.schedule == "cosine":
    body = optax.cosine_decay_schedule(peak, max(num_steps - warmup, 1))
  else:
    raise ValueError(f"optim.schedule={optim_cfg.schedule!r}: expected 'constant' or 'cosine'")
  if warmup <= 0:
    return body
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), body], [warmup])


def make_optimizer(optim_cfg: Any, num_steps: int) -> optax.GradientTransformation:
  """AdamW per group after zeroing frozen gradients and clipping the global norm (REFERENCE.md §2).

  Frozen parameters get no gradient and no Adam state, as in the reference where they have
  ``requires_grad=False`` (so they also do not count in the clipped norm).
  """
  def adamw(peak):
    return optax.adamw(learning_rate_schedule(peak, optim_cfg, num_steps), b1=optim_cfg.b1,
                       b2=optim_cfg.b2, eps=optim_cfg.eps, weight_decay=optim_cfg.weight_decay)

  groups = lambda params: param_groups(params, optim_cfg)  # noqa: E731
  frozen_mask = lambda params: jax.tree.map(lambda g: g == "frozen", groups(params))  # noqa: E731
  return optax.chain(
      optax.masked(optax.set_to_zero(), frozen_mask),
      optax.clip_by_global_norm(optim_cfg.clip_norm) if optim_cfg.clip_norm > 0 else optax.identity(),
      optax.multi_transform({"frozen": optax.set_to_zero(), "backbone": adamw(optim_cfg.backbone_lr),
                             "default": adamw(optim_cfg.lr)}, groups),
  )


def train_state_factory(init_variables: Callable[[jax.Array], dict],
                        tx: optax.GradientTransformation, rng: jax.Array, mesh: Mesh, rules: Any
                        ) -> tuple[TrainState, TrainState, Callable[[jax.Array], TrainState]]:
  """Abstract train state, its shardings, and a jitted init that creates it already sharded.

  Nothing is allocated until the returned init is called, so a resumed run restores straight into
  the sharded layout and a fresh run never holds the whole state on one device.

  Args:
    init_variables: ``rng -> variables`` of the model (``params`` boxed with logical axis names,
      optional ``batch_stats``).
    tx: the optimizer.
    rng: an example PRNG key (only its shape and type are used here).
    mesh, rules: device mesh and logical-axis rules.

  Returns:
    ``(abstract_state, shardings, init)``: ``jax.ShapeDtypeStruct`` leaves carrying their
    shardings (the restore target), the matching tree of ``NamedSharding``, and ``rng -> state``.
  """
  def init(rng):
    variables = init_variables(rng)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      consts=variables.get("batch_stats", {}), opt_state=tx.init(params))

  boxed = jax.eval_shape(init, rng)
  shardings = sharding_lib.logical_shardings(boxed, mesh, rules)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nn.unbox(boxed), shardings)

  def sharded_init(rng):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)(rng)

  return abstract, shardings, sharded_init
