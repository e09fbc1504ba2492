"""Loads HF Gemma3 / MedGemma checkpoints into ``models.gemma3.Gemma3`` params, and exports back.

A directory holds ``config.json`` and either ``model.safetensors`` or a sharded
``model.safetensors.index.json`` + the shard files it lists. Tensors are read lazily, one at a
time, with ``safetensors.safe_open`` (bfloat16 tensors, which NumPy cannot name, through a memory
map of the file with ``ml_dtypes.bfloat16``). With a mesh, each converted tensor goes straight to
its ``NamedSharding`` (``jax.make_array_from_callback``; every process builds only its shards), so
a full copy never sits on one device.

Two on-disk layouts (picked from ``config.json``'s ``architectures`` / ``model_type``):

  ``causal_lm``               ``Gemma3ForCausalLM``: ``model.*`` (``lm_head.weight`` absent: tied)
  ``conditional_generation``  ``Gemma3ForConditionalGeneration`` (MedGemma):
                              ``language_model.model.*`` (``model.language_model.*``, transformers
                              5's in-memory names, also accepted); ``vision_tower.*`` and
                              ``multi_modal_projector.*`` are skipped

Weights map onto our leaves through a declarative NAME TABLE (``name_table(config)``; templates in
``GLOBAL_RULES`` and ``LAYER_RULES``) and per-kind transforms (``GEMMA3_TRANSFORMS``):

  ``copy``            unchanged (embedding; RMSNorm weights: both sides use (1 + w))
  ``linear``          [out, in] → [in, out] (MLP)
  ``heads_kernel``    q/k/v [n·D, H] → [H, n, D] (n = N for q, KV for k/v)
  ``out_proj_weight`` o_proj [H, N·D] → [N, D, H]

Untied output table (``tie_word_embeddings: false`` in ``config.json``, or the override
``tie_word_embeddings=False``): ``lm_head.weight`` [V, H] (``LM_HEAD_KEYS``, beside the text model)
↔ ``embedder/lm_head``, copied. A tied checkpoint loaded untied starts ``lm_head`` as a copy of
the embedding table (what PEFT's separate ``modules_to_save`` copies of a tied table start from).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from anatomix_jax.core.config import DEFAULT_RULES
from anatomix_jax.convert.tensors import (
    TRANSFORMS, HFRule, Transform, get_path, key_list, read_bf16_tensor, set_path)
from anatomix_jax.models import lora as lora_lib
from anatomix_jax.models.gemma3 import abstract_variables, stack_layers, unstack_layers
from anatomix_jax.models.gemma3_config import Gemma3Config, hf_ties_embeddings
from anatomix_jax.core.sharding import logical_shardings, unbox

Path = tuple[str, ...]
CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CAUSAL_LM = "causal_lm"
CONDITIONAL = "conditional_generation"
# config.json "architectures" entry → layout.
ARCHITECTURES = {"Gemma3ForCausalLM": CAUSAL_LM, "Gemma3ForConditionalGeneration": CONDITIONAL}
MODEL_TYPES = {"gemma3_text": CAUSAL_LM, "gemma3": CONDITIONAL}  # when architectures is absent
# Key prefixes of the text model per layout, in order of preference.
LAYOUT_PREFIXES = {CAUSAL_LM: ("model.",),
                   CONDITIONAL: ("language_model.model.", "model.language_model.")}
# Tensors that are not part of the text model (or tied to it) and are skipped (an untied lm_head
# is read on its own: LM_HEAD_KEYS).
IGNORED_KEYS = re.compile(
    r"^(vision_tower\.|multi_modal_projector\.|lm_head\.|language_model\.lm_head\.|"
    r"model\.vision_tower\.|model\.multi_modal_projector\.)")
ANCHOR_KEY = "embed_tokens.weight"
# The untied output table's key for each text-model prefix (it sits beside the text model).
LM_HEAD_KEYS = {"model.": "lm_head.weight",
                "language_model.model.": "language_model.lm_head.weight",
                "model.language_model.": "lm_head.weight"}
LM_HEAD_PATH = ("embedder", "lm_head")


class Gemma3LoadError(ValueError):
  """A Gemma3 directory's config or weights are inconsistent or unreadable."""


class Gemma3FileNotFoundError(FileNotFoundError):
  """A Gemma3 directory, or a file it must hold, does not exist."""


# --- Tensor transforms and name table -------------------------------------------------------------

GEMMA3_TRANSFORMS: dict[str, Transform] = {
    k: TRANSFORMS[k] for k in ("copy", "linear", "out_proj_weight", "heads_kernel")}

# (HF key without the layout prefix, our '/'-joined path, transform, heads); "{i}": layer index;
# heads "q" = num_attention_heads, "kv" = num_key_value_heads, None = not split by head.
GLOBAL_RULES = (
    ("embed_tokens.weight", "embedder/embedding", "copy", None),
    ("norm.weight", "final_norm/scale", "copy", None),
)
LAYER_RULES = (
    ("layers.{i}.self_attn.q_proj.weight", "layers_{i}/attn/q_proj/kernel", "heads_kernel", "q"),
    ("layers.{i}.self_attn.k_proj.weight", "layers_{i}/attn/k_proj/kernel", "heads_kernel", "kv"),
    ("layers.{i}.self_attn.v_proj.weight", "layers_{i}/attn/v_proj/kernel", "heads_kernel", "kv"),
    ("layers.{i}.self_attn.o_proj.weight", "layers_{i}/attn/o_proj/kernel", "out_proj_weight",
     "q"),
    ("layers.{i}.self_attn.q_norm.weight", "layers_{i}/attn/q_norm/scale", "copy", None),
    ("layers.{i}.self_attn.k_norm.weight", "layers_{i}/attn/k_norm/scale", "copy", None),
    ("layers.{i}.mlp.gate_proj.weight", "layers_{i}/mlp/gate_proj/kernel", "linear", None),
    ("layers.{i}.mlp.up_proj.weight", "layers_{i}/mlp/up_proj/kernel", "linear", None),
    ("layers.{i}.mlp.down_proj.weight", "layers_{i}/mlp/down_proj/kernel", "linear", None),
) + tuple(
    (f"layers.{{i}}.{norm}.weight", f"layers_{{i}}/{norm}/scale", "copy", None)
    for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"))


@functools.lru_cache(maxsize=16)
def name_table(config: Gemma3Config) -> tuple[HFRule, ...]:
  """Every HF key of the text model at ``config`` with its leaf."""
  heads = {"q": config.num_attention_heads, "kv": config.num_key_value_heads, None: 1}
  rule = lambda key, path, kind, h, **fmt: HFRule(  # noqa: E731
      key.format(**fmt), tuple(path.format(**fmt).split("/")), kind, heads[h])
  rules = [rule(*r) for r in GLOBAL_RULES]
  for i in range(config.num_hidden_layers):
    rules += [rule(*r, i=i) for r in LAYER_RULES]
  return tuple(rules)


def expected_hf_shapes(config: Gemma3Config) -> dict[str, tuple[int, ...]]:
  """HF key (without prefix) → the shape a HF model at ``config`` has."""
  params = unbox(abstract_variables(config)["params"])
  shape = lambda r: tuple(get_path(params, r.path).shape)  # noqa: E731
  return {r.hf_key: GEMMA3_TRANSFORMS[r.kind].torch_shape([shape(r)], r.heads)
          for r in name_table(config)}


# --- Reading ------------------------------------------------------------------------------------

def _model_dir(model_dir: str | os.PathLike) -> str:
  path = os.fspath(model_dir)
  if not os.path.isdir(path):
    raise Gemma3FileNotFoundError(f"{path}: no such Gemma3 model directory")
  return path


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.isfile(path):
    raise Gemma3FileNotFoundError(f"{path}: no such file")
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except ValueError as err:
    raise Gemma3LoadError(f"{path}: not valid JSON ({err})") from err


def layout_of(hf_config: Mapping[str, Any], source: str = CONFIG_FILE) -> str:
  """The on-disk layout of a ``config.json`` dict (``causal_lm`` or ``conditional_generation``).

  Raises:
    Gemma3LoadError: naming an unknown architecture or model_type.
  """
  architectures = hf_config.get("architectures") or []
  if architectures:
    known = [a for a in architectures if a in ARCHITECTURES]
    if not known:
      raise Gemma3LoadError(f"{source}: architectures {architectures} are not supported; "
                            f"supported: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[known[0]]
  model_type = hf_config.get("model_type")
  if model_type not in MODEL_TYPES:
    raise Gemma3LoadError(f"{source}: model_type {model_type!r} is not supported; supported: "
                          f"{sorted(MODEL_TYPES)}")
  return MODEL_TYPES[model_type]


def read_config(model_dir: str | os.PathLike, **overrides: Any) -> tuple[Gemma3Config, str]:
  """Reads ``config.json``: (config, layout). ``overrides`` are our own fields (dtype, remat…,
  ``tie_word_embeddings=False`` to untie a tied model)."""
  config, layout, _ = _read_config(model_dir, **overrides)
  return config, layout


def _read_config(model_dir: str | os.PathLike, **overrides: Any
                 ) -> tuple[Gemma3Config, str, bool]:
  """``read_config`` + whether the file itself ties the output table."""
  path = os.path.join(_model_dir(model_dir), CONFIG_FILE)
  hf_config = _read_json(path)
  layout = layout_of(hf_config, path)
  try:
    config = Gemma3Config.from_hf_dict(hf_config, **overrides)
  except (ValueError, TypeError) as err:
    raise Gemma3LoadError(f"{path}: {err}") from err
  return config, layout, hf_ties_embeddings(hf_config)


class _Checkpoint:
  """The tensors of a (possibly sharded) safetensors checkpoint, read lazily by key."""

  def __init__(self, model_dir: str):
    single = os.path.join(model_dir, SINGLE_FILE)
    index = os.path.join(model_dir, INDEX_FILE)
    if os.path.isfile(index):
      weight_map = _read_json(index).get("weight_map")
      if not isinstance(weight_map, Mapping):
        raise Gemma3LoadError(f"{index}: no weight_map")
      for name in sorted(set(weight_map.values())):
        if not os.path.isfile(os.path.join(model_dir, name)):
          raise Gemma3FileNotFoundError(f"{index}: lists shard file {name}, which does not exist "
                                        f"in {model_dir} (e.g. for tensor "
                                        f"{next(k for k, v in weight_map.items() if v == name)})")
      self.files = {k: os.path.join(model_dir, v) for k, v in weight_map.items()}
      self.source = index
    elif os.path.isfile(single):
      from safetensors import safe_open  # noqa: PLC0415
      try:
        with safe_open(single, framework="numpy") as f:
          self.files = {k: single for k in f.keys()}  # noqa: SIM118
      except Exception as err:  # noqa: BLE001 (the library raises several kinds)
        raise Gemma3LoadError(f"{single}: not a readable safetensors file ({err})") from err
      self.source = single
    else:
      raise Gemma3FileNotFoundError(f"{model_dir}: no weight file (looked for {SINGLE_FILE} and "
                                    f"{INDEX_FILE})")
    self._handles: dict[str, Any] = {}

  def keys(self) -> list[str]:
    return list(self.files)

  def _handle(self, key: str) -> Any:
    path = self.files[key]
    if path not in self._handles:
      from safetensors import safe_open  # noqa: PLC0415
      try:
        self._handles[path] = safe_open(path, framework="numpy")
      except Exception as err:  # noqa: BLE001
        raise Gemma3LoadError(f"{path}: not a readable safetensors file ({err})") from err
    return self._handles[path]

  def shape(self, key: str) -> tuple[int, ...]:
    try:
      return tuple(self._handle(key).get_slice(key).get_shape())
    except Exception as err:  # noqa: BLE001 (a key listed in the index but not in the shard)
      raise Gemma3LoadError(f"{self.files[key]}: cannot read tensor {key} ({err})") from err

  def close(self) -> None:
    self._handles.clear()  # safe_open handles release their memory maps when dropped

  def get(self, key: str) -> np.ndarray:
    handle = self._handle(key)
    if handle.get_slice(key).get_dtype() == "BF16":
      return read_bf16_tensor(self.files[key], key)
    return handle.get_tensor(key)


def _prefix(checkpoint: _Checkpoint, layout: str) -> str:
  keys = set(checkpoint.keys())
  for prefix in LAYOUT_PREFIXES[layout]:
    if prefix + ANCHOR_KEY in keys:
      return prefix
  raise Gemma3LoadError(f"{checkpoint.source}: missing tensor "
                        f"{LAYOUT_PREFIXES[layout][0] + ANCHOR_KEY} (layout {layout}; tensors "
                        f"found: {key_list(list(keys))})")


def load_gemma3(model_dir: str | os.PathLike, mesh: jax.sharding.Mesh | None = None,
                rules: Sequence[tuple[str, Any]] | None = None, dtype: str = "float32", *,
                param_dtype: str = "float32", **config_overrides: Any
                ) -> tuple[Gemma3Config, dict[str, Any]]:
  """Loads a local HF Gemma3 text model or MedGemma (multimodal) directory.

  Args:
    model_dir: holds ``config.json`` and ``model.safetensors`` or an index with its shards.
    mesh: None: NumPy params on the host; a mesh: ``jax.Array`` params, each placed straight
      onto its ``NamedSharding`` from the logical-axis ``rules``.
    rules: logical-axis rules; None: ``config_lib.DEFAULT_RULES``.
    dtype: our compute dtype name.
    param_dtype: the parameters' dtype name (what the tensors are cast to).
    **config_overrides: other fields of ``Gemma3Config`` (e.g. ``remat=True``).

  Returns:
    ``(config, params)`` for ``Gemma3(config).apply({"params": params}, …)``.

  Raises:
    Gemma3FileNotFoundError: the directory, config, weights or a listed shard file is missing.
    Gemma3LoadError: naming the file and the offending setting or tensor (unknown
      architecture/model_type, missing tensor, shape mismatch with the config).
  """
  config, layout, file_tied = _read_config(model_dir, dtype=dtype, param_dtype=param_dtype,
                                           **config_overrides)
  if config.scan_layers:
    # Read per layer onto the host, stack along the scanned axis, then place. (This holds the
    # whole model in host memory once, unlike the per-tensor path below.)
    overrides = dict(config_overrides, scan_layers=False)
    _, flat = load_gemma3(model_dir, None, rules, dtype, param_dtype=param_dtype, **overrides)
    params = stack_layers(flat, config.num_hidden_layers)
    if mesh is not None:
      shardings = logical_shardings(abstract_variables(config)["params"], mesh,
                                    DEFAULT_RULES if rules is None else rules)
      params = _place(params, shardings)
    return config, params
  checkpoint = _Checkpoint(_model_dir(model_dir))
  prefix = _prefix(checkpoint, layout)
  expected = expected_hf_shapes(config)
  head_key = None if config.tie_word_embeddings or file_tied else LM_HEAD_KEYS[prefix]
  missing = [prefix + k for k in expected if prefix + k not in checkpoint.files]
  missing += [head_key] if head_key and head_key not in checkpoint.files else []
  if missing:
    raise Gemma3LoadError(f"{checkpoint.source}: missing tensor(s) {key_list(missing)}")
  unexpected = [k for k in checkpoint.keys()
                if not IGNORED_KEYS.match(k) and (not k.startswith(prefix)
                                                  or k[len(prefix):] not in expected)]
  if unexpected:
    raise Gemma3LoadError(f"{checkpoint.source}: unexpected tensor(s) {key_list(unexpected)} "
                          f"(does num_hidden_layers match?)")
  for key, shape in expected.items():
    found = checkpoint.shape(prefix + key)
    if found != shape:
      raise Gemma3LoadError(f"{checkpoint.files[prefix + key]}: tensor {prefix + key} has shape "
                            f"{found}, but the config gives {shape}")
  table_shape = (config.vocab_size, config.hidden_size)
  if head_key and checkpoint.shape(head_key) != table_shape:
    raise Gemma3LoadError(f"{checkpoint.files[head_key]}: tensor {head_key} has shape "
                          f"{checkpoint.shape(head_key)}, but the config gives {table_shape}")
  shardings = None
  if mesh is not None:
    shardings = logical_shardings(abstract_variables(config)["params"], mesh,
                                  DEFAULT_RULES if rules is None else rules)
  params: dict[str, Any] = {}

  def put(path: Path, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array.astype(config.params_dtype))
    if shardings is not None:
      sharding = get_path(shardings, path)
      array = jax.make_array_from_callback(array.shape, sharding, lambda idx, a=array: a[idx])
    set_path(params, path, array)

  try:
    for rule in name_table(config):
      tensor = checkpoint.get(prefix + rule.hf_key)
      (array,) = GEMMA3_TRANSFORMS[rule.kind].to_flax(tensor, rule.heads)
      put(rule.path, array)
    if not config.tie_word_embeddings:  # the file's lm_head, or (a tied file) the table's copy
      put(LM_HEAD_PATH, checkpoint.get(head_key or prefix + ANCHOR_KEY))
  finally:
    checkpoint.close()
  return config, params


def _place(params: Mapping[str, Any], shardings: Mapping[str, Any]) -> dict[str, Any]:
  """Host arrays → jax Arrays on the matching shardings (extra sharding branches ignored)."""
  return {k: _place(v, shardings[k]) if isinstance(v, Mapping) else
          jax.make_array_from_callback(v.shape, shardings[k], lambda idx, a=v: a[idx])
          for k, v in params.items()}


# --- Export -------------------------------------------------------------------------------------

def to_hf_state_dict(params: Mapping[str, Any], config: Gemma3Config,
                     prefix: str = "model.") -> dict[str, np.ndarray]:
  """Our params → HF tensors (NumPy, the params' dtype) under ``prefix``."""
  expected = expected_hf_shapes(config)
  out = {}
  for rule in name_table(config):
    try:
      leaf = np.asarray(jax.device_get(get_path(params, rule.path)))
    except KeyError as err:
      raise Gemma3LoadError(f"params lack {'/'.join(rule.path)} (for {rule.hf_key})") from err
    tensor = GEMMA3_TRANSFORMS[rule.kind].to_torch([leaf], rule.heads)
    if tuple(tensor.shape) != expected[rule.hf_key]:
      raise Gemma3LoadError(f"params {'/'.join(rule.path)} has shape {leaf.shape}, which does not "
                            f"fit {rule.hf_key} {expected[rule.hf_key]} of the config")
    out[prefix + rule.hf_key] = np.ascontiguousarray(tensor)
  if not config.tie_word_embeddings:
    try:
      head = np.asarray(jax.device_get(get_path(params, LM_HEAD_PATH)))
    except KeyError as err:
      raise Gemma3LoadError("params lack embedder/lm_head (the untied output table)") from err
    out[LM_HEAD_KEYS[prefix]] = np.ascontiguousarray(head)
  return out


def export_gemma3(params: Mapping[str, Any], config: Gemma3Config, out_dir: str | os.PathLike,
                  layout: str = CAUSAL_LM) -> str:
  """Writes ``config.json`` + ``model.safetensors`` for ``Gemma3ForCausalLM.from_pretrained``.

  Args:
    params: ``Gemma3`` params (NumPy or jax arrays, possibly sharded).
    config: their config.
    out_dir: created if needed.
    layout: only ``causal_lm`` (a text-only ``Gemma3ForCausalLM`` directory; a tied
      ``lm_head`` is not stored, as transformers does; an untied one is).

  Returns:
    The path of the weight file.
  """
  if layout != CAUSAL_LM:
    raise ValueError(f"export layout {layout!r} is not supported; supported: [{CAUSAL_LM!r}]")
  from safetensors.numpy import save_file  # noqa: PLC0415
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  params = nn.unbox(params)
  if config.scan_layers:
    params = unstack_layers(jax.device_get(params))
    config = dataclasses.replace(config, scan_layers=False)
  if lora_lib.lora_leaves(params):
    if not config.lora.rank:
      raise Gemma3LoadError("params hold LoRA leaves but config.lora.rank is 0 (pass the config "
                            "the adapters were trained with)")
    params = lora_lib.merge(params, config.lora)  # the exported model is the merged one
  config = dataclasses.replace(config, lora=lora_lib.LoraSpec())
  state = to_hf_state_dict(params, config, LAYOUT_PREFIXES[CAUSAL_LM][0])
  hf_config = config.to_hf_dict()
  hf_config["dtype"] = str(next(iter(state.values())).dtype)
  with open(os.path.join(out_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
    json.dump(hf_config, f, indent=2)
  path = os.path.join(out_dir, SINGLE_FILE)
  save_file(state, path, metadata={"format": "pt"})
  return path


# --- LoRA adapters in PEFT's format ------------------------------------------------------------

PEFT_PREFIXES = {CAUSAL_LM: "base_model.model.model.",
                 CONDITIONAL: "base_model.model.model.language_model."}
# our module group → the HF submodule that holds the projection.
_LORA_GROUPS = {"q_proj": ("attn", "self_attn"), "k_proj": ("attn", "self_attn"),
                "v_proj": ("attn", "self_attn"), "o_proj": ("attn", "self_attn"),
                "gate_proj": ("mlp", "mlp"), "up_proj": ("mlp", "mlp"),
                "down_proj": ("mlp", "mlp")}
# The tied output table of a ``modules_to_save`` embedding (both layouts keep lm_head at the top).
PEFT_LM_HEAD_KEY = "base_model.model.lm_head.weight"
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"


def to_peft_state_dict(params: Mapping[str, Any], config: Gemma3Config,
                       layout: str = CAUSAL_LM) -> dict[str, np.ndarray]:
  """The LoRA leaves as PEFT tensors: ``…layers.{i}.self_attn.q_proj.lora_A.weight`` [r, in] and
  ``….lora_B.weight`` [out, r] (in/out flattened as in the HF linear layer)."""
  spec, params = config.lora, nn.unbox(params)
  if config.scan_layers:
    params = unstack_layers(jax.device_get(params))
  if not spec.rank:
    raise Gemma3LoadError("config.lora.rank is 0: there are no adapters to export")
  prefix, out = PEFT_PREFIXES[layout], {}
  for i in range(config.num_hidden_layers):
    for name in spec.targets:
      ours, theirs = _LORA_GROUPS[name]
      try:
        leaf = params[f"layers_{i}"][ours][name]
        a, b = (np.asarray(jax.device_get(leaf[k]), np.float32) for k in lora_lib.LORA_LEAVES)
      except KeyError as err:
        raise Gemma3LoadError(f"params lack layers_{i}/{ours}/{name}/lora_a|lora_b") from err
      key = f"{prefix}layers.{i}.{theirs}.{name}"
      out[f"{key}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, spec.rank).T)
      out[f"{key}.lora_B.weight"] = np.ascontiguousarray(b.reshape(spec.rank, -1).T)
  return out


def export_peft_adapter(params: Mapping[str, Any], config: Gemma3Config,
                        out_dir: str | os.PathLike, base_model: str = "",
                        layout: str = CAUSAL_LM, embedding: bool = True) -> str:
  """Writes a PEFT LoRA adapter directory (``adapter_config.json`` + safetensors).

  ``peft.PeftModel.from_pretrained(base, out_dir)`` then reproduces ``params``: the LoRA matrices
  (float32) and, with ``embedding``, the embedding table (its dtype) as PEFT stores a
  ``modules_to_save`` module: tied (``config.tie_word_embeddings``), ``modules_to_save:
  ["embed_tokens"]`` with ``ensure_weight_tying`` (the tied ``lm_head`` then shares the adapter's
  table, as in our model) and the table under both ``…embed_tokens.weight`` and
  ``base_model.model.lm_head.weight`` (PEFT's own save writes and its load needs both); untied,
  ``modules_to_save: ["embed_tokens", "lm_head"]`` without weight tying, ``embedder/lm_head``
  under ``base_model.model.lm_head.weight`` (a tied base then gets two separate copies, as the
  original AnatomiX trains them). Pass ``embedding=False`` only when the tables are the base's
  (they did not train); a table with more rows than the base's needs
  ``base.resize_token_embeddings(rows)`` before loading.

  Returns:
    The path of the adapter weight file.
  """
  from safetensors.numpy import save_file  # noqa: PLC0415
  state = to_peft_state_dict(params, config, layout)
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  spec = config.lora
  adapter_config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.rank, "lora_alpha": spec.alpha,
      "lora_dropout": spec.dropout, "target_modules": sorted(spec.targets), "bias": "none",
      "fan_in_fan_out": False, "base_model_name_or_path": base_model}
  if embedding:
    embedder = nn.unbox(params)["embedder"]
    table = np.asarray(jax.device_get(embedder["embedding"]))
    state[f"{PEFT_PREFIXES[layout]}embed_tokens.weight"] = state[PEFT_LM_HEAD_KEY] = table
    if config.tie_word_embeddings:
      adapter_config.update(modules_to_save=["embed_tokens"], ensure_weight_tying=True)
    else:
      state[PEFT_LM_HEAD_KEY] = np.asarray(jax.device_get(embedder["lm_head"]))
      adapter_config.update(modules_to_save=["embed_tokens", "lm_head"])
  with open(os.path.join(out_dir, ADAPTER_CONFIG_FILE), "w", encoding="utf-8") as f:
    json.dump(adapter_config, f, indent=2)
  path = os.path.join(out_dir, ADAPTER_FILE)
  save_file(state, path, metadata={"format": "pt"})
  return path


# --- One tensor ------------------------------------------------------------------------------------

def read_embedding(model_dir: str | os.PathLike) -> np.ndarray:
  """The input embedding table [V, H] of a Gemma3 / MedGemma directory, as stored (float32 or
  ``ml_dtypes.bfloat16``); only that tensor is read (e.g. to compare with a checkpoint's copy)."""
  _, layout = read_config(model_dir)
  checkpoint = _Checkpoint(_model_dir(model_dir))
  try:
    return checkpoint.get(_prefix(checkpoint, layout) + ANCHOR_KEY)
  finally:
    checkpoint.close()
