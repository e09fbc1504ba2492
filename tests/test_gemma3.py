"""The Flax Gemma3 LM and its HF loader/exporter against transformers' torch Gemma3 models."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

from anatomix_jax.aot.memory import estimate_memory
from anatomix_jax.core import config as config_lib
from anatomix_jax.convert import hf_gemma3
from anatomix_jax.models import gemma3
from anatomix_jax.core import sharding

S, F = "sliding_attention", "full_attention"
LAYER_TYPES = [S, S, F, S, S, S, F]
# Odd sizes so that a transposed or mis-split tensor cannot pass by symmetry; a window (5) shorter
# than the prompts (11); RoPE bases small enough that positions ≤ 16 actually rotate.
TINY = dict(vocab_size=131, hidden_size=24, intermediate_size=37, num_hidden_layers=7,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=5,
            layer_types=LAYER_TYPES, query_pre_attn_scalar=11, max_position_embeddings=64,
            rope_parameters={S: {"rope_type": "default", "rope_theta": 100.0},
                             F: {"rope_type": "linear", "rope_theta": 1000.0, "factor": 8.0}})
LENGTHS = (11, 6, 9)  # three prompts, T = 11


def _randomize(model: torch.nn.Module) -> None:
  """Larger random weights than HF's init (norm weights nonzero) so that every term matters."""
  torch.manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.normal_(0.0, 0.3 if "norm" in name else 0.15)


def _text_config(**overrides) -> transformers.Gemma3TextConfig:
  return transformers.Gemma3TextConfig(**dict(TINY, **overrides))


def _prompts(padding: str, lengths=LENGTHS, total: int = 11, seed: int = 0):
  """(ids, mask) int64[B, total]: random prompts, right- or left-padded with token 0."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, TINY["vocab_size"], (len(lengths), total))
  mask = np.zeros_like(ids)
  for i, n in enumerate(lengths):
    mask[i, :n] = 1 if padding == "right" else 0
    if padding == "left":
      mask[i, total - n:] = 1
  return ids * mask, mask


def _real(mask):
  return mask.astype(bool)


def _torch_logits(model, ids, mask, positions=None) -> np.ndarray:
  kwargs = {} if positions is None else {"position_ids": torch.tensor(np.asarray(positions))}
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **kwargs)
  return out.logits.float().numpy()


@functools.lru_cache(maxsize=8)
def _forward(config: gemma3.Gemma3Config):
  model = gemma3.Gemma3(config)

  def forward(params, ids, mask):
    logits, _ = model.apply({"params": params}, ids, positions=gemma3.positions_from_mask(mask),
                            attention_mask=mask)
    return logits

  return jax.jit(forward)


def _jax_logits(config, params, ids, mask) -> np.ndarray:
  return np.asarray(_forward(config)(params, jnp.asarray(ids, jnp.int32),
                                     jnp.asarray(mask, jnp.int32)))


@pytest.fixture(scope="module")
def causal(tmp_path_factory):
  """(directory, torch model): a tiny Gemma3ForCausalLM (final logit soft-cap 5) saved as a
  SHARDED safetensors checkpoint."""
  path = str(tmp_path_factory.mktemp("gemma3_causal"))
  torch.manual_seed(0)
  model = transformers.Gemma3ForCausalLM(
      _text_config(final_logit_softcapping=5.0, attn_implementation="eager")).eval()
  _randomize(model)
  model.save_pretrained(path, max_shard_size="40KB")
  assert os.path.isfile(os.path.join(path, hf_gemma3.INDEX_FILE))
  return path, model


@pytest.fixture(scope="module")
def loaded(causal):
  return hf_gemma3.load_gemma3(causal[0])


@pytest.fixture(scope="module")
def multimodal(tmp_path_factory):
  """(directory, torch model): a tiny Gemma3ForConditionalGeneration (MedGemma layout).

  Its text config has no final soft-cap: ``Gemma3ForConditionalGeneration`` would not apply it.
  """
  path = str(tmp_path_factory.mktemp("gemma3_mm"))
  text = _text_config().to_dict()
  vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=20,
                                           num_hidden_layers=1, num_attention_heads=2,
                                           image_size=28, patch_size=14).to_dict()
  config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                     attn_implementation="eager")
  torch.manual_seed(0)
  model = transformers.Gemma3ForConditionalGeneration(config).eval()
  _randomize(model)
  model.save_pretrained(path)
  return path, model


# --- Parity ---------------------------------------------------------------------------------------

def test_config_from_hf(causal):
  config = gemma3.Gemma3Config.from_hf_dict(causal[1].config.to_dict())
  assert config.final_logit_softcapping == 5.0 and config.attn_logit_softcapping is None
  with pytest.warns(UserWarning, match="attn_logit_softcapping=3.0 is ignored"):
    capped = gemma3.Gemma3Config.from_hf_dict(dict(causal[1].config.to_dict(),
                                                   attn_logit_softcapping=3.0))
  assert capped == config
  assert config.layer_types == tuple(LAYER_TYPES) and config.sliding_window == 5
  assert (config.rope_local_theta, config.rope_local_factor) == (100.0, 1.0)
  assert (config.rope_global_theta, config.rope_global_factor) == (1000.0, 8.0)
  # Pre-v5 fields: rope_theta / rope_local_base_freq / rope_scaling (global layers only).
  old = {k: v for k, v in TINY.items() if k not in ("rope_parameters", "layer_types")}
  old.update(model_type="gemma3_text", rope_theta=1000.0, rope_local_base_freq=100.0,
             rope_scaling={"rope_type": "linear", "factor": 8.0}, sliding_window_pattern=3)
  legacy = gemma3.Gemma3Config.from_hf_dict(old)
  assert legacy.rope(F) == (1000.0, 8.0) and legacy.rope(S) == (100.0, 1.0)
  assert legacy.layer_types == (S, S, F, S, S, F, S)
  assert gemma3.Gemma3Config.from_hf_dict(legacy.to_hf_dict()) == legacy
  # A Google-style multimodal config.json whose text_config lists only what differs from HF's
  # defaults (as gemma-3-4b-it / medgemma-4b-it do): the MedGemma-4B text model.
  sparse = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
            "eos_token_id": [1, 106], "text_config": {
                "hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                "num_hidden_layers": 34, "sliding_window": 1024,
                "rope_scaling": {"factor": 8.0, "rope_type": "linear"}}}
  assert gemma3.Gemma3Config.from_hf_dict(sparse) == gemma3.medgemma_4b(eos_token_id=(1, 106))
  with pytest.raises(ValueError, match="hidden_activation 'relu'"):
    gemma3.Gemma3Config.from_hf_dict(dict(old, hidden_activation="relu"))
  with pytest.raises(ValueError, match="rope_type 'yarn'"):
    gemma3.Gemma3Config.from_hf_dict(dict(old, rope_scaling={"rope_type": "yarn", "factor": 2.0}))


def test_causal_lm_parity_right_and_left_padded(causal, loaded):
  _, torch_model = causal
  config, params = loaded
  for padding in ("right", "left"):
    ids, mask = _prompts(padding)
    positions = np.asarray(gemma3.positions_from_mask(mask))
    ref = _torch_logits(torch_model, ids, mask, positions if padding == "left" else None)
    got = _jax_logits(config, params, ids, mask)
    real = _real(mask)
    assert np.abs(ref[real]).max() > 1.0  # the weights make logits of a useful size
    np.testing.assert_allclose(got[real], ref[real], atol=1e-4, rtol=0, err_msg=padding)
  # ``embeddings`` (what ``embed`` returns) instead of tokens: the same logits.
  model = gemma3.Gemma3(config)

  @jax.jit
  def via_embeddings(params, ids, mask):
    embeddings = model.apply({"params": params}, ids, method=gemma3.Gemma3.embed)
    assert embeddings.shape == (3, 11, 24)
    return model.apply({"params": params}, embeddings=embeddings,
                       positions=gemma3.positions_from_mask(mask), attention_mask=mask)

  logits, cache = via_embeddings(params, ids, mask)
  assert cache is None
  np.testing.assert_allclose(np.asarray(logits)[real], got[real], atol=1e-5)


def test_medgemma_layout_parity(multimodal):
  path, torch_model = multimodal
  with safe_open(os.path.join(path, hf_gemma3.SINGLE_FILE), framework="numpy") as f:
    keys = list(f.keys())  # noqa: SIM118
  text_keys = [k for k in keys if not k.startswith(("vision_tower.", "multi_modal_projector."))]
  assert text_keys and all(k.startswith("language_model.model.") for k in text_keys)
  assert any(k.startswith("vision_tower.") for k in keys)
  config, params = hf_gemma3.load_gemma3(path)
  assert config.final_logit_softcapping is None
  ids, mask = _prompts("right")
  ref = _torch_logits(torch_model, ids, mask)
  got = _jax_logits(config, params, ids, mask)
  real = _real(mask)
  assert np.abs(ref[real]).max() > 1.0
  np.testing.assert_allclose(got[real], ref[real], atol=1e-4, rtol=0)


def test_incremental_decode_matches_full_forward(loaded):
  config, params = loaded
  model = gemma3.Gemma3(config)
  prompt, new = 11, 5
  # Left-padded prompts of lengths 11, 7 and 4, each followed by 5 (teacher-forced) new tokens.
  ids, mask = _prompts("left", lengths=(11, 7, 4), total=prompt, seed=3)
  extra = np.random.default_rng(4).integers(1, TINY["vocab_size"], (3, new))
  ids, mask = np.concatenate([ids, extra], 1), np.concatenate([mask, np.ones_like(extra)], 1)
  positions = gemma3.positions_from_mask(mask)
  full = _jax_logits(config, params, ids, mask)

  @jax.jit
  def step(params, cache, tokens, positions, mask, index):
    return model.apply({"params": params}, tokens, positions=positions, attention_mask=mask,
                       cache=cache, cache_index=index)

  cache = model.init_cache(3, prompt + new)
  assert cache["layers_0"]["k"].shape == (3, 2, prompt + new, 8)  # [B, KV, S, D]
  logits, cache = step(params, cache, ids[:, :prompt], positions[:, :prompt], mask, 0)
  real = _real(mask[:, :prompt])
  np.testing.assert_allclose(np.asarray(logits)[real], full[:, :prompt][real], atol=1e-4)
  for j in range(prompt, prompt + new):
    logits, cache = step(params, cache, ids[:, j:j + 1], positions[:, j:j + 1], mask, j)
    np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, j], atol=1e-4, err_msg=str(j))
  np.testing.assert_array_equal(np.asarray(cache["pos"]), np.asarray(positions))


def test_cache_errors(loaded):
  config, params = loaded
  model = gemma3.Gemma3(config)
  ids, mask = _prompts("left")
  positions = gemma3.positions_from_mask(mask)
  small = model.init_cache(3, 8)
  with pytest.raises(ValueError, match="11 new tokens do not fit the KV cache of 8 slots"):
    model.apply({"params": params}, ids, positions=positions, attention_mask=np.ones((3, 8)),
                cache=small, cache_index=0)
  cache = model.init_cache(3, 16)
  with pytest.raises(ValueError, match=r"cache_index 6 \+ 11 new tokens exceeds the KV cache"):
    model.apply({"params": params}, ids, positions=positions, attention_mask=np.ones((3, 16)),
                cache=cache, cache_index=6)
  with pytest.raises(ValueError, match=r"attention_mask has shape \(3, 11\), expected \(3, 16\)"):
    model.apply({"params": params}, ids, positions=positions, attention_mask=mask, cache=cache,
                cache_index=0)
  with pytest.raises(ValueError, match="exactly one of tokens and embeddings"):
    model.apply({"params": params}, positions=positions, attention_mask=mask)
  old_layout = {k: v if k == "pos" else {n: a.transpose(0, 2, 1, 3) for n, a in v.items()}
                for k, v in cache.items()}  # [B, S, KV, D], the layout before the decode change
  with pytest.raises(ValueError, match=r"cache\['layers_0'\]\['k'\] has shape \(3, 16, 2, 8\), "
                     r"expected \[B, KV, S, D\] = \(3, 2, 16, 8\)"):
    model.apply({"params": params}, ids, positions=positions, attention_mask=np.ones((3, 16)),
                cache=old_layout, cache_index=0)


def test_export_round_trip(causal, loaded, tmp_path):
  _, torch_model = causal
  config, params = loaded
  hf_gemma3.export_gemma3(params, config, tmp_path)
  reloaded = transformers.Gemma3ForCausalLM.from_pretrained(
      str(tmp_path), attn_implementation="eager").eval()
  ids, mask = _prompts("right")
  np.testing.assert_array_equal(_torch_logits(reloaded, ids, mask),
                                _torch_logits(torch_model, ids, mask))
  config2, params2 = hf_gemma3.load_gemma3(tmp_path)
  assert config2 == config
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    np.testing.assert_array_equal(a, b)


def test_bfloat16_checkpoint(causal, loaded, tmp_path):
  """bf16 tensors (NumPy cannot name them) load through the memory-map reader, and export."""
  transformers.Gemma3ForCausalLM.from_pretrained(causal[0], dtype=torch.bfloat16).save_pretrained(
      tmp_path / "bf16")
  config, params = hf_gemma3.load_gemma3(tmp_path / "bf16", param_dtype="bfloat16")
  assert config.params_dtype == jnp.bfloat16
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded[1])):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_array_equal(a, b.astype(jnp.bfloat16))
  hf_gemma3.export_gemma3(params, config, tmp_path / "out")
  _, again = hf_gemma3.load_gemma3(tmp_path / "out", param_dtype="bfloat16")
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)


# --- Size ---------------------------------------------------------------------------------------

def test_medgemma_4b_param_count_and_memory():
  config = gemma3.medgemma_4b()
  assert config.layer_types.count(F) == 5 and config.layer_types[5] == F
  h, n, kv, d, f, v, layers = 2560, 8, 4, 256, 10240, 262208, 34
  per_layer = (h * n * d + 2 * h * kv * d + n * d * h  # q, k, v, o
               + 2 * d + 4 * h  # q/k norms, four hidden-size norms
               + 3 * h * f)  # gate, up, down
  expected = v * h + layers * per_layer + h
  assert gemma3.param_count(config) == expected == 3_880_263_168
  specs = nn.get_partition_spec(gemma3.abstract_variables(config))
  used = {n for spec in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.P))
          for n in spec if n is not None}
  assert used <= {name for name, _ in config_lib.DEFAULT_RULES}
  assert {"vocab", "embed", "heads", "kv_heads", "kv", "mlp"} <= used
  one = estimate_memory(config, {"data": 1, "fsdp": 1, "tensor": 1}, 8, 512)
  fsdp = estimate_memory(config, {"data": 1, "fsdp": 8, "tensor": 1}, 8, 512)
  assert one["params"] == expected * 4 and one["optimizer"] == 2 * expected * 4
  assert expected * 4 / 8 <= fsdp["params"] < expected * 4 / 8 * 1.001  # 4·2560 rows divide
  remat = estimate_memory(config, {"data": 1, "fsdp": 8, "tensor": 1}, 8, 512, remat=True)
  assert remat["activations"] < fsdp["activations"]
  assert fsdp["total"] == sum(v for k, v in fsdp.items() if k != "total")


# --- Loading onto a mesh -------------------------------------------------------------------------

def test_load_onto_mesh(causal, loaded):
  mesh = sharding.make_mesh(config_lib.mesh_config((2, 2, 2)))
  config, params = hf_gemma3.load_gemma3(causal[0], mesh=mesh)
  q = params["layers_0"]["attn"]["q_proj"]["kernel"]
  assert isinstance(q, jax.Array) and q.sharding.spec == jax.sharding.PartitionSpec(
      "fsdp", "tensor", None)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded[1])):
    np.testing.assert_array_equal(np.asarray(a), b)


# --- Bad input ------------------------------------------------------------------------------------

def _copy(src, tmp_path, name="copy"):
  dst = os.path.join(tmp_path, name)
  shutil.copytree(src, dst)
  return dst


def _edit_config(path, **changes):
  with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
    config = json.load(f)
  config.update(changes)
  with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f)


def test_bad_checkpoints(causal, tmp_path):
  path = _copy(causal[0], tmp_path, "missing_shard")
  with open(os.path.join(path, hf_gemma3.INDEX_FILE), encoding="utf-8") as f:
    shard = sorted(set(json.load(f)["weight_map"].values()))[1]
  os.remove(os.path.join(path, shard))
  with pytest.raises(FileNotFoundError, match=f"model.safetensors.index.json: lists shard file "
                                              f"{shard}, which does not exist"):
    hf_gemma3.load_gemma3(path)

  path = _copy(causal[0], tmp_path, "shape")
  _edit_config(path, intermediate_size=36)
  with pytest.raises(ValueError, match=r"tensor model\.layers\.0\.mlp\.\w+_proj\.weight has shape "
                                       r"\(\d+, \d+\), but the config gives"):
    hf_gemma3.load_gemma3(path)

  path = _copy(causal[0], tmp_path, "layers")
  _edit_config(path, num_hidden_layers=8, layer_types=LAYER_TYPES + [S])
  with pytest.raises(ValueError, match=r"missing tensor\(s\) model\.layers\.7\."):
    hf_gemma3.load_gemma3(path)

  path = _copy(causal[0], tmp_path, "arch")
  _edit_config(path, architectures=["LlamaForCausalLM"])
  with pytest.raises(ValueError, match=r"config\.json: architectures \['LlamaForCausalLM'\] are "
                                       "not supported"):
    hf_gemma3.load_gemma3(path)
  _edit_config(path, architectures=None, model_type="llama")
  with pytest.raises(ValueError, match="config.json: model_type 'llama' is not supported"):
    hf_gemma3.load_gemma3(path)

  with pytest.raises(FileNotFoundError, match="no such Gemma3 model directory"):
    hf_gemma3.load_gemma3(os.path.join(tmp_path, "nowhere"))


# --- Scanned layers -------------------------------------------------------------------------------

def test_scan_layers_matches_torch_and_the_layer_loop(causal, loaded, tmp_path):
  """``scan_layers=True``: HF weights stacked on a leading layer axis, one scanned body that picks
  each layer's mask and RoPE by its kind — the same logits as torch and the same gradients as the
  per-layer loop; export unstacks again."""
  path, torch_model = causal
  config, params = loaded
  scan_config, scan_params = hf_gemma3.load_gemma3(path, scan_layers=True, remat=True)
  assert scan_params["layers"]["attn"]["q_proj"]["kernel"].shape == (7, 24, 4, 8)
  assert not any(k.startswith("layers_") for k in scan_params)
  specs = nn.get_partition_spec(gemma3.abstract_variables(scan_config))["params"]
  assert specs["layers"]["attn"]["q_proj"]["kernel"] == jax.sharding.PartitionSpec(
      "layers", "embed", "heads", "kv")
  ids, mask = _prompts("right")
  real = _real(mask)
  ref = _torch_logits(torch_model, ids, mask)
  got = np.asarray(gemma3.Gemma3(scan_config).apply(
      {"params": scan_params}, jnp.asarray(ids, jnp.int32),
      positions=gemma3.positions_from_mask(mask), attention_mask=jnp.asarray(mask))[0])
  np.testing.assert_allclose(got[real], ref[real], atol=1e-4, rtol=0)

  def loss(cfg, p):
    logits, _ = gemma3.Gemma3(cfg).apply({"params": p}, jnp.asarray(ids, jnp.int32),
                                         positions=gemma3.positions_from_mask(mask),
                                         attention_mask=jnp.asarray(mask))
    return jnp.sum(jnp.where(real[..., None], jax.nn.log_softmax(logits), 0.0)) / real.sum()

  g_loop = jax.grad(functools.partial(loss, config))(params)
  g_scan = gemma3.unstack_layers(jax.device_get(jax.grad(functools.partial(loss, scan_config))(
      scan_params)))
  for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(g_loop), jax.tree.leaves(g_scan)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4,
                               atol=1e-5 * np.abs(np.asarray(a)).max() + 1e-9, err_msg=str(p))
  hf_gemma3.export_gemma3(scan_params, scan_config, tmp_path)
  reloaded = transformers.Gemma3ForCausalLM.from_pretrained(tmp_path,
                                                            attn_implementation="eager").eval()
  np.testing.assert_allclose(_torch_logits(reloaded, ids, mask)[real], ref[real], atol=1e-5)
  cache = gemma3.init_cache(config, 3, 16)
  with pytest.raises(ValueError, match="scan_layers=True runs without a KV cache"):
    gemma3.Gemma3(scan_config).apply({"params": scan_params}, jnp.asarray(ids[:, :1]),
                                     positions=jnp.zeros((3, 1), jnp.int32),
                                     attention_mask=jnp.ones((3, 16), jnp.int32), cache=cache,
                                     cache_index=0)


# --- Untied output table --------------------------------------------------------------------------

def test_untied_output_table_matches_torch(causal, loaded, multimodal, tmp_path):
  """``tie_word_embeddings=False``: HF's separate ``lm_head.weight`` loads as ``embedder/lm_head``
  (same logical axes as the embedding) and gives the logits of Gemma3ForCausalLM (full forward,
  KV-cache decode, greedy ``generate``) and of the MedGemma layout; export writes it back; a tied
  checkpoint loaded untied starts with a copy of its table (the same logits)."""
  from anatomix_jax.models import generate as gen  # noqa: PLC0415

  torch.manual_seed(0)
  torch_model = transformers.Gemma3ForCausalLM(_text_config(
      final_logit_softcapping=5.0, tie_word_embeddings=False, attn_implementation="eager")).eval()
  _randomize(torch_model)
  assert torch_model.lm_head.weight.data_ptr() != torch_model.model.embed_tokens.weight.data_ptr()
  torch_model.save_pretrained(tmp_path / "untied")
  config, params = hf_gemma3.load_gemma3(tmp_path / "untied")
  assert not config.tie_word_embeddings and sorted(params["embedder"]) == ["embedding", "lm_head"]
  np.testing.assert_array_equal(params["embedder"]["lm_head"],
                                torch_model.lm_head.weight.detach().numpy())
  specs = nn.get_partition_spec(gemma3.abstract_variables(config))["params"]["embedder"]
  assert specs["lm_head"] == specs["embedding"] == jax.P("vocab", "embed")
  ids, mask = _prompts("right")
  real = _real(mask)
  ref = _torch_logits(torch_model, ids, mask)
  got = _jax_logits(config, params, ids, mask)
  assert np.abs(ref[real]).max() > 1.0
  print(f"untied float32 logits max |ours - torch| = {np.abs(got[real] - ref[real]).max():.2e}")
  np.testing.assert_allclose(got[real], ref[real], atol=1e-5, rtol=0)
  # The output table matters: with the input table the logits differ.
  tied = _jax_logits(dataclasses.replace(config, tie_word_embeddings=True),
                     {k: v for k, v in params.items() if k != "embedder"}
                     | {"embedder": {"embedding": params["embedder"]["embedding"]}}, ids, mask)
  assert np.abs(tied[real] - got[real]).max() > 0.1
  # Decoding: the first new token by KV cache equals the full forward; greedy ids equal torch's.
  prompt = [int(x) for x in ids[0]]
  tokens, pmask = gen.left_pad([prompt])
  out = gen.generate(config, params, tokens=tokens, attention_mask=pmask, max_new_tokens=6)
  with torch.no_grad():
    want = torch_model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(
        1, len(prompt), dtype=torch.long), do_sample=False, max_new_tokens=6, pad_token_id=0,
        eos_token_id=None)[0, len(prompt):].numpy()
  np.testing.assert_array_equal(np.asarray(out["tokens"])[0], want)
  # Export: lm_head.weight stored, config untied; transformers and our loader read it back.
  hf_gemma3.export_gemma3(params, config, tmp_path / "out")
  with open(tmp_path / "out" / "config.json") as f:
    assert json.load(f)["tie_word_embeddings"] is False
  reloaded = transformers.Gemma3ForCausalLM.from_pretrained(
      tmp_path / "out", attn_implementation="eager").eval()
  np.testing.assert_array_equal(_torch_logits(reloaded, ids, mask), ref)
  config2, params2 = hf_gemma3.load_gemma3(tmp_path / "out")
  assert config2 == config
  jax.tree.map(np.testing.assert_array_equal, params2, params)
  with pytest.raises(ValueError, match="tie_word_embeddings=True cannot override an untied"):
    hf_gemma3.load_gemma3(tmp_path / "out", tie_word_embeddings=True)
  # A tied checkpoint loaded untied: lm_head starts as the table's copy, the logits unchanged.
  config3, params3 = hf_gemma3.load_gemma3(causal[0], tie_word_embeddings=False)
  assert not config3.tie_word_embeddings
  np.testing.assert_array_equal(params3["embedder"]["lm_head"], loaded[1]["embedder"]["embedding"])
  np.testing.assert_array_equal(_jax_logits(config3, params3, ids, mask),
                                _jax_logits(*loaded, ids, mask))
  # The MedGemma layout, untied (the top-level flag, as Gemma3ForConditionalGeneration reads it).
  mm = transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(
      text_config=_text_config().to_dict(), vision_config=multimodal[1].config.vision_config,
      mm_tokens_per_image=4, tie_word_embeddings=False, attn_implementation="eager")).eval()
  _randomize(mm)
  mm.save_pretrained(tmp_path / "mm")
  config4, params4 = hf_gemma3.load_gemma3(tmp_path / "mm")
  assert not config4.tie_word_embeddings
  np.testing.assert_allclose(_jax_logits(config4, params4, ids, mask)[real],
                             _torch_logits(mm, ids, mask)[real], atol=1e-5, rtol=0)
