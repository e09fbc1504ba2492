"""Declarative conversion between the reference PyTorch APM state dict and our (params, batch_stats).

The reference's ``VisionModel.state_dict()`` keys (``tests/data/reference_apm_state_dict.txt``; an
``APMModel`` checkpoint prefixes them with ``vis_model.``) map one-to-one onto our leaves through a
NAME TABLE (``name_table(config)``: one ``Rule`` per torch key) and a handful of per-kind TENSOR
TRANSFORMS (``TRANSFORMS``):

  ``conv``            OIHW → HWIO
  ``linear``          [out, in] → [in, out]
  ``in_proj_weight``  packed [3D, D] → q, k, v kernels [D, heads, d_head] (head-major features)
  ``in_proj_bias``    packed [3D] → q, k, v biases [heads, d_head]
  ``out_proj_weight`` [D, D] → [heads, d_head, D]
  ``copy``            unchanged (biases, LayerNorm, embeddings, CLS token, BN buffers)

The BN buffers (``weight``, ``bias``, ``running_mean``, ``running_var``) go to ``batch_stats``
(``scale``, ``bias``, ``mean``, ``var``). ``num_batches_tracked`` entries are ignored, as the
reference's FrozenBatchNorm2d ignores them.

Frozen parameters: the reference trains with the ResNet layer1 convolutions frozen at their init;
ours are the params under ``backbone/layer1_*`` (``is_reference_frozen``,
``reference_trainable_mask``, ``FROZEN_PARAM_REGEX``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from anatomix_jax.convert.tensors import (
    TRANSFORMS, Path, get_path, key_list, leaf_paths, read_safetensors, read_torch_file,
    set_path, to_numpy)
from anatomix_jax.models.apm import APM, APMConfig
VISION_PREFIX = "vis_model."
TEXT_PREFIX = "text_model."
TEXT_HEAD = "project_head.proj"  # under text_model.: Linear(768→512), ReLU, Linear(512→16)
IGNORED_SUFFIX = ".num_batches_tracked"
# '/'-joined param paths the reference keeps frozen (its layer1 convolutions).
FROZEN_PARAM_REGEX = r"^backbone/layer1_"


# --- Name table -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Rule:
  """One torch key ↔ one or more of our leaves.

  Attributes:
    torch_key: the reference state-dict key (without ``vis_model.``).
    collection: ``"params"`` or ``"batch_stats"``.
    paths: our leaf paths inside the collection (three for a packed attention in_proj).
    kind: a ``TRANSFORMS`` key.
    heads: attention heads (attention transforms only).
  """

  torch_key: str
  collection: str
  paths: tuple[Path, ...]
  kind: str
  heads: int = 0

  @property
  def reference_kind(self) -> str:
    """The reference's kind of the tensor: ``trainable``, ``frozen`` or ``buffer``."""
    if self.collection == "batch_stats":
      return "buffer"
    return "frozen" if is_reference_frozen(self.paths[0]) else "trainable"


def is_reference_frozen(path: Sequence[str]) -> bool:
  """Whether our param at ``path`` (tuple of names, or '/'-joined) is frozen in the reference."""
  joined = path if isinstance(path, str) else "/".join(str(p) for p in path)
  return re.search(FROZEN_PARAM_REGEX, joined) is not None


def reference_trainable_mask(params: Any) -> Any:
  """A pytree of bools like ``params``: False for the reference's frozen params (layer1 convs).

  Works on boxed or unboxed trees, concrete or abstract. Use it with ``optax.masked`` /
  ``optax.multi_transform`` to freeze them.
  """
  params = nn.unbox(params)
  return jax.tree_util.tree_map_with_path(
      lambda kp, _: not is_reference_frozen(tuple(getattr(k, "key", k) for k in kp)), params)


def _linear(rules: list[Rule], torch_prefix: str, path: Path) -> None:
  rules.append(Rule(f"{torch_prefix}.weight", "params", (path + ("kernel",),), "linear"))
  rules.append(Rule(f"{torch_prefix}.bias", "params", (path + ("bias",),), "copy"))


def _layer_norm(rules: list[Rule], torch_prefix: str, path: Path) -> None:
  rules.append(Rule(f"{torch_prefix}.weight", "params", (path + ("scale",),), "copy"))
  rules.append(Rule(f"{torch_prefix}.bias", "params", (path + ("bias",),), "copy"))


def _attention(rules: list[Rule], torch_prefix: str, path: Path, heads: int) -> None:
  qkv = ("query", "key", "value")
  rules.append(Rule(f"{torch_prefix}.in_proj_weight", "params",
                    tuple(path + (n, "kernel") for n in qkv), "in_proj_weight", heads))
  rules.append(Rule(f"{torch_prefix}.in_proj_bias", "params",
                    tuple(path + (n, "bias") for n in qkv), "in_proj_bias", heads))
  rules.append(Rule(f"{torch_prefix}.out_proj.weight", "params", (path + ("out", "kernel"),),
                    "out_proj_weight", heads))
  rules.append(Rule(f"{torch_prefix}.out_proj.bias", "params", (path + ("out", "bias"),), "copy"))


def _conv_bn(rules: list[Rule], conv_key: str, conv_path: Path, bn_key: str, bn_path: Path) -> None:
  rules.append(Rule(conv_key, "params", (conv_path + ("kernel",),), "conv"))
  for torch_name, ours in (("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"),
                           ("running_var", "var")):
    rules.append(Rule(f"{bn_key}.{torch_name}", "batch_stats", (bn_path + (ours,),), "copy"))


@functools.lru_cache(maxsize=16)
def name_table(config: APMConfig) -> tuple[Rule, ...]:
  """The full torch-key ↔ leaf table for ``config``, in the reference's state-dict order."""
  rules: list[Rule] = []
  rules += [Rule("transformer.cls_token", "params", (("transformer", "cls_token"),), "copy"),
            Rule("transformer.cls_pos", "params", (("transformer", "cls_pos"),), "copy")]
  for i in range(config.enc_layers):
    tk, fp = f"transformer.encoder.layers.{i}", ("transformer", f"encoder_layer_{i}")
    _attention(rules, f"{tk}.self_attn", fp + ("self_attn",), config.num_heads)
    _linear(rules, f"{tk}.linear1", fp + ("ffn", "linear1"))
    _linear(rules, f"{tk}.linear2", fp + ("ffn", "linear2"))
    for n in (1, 2):
      _layer_norm(rules, f"{tk}.norm{n}", fp + (f"norm{n}",))
  for i in range(config.dec_layers):
    tk, fp = f"transformer.decoder.layers.{i}", ("transformer", f"decoder_layer_{i}")
    _attention(rules, f"{tk}.self_attn", fp + ("self_attn",), config.num_heads)
    _attention(rules, f"{tk}.multihead_attn", fp + ("cross_attn",), config.num_heads)
    _linear(rules, f"{tk}.linear1", fp + ("ffn", "linear1"))
    _linear(rules, f"{tk}.linear2", fp + ("ffn", "linear2"))
    for n in (1, 2, 3):
      _layer_norm(rules, f"{tk}.norm{n}", fp + (f"norm{n}",))
  _layer_norm(rules, "transformer.decoder.norm", ("transformer", "decoder_norm"))
  _linear(rules, "image_class_embed", ("image_class_embed",))
  _attention(rules, "anat_obj_embs.mha", ("anat_obj_embs", "mha"), config.obj_heads)
  _linear(rules, "anat_obj_embs.linear", ("anat_obj_embs", "linear"))
  for i in range(3):
    _linear(rules, f"bbox_embed.layers.{i}", ("bbox_embed", f"layers_{i}"))
  if config.text_dim:  # the text model's trainable head (its frozen BERT is loaded separately)
    _linear(rules, f"{TEXT_HEAD}.0", ("text_projection", "linear1"))
    _linear(rules, f"{TEXT_HEAD}.2", ("text_projection", "linear2"))
  rules.append(Rule("query_embed.weight", "params", (("query_embed",),), "copy"))
  rules.append(Rule("input_proj.weight", "params", (("input_proj", "kernel"),), "conv"))
  rules.append(Rule("input_proj.bias", "params", (("input_proj", "bias"),), "copy"))
  body = "backbone.0.body"
  _conv_bn(rules, f"{body}.conv1.weight", ("backbone", "conv1"), f"{body}.bn1", ("backbone", "bn1"))
  for stage, depth in enumerate(config.depths, start=1):
    for block in range(depth):
      tk, fp = f"{body}.layer{stage}.{block}", ("backbone", f"layer{stage}_{block}")
      for n in (1, 2, 3):
        _conv_bn(rules, f"{tk}.conv{n}.weight", fp + (f"conv{n}",), f"{tk}.bn{n}", fp + (f"bn{n}",))
      if block == 0:  # every stage's first block has a projection shortcut (see models/resnet.py)
        _conv_bn(rules, f"{tk}.downsample.0.weight", fp + ("downsample_conv",),
                 f"{tk}.downsample.1", fp + ("downsample_bn",))
  return tuple(rules)


@functools.lru_cache(maxsize=16)
def abstract_variables(config: APMConfig) -> dict[str, Any]:
  """Our variable shapes for ``config`` (unboxed ShapeDtypeStructs; nothing is allocated)."""
  images = jax.ShapeDtypeStruct((1, 32, 32, 1), jnp.float32)
  variables = jax.eval_shape(APM(config).init, jax.random.key(0), images)
  return nn.unbox(dict(variables))


def _as_config(config: APMConfig | Mapping[str, Any]) -> APMConfig:
  return config if isinstance(config, APMConfig) else APMConfig.from_config(config)


def expected_torch_shapes(config: APMConfig) -> dict[str, tuple[int, ...]]:
  """torch key → shape the reference has at ``config``."""
  config = _as_config(config)
  variables = abstract_variables(config)
  return {
      rule.torch_key: TRANSFORMS[rule.kind].torch_shape(
          [tuple(get_path(variables[rule.collection], p).shape) for p in rule.paths], rule.heads)
      for rule in name_table(config)
  }


def _select_vision_keys(state: Mapping[str, Any], source: str, text_head: bool = False
                        ) -> dict[str, Any]:
  """Strips ``vis_model.``; drops ``num_batches_tracked`` and the text model's entries except,
  with ``text_head``, its projection head (kept as ``project_head.proj.*``)."""
  keys = list(state)
  prefixed = any(k.startswith(VISION_PREFIX) for k in keys)
  out = {}
  for key in keys:
    if key.endswith(IGNORED_SUFFIX):
      continue
    if prefixed:
      if key.startswith(TEXT_PREFIX):
        if text_head and key.startswith(TEXT_PREFIX + TEXT_HEAD):
          out[key[len(TEXT_PREFIX):]] = state[key]
        continue  # the APMModel's frozen text encoder: not part of the vision model
      if not key.startswith(VISION_PREFIX):
        raise ValueError(f"{source}: unexpected key {key!r} beside '{VISION_PREFIX}*' entries")
      out[key[len(VISION_PREFIX):]] = state[key]
    else:
      out[key] = state[key]
  return out


def from_torch_state_dict(state: Mapping[str, Any], config: APMConfig | Mapping[str, Any], *,
                          source: str = "state dict") -> tuple[dict[str, Any], dict[str, Any]]:
  """Converts a reference state dict to our ``(params, batch_stats)`` (float32 NumPy arrays).

  Args:
    state: torch key → array (NumPy, or anything ``np.asarray`` accepts); keys may carry the
      ``vis_model.`` prefix of an ``APMModel`` checkpoint (then ``text_model.*`` is ignored but
      for ``text_model.project_head.proj.*`` when ``config.text_dim`` > 0).
    config: the APM config the checkpoint was trained with.
    source: a name for error messages (e.g. the file path).

  Returns:
    ``(params, batch_stats)`` nested dicts, ready for ``APM(config).apply``.

  Raises:
    ValueError: naming every missing or unexpected key, or the first tensor of the wrong shape.
  """
  config = _as_config(config)
  state = _select_vision_keys(state, source, text_head=bool(config.text_dim))
  table = name_table(config)
  expected = expected_torch_shapes(config)
  missing = [r.torch_key for r in table if r.torch_key not in state]
  unexpected = [k for k in state if k not in expected]
  if missing or unexpected:
    parts = []
    if missing:
      parts.append(f"missing keys: {key_list(missing)}")
    if unexpected:
      parts.append(f"unexpected keys: {key_list(unexpected)}")
    raise ValueError(f"{source}: does not match the APM at {config}: " + "; ".join(parts))
  out: dict[str, dict[str, Any]] = {"params": {}, "batch_stats": {}}
  for rule in table:
    tensor = np.asarray(state[rule.torch_key])
    if tuple(tensor.shape) != expected[rule.torch_key]:
      raise ValueError(f"{source}: {rule.torch_key} has shape {tuple(tensor.shape)}, expected "
                       f"{expected[rule.torch_key]} for {config}")
    arrays = TRANSFORMS[rule.kind].to_flax(tensor.astype(np.float32), rule.heads)
    for path, array in zip(rule.paths, arrays):
      set_path(out[rule.collection], path, np.ascontiguousarray(array))
  return out["params"], out["batch_stats"]


def to_torch_state_dict(params: Any, batch_stats: Any,
                        config: APMConfig | Mapping[str, Any]) -> dict[str, Any]:
  """Converts our ``(params, batch_stats)`` to the reference's state dict (no ``vis_model.``).

  Args:
    params: our params (boxed or unboxed; JAX or NumPy arrays, or ShapeDtypeStructs).
    batch_stats: our BN constants, likewise.
    config: the APM config.

  Returns:
    torch key → NumPy array in the reference's layout (``jax.ShapeDtypeStruct`` for abstract
    input), in the reference's key order.

  Raises:
    ValueError: naming missing or unexpected leaves of ``params``/``batch_stats``.
  """
  config = _as_config(config)
  trees = {"params": nn.unbox(params), "batch_stats": nn.unbox(batch_stats)}
  table = name_table(config)
  for collection, tree in trees.items():
    wanted = {p for r in table if r.collection == collection for p in r.paths}
    have = leaf_paths(tree)
    missing, extra = wanted - have, have - wanted
    if missing or extra:
      fmt = lambda paths: key_list(["/".join(p) for p in paths])  # noqa: E731
      raise ValueError(f"{collection} do not match the APM at {config}: "
                       + (f"missing {fmt(missing)}; " if missing else "")
                       + (f"unexpected {fmt(extra)}" if extra else ""))
  out = {}
  for rule in table:
    leaves = [get_path(trees[rule.collection], p) for p in rule.paths]
    transform = TRANSFORMS[rule.kind]
    if any(isinstance(x, jax.ShapeDtypeStruct) for x in leaves):
      shape = transform.torch_shape([tuple(x.shape) for x in leaves], rule.heads)
      out[rule.torch_key] = jax.ShapeDtypeStruct(shape, leaves[0].dtype)
    else:
      tensor = transform.to_torch([np.asarray(x) for x in leaves], rule.heads)
      out[rule.torch_key] = np.ascontiguousarray(tensor)
  return out


def _is_tensor(value: Any) -> bool:
  return hasattr(value, "shape") and hasattr(value, "dtype")


def read_reference_file(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """A reference APM file's state dict and, for a training checkpoint, its other entries.

  Args:
    path: a ``.safetensors`` state dict, or a PyTorch file (torch's weights-only unpickler, never
      plain pickle; the original's ``argparse.Namespace`` args and ``pathlib`` paths are allowed,
      any other class is refused) holding a bare state dict or a dict with a ``model`` (or
      ``state_dict``) entry, as ``train_apm.py`` saves: ``{"model", "vis_optimizer",
      "text_optimizer", "lr_scheduler", "epoch", "args", "best_loss"}``.

  Returns:
    ``(state, extras)``: torch key → NumPy array (as saved: ``vis_model.``/``text_model.``
    prefixes kept), and the file's other top-level entries (``{}`` for a bare state dict).

  Raises:
    FileNotFoundError: no such file. ValueError: naming the file and the entry: unreadable or
      truncated, a refused class, no ``model`` entry, or a non-tensor where a tensor belongs.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such checkpoint file")
  if path.endswith(".safetensors"):
    return {k: to_numpy(v) for k, v in read_safetensors(path).items()}, {}
  obj = read_torch_file(path, allow_original_types=True)
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path}: expected a state dict or a checkpoint dict, got "
                     f"{type(obj).__name__}")
  entry = next((e for e in ("model", "state_dict") if isinstance(obj.get(e), Mapping)), None)
  if entry is not None:
    state, extras = obj[entry], {k: v for k, v in obj.items() if k != entry}
  elif obj and all(_is_tensor(v) for v in obj.values()):
    state, extras = obj, {}
  else:
    raise ValueError(f"{path}: no 'model' entry holding the state dict (top-level keys: "
                     f"{key_list([str(k) for k in obj])})")
  for key, value in state.items():
    if not isinstance(key, str) or not _is_tensor(value):
      raise ValueError(f"{path}: {entry or 'state dict'}[{key!r}] is a {type(value).__name__}, "
                       "expected a tensor")
  return {k: to_numpy(v) for k, v in state.items()}, extras


def load_reference_checkpoint(path: str | os.PathLike, config: APMConfig | Mapping[str, Any]
                              ) -> tuple[dict[str, Any], dict[str, Any]]:
  """Reads a reference APM checkpoint file and converts it (see ``from_torch_state_dict``).

  Args:
    path: a ``.safetensors`` file, or a PyTorch file (see ``read_reference_file``: a state dict,
      or a training checkpoint with its ``args``; no class beyond the original's is unpickled).
    config: the APM config of the checkpoint.

  Returns:
    ``(params, batch_stats)``.
  """
  state, _ = read_reference_file(path)
  return from_torch_state_dict(state, config, source=os.fspath(path))
