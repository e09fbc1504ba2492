"""Stage-2 train steps: what trains in each step, the schedule, and (2,2,2) mesh == one device."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from anatomix_jax.core import config as config_lib
from anatomix_jax.models import anatomix, gemma3, lora
from anatomix_jax.stage2 import steps
from anatomix_jax.core import sharding

S, F = "sliding_attention", "full_attention"
# Even sizes so the (2,2,2) mesh really splits vocabulary, heads and MLP.
LM = gemma3.Gemma3Config(
    vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=4, sliding_window=3,
    layer_types=(S, F), query_pre_attn_scalar=5, rope_local_theta=100.0,
    rope_global_theta=1000.0, lora=lora.LoraSpec(rank=2, alpha=4.0))
IMAGE, OBJ0, O, P_ = 40, 50, 3, 4
CONFIG = anatomix.AnatomiXConfig(LM, image_token_id=IMAGE, first_object_token_id=OBJ0,
                                 num_objects=O, image_dim=6, object_dim=5, projection_hidden=8)
OPTIM = ml_collections.ConfigDict(dict(lr=1e-2, warmup_ratio=0.0, clip_norm=0.3, b1=0.9,
                                       b2=0.999, eps=1e-2, weight_decay=0.0))
# (A large Adam eps keeps the first update proportional to the gradient instead of ≈ sign(g), so
# the sharded-vs-single comparison is not dominated by rounding of near-zero gradients.)


def _batch(b: int = 8, t: int = 12) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 39, (b, t)).astype(np.int32)
  tokens[:, 1:1 + P_] = IMAGE
  tokens[:, 6:6 + O] = OBJ0 + np.arange(O)
  lengths = rng.integers(9, t + 1, b)
  mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
  tokens *= mask
  targets = np.concatenate([tokens[:, 1:], np.zeros((b, 1), np.int32)], axis=1)
  weights = np.zeros((b, t), np.float32)
  weights[:, 8:] = 1.0
  weights *= np.concatenate([mask[:, 1:], np.zeros((b, 1), np.int32)], axis=1)
  return {"tokens": tokens, "attention_mask": mask, "targets": targets, "weights": weights,
          "image_features": rng.normal(size=(b, P_, 6)).astype(np.float32),
          "object_features": rng.normal(size=(b, O, 5)).astype(np.float32)}


@pytest.fixture(scope="module")
def params():
  p = jax.device_get(anatomix.init_params(CONFIG, jax.random.key(0)))
  # Nonzero LoRA B (as after some training), so LoRA A gets gradients too.
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x + 0.1 if path[-1].key == "lora_b" else x, p)


def _flat(tree):
  return {"/".join(k.key for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_leaves_with_path(tree)}


def _one_step(params, groups, mesh_shape=(1, 1, 1), devices=None):
  devices = devices or jax.devices()[:1]
  rules = config_lib.DEFAULT_RULES
  mesh = sharding.make_mesh(config_lib.mesh_config(mesh_shape), devices)
  shardings = sharding.logical_shardings(anatomix.abstract_variables(CONFIG)["params"], mesh,
                                         rules)
  trainable, frozen = steps.split(params, groups)
  train_sh, frozen_sh = steps.split(shardings, groups)
  tx = steps.make_optimizer(OPTIM, num_steps=10)
  model = anatomix.AnatomiX(CONFIG)
  batch_sh = sharding.batch_sharding(mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = steps.init_state(jax.device_put(trainable, train_sh), tx)
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    step = steps.jit_train_step(steps.make_train_step(model, tx), state_sh, frozen_sh, batch_sh,
                                mesh)
    state, metrics = step(state, jax.device_put(frozen, frozen_sh),
                          jax.device_put(_batch(), batch_sh), jax.random.key(1))
  return jax.device_get(state), jax.device_get(metrics)


@pytest.mark.parametrize("step_name", ["align", "finetune"])
def test_only_the_configured_groups_change(params, step_name):
  state, metrics = _one_step(params, steps.PHASE_GROUPS[step_name])
  assert int(state.step) == 1 and int(metrics["nonfinite"]) == 0
  assert int(metrics["tokens"]) > 0 and 1.0 < float(metrics["loss"]) < 10.0
  before = _flat(params)
  after = _flat(state.params)
  projection = {k for k in before if k.startswith(("image_projection/", "object_projection/"))}
  lora_keys = {k for k in before if k.endswith(("lora_a", "lora_b"))}
  want = projection if step_name == "align" else (
      projection | lora_keys | {"lm/embedder/embedding"})
  assert set(after) == want  # the state holds exactly the trainable leaves
  for key in want:
    assert np.abs(after[key] - before[key]).max() > 0, f"{key} did not change"
  # Base weights are not in the state at all (they stay in the frozen tree, unchanged).
  assert "lm/layers_0/attn/q_proj/kernel" not in after


def test_sharded_finetune_step_equals_single_device(params):
  groups = steps.PHASE_GROUPS["finetune"]
  one, m1 = _one_step(params, groups)
  eight, m8 = _one_step(params, groups, (2, 2, 2), jax.devices())
  np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
  np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-5)
  a, b, p0 = _flat(eight.params), _flat(one.params), _flat(params)
  for key in b:
    np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-7, err_msg=key)
    # The updates themselves agree to float32 resolution of the params (not only the params).
    np.testing.assert_allclose(a[key] - p0[key], b[key] - p0[key], rtol=0,
                               atol=1e-3 * np.abs(b[key] - p0[key]).max() + 1e-7, err_msg=key)


def test_linear_schedule_with_warmup_ratio():
  schedule = steps.learning_rate(2e-4, num_steps=100, warmup_ratio=0.03)
  # HF get_linear_schedule_with_warmup: warm-up ceil(0.03·100) = 3 steps, then linear to 0.
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(float(schedule(1)), 2e-4 / 3, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(3)), 2e-4, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(3 + 97 // 2)), 2e-4 * (1 - 48 / 97), rtol=1e-5)
  assert float(schedule(100)) == 0.0
  with pytest.raises(ValueError, match=r"trainable groups \['heads'\] are unknown"):
    steps.trainable_predicate(["heads"])


def test_lora_b_zero_model_equals_base_model():
  base_cfg = dataclasses.replace(CONFIG, lm=dataclasses.replace(LM, lora=lora.LoraSpec()))
  full = jax.device_get(anatomix.init_params(CONFIG, jax.random.key(3)))
  base = jax.tree_util.tree_map_with_path(lambda p, x: x, full)
  base = {**base, "lm": lora.merge(full["lm"], LM.lora)}  # B = 0: merging changes nothing
  batch = {k: jnp.asarray(v) for k, v in _batch().items()}
  with_lora = steps.loss_and_count(anatomix.AnatomiX(CONFIG), full, batch)
  without = steps.loss_and_count(anatomix.AnatomiX(base_cfg), base, batch)
  assert float(with_lora[0]) == float(without[0])


@pytest.mark.parametrize("chunk", [5, 4])  # 12 tokens: padded to 15 / exact 3 slices
def test_chunked_loss_equals_full_logits(params, chunk):
  """Loss and gradients with the logits in slices equal torch's cross-entropy on full logits."""
  import torch  # pylint: disable=import-outside-toplevel

  batch = {k: jnp.asarray(v) for k, v in _batch().items()}
  model = anatomix.AnatomiX(CONFIG)
  (logits,) = model.apply({"params": params}, batch["tokens"], batch["image_features"],
                          batch["object_features"], attention_mask=batch["attention_mask"],
                          positions=gemma3.positions_from_mask(batch["attention_mask"]))
  per_token = torch.nn.functional.cross_entropy(
      torch.from_numpy(np.asarray(logits)).reshape(-1, LM.vocab_size),
      torch.from_numpy(np.asarray(batch["targets"])).long().reshape(-1), reduction="none")
  w = torch.from_numpy(np.asarray(batch["weights"])).reshape(-1)
  expected = float((per_token * w).sum() / w.sum())
  loss = lambda p, c: steps.loss_and_count(model, p, batch, loss_chunk=c)[0]  # noqa: E731
  chunked, grads = jax.value_and_grad(loss)(params, chunk)
  np.testing.assert_allclose(float(chunked), expected, rtol=1e-5)
  _, full_grads = jax.value_and_grad(loss)(params, 0)
  for (path, g), h in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(full_grads)):
    np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_untied_lm_trains_both_tables_and_chunks_its_loss():
  """``tie_word_embeddings=False``: the finetune "embedding" group holds the input table and the
  output table ``lm/embedder/lm_head``; the chunked loss uses lm_head (loss and grads equal the
  full-logits ones) and both tables get gradients."""
  config = dataclasses.replace(CONFIG, lm=dataclasses.replace(LM, tie_word_embeddings=False))
  params = jax.device_get(anatomix.init_params(config, jax.random.key(4)))
  trainable, frozen = steps.split(params, steps.PHASE_GROUPS["finetune"])
  assert {"lm/embedder/embedding", "lm/embedder/lm_head"} <= set(_flat(trainable))
  assert not any(k.startswith("lm/embedder/") for k in _flat(frozen))
  model = anatomix.AnatomiX(config)
  batch = {k: jnp.asarray(v) for k, v in _batch().items()}
  loss = lambda t, c: steps.loss_and_count(  # noqa: E731
      model, anatomix.combine(frozen, t), batch, loss_chunk=c)[0]
  chunked, grads = jax.value_and_grad(loss)(trainable, 5)
  full, full_grads = jax.value_and_grad(loss)(trainable, 0)
  np.testing.assert_allclose(float(chunked), float(full), rtol=1e-6)
  g, h = _flat(grads), _flat(full_grads)
  for key in ("lm/embedder/embedding", "lm/embedder/lm_head"):
    assert np.abs(g[key]).max() > 0, key
    np.testing.assert_allclose(g[key], h[key], rtol=1e-4, atol=1e-6, err_msg=key)
  # The output table is lm_head: tying it to the input table changes the loss.
  tied = jax.tree.map(lambda x: x, trainable)
  tied["lm"]["embedder"]["lm_head"] = tied["lm"]["embedder"]["embedding"]
  assert abs(float(loss(tied, 0)) - float(full)) > 1e-3
