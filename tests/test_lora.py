"""LoRA on the Gemma3 decoder: PEFT math against torch, zero-init identity, merge and export."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from anatomix_jax.convert import hf_gemma3
from anatomix_jax.models import gemma3, lora

S, F = "sliding_attention", "full_attention"
# Odd sizes (no accidental symmetry); both layer kinds; a window shorter than the prompt.
BASE = gemma3.Gemma3Config(
    vocab_size=97, hidden_size=20, intermediate_size=29, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, head_dim=6, sliding_window=4,
    layer_types=(S, F, S), query_pre_attn_scalar=7, rope_local_theta=100.0,
    rope_global_theta=1000.0)
SPEC = lora.LoraSpec(rank=3, alpha=5.0, dropout=0.25)
LORA = dataclasses.replace(BASE, lora=SPEC)
B, T = 2, 9


def _inputs():
  rng = np.random.default_rng(0)
  ids = rng.integers(1, BASE.vocab_size, (B, T)).astype(np.int32)
  mask = np.ones((B, T), np.int32)
  mask[1, 6:] = 0
  return ids * mask, mask


def _logits(config, params, ids, mask, rngs=None):
  logits, _ = gemma3.Gemma3(config).apply(
      {"params": params}, jnp.asarray(ids), positions=gemma3.positions_from_mask(mask),
      attention_mask=jnp.asarray(mask), rngs=rngs)
  return np.asarray(logits)


@pytest.fixture(scope="module")
def params():
  """(base params, LoRA params with random nonzero B)."""
  base = gemma3.init_params(BASE, jax.random.key(0))
  base = jax.tree.map(lambda x: x * 4.0, base)  # larger than HF's init so every term matters
  adapters = gemma3.init_lora_params(LORA, jax.random.key(1))
  adapters = jax.tree_util.tree_map_with_path(
      lambda p, x: (jax.random.normal(jax.random.key(len(str(p))), x.shape) * 0.2
                    if p[-1].key == "lora_b" else x), adapters)
  return base, gemma3.add_lora_params(base, adapters)


def test_fresh_adapters_are_identity_and_shaped_like_peft():
  base = gemma3.init_params(BASE, jax.random.key(0))
  adapters = gemma3.init_lora_params(LORA, jax.random.key(1))
  layer = adapters["layers_0"]
  assert layer["attn"]["q_proj"]["lora_a"].shape == (20, 3)
  assert layer["attn"]["q_proj"]["lora_b"].shape == (3, 4, 6)
  assert layer["attn"]["k_proj"]["lora_b"].shape == (3, 2, 6)
  assert layer["attn"]["o_proj"]["lora_a"].shape == (4, 6, 3)
  assert layer["mlp"]["down_proj"]["lora_a"].shape == (29, 3)
  assert sorted(layer["mlp"]) == ["down_proj", "gate_proj", "up_proj"]
  # PEFT init: A ~ U(±1/√fan_in), B = 0.
  a = np.asarray(layer["mlp"]["down_proj"]["lora_a"])
  assert np.abs(a).max() <= 1 / np.sqrt(29) and np.abs(a).max() > 0.5 / np.sqrt(29)
  assert all(not np.asarray(x).any() for p, x in
             jax.tree_util.tree_flatten_with_path(adapters)[0] if p[-1].key == "lora_b")
  # 7 targets per layer; per target r·(in + out).
  h, f, n, kv, d, r = 20, 29, 4, 2, 6, 3
  per_layer = r * ((h + n * d) * 2 + (h + kv * d) * 2 + (h + f) * 2 + (f + h))
  assert lora.num_params(adapters) == 3 * per_layer
  ids, mask = _inputs()
  full = gemma3.add_lora_params(base, adapters)
  want = _logits(BASE, base, ids, mask)
  np.testing.assert_array_equal(_logits(LORA, full, ids, mask), want)
  # Dropout acts on the adapter input only: with B = 0 it cannot change anything either.
  np.testing.assert_array_equal(
      _logits(LORA, full, ids, mask, rngs={"dropout": jax.random.key(3)}), want)


def test_adapter_math_matches_torch_peft_update(params, tmp_path):
  """Our LoRA logits == a torch HF model whose weights get W += (alpha/r)·B_hf·A_hf from the
  exported PEFT tensors (PEFT's merge rule), i.e. the adapter layout and math are PEFT's."""
  base, full = params
  hf_gemma3.export_gemma3(base, BASE, tmp_path / "base")
  adapter_file = hf_gemma3.export_peft_adapter(full, LORA, tmp_path / "adapter")
  with open(tmp_path / "adapter" / hf_gemma3.ADAPTER_CONFIG_FILE) as f:
    adapter_config = json.load(f)
  assert adapter_config["r"] == 3 and adapter_config["lora_alpha"] == 5.0
  assert adapter_config["target_modules"] == sorted(lora.ALL_LINEAR)
  tensors = load_file(adapter_file)
  assert len(tensors) == 3 * 7 * 2 + 2  # + the embedding table, for embed_tokens and lm_head
  assert tensors["base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight"].shape == (3, 24)
  assert tensors["base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight"].shape == (20, 3)
  model = transformers.Gemma3ForCausalLM.from_pretrained(
      tmp_path / "base", attn_implementation="eager").eval()
  state = model.state_dict()
  scale = adapter_config["lora_alpha"] / adapter_config["r"]
  with torch.no_grad():
    for key, a in tensors.items():
      if ".lora_A." not in key:
        continue
      module = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
      b = tensors[key.replace("lora_A", "lora_B")]
      state[module] += torch.tensor(scale * (b @ a))
  ids, mask = _inputs()
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()
  got = _logits(LORA, full, ids, mask)
  real = mask.astype(bool)
  assert np.abs(got[real] - _logits(BASE, base, ids, mask)[real]).max() > 1e-2  # adapters matter
  np.testing.assert_allclose(got[real], ref[real], atol=1e-4, rtol=0)


def _hf_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """A transformers model's float32 logits [B, T, V] for ``ids``/``mask`` [B, T]."""
  with torch.no_grad():
    return model.eval()(input_ids=torch.tensor(ids, dtype=torch.long),
                        attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()


def _load_hf(path):
  return transformers.Gemma3ForCausalLM.from_pretrained(path, attn_implementation="eager")


def test_peft_from_pretrained_reproduces_trained_lora_and_embedding(params, tmp_path):
  """The standard ``PeftModel.from_pretrained(base, adapter)`` == our model when the finetune
  phase trained LoRA and the (tied) embedding table; so does the merged export. LoRA-only
  adapters (the old export) were off by the table's change."""
  base, full = params
  table = full["embedder"]["embedding"]
  trained = dict(full, embedder={"embedding": table + 0.5 * jax.random.normal(
      jax.random.key(9), table.shape)})
  hf_gemma3.export_gemma3(base, BASE, tmp_path / "base")
  adapter_file = hf_gemma3.export_peft_adapter(trained, LORA, tmp_path / "adapter",
                                               base_model=str(tmp_path / "base"))
  with open(tmp_path / "adapter" / hf_gemma3.ADAPTER_CONFIG_FILE) as f:
    adapter_config = json.load(f)
  assert adapter_config["modules_to_save"] == ["embed_tokens"]
  assert adapter_config["ensure_weight_tying"] is True
  tensors = load_file(adapter_file)
  for key in ("base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"):
    np.testing.assert_array_equal(tensors[key], np.asarray(trained["embedder"]["embedding"]))
  hf_gemma3.export_gemma3(trained, LORA, tmp_path / "merged")
  ids, mask = _inputs()
  ids = np.concatenate([ids, (ids * 7 + 3) % BASE.vocab_size * mask])  # 4 sequences
  mask = np.concatenate([mask, mask])
  got = _logits(LORA, trained, ids, mask)
  real = mask.astype(bool)
  assert np.abs(got[real] - _logits(LORA, full, ids, mask)[real]).max() > 1e-1  # table matters

  model = peft.PeftModel.from_pretrained(_load_hf(tmp_path / "base"), tmp_path / "adapter")
  np.testing.assert_allclose(_hf_logits(model, ids, mask)[real], got[real], atol=1e-4, rtol=0)
  np.testing.assert_allclose(_hf_logits(_load_hf(tmp_path / "merged"), ids, mask)[real], got[real],
                             atol=1e-4, rtol=0)
  # Without the table (embedding=False: only for an untrained table) the adapter is LoRA only.
  hf_gemma3.export_peft_adapter(trained, LORA, tmp_path / "lora_only", embedding=False)
  assert len(load_file(tmp_path / "lora_only" / hf_gemma3.ADAPTER_FILE)) == 3 * 7 * 2
  with open(tmp_path / "lora_only" / hf_gemma3.ADAPTER_CONFIG_FILE) as f:
    assert "modules_to_save" not in json.load(f)


def test_peft_from_pretrained_reproduces_untied_tables(params, tmp_path):
  """An untied LM (``tie_word_embeddings=False``: the original AnatomiX's separately trained
  ``embed_tokens`` and ``lm_head`` copies) → ``modules_to_save: ["embed_tokens", "lm_head"]``
  without weight tying; ``PeftModel.from_pretrained`` on the TIED base (MedGemma's case) gives each
  its own copy and reproduces our logits; the merged export is an untied Gemma3ForCausalLM."""
  base, full = params
  untied = dataclasses.replace(LORA, tie_word_embeddings=False)
  table = full["embedder"]["embedding"]
  noise = lambda seed: 0.5 * jax.random.normal(jax.random.key(seed), table.shape)  # noqa: E731
  trained = dict(full, embedder={"embedding": table + noise(9), "lm_head": table + noise(10)})
  hf_gemma3.export_gemma3(base, BASE, tmp_path / "base")
  adapter_file = hf_gemma3.export_peft_adapter(trained, untied, tmp_path / "adapter",
                                               base_model=str(tmp_path / "base"))
  with open(tmp_path / "adapter" / hf_gemma3.ADAPTER_CONFIG_FILE) as f:
    adapter_config = json.load(f)
  assert adapter_config["modules_to_save"] == ["embed_tokens", "lm_head"]
  assert "ensure_weight_tying" not in adapter_config
  tensors = load_file(adapter_file)
  np.testing.assert_array_equal(tensors["base_model.model.model.embed_tokens.weight"],
                                np.asarray(trained["embedder"]["embedding"]))
  np.testing.assert_array_equal(tensors["base_model.model.lm_head.weight"],
                                np.asarray(trained["embedder"]["lm_head"]))
  hf_gemma3.export_gemma3(trained, untied, tmp_path / "merged")
  ids, mask = _inputs()
  got = _logits(untied, trained, ids, mask)
  real = mask.astype(bool)
  one_table = dict(trained, embedder={"embedding": trained["embedder"]["embedding"]})
  assert np.abs(got[real] - _logits(LORA, one_table, ids, mask)[real]).max() > 1e-1

  # PEFT warns about exactly the original AnatomiX's setup: a tied base, both tables saved.
  with pytest.warns(UserWarning, match="`ensure_weight_tying` is not set"):
    model = peft.PeftModel.from_pretrained(_load_hf(tmp_path / "base"), tmp_path / "adapter")
  print(f"untied PEFT adapter: max |ours - PeftModel| = "
        f"{np.abs(_hf_logits(model, ids, mask)[real] - got[real]).max():.2e}")
  np.testing.assert_allclose(_hf_logits(model, ids, mask)[real], got[real], atol=1e-4, rtol=0)
  merged = _load_hf(tmp_path / "merged")
  assert not merged.config.tie_word_embeddings
  np.testing.assert_allclose(_hf_logits(merged, ids, mask)[real], got[real], atol=1e-4, rtol=0)


def test_merged_export_equals_unmerged(params, tmp_path):
  _, full = params
  ids, mask = _inputs()
  got = _logits(LORA, full, ids, mask)
  merged = lora.merge(full, SPEC)
  assert not lora.lora_leaves(merged)
  np.testing.assert_allclose(_logits(BASE, merged, ids, mask), got, atol=1e-5, rtol=0)
  # export_gemma3 merges LoRA configs itself; transformers reloads the merged model.
  hf_gemma3.export_gemma3(full, LORA, tmp_path / "merged")
  model = transformers.Gemma3ForCausalLM.from_pretrained(
      tmp_path / "merged", attn_implementation="eager").eval()
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()
  real = mask.astype(bool)
  np.testing.assert_allclose(ref[real], got[real], atol=1e-5, rtol=0)
  with pytest.raises(hf_gemma3.Gemma3LoadError, match="LoRA leaves but config.lora.rank is 0"):
    hf_gemma3.export_gemma3(full, BASE, tmp_path / "bad")


def test_dropout_is_inverted_dropout_on_the_adapter_input(params):
  base, full = params
  ids, mask = _inputs()
  plain = _logits(LORA, full, ids, mask)
  one = _logits(LORA, full, ids, mask, rngs={"dropout": jax.random.key(5)})
  again = _logits(LORA, full, ids, mask, rngs={"dropout": jax.random.key(5)})
  other = _logits(LORA, full, ids, mask, rngs={"dropout": jax.random.key(6)})
  np.testing.assert_array_equal(one, again)
  assert np.abs(one - plain).max() > 1e-4 and np.abs(one - other).max() > 1e-4
  # Averaged over many masks the adapter update is unbiased (inverted dropout): the mean over
  # 64 keys of a single q_proj's output approaches the no-dropout output.
  layer = gemma3.HeadsProjection(4, 6, "heads", jnp.float32, jnp.float32, SPEC)
  q_params = full["layers_0"]["attn"]["q_proj"]
  x = jax.random.normal(jax.random.key(7), (1, 5, 20))
  clean = layer.apply({"params": q_params}, x)
  noisy = jax.vmap(lambda k: layer.apply({"params": q_params}, x, rngs={"dropout": k}))(
      jax.random.split(jax.random.key(8), 256))
  update = clean - layer.apply({"params": dict(q_params, lora_b=0 * q_params["lora_b"])}, x)
  err = np.abs(np.asarray(noisy.mean(0) - clean)).max()
  assert err < 0.2 * np.abs(np.asarray(update)).max()


def test_spec_validation():
  with pytest.raises(ValueError, match=r"LoRA targets \['lm_head'\]"):
    lora.LoraSpec(rank=2, targets=("q_proj", "lm_head"))
  with pytest.raises(ValueError, match="rank must be >= 0"):
    lora.LoraSpec(rank=-1)
  only_q = dataclasses.replace(BASE, lora=lora.LoraSpec(rank=2, targets=("q_proj",)))
  adapters = gemma3.init_lora_params(only_q, jax.random.key(0))
  assert sorted(adapters["layers_2"]) == ["attn"] and sorted(adapters["layers_2"]["attn"]) == [
      "q_proj"]
  with pytest.raises(ValueError, match="rank is 0"):
    gemma3.init_lora_params(BASE, jax.random.key(0))


def test_lora_on_scanned_layers_merges_like_per_layer(params):
  """Adapters stacked on the scanned layer axis merge (vmapped) into the same kernels."""
  _, full = params
  scan = dataclasses.replace(LORA, scan_layers=True)
  stacked = gemma3.stack_layers(jax.device_get(full), 3)
  ids, mask = _inputs()
  np.testing.assert_allclose(_logits(scan, stacked, ids, mask), _logits(LORA, full, ids, mask),
                             atol=1e-5, rtol=0)
  merged = gemma3.unstack_layers(jax.device_get(lora.merge(stacked, SPEC)))
  want = lora.merge(full, SPEC)
  for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(merged)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7, err_msg=str(p))
