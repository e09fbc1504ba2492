"""The jitted stage-1 train step: sharded (2,2,2) == single device, frozen parts, NaN handling.

The tiny config keeps the demo's contrastive term on, so the text projection head and the
contrastive loss run inside the sharded step too.
"""

import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding

import tiny
from anatomix_jax.core import config as config_lib, loop, sharding, state as state_lib
from anatomix_jax.models import apm
from anatomix_jax.stage1 import steps

TEXT_DIM = 11  # width of the (fake) frozen text-encoder embeddings


def _batch(seed=0, size=64, batch=8):
  rng = np.random.default_rng(seed)
  centres, sizes = rng.uniform(0.3, 0.7, (batch, 36, 2)), rng.uniform(0.1, 0.3, (batch, 36, 2))
  mask = (rng.random((batch, 36)) > 0.1).astype(np.float32)
  # Sentence embeddings: many anatomies share a sentence, as in real data.
  table = rng.normal(size=(50, TEXT_DIM)).astype(np.float32)
  sentence_ids = rng.integers(0, 50, (batch, 36)).astype(np.int32)
  return {"text_pooled": table[sentence_ids], "sentence_ids": sentence_ids,"image": rng.random((batch, size, size, 1), np.float32),
          "boxes": np.concatenate([centres, sizes], -1).astype(np.float32), "box_mask": mask,
          "labels": rng.integers(0, 2, (batch, 14)).astype(np.float32),
          "valid": np.ones(batch, np.float32), "index": np.arange(batch, dtype=np.int32)}


def _setup(config, mesh_shape, devices):
  mesh = sharding.make_mesh(config_lib.mesh_config(mesh_shape), devices)
  rules = tuple(config.sharding_rules)
  text_dim = TEXT_DIM if config.loss.contrastive else 0
  model = apm.APM(dataclasses.replace(apm.APMConfig.from_config(config.model), text_dim=text_dim))
  tx = state_lib.make_optimizer(config.optim, 10)
  size = config.data.image_size
  init_vars = lambda r: model.init({"params": r}, np.zeros((1, size, size, 1), np.float32))  # noqa: E731
  abstract, shardings, init = state_lib.train_state_factory(init_vars, tx, jax.random.key(0), mesh,
                                                            rules)
  batch_sh = sharding.batch_sharding(mesh, rules)
  step = steps.jit_train_step(steps.make_train_step(model, tx, config.loss, config.optim), shardings, batch_sh, mesh)
  return mesh, shardings, init, batch_sh, step


def _fresh(state, shardings):
  """A new copy of ``state`` (the jitted step donates, i.e. deletes, its input state)."""
  return jax.device_put(jax.device_get(state), shardings)


@pytest.fixture(scope="module")
def single():
  # No warm-up: the first step must move the parameters (a warm-up starts at learning rate 0).
  # Adam's eps 1e-8 would make the update of a gradient entry near zero (|g| ~ 1e-8) amplify the
  # float reassociation noise of the sharded reductions by lr/eps; eps 1e-4 keeps the comparison
  # about the sharded computation rather than Adam's conditioning.
  config = tiny.config("unused", **{"loss.aux": True, "optim.warmup_steps": 0, "optim.eps": 1e-4})
  mesh, shardings, init, batch_sh, step = _setup(config, (1, 1, 1), jax.devices()[:1])
  state = init(jax.random.key(0))
  return config, mesh, shardings, state, batch_sh, step


def test_sharded_step_equals_single_device(single):
  config, mesh1, shardings1, state1, batch_sh1, step1 = single
  mesh8, shardings8, _, batch_sh8, step8 = _setup(config, (2, 2, 2), jax.devices())
  # The same initial values, laid out for the 8-device mesh (some of them actually split).
  state8 = jax.device_put(jax.device_get(state1), shardings8)
  assert any(len(s.spec) and s.spec[0] is not None for s in jax.tree.leaves(
      shardings8.params, is_leaf=lambda x: isinstance(x, NamedSharding)))
  batch = _batch()
  rng = jax.random.key(7)
  with jax.set_mesh(mesh1):
    new1, m1 = step1(_fresh(state1, shardings1),
                     sharding.host_to_global(batch, batch_sh1), rng)
  with jax.set_mesh(mesh8):
    new8, m8 = step8(state8, sharding.host_to_global(batch, batch_sh8), rng)
  np.testing.assert_allclose(float(m8["loss"]), float(m1["loss"]), rtol=1e-5)
  np.testing.assert_allclose(float(m8["contrastive"]), float(m1["contrastive"]), rtol=1e-5)
  assert float(m1["contrastive"]) > 0
  before = jax.tree.leaves(jax.device_get(state1.params))
  assert sum(not np.array_equal(a, b) for a, b in zip(before, jax.tree.leaves(jax.device_get(new1.params)))) > 10
  got = jax.tree_util.tree_leaves_with_path(jax.device_get(new8.params))
  for (path, a), b in zip(got, jax.tree.leaves(jax.device_get(new1.params))):
    name = state_lib.param_path(path)
    # Attention key biases add q·b to every key's score alike: softmax cancels it, their exact
    # gradient is 0, and Adam turns the rounding noise left in it into arbitrary tiny updates.
    if not name.endswith("key/bias"):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=name)
  # Dropout was active (train=True) and keyed by the step: the two meshes drew the same masks.
  assert float(m1["loss"]) > 0


def test_frozen_layer1_and_backbone_rate(single):
  config, mesh, shardings, state, batch_sh, step = single
  before = jax.device_get(state.params)
  with jax.set_mesh(mesh):
    new, metrics = step(_fresh(state, shardings),
                        sharding.host_to_global(_batch(1), batch_sh), jax.random.key(0))
  after = jax.device_get(new.params)
  flat_before = {state_lib.param_path(p): v for p, v in jax.tree_util.tree_leaves_with_path(before)}
  flat_after = {state_lib.param_path(p): v for p, v in jax.tree_util.tree_leaves_with_path(after)}
  frozen = [k for k in flat_before if k.startswith("backbone/layer1_")]
  assert frozen and all(np.array_equal(flat_before[k], flat_after[k]) for k in frozen)
  changed = [k for k in flat_before if not np.array_equal(flat_before[k], flat_after[k])]
  assert "backbone/conv1/kernel" in changed and "transformer/cls_token" in changed
  assert "text_projection/linear1/kernel" in changed  # the contrastive term trains the text head
  assert int(metrics["nonfinite"]) == 0


def test_nonfinite_loss_leaves_state_unchanged_and_stops_the_loop(single):
  _, mesh, shardings, state, batch_sh, step = single
  batch = _batch(2)
  batch["boxes"][0, 0, 0] = np.nan
  before = jax.device_get(state.params)
  with jax.set_mesh(mesh):
    new, metrics = step(_fresh(state, shardings),
                        sharding.host_to_global(batch, batch_sh), jax.random.key(0))
  assert int(metrics["nonfinite"]) == 1 and int(new.step) == int(state.step) + 1
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(new.params))):
    np.testing.assert_array_equal(a, b)

  class _Task:  # the parts of a core.loop.Task that the train summary reads
    num_steps = 10
    config = tiny.config("unused")
    checkpointer = type("C", (), {"latest_step": staticmethod(lambda: 4)})()

  with pytest.raises(FloatingPointError, match=r"steps 5 and 6.*checkpoint 4"):
    loop.summarize_train(_Task(), [jax.device_get(metrics)] * 2, [{}] * 2, 6, 4, 1.0)
