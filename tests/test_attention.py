"""Fused attention kernels (``lm.attention``) against the XLA einsum path, on CPU.

The splash kernel runs in Pallas interpret mode and the cuDNN call with JAX's XLA implementation
(no accelerator here), so these tests check what is ours: how each kernel is handed Gemma3's
masks (causal, sliding window, padding, grouped heads, softcap), the per-shard wrapping on a
device mesh, the scanned-layer switch and the fallbacks. The XLA path itself is checked against
transformers' PyTorch Gemma3 in test_gemma3.py.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anatomix_jax.core import config as config_lib, sharding
from anatomix_jax.models import attention, gemma3

S, F = "sliding_attention", "full_attention"
T = 256  # splash tiles the sequence in blocks of 128
TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=37,
            layer_types=(S, F), query_pre_attn_scalar=13.0)


def _inputs(batch=4, t=T, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, TINY["vocab_size"], (batch, t)).astype(np.int32)
  lengths = [t, t - 56, 131, 1][:batch]  # right-padded rows (one with a single real token)
  mask = (np.arange(t)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
  return jnp.asarray(tokens), jnp.asarray(mask)


def _forward_and_grads(config, params, tokens, mask, **kwargs):
  model = gemma3.Gemma3(config)
  real = mask[..., None] > 0

  def loss(p):
    logits, _ = model.apply({"params": p}, tokens, positions=gemma3.positions_from_mask(mask),
                            attention_mask=mask, **kwargs)
    return jnp.sum(jnp.where(real, jax.nn.log_softmax(logits), 0.0)) / real.sum() / 97, logits

  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return np.asarray(logits), jax.device_get(grads)


def _assert_same(got, want, mask, atol=1e-5):
  real = np.asarray(mask, bool)
  np.testing.assert_allclose(got[0][real], want[0][real], atol=atol, rtol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got[1]), jax.tree.leaves(want[1])):
    scale = max(float(np.max(np.abs(b))), 1e-3)
    np.testing.assert_allclose(a / scale, b / scale, atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("kind,extra", [
    ("splash", {}),
    ("splash", dict(attn_logit_softcapping=0.7, num_key_value_heads=1)),  # softcap, one KV head
    ("cudnn", {}),
])
def test_kernel_matches_xla_forward_and_gradients(kind, extra):
  config = gemma3.Gemma3Config(**{**TINY, **extra})
  params = gemma3.init_params(config, jax.random.key(1))
  params = jax.tree.map(lambda x: x * 4.0 if x.ndim > 1 else x, params)  # peaked attention
  tokens, mask = _inputs()
  want = _forward_and_grads(config, params, tokens, mask)
  got = _forward_and_grads(dataclasses.replace(config, attention=kind), params, tokens, mask)
  _assert_same(got, want, mask)


def test_kernel_window_is_the_decoders():
  """A window one key wider changes the output: the kernels' masks are not just 'close'."""
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(2, T, 4, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(2, T, 2, 8)), jnp.float32) for _ in range(2))
  valid = jnp.asarray(np.arange(T)[None] < np.array([[T], [200]]))
  positions = gemma3.positions_from_mask(valid)
  mask = gemma3.attention_masks(valid, positions, positions, 0, 9)[S]
  want, _ = attention.xla_attention(q.reshape(2, T, 2, 2, 8), k, v, mask, scale=0.5, softcap=None)
  want = np.asarray(want.reshape(2, T, 4, 8))[np.asarray(valid)]
  for run in (attention.splash_attention, attention.cudnn_attention):
    same = np.asarray(run(q, k, v, valid, scale=0.5, window=9))[np.asarray(valid)]
    wider = np.asarray(run(q, k, v, valid, scale=0.5, window=10))[np.asarray(valid)]
    np.testing.assert_allclose(same, want, atol=1e-5)
    assert np.abs(wider - want).max() > 1e-2


def test_scanned_layers_pick_the_kernel_mask_per_layer_kind():
  config = gemma3.Gemma3Config(**TINY, scan_layers=True)
  flat = gemma3.init_params(dataclasses.replace(config, scan_layers=False), jax.random.key(2))
  params = gemma3.stack_layers(jax.tree.map(lambda x: x * 4.0 if x.ndim > 1 else x, flat), 2)
  tokens, mask = _inputs(batch=2)
  want = _forward_and_grads(config, params, tokens, mask)
  got = _forward_and_grads(dataclasses.replace(config, attention="splash"), params, tokens, mask)
  _assert_same(got, want, mask)


@pytest.mark.parametrize("batch", [4, 2])
def test_splash_on_a_mesh_runs_per_shard(batch):
  """(data 2, fsdp 2, tensor 2): rows over data×fsdp, heads over tensor, as the rules say; a
  batch the row axes do not divide runs unsplit over rows."""
  config = gemma3.Gemma3Config(**TINY)
  params = jax.device_get(gemma3.init_params(config, jax.random.key(3)))
  tokens, mask = _inputs(batch=batch)
  want = _forward_and_grads(config, params, tokens, mask)
  rules = config_lib.DEFAULT_RULES
  mesh = sharding.make_mesh(config_lib.mesh_config((2, 2, 2)), jax.devices())
  shardings = sharding.logical_shardings(gemma3.abstract_variables(config)["params"], mesh, rules)
  rows = sharding.batch_sharding(mesh, rules) if batch == 4 else None
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    got = _forward_and_grads(dataclasses.replace(config, attention="splash"),
                             jax.device_put(params, shardings), jax.device_put(tokens, rows),
                             jax.device_put(mask, rows))
  _assert_same(got, want, mask)


def test_calls_the_kernels_cannot_serve_fall_back_to_xla():
  """Bidirectional image spans, a sequence splash's blocks do not tile, and a KV cache."""
  config = gemma3.Gemma3Config(**TINY)
  params = gemma3.init_params(config, jax.random.key(4))
  splash = dataclasses.replace(config, attention="splash")
  tokens, mask = _inputs(batch=2)
  groups = jnp.zeros(tokens.shape, jnp.int32).at[:, 10:30].set(1)
  for kwargs, toks, m in (({"token_groups": groups}, tokens, mask),
                          ({}, tokens[:, :100], mask[:, :100])):
    want = _forward_and_grads(config, params, toks, m, **kwargs)
    _assert_same(_forward_and_grads(splash, params, toks, m, **kwargs), want, m)
  # Generation: a prefill and a decode step through the cache equal the XLA model's.
  for cfg in (config, splash):
    model = gemma3.Gemma3(cfg)
    cache = model.init_cache(2, 40)
    ones = jnp.ones((2, 40), jnp.int32)
    logits, cache = model.apply({"params": params}, tokens[:, :39],
                                positions=jnp.broadcast_to(jnp.arange(39), (2, 39)),
                                attention_mask=ones, cache=cache, cache_index=0)
    step, _ = model.apply({"params": params}, tokens[:, 39:40], positions=jnp.full((2, 1), 39),
                          attention_mask=ones, cache=cache, cache_index=39)
    if cfg is config:
      want = (np.asarray(logits), np.asarray(step))
  np.testing.assert_allclose(np.asarray(logits), want[0], atol=1e-6)
  np.testing.assert_allclose(np.asarray(step), want[1], atol=1e-6)


def test_resolve_and_config_validation():
  assert attention.resolve("auto", "tpu") == "splash"
  assert attention.resolve("auto", "gpu") == "cudnn"
  assert attention.resolve("auto", "cpu") == "xla"
  assert attention.resolve("cudnn", "tpu") == "cudnn"  # explicit kinds are kept
  assert attention.resolve("auto") == "xla"  # these tests run on CPU
  with pytest.raises(ValueError, match="lm.attention must be one of"):
    attention.resolve("flash")
  with pytest.raises(ValueError, match="attention must be one of"):
    gemma3.Gemma3Config(**TINY, attention="flash")
