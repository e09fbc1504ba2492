"""Gemma3 on a (2, 2, 2) data/fsdp/tensor mesh: forward and one AdamW step equal one device.

(Separate from test_gemma3.py to keep each file's compile time under a minute.)
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from anatomix_jax.core import config as config_lib
from anatomix_jax.models import gemma3
from anatomix_jax.core import sharding

S, F = "sliding_attention", "full_attention"
# Even sizes, so that the tensor axis really splits the vocabulary, heads and MLP.
SHARDED = dict(vocab_size=134, hidden_size=24, intermediate_size=38, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=5,
               layer_types=(S, F), rope_local_theta=100.0, rope_global_theta=1000.0,
               rope_global_factor=8.0, query_pre_attn_scalar=11)


def _loss(model, params, ids, mask):
  logits, _ = model.apply({"params": params}, ids, positions=gemma3.positions_from_mask(mask),
                          attention_mask=mask)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:])
  weight = mask[:, 1:].astype(jnp.float32)
  return jnp.sum(ce * weight) / jnp.sum(weight), logits


def _train_step(mesh_shape, devices, params_host, ids, mask):
  config = gemma3.Gemma3Config(**SHARDED, remat=True)
  model = gemma3.Gemma3(config)
  rules = config_lib.DEFAULT_RULES
  mesh = sharding.make_mesh(config_lib.mesh_config(mesh_shape), devices)
  shardings = sharding.logical_shardings(gemma3.abstract_variables(config)["params"], mesh, rules)
  tx = optax.adamw(1e-3, eps=1e-4)
  batch_sh = sharding.batch_sharding(mesh, rules)

  @jax.jit
  def step(params, ids, mask):
    opt_state = tx.init(params)
    (loss, logits), grads = jax.value_and_grad(
        lambda p: _loss(model, p, ids, mask), has_aux=True)(params)
    updates, _ = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), grads, loss, logits

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    params = jax.device_put(params_host, shardings)
    new, grads, loss, logits = step(params, jax.device_put(ids, batch_sh),
                                    jax.device_put(mask, batch_sh))
  return shardings, jax.device_get((new, grads)), float(loss), np.asarray(logits)


def test_sharded_forward_and_train_step_equal_single_device():
  config = gemma3.Gemma3Config(**SHARDED)
  params = jax.device_get(gemma3.init_params(config, jax.random.key(0)))
  params = jax.tree.map(lambda x: x * 5.0 if x.ndim > 1 else x + 0.3, params)  # larger logits
  rng = np.random.default_rng(0)
  ids = rng.integers(1, 134, (8, 11)).astype(np.int32)
  mask = (np.arange(11)[None] < rng.integers(4, 12, (8, 1))).astype(np.int32)
  _, (new1, grads1), loss1, logits1 = _train_step((1, 1, 1), jax.devices()[:1], params, ids, mask)
  shardings8, (new8, grads8), loss8, logits8 = _train_step((2, 2, 2), jax.devices(), params, ids,
                                                           mask)
  specs = {_path_name(p): s.spec for p, s in jax.tree_util.tree_leaves_with_path(
      shardings8, is_leaf=lambda x: isinstance(x, NamedSharding))}
  assert specs["embedder/embedding"] == P("tensor", "fsdp")
  assert specs["layers_0/attn/k_proj/kernel"] == P("fsdp", "tensor", None)
  assert specs["layers_0/mlp/down_proj/kernel"] == P("tensor", "fsdp")
  real = mask.astype(bool)
  np.testing.assert_allclose(logits8[real], logits1[real], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  changed = 0
  for (path, a), b, g8, g1, before in zip(
      jax.tree_util.tree_leaves_with_path(new8), jax.tree.leaves(new1), jax.tree.leaves(grads8),
      jax.tree.leaves(grads1), jax.tree.leaves(params)):
    name = _path_name(path)
    # Gradients: equal up to float reassociation, relative to each tensor's scale.
    assert np.abs(g8 - g1).max() <= 1e-5 * np.abs(g1).max(), name
    # Parameters after one AdamW step: the first update is lr·g/(|g| + eps), which amplifies the
    # rounding noise of entries with |g| ≈ eps; atol 1e-6 is 1e-3 of the learning rate.
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)
    changed += not np.array_equal(b, before)
  assert changed == len(jax.tree.leaves(params))


def _path_name(path) -> str:
  return "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
