"""The original AnatomiX's stage-2 checkpoint (``model.pt``) in and out.

The original saves (``src/models/anatomix.py::AnatomiX.save_pretrained``, also inside each HF
Trainer ``checkpoint-N/``)::

  {"apm": None, "LM": {"core_model": {...}, "wrapper": {...}}}

``LM`` is ``LMModel.save_pretrained()`` (``src/models/LM.py``; called with a path it saves that dict
alone, which is accepted too):

``core_model``  the PEFT-wrapped MedGemma's state-dict entries holding ``lora_``, ``embed_tokens``
                or ``lm_head`` (PEFT's module names, adapter ``default``, transformers ≥ 4.52)::

                  base_model.model.model.language_model.layers.{i}.self_attn.q_proj.lora_A.default.weight  [r, in]
                  base_model.model.model.language_model.layers.{i}.self_attn.q_proj.lora_B.default.weight  [out, r]
                  … k/v/o_proj, mlp.gate/up/down_proj (target_modules "all-linear")
                  base_model.model.model.language_model.embed_tokens.modules_to_save.default.weight  [V, H]
                  base_model.model.model.language_model.embed_tokens.original_module.weight          [V, H]
                  base_model.model.lm_head.modules_to_save.default.weight                            [V, H]
                  base_model.model.lm_head.original_module.weight                                    [V, H]

                (LoRA float32, PEFT's adapter up-cast; tables bfloat16, the base's dtype. The two
                ``original_module`` entries are MedGemma's tied table, one storage.)
``wrapper``     ``image_projectionhead.proj.{0,2,3}.{weight,bias}``, ``obj_projectionhead.…``
                (``export.projection_head_tensors``' names; float32).

Our finetune params hold the same: ``lm/layers_{i}/{attn,mlp}/{name}/lora_{a,b}``, the trained table
``lm/embedder/embedding`` (+ ``lm/embedder/lm_head``, untied) and the two heads. LoRA maps as
``lora_a = Aᵀ`` reshaped to the kernel's input dims + [r], ``lora_b = Bᵀ`` reshaped to [r] + the
output dims (PEFT's ``W + (alpha/r)·B·A`` is our ``x·W + x·A·B·(alpha/r)``). The model.pt holds
neither alpha nor the target list: they and the rank are the config's (``lm.lora``; the original's r
16, alpha 16, all-linear are the defaults), and the tensors must agree.

Two tables: PEFT's ``modules_to_save`` gives ``embed_tokens`` and ``lm_head`` separate copies of
MedGemma's tied table, which the original trains apart (it does not set ``ensure_weight_tying``).
``import_lm(table=...)``: "untied" keeps both (the workdir's config sets
``lm.tie_word_embeddings = False``: our LM gets a separate output table ``lm/embedder/lm_head``,
trained with the embedding); "tied" needs them equal; "embed_tokens" / "lm_head" keep one copy
(another model where the other one was trained). ``export_lm`` writes both copies either way.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging

from anatomix_jax.convert import hf_gemma3
from anatomix_jax.convert.tensors import key_list, read_torch_file, to_numpy
from anatomix_jax.core import loop as core_loop
from anatomix_jax.models import anatomix, gemma3
from anatomix_jax.stage2 import config as stage2_config, export, inference, steps, task

MODEL_FILE = "model.pt"
ADAPTER = "default"
# PEFT around Gemma3ForConditionalGeneration (what the original loads MedGemma as).
LAYER_PREFIX = "base_model.model.model.language_model."
LM_HEAD_PREFIX = "base_model.model.lm_head."
# our module group → PEFT's submodule, per LoRA target.
LORA_MODULES = {"q_proj": ("attn", "self_attn"), "k_proj": ("attn", "self_attn"),
                "v_proj": ("attn", "self_attn"), "o_proj": ("attn", "self_attn"),
                "gate_proj": ("mlp", "mlp"), "up_proj": ("mlp", "mlp"),
                "down_proj": ("mlp", "mlp")}
# Any prefix (other transformers layouts), any adapter name.
_LORA_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])"
                       r"(?:\.[^.]+)?\.weight$")
_TABLE_KEY = re.compile(r"(?:^|\.)(embed_tokens|lm_head)\.(?:modules_to_save\.[^.]+|"
                        r"(original_module))\.weight$")
TABLE_CHOICES = ("untied", "tied", "embed_tokens", "lm_head")


class OriginalCheckpointError(ValueError):
  """A model.pt that does not fit the config or base model (names the file and the key)."""


# --- reading model.pt ------------------------------------------------------------------------------

def locate(model_pt: str) -> tuple[str, int]:
  """``(file, step)``: ``model_pt`` itself, ``{dir}/model.pt``, or the latest
  ``{dir}/checkpoint-N/model.pt`` (the original's ``find_last``); step N of a ``checkpoint-N``
  directory, else 0."""
  path = os.path.abspath(model_pt)
  if os.path.isdir(path) and not os.path.isfile(os.path.join(path, MODEL_FILE)):
    found = [(int(m.group(1)), d) for d in os.listdir(path)
             if (m := re.fullmatch(r"checkpoint-(\d+)", d))
             and os.path.isfile(os.path.join(path, d, MODEL_FILE))]
    if not found:
      raise FileNotFoundError(f"{path}: no {MODEL_FILE} and no checkpoint-N/{MODEL_FILE} in it")
    path = os.path.join(path, max(found)[1])
  if os.path.isdir(path):
    path = os.path.join(path, MODEL_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file")
  m = re.fullmatch(r"checkpoint-(\d+)", os.path.basename(os.path.dirname(path)))
  return path, int(m.group(1)) if m else 0


def read_lm(path: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, str]]:
  """``(core_model, wrapper, dtypes)`` of a model.pt: float32 NumPy tensors by key, and the torch
  dtype name each was stored in.

  Raises:
    OriginalCheckpointError: no ``LM`` entry (nor a bare ``LMModel.save_pretrained`` dict), or
      ``LM`` lacks ``core_model`` / ``wrapper`` or holds a non-tensor there.
  """
  obj = read_torch_file(path, allow_original_types=True)
  if isinstance(obj, Mapping) and "LM" not in obj and {"core_model", "wrapper"} <= set(obj):
    lm = obj  # LMModel.save_pretrained(path) (src/models/LM.py) saves this part alone
  elif not isinstance(obj, Mapping) or not isinstance(obj.get("LM"), Mapping):
    found = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
    raise OriginalCheckpointError(f"{path}: no 'LM' entry (found {found}); expected the "
                                  "original's {'apm': None, 'LM': {'core_model', 'wrapper'}}")
  else:
    lm = obj["LM"]
  out, dtypes = [], {}
  for part in ("core_model", "wrapper"):
    if not isinstance(lm.get(part), Mapping):
      raise OriginalCheckpointError(f"{path}: 'LM' has no '{part}' dict (keys: {sorted(lm)})")
    tensors = {}
    for key, value in lm[part].items():
      if not hasattr(value, "detach"):
        raise OriginalCheckpointError(f"{path}: LM.{part}.{key} is a {type(value).__name__}, "
                                      "not a tensor")
      tensors[key], dtypes[key] = to_numpy(value), str(value.dtype).removeprefix("torch.")
    out.append(tensors)
  return out[0], out[1], dtypes


def _lora_tensors(core: Mapping[str, np.ndarray], path: str, spec: Any, num_layers: int
                  ) -> dict[tuple[int, str, str], tuple[str, np.ndarray]]:
  """``(layer, module, "A"|"B") → (key, tensor)``; checks rank and targets against ``spec``."""
  found = {}
  for key, value in core.items():
    m = _LORA_KEY.search(key)
    if m is None:
      if _TABLE_KEY.search(key) is None:
        raise OriginalCheckpointError(f"{path}: LM.core_model.{key} is neither a LoRA matrix of a "
                                      "decoder layer nor an embed_tokens / lm_head table")
      continue
    layer, group, name, ab = int(m.group(1)), m.group(2), m.group(3), m.group(4)
    if name not in spec.targets or LORA_MODULES[name][1] != group:
      raise OriginalCheckpointError(
          f"{path}: LM.core_model.{key}: {name} is not a LoRA target of the config "
          f"(lm.lora.targets = {sorted(spec.targets)})")
    if layer >= num_layers:
      raise OriginalCheckpointError(f"{path}: LM.core_model.{key}: layer {layer}, but the base "
                                    f"model has {num_layers} layers")
    rank = value.shape[0] if ab == "A" else value.shape[-1]
    if value.ndim != 2 or rank != spec.rank:
      raise OriginalCheckpointError(
          f"{path}: LM.core_model.{key} has shape {tuple(value.shape)}, i.e. rank {rank}; the "
          f"config's lm.lora.rank is {spec.rank}")
    found[(layer, name, ab)] = (key, value)
  if not found:
    raise OriginalCheckpointError(f"{path}: LM.core_model holds no LoRA matrices (a step-1 "
                                  "alignment checkpoint?); import_lm takes a step-2 one")
  for i in range(num_layers):
    for name in spec.targets:
      for ab in "AB":
        if (i, name, ab) not in found:
          raise OriginalCheckpointError(
              f"{path}: LM.core_model lacks {LAYER_PREFIX}layers.{i}.{LORA_MODULES[name][1]}."
              f"{name}.lora_{ab}.{ADAPTER}.weight (lm.lora.targets = {sorted(spec.targets)})")
  return found


def _rounded(x: np.ndarray, dtype: str) -> np.ndarray:
  """float32 ``x`` rounded to torch dtype ``dtype`` (e.g. "bfloat16") and back."""
  import ml_dtypes  # noqa: PLC0415 (a jax dependency)
  return np.asarray(x, getattr(ml_dtypes, dtype, None) or np.dtype(dtype)).astype(np.float32)


def _table_copies(core: Mapping[str, np.ndarray], path: str, base: np.ndarray,
                  dtypes: Mapping[str, str]) -> tuple[dict[str, np.ndarray], dict[str, str], float]:
  """The original's trained ``embed_tokens`` and ``lm_head`` copies, their keys, and
  max |embed_tokens − lm_head|.

  A missing ``modules_to_save`` copy is the base table (untrained); an ``original_module`` must
  equal the base model's table rounded to the file's dtype.
  """
  copies = {"embed_tokens": base, "lm_head": base}
  keys = {"embed_tokens": "(base model)", "lm_head": "(base model)"}
  for key, value in core.items():
    m = _TABLE_KEY.search(key)
    if m is None:
      continue
    if value.shape != base.shape:
      raise OriginalCheckpointError(
          f"{path}: LM.core_model.{key} has shape {value.shape}, the base model's table "
          f"{base.shape}: another base model, or a resized vocabulary (the original never resizes)")
    if m.group(2):  # original_module: the frozen base table
      expected = _rounded(base, dtypes.get(key, "float32"))
      if not np.array_equal(value, expected):
        raise OriginalCheckpointError(
            f"{path}: LM.core_model.{key} differs from the base model's embedding table (max "
            f"|diff| {np.abs(value - expected).max():.3g}): the checkpoint was trained from "
            "another base model")
    else:
      copies[m.group(1)], keys[m.group(1)] = value, key
  return copies, keys, float(np.abs(copies["embed_tokens"] - copies["lm_head"]).max())


def _tables(core: Mapping[str, np.ndarray], path: str, base: np.ndarray, choice: str,
            dtypes: Mapping[str, str]) -> tuple[dict[str, np.ndarray], float]:
  """Our ``embedder`` leaves for ``choice`` (``embedding``, + ``lm_head`` when "untied"), and
  max |embed_tokens − lm_head| of the original's copies."""
  copies, keys, diff = _table_copies(core, path, base, dtypes)
  if diff > 0 and choice == "tied":
    raise OriginalCheckpointError(
        f"{path}: the input table {keys['embed_tokens']} and the output table {keys['lm_head']} "
        f"differ (max |diff| {diff:.3g}); table='tied' needs them equal. Pass table='untied' to "
        "keep both (or 'embed_tokens' / 'lm_head' to keep one: the imported model then differs "
        "from the original's)")
  if choice == "untied":
    return {"embedding": copies["embed_tokens"], "lm_head": copies["lm_head"]}, diff
  return {"embedding": copies["lm_head" if choice == "lm_head" else "embed_tokens"]}, diff


def _heads(wrapper: Mapping[str, np.ndarray], path: str, abstract: Any) -> dict[str, Any]:
  """The wrapper's projection heads as our params (the inverse of
  ``export.projection_head_tensors``), checked against ``abstract``'s shapes."""
  zeros = {k: jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract[k])
           for k in export.HEAD_NAMES}
  expected = export.projection_head_tensors(zeros)
  missing = sorted(set(expected) - set(wrapper))
  extra = sorted(set(wrapper) - set(expected))
  if missing or extra:
    raise OriginalCheckpointError(f"{path}: LM.wrapper "
                                  + (f"lacks {key_list(missing)}" if missing else "")
                                  + ("; " if missing and extra else "")
                                  + (f"has unexpected {key_list(extra)}" if extra else ""))
  for key, want in expected.items():
    if wrapper[key].shape != want.shape:
      raise OriginalCheckpointError(
          f"{path}: LM.wrapper.{key} has shape {wrapper[key].shape}, this model needs "
          f"{want.shape} (lm.projection_hidden, the APM's widths and the LM's hidden size)")
  out = {}
  for ours, theirs in export.HEAD_NAMES.items():
    t = lambda i, p: wrapper[f"{theirs}.proj.{i}.{p}"]  # noqa: E731
    out[ours] = {"fc_in": {"kernel": t(0, "weight").T, "bias": t(0, "bias")},
                 "norm": {"scale": t(2, "weight"), "bias": t(2, "bias")},
                 "fc_out": {"kernel": t(3, "weight").T, "bias": t(3, "bias")}}
  return out


def _layer_shape(lm: Mapping[str, Any], scanned: bool, i: int, group: str, name: str,
                 leaf: str) -> tuple[int, ...]:
  if scanned:
    return tuple(lm["layers"][group][name][leaf].shape[1:])
  return tuple(lm[f"layers_{i}"][group][name][leaf].shape)


def trainable_params(core: Mapping[str, np.ndarray], wrapper: Mapping[str, np.ndarray],
                     path: str, model_config: anatomix.AnatomiXConfig, base_table: np.ndarray,
                     table: str = "tied", dtypes: Mapping[str, str] | None = None
                     ) -> tuple[dict[str, Any], float]:
  """A model.pt's tensors → our finetune-phase trainable params (NumPy, the params' dtype).

  Args:
    core, wrapper: ``read_lm``'s tensors.
    path: the file (for errors).
    model_config: the stage-2 model (its ``lm.lora`` is the config's rank, alpha and targets).
    base_table: the base model's embedding [V, H].
    table: ``TABLE_CHOICES``: "untied" (both copies; ``model_config.lm`` must be untied), "tied"
      (the original's two copies must be equal), "embed_tokens" or "lm_head" (keep that copy).
    dtypes: the stored torch dtype per key (``read_lm``; default float32), to compare an
      ``original_module`` with ``base_table``.

  Returns:
    ``(params, max |embed_tokens − lm_head|)``; params hold ``image_projection``,
    ``object_projection``, ``lm/embedder/embedding`` (+ ``lm_head``, untied) and every
    ``lm/…/lora_{a,b}``.
  """
  lm_cfg = model_config.lm
  if (table == "untied") == lm_cfg.tie_word_embeddings:
    raise ValueError(f"table={table!r} needs {'an untied' if table == 'untied' else 'a tied'} LM "
                     f"(model_config.lm.tie_word_embeddings is {lm_cfg.tie_word_embeddings})")
  abstract = steps.split(nn.unbox(anatomix.abstract_variables(model_config)["params"]),
                         steps.PHASE_GROUPS["finetune"])[0]
  found = _lora_tensors(core, path, lm_cfg.lora, lm_cfg.num_hidden_layers)
  lm: dict[str, Any] = {}
  for i in range(lm_cfg.num_hidden_layers):
    for name in lm_cfg.lora.targets:
      group = LORA_MODULES[name][0]
      leaves = {}
      for ab, leaf in (("A", "lora_a"), ("B", "lora_b")):
        key, value = found[(i, name, ab)]
        shape = _layer_shape(abstract["lm"], lm_cfg.scan_layers, i, group, name, leaf)
        want = ((lm_cfg.lora.rank, int(np.prod(shape[:-1]))) if ab == "A"
                else (int(np.prod(shape[1:])), lm_cfg.lora.rank))
        if value.shape != want:
          raise OriginalCheckpointError(f"{path}: LM.core_model.{key} has shape {value.shape}, "
                                        f"the base model's {name} needs {want}")
        leaves[leaf] = value.T.reshape(shape)
      lm.setdefault(f"layers_{i}", {}).setdefault(group, {})[name] = leaves
  if lm_cfg.scan_layers:
    lm = gemma3.stack_layers(lm, lm_cfg.num_hidden_layers)
  if base_table.shape != tuple(abstract["lm"]["embedder"]["embedding"].shape):
    raise OriginalCheckpointError(f"base table {base_table.shape} does not fit the LM's "
                                  f"{abstract['lm']['embedder']['embedding'].shape}")
  lm["embedder"], diff = _tables(core, path, base_table, table, dtypes or {})
  params = {"lm": lm, **_heads(wrapper, path, abstract)}
  structure = jax.tree.structure(params)
  if structure != jax.tree.structure(abstract):
    raise OriginalCheckpointError(f"{path}: the converted leaves {structure} do not match the "
                                  f"model's {jax.tree.structure(abstract)}")
  params = jax.tree.map(lambda x, a: np.ascontiguousarray(x, a.dtype), params, abstract)
  return params, diff


# --- import -----------------------------------------------------------------------------------

def _set(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
  node = config
  *parents, leaf = dotted.split(".")
  for name in parents:
    node = node[name]
  if leaf not in node:
    raise KeyError(f"overrides: {dotted} is not a stage-2 config field")
  node[leaf] = value


def import_config(base_model_dir: str, apm_workdir: str,
                  overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
  """The finetune config an imported workdir records: ``stage2.config.base_config("finetune")``
  (the original's LoRA r 16 / alpha 16 / all-linear, heads 512) at ``base_model_dir`` and
  ``apm_workdir`` (absolute), then ``overrides`` (dotted field → value)."""
  c = stage2_config.base_config("finetune")
  c.lm.model_dir = os.path.abspath(base_model_dir)
  c.apm.workdir = os.path.abspath(apm_workdir)
  for key, value in (overrides or {}).items():
    _set(c, key, value)
  return c


def import_lm(model_pt: str, base_model_dir: str, apm_workdir: str, out_workdir: str, *,
              overrides: Mapping[str, Any] | None = None, table: str | None = None) -> dict:
  """The original's step-2 ``model.pt`` → a finetune-phase stage-2 workdir.

  The workdir holds one Orbax checkpoint (the trained leaves, a fresh optimizer state, the
  training loop's meta + ``imported_from``) that ``--mode=predict``, ``--mode=eval`` and
  ``--config.init_from`` take as they take a trained one. It is written to a temporary sibling
  directory and renamed at the end: on any error nothing is left.

  Args:
    model_pt: the original's ``model.pt``, a ``checkpoint-N/`` directory holding one, or their
      parent (the latest ``checkpoint-N``).
    base_model_dir: the local MedGemma / Gemma3 HF directory it was trained from (config, weights,
      tokenizer); the workdir refers to it.
    apm_workdir: a stage-1 workdir (with ``rag/``), referred to as well.
    out_workdir: the workdir to create (must not exist).
    overrides: dotted stage-2 config fields (e.g. ``{"lm.dtype": "float32"}``).
    table: ``TABLE_CHOICES`` (see the module docstring); None: "untied" when the original's
      ``embed_tokens`` and ``lm_head`` copies differ, "tied" when they are equal (one table, the
      same logits). "untied" writes ``lm.tie_word_embeddings = False`` into the workdir's config.

  Returns:
    ``workdir``, ``step`` (N of ``checkpoint-N``, else 0), ``source`` (the file), ``rank``,
    ``alpha``, ``targets``, ``table`` (the choice made), ``lm_head_max_abs_diff``.

  Raises:
    OriginalCheckpointError: naming the file and key: no ``LM`` entry or part of it, a LoRA rank or
      target set other than the config's, a shape that does not fit the base model or the APM,
      an ``original_module`` table unlike the base model's, differing tables with ``table="tied"``;
      or naming the base model: its table has no rows for the 45 AnatomiX tokens.
    FileExistsError: ``out_workdir`` exists.
  """
  if table not in (None, *TABLE_CHOICES):
    raise ValueError(f"table={table!r}: expected None or one of {TABLE_CHOICES}")
  out_workdir = os.path.abspath(out_workdir)
  if os.path.exists(out_workdir):
    raise FileExistsError(f"{out_workdir} exists; import_lm writes a new workdir")
  path, step = locate(model_pt)
  core, wrapper, dtypes = read_lm(path)
  config = import_config(base_model_dir, apm_workdir, overrides)
  base_table = np.asarray(hf_gemma3.read_embedding(task.base_model_dir(config, out_workdir)),
                          np.float32)
  if table is None:
    table = "untied" if _table_copies(core, path, base_table, dtypes)[2] > 0 else "tied"
  if table == "untied":
    config.lm.tie_word_embeddings = False  # read by Stage2Task; kept in the workdir's config
  os.makedirs(os.path.dirname(out_workdir), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(out_workdir) + ".importing-",
                         dir=os.path.dirname(out_workdir))
  try:
    run = task.Stage2Task(config, tmp, needs_data=False)
    try:
      rows, tok = run.file_lm_config.vocab_size, run.tok
      if tok.vocab_size > rows:
        raise OriginalCheckpointError(
            f"{run.base_dir}: its embedding table has {rows} rows, but its tokenizer with the 45 "
            f"AnatomiX tokens has {tok.vocab_size} (ids up to {tok.vocab_size - 1}); the original "
            "never resizes the table, so its model.pt cannot belong to this base model")
      params, diff = trainable_params(core, wrapper, path, run.model_config, base_table, table,
                                      dtypes)
      with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
        state = jax.jit(lambda p: steps.init_state(p, run.tx),
                        out_shardings=run.state_shardings)(params)
        state = state.replace(step=jax.device_put(np.int32(step), run.state_shardings.step))
        meta = core_loop.checkpoint_meta(run, step)
        meta["imported_from"] = {"file": path, "format": "original AnatomiX model.pt",
                                 "table": table, "lm_head_max_abs_diff": diff}
        run.checkpointer.save(step, state, None, meta, force=True)
    finally:
      run.checkpointer.close()
    os.rename(tmp, out_workdir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  spec = run.model_config.lm.lora
  logging.info("imported %s (step %d) into %s", path, step, out_workdir)
  return {"workdir": out_workdir, "step": step, "source": path, "rank": spec.rank,
          "alpha": spec.alpha, "targets": list(spec.targets), "table": table,
          "lm_head_max_abs_diff": diff}


# --- export -----------------------------------------------------------------------------------

def core_model_tensors(params: Mapping[str, Any], lm_config: Any, base_table: np.ndarray
                       ) -> dict[str, np.ndarray]:
  """Our finetune params → ``LM.core_model`` (float32 NumPy, keys in the original's order:
  the embed_tokens pair, the layers' LoRA, the lm_head pair). The base table appears under both
  names as one array; so does a tied trained table, while an untied LM's ``lm_head`` is the
  lm_head copy."""
  lm = jax.device_get(params["lm"])
  if lm_config.scan_layers:
    lm = gemma3.unstack_layers(lm)
  spec, table = lm_config.lora, np.asarray(lm["embedder"]["embedding"], np.float32)
  head = table if lm_config.tie_word_embeddings else np.asarray(lm["embedder"]["lm_head"],
                                                                  np.float32)
  out = {f"{LAYER_PREFIX}embed_tokens.original_module.weight": base_table,
         f"{LAYER_PREFIX}embed_tokens.modules_to_save.{ADAPTER}.weight": table}
  for i in range(lm_config.num_hidden_layers):
    for name in spec.targets:
      ours, theirs = LORA_MODULES[name]
      leaf = lm[f"layers_{i}"][ours][name]
      key = f"{LAYER_PREFIX}layers.{i}.{theirs}.{name}"
      a, b = (np.asarray(leaf[k], np.float32) for k in ("lora_a", "lora_b"))
      out[f"{key}.lora_A.{ADAPTER}.weight"] = np.ascontiguousarray(a.reshape(-1, spec.rank).T)
      out[f"{key}.lora_B.{ADAPTER}.weight"] = np.ascontiguousarray(b.reshape(spec.rank, -1).T)
  out[f"{LM_HEAD_PREFIX}original_module.weight"] = base_table
  out[f"{LM_HEAD_PREFIX}modules_to_save.{ADAPTER}.weight"] = head
  return out


def export_lm(workdir: str, out_path: str, *, step: int | None = None,
              table_dtype: str = "bfloat16") -> dict:
  """A finetune-phase stage-2 workdir → ``model.pt`` in the original's layout (what its
  ``AnatomiX.load_pretrained`` / ``LMModel.load_pretrained`` load into the PEFT-wrapped MedGemma).

  Args:
    workdir: a finetune stage-2 workdir (trained here or imported).
    out_path: the file to write (a directory: ``{out_path}/model.pt``); written via a temporary
      file and a rename.
    step: the checkpoint (None: the latest).
    table_dtype: the embedding tables' torch dtype (the original's: bfloat16); LoRA and heads
      are float32.

  Returns:
    ``path``, ``step``, ``num_tensors``.

  Raises:
    ValueError: an align workdir (no LoRA), or a table the run resized beyond the base model's.
  """
  import torch  # noqa: PLC0415 (optional dependency)

  config, step = inference.training_config(workdir, step)
  if config.phase != "finetune":
    raise ValueError(f"{workdir}: a {config.phase} workdir; the original's model.pt holds LoRA, "
                     "so export_lm takes a finetune one")
  run = task.Stage2Task(config, workdir, needs_data=False)
  try:
    abstract = steps.split(nn.unbox(anatomix.abstract_variables(run.model_config)["params"]),
                           run.groups)[0]
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
      state, _ = run.checkpointer.restore(step, run.abstract_state_of(abstract), None)
  finally:
    run.checkpointer.close()
  if run.model_config.lm.vocab_size != run.file_lm_config.vocab_size:
    raise ValueError(f"{workdir}: its table has {run.model_config.lm.vocab_size} rows, resized from "
                     f"the base model's {run.file_lm_config.vocab_size}; the original cannot load it")
  params = jax.device_get(state.params)
  base = np.asarray(hf_gemma3.read_embedding(run.base_dir), np.float32)
  converted: dict[int, Any] = {}  # one tensor per array: the tied names share their storage
  core = {}
  for key, array in core_model_tensors(params, run.model_config.lm, base).items():
    if id(array) not in converted:
      t = torch.from_numpy(np.array(array, np.float32))
      converted[id(array)] = t.to(getattr(torch, table_dtype)) if _TABLE_KEY.search(key) else t
    core[key] = converted[id(array)]
  heads = export.projection_head_tensors(params)
  wrapper = {k: torch.from_numpy(np.array(heads[k], np.float32))  # the state dict's order
             for k in (f"{name}.proj.{i}.{p}" for name in export.HEAD_NAMES.values()
                       for i in (0, 2, 3) for p in ("weight", "bias"))}
  if os.path.isdir(out_path):
    out_path = os.path.join(out_path, MODEL_FILE)
  tmp = out_path + ".tmp"
  torch.save({"apm": None, "LM": {"core_model": core, "wrapper": wrapper}}, tmp)
  os.replace(tmp, out_path)
  logging.info("exported %s step %d to %s", workdir, step, out_path)
  return {"path": os.path.abspath(out_path), "step": step, "num_tensors": len(core) + len(wrapper)}

