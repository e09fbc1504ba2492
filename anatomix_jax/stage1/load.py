"""A trained APM from a stage-1 workdir: model, variables and config, without any training data.

``load(workdir, which)`` reads only ``{workdir}/checkpoints`` (the config saved with the checkpoint
rebuilds the model), so stage 2, evaluation and prediction work where the stage-1 records and
text-embedding cache are gone. ``build`` is also what the training task uses, so both place the
state the same way.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from anatomix_jax.core import checkpointing, sharding as sharding_lib, state as state_lib
from anatomix_jax.models import apm


@dataclasses.dataclass
class APMState:
  """The model and the sharded train-state layout of one stage-1 configuration.

  Attributes:
    model: the APM module.
    tx: its optimizer (the state's shapes depend on it, not on the schedule's length).
    abstract: ``jax.ShapeDtypeStruct`` train state with shardings (the restore target).
    shardings: the matching ``NamedSharding`` tree.
    init: ``rng -> TrainState``, already sharded.
  """
  model: apm.APM
  tx: optax.GradientTransformation
  abstract: Any
  shardings: Any
  init: Any


def build(config: Any, text_dim: int, num_steps: int, mesh: Any, rules: Any) -> APMState:
  """The APM of ``config.model`` (with a text head of width ``text_dim``, 0: none) and its state."""
  model = apm.APM(dataclasses.replace(apm.APMConfig.from_config(config.model), text_dim=text_dim))
  tx = state_lib.make_optimizer(config.optim, num_steps)
  size = config.data.image_size
  init_variables = lambda rng: model.init(  # noqa: E731
      {"params": rng, "dropout": rng}, jnp.zeros((1, size, size, 1), jnp.float32), train=False)
  abstract, shardings, init = state_lib.train_state_factory(
      init_variables, tx, jax.random.key(config.seed), mesh, rules)
  return APMState(model, tx, abstract, shardings, init)


@dataclasses.dataclass
class Loaded:
  """A restored APM.

  Attributes:
    config: the stage-1 config the checkpoint was trained with.
    model: the APM (eval with ``train=False``).
    variables: ``{"params", "batch_stats"}`` for ``model.apply``.
    step: the checkpoint's step.
    meta: the checkpoint's metadata.
  """
  config: ml_collections.ConfigDict
  model: apm.APM
  variables: dict
  step: int
  meta: dict


def read_meta(workdir: str, which: str | int = "latest") -> tuple[dict, int]:
  """The metadata (incl. the training config) of checkpoint ``which`` of a stage-1 workdir, and
  its step; nothing else is read.

  Raises:
    FileNotFoundError: no such checkpoint; ValueError: the checkpoint is not a stage-1 one.
  """
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    step = ckpt.step_for(which)
    if step is None:
      raise FileNotFoundError(f"no {which!r} stage-1 checkpoint in {ckpt.directory}: train "
                              "stage 1 first (--mode=train) with that --workdir")
    meta = ckpt.read_meta(step)
  finally:
    ckpt.close()
  if meta.get("stage", "stage1") != "stage1":
    raise ValueError(f"{ckpt.directory}/{step} is a {meta['stage']} checkpoint, not stage 1")
  return meta, step


def load(workdir: str, which: str | int = "latest", mesh: Any = None) -> Loaded:
  """Restores checkpoint ``which`` ("latest", "best" or a step) of a stage-1 workdir.

  Args:
    workdir: a stage-1 workdir (only its ``checkpoints/`` is read).
    which: the checkpoint.
    mesh: where to place the state (default: the mesh of the saved config on this host's devices).

  Raises:
    FileNotFoundError: no such checkpoint; ValueError: the checkpoint is not a stage-1 one.
  """
  meta, step = read_meta(workdir, which)
  config = ml_collections.ConfigDict(meta["config"])
  mesh = sharding_lib.make_mesh(config.mesh) if mesh is None else mesh
  rules = tuple(tuple(r) for r in config.sharding_rules)
  built = build(config, int(meta.get("text_dim", 0)), int(meta.get("num_steps", 1)), mesh, rules)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    state, _ = ckpt.restore(step, built.abstract, None)
  finally:
    ckpt.close()
  return Loaded(config, built.model, {"params": state.params, "batch_stats": state.consts},
                step, meta)
