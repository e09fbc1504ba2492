"""The original AnatomiX's stage-1 files in and out: its APM training checkpoint and ``emb_db.pt``.

``import_apm`` turns ``train_apm.py``'s checkpoint (``{"model", "vis_optimizer", "text_optimizer",
"lr_scheduler", "epoch", "args", "best_loss"}``, or a bare state dict) and, optionally,
``create_rag_db.py``'s ``emb_db.pt`` into a stage-1 workdir that ``stage1.load.load`` and stage 2
(``stage2.frozen_apm``) read like one trained here:

* weights: ``vis_model.*`` through ``convert.reference_apm``'s name table; the trained text
  projection head ``text_model.project_head.proj.*`` to ``params/text_projection`` (``text_dim``
  and ``text_hidden`` read from its shapes). The frozen BERT (``text_model.model.*``) is not
  imported: ``text.encoder_dir`` names a local copy when the text branch is needed;
* ``args`` → the paper config (``configs/stage1.py``): ``ARG_KEYS`` are copied, ``ARG_CHOICES``
  must hold a value this project reproduces (else an error naming the arg), a few are mapped by
  rule (``loss.cl_loss_type``/``cl_loss_weight``, ``training.lr_drop``, ``model.dino_dir``), and
  ``IGNORED_ARGS`` do not change the model or its training here (file locations, logging, losses
  the original never computes). The original has no image-size arg: it trains at 1024², the
  config's default. ``overrides`` (``{"section.field": value}``) are applied last;
* the checkpoint is step 0 with fresh optimizer moments (the original's optimizer and scheduler
  states are not imported); the checkpoint metadata is the training loop's
  (``core.loop.checkpoint_meta``) plus ``"original"``: the source file, its epoch, best loss and
  args (JSON; ``path_args`` lists the ones that were ``pathlib`` paths);
* ``emb_db.pt`` → ``rag/`` (``rag.database``): tables in this project's anatomy order, sentences
  in the file's order, embeddings L2-normalised (retrieval is by cosine, as the original's). The
  original keeps no sentence counts, so the imported database has none and its prior weight is 0:
  retrieval is the original's pure cosine top-1; a prior weight > 0 is refused by
  ``rag.retrieval`` for it.

Everything is checked before anything is written, and written to a temporary directory beside
``out_workdir`` that is renamed at the end: a failed import leaves no ``out_workdir``.

``export_apm`` writes the same file kinds back: ``apm_checkpoint.pth`` (``{"model", "epoch",
"args"}``; ``model`` has the original ``APMModel``'s ``vis_model.*`` names and shapes, plus
``text_model.project_head.proj.*`` when the workdir has the text head; ``args`` an
``argparse.Namespace`` like ``parse_args(key="apm")``'s, rebuilt from the config over the imported
args or the original's defaults) and ``emb_db.pt`` from the workdir's ``rag/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from anatomix_jax import anatomy
from anatomix_jax.convert import original_rag, reference_apm
from anatomix_jax.core import (checkpointing, loop as core_loop, sharding as sharding_lib,
                               state as state_lib)
from anatomix_jax.models import apm
from anatomix_jax.rag import database
from anatomix_jax.stage1 import load as load_lib, task as task_lib

APM_FILE = "apm_checkpoint.pth"
EMB_DB_FILE = "emb_db.pt"
IMPORT_STEP = 0  # the imported weights are a starting point: no update of this project applied

# Original arg (dotted, under the ``apm`` section) → our config key, copied (type-checked).
ARG_KEYS = (
    ("seed", "seed"),
    ("model.enc_layers", "model.enc_layers"),
    ("model.dec_layers", "model.dec_layers"),
    ("model.dim_feedforward", "model.ffn_dim"),
    ("model.hidden_dim", "model.hidden_dim"),
    ("model.dropout", "model.dropout"),
    ("model.nheads", "model.num_heads"),
    ("model.proj_dim", "model.proj_dim"),
    ("loss.cl_temp", "loss.contrastive_temperature"),
    ("loss.bbox_loss_coef", "loss.l1"),
    ("loss.giou_loss_coef", "loss.giou"),
    ("loss.image_label_loss_coef", "loss.labels"),
    ("training.lr", "optim.lr"),
    ("training.lr_backbone", "optim.backbone_lr"),
    ("training.weight_decay", "optim.weight_decay"),
    ("training.clip_max_norm", "optim.clip_norm"),
    ("training.epochs", "train.epochs"),
    ("data.batch_size", "train.batch_size"),
    ("data.batch_size", "eval.batch_size"),
)
# Original arg → (the values this project reproduces, the first is what an export writes; why).
ARG_CHOICES = {
    "model.backbone": (("resnet50",), "the original builds torchvision's ResNet-50 (ours: "
                                      "model.depths=(3, 4, 6, 3), model.width=64)"),
    "model.dilation": ((False,), "no dilated C5 stage here"),
    "model.position_embedding": (("sine", "v2"), "only the normalised sine positions are here"),
    "model.pre_norm": ((False,), "the transformer here is post-norm"),
    "model.num_queries": ((anatomy.NUM_ANATOMIES,), "one query per anatomy of anatomix_jax/"
                                                    "anatomy.py"),
    "loss.cl_loss_type": (("kl", "clip"), "loss.contrastive_kind has 'kl' and 'clip'"),
    "data.text_key": (("findings",), "the sentences here follow the findings rule "
                                     "(data/scene_graph.py)"),
}
# Mapped by a rule in ``config_from_args``.
RULE_ARGS = ("loss.cl_loss_weight", "training.lr_drop", "model.dino_dir")
# Original args (or sections) that change neither the model nor its training here.
IGNORED_ARGS = {
    "config": "the YAML file the args came from",
    "mode": "run bookkeeping", "output_dir": "run bookkeeping", "experiment_name": "run bookkeeping",
    "device": "run bookkeeping", "debug": "run bookkeeping", "return_model_only": "run bookkeeping",
    "model.model_size": "not read by the original", "model.freeze_vis_enc": "not read by the original",
    "model.mha_head_type": "not read by the original", "model.pca_proj": "not read by the original",
    "model.frozen_text_model": "not read by the original",
    "model.return_oq": "an output switch", "model.cl_temp": "a copy of loss.cl_temp",
    "model.text_enc_type": "the frozen text encoder (here: text.encoder_dir, a local copy)",
    "training.resume": "run bookkeeping", "training.start_epoch": "run bookkeeping",
    "training.print_freq": "run bookkeeping", "training.eval_freq": "run bookkeeping",
    "loss.aux_loss": "the original's VisionModel returns no auxiliary outputs (loss.aux=False)",
    "loss.cl_loss_bidirectional": "the original's contrastive loss is always symmetric",
    "loss.cl_loss_coef": "not read by the original", "loss.label_loss_coef": "no query labels",
    "loss.object_weights_type": "not read by the original", "loss.eos_coef": "no query labels",
    "loss.set_cost_class": "no matcher", "loss.set_cost_bbox": "no matcher",
    "loss.set_cost_giou": "no matcher", "loss.mask_loss_coef": "not used",
    "loss.dice_loss_coef": "not used",
    "data.image_dir": "data location", "data.sg_dir": "data location",
    "data.labels_csv_path": "data location", "data.num_workers": "host setting",
    "rag": "database location", "inference": "inference file", "logging": "W&B logging",
}
# The original's ``configs/anatomix_config.yaml`` ``apm`` section, the base of an exported ``args``.
ORIGINAL_DEFAULT_ARGS = {
    "mode": "train", "output_dir": "", "experiment_name": "apm", "device": "cuda", "seed": 2025,
    "return_model_only": False, "debug": False,
    "model": {"model_size": "small", "backbone": "resnet50", "dilation": False,
              "position_embedding": "sine", "pre_norm": False, "freeze_vis_enc": False,
              "enc_layers": 4, "dec_layers": 4, "dim_feedforward": 1024, "hidden_dim": 256,
              "dropout": 0.1, "nheads": 4, "num_queries": 36, "return_oq": False,
              "mha_head_type": "S",
              "text_enc_type": "microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract-fulltext",
              "proj_dim": 16, "pca_proj": False, "frozen_text_model": "all", "cl_temp": 0.01},
    "training": {"resume": "", "start_epoch": 0, "epochs": 45, "lr": 0.0001, "lr_backbone": 1e-05,
                 "weight_decay": 0.0001, "lr_drop": 200, "clip_max_norm": 0.1, "print_freq": 50,
                 "eval_freq": 1},
    "loss": {"cl_temp": 0.01, "cl_loss_bidirectional": True, "cl_loss_type": "kl",
             "cl_loss_weight": 1.0, "object_weights_type": "0", "aux_loss": True,
             "set_cost_class": 1, "set_cost_bbox": 5, "set_cost_giou": 2, "mask_loss_coef": 0,
             "dice_loss_coef": 0, "label_loss_coef": 0, "image_label_loss_coef": 2,
             "bbox_loss_coef": 5, "giou_loss_coef": 3, "eos_coef": 0, "cl_loss_coef": 1},
    "data": {"image_dir": "", "sg_dir": "", "labels_csv_path": "", "text_key": "findings",
             "num_workers": 2, "batch_size": 48},
    "rag": {"db_dir": ""},
    "inference": {"ckpt_path": APM_FILE},
    "logging": {"wandb": False, "wandb_project": "vlm_project", "wandb_run": "",
                "green_metric": False},
}
# What the original's code builds whatever its args say (an export warns where ours differ).
ORIGINAL_FIXED = {"depths": (3, 4, 6, 3), "width": 64, "num_labels": 14, "obj_heads": 2}
ORIGINAL_TEXT_HEAD = {"text_dim": 768, "text_hidden": 512}


# --- args ↔ config --------------------------------------------------------------------------------

def flatten_args(args: Any) -> tuple[dict[str, Any], list[str]]:
  """The original's (nested) ``argparse.Namespace`` or dict → ``{dotted name: JSON value}`` and
  the names whose values were ``pathlib`` paths (now strings)."""
  flat, paths = {}, []

  def walk(node, prefix):
    items = vars(node).items() if isinstance(node, argparse.Namespace) else node.items()
    for key, value in items:
      name = f"{prefix}{key}"
      if isinstance(value, (argparse.Namespace, Mapping)):
        walk(value, name + ".")
        continue
      if isinstance(value, pathlib.PurePath):
        value = str(value)
        paths.append(name)
      elif isinstance(value, tuple):
        value = list(value)
      try:
        json.dumps(value)
      except (TypeError, ValueError):
        value = repr(value)
      flat[name] = value

  if args is not None:
    walk(args, "")
  return flat, paths


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for name, value in flat.items():
    node = out
    *parents, leaf = name.split(".")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


def _get_key(config: ml_collections.ConfigDict, key: str) -> Any:
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def _set_key(config: ml_collections.ConfigDict, key: str, value: Any, source: str) -> None:
  *parents, leaf = key.split(".")
  node = config
  try:
    for part in parents:
      node = node[part]
    if leaf not in node:
      raise KeyError(leaf)
    node[leaf] = value
  except (KeyError, AttributeError):
    raise ValueError(f"{source}: {key} is not a stage-1 config field") from None
  except TypeError as err:
    raise ValueError(f"{source}: {key}={value!r}: {err}") from None


def _typed(value: Any, default: Any, arg: str, source: str) -> Any:
  """``value`` as the type of our config's ``default``, or an error naming the arg."""
  ok = (isinstance(value, bool) if isinstance(default, bool) else
        isinstance(value, int) and not isinstance(value, bool) if isinstance(default, int) else
        isinstance(value, (int, float)) and not isinstance(value, bool)
        if isinstance(default, float) else isinstance(value, type(default)))
  if not ok:
    raise ValueError(f"{source}: args.{arg}={value!r} is a {type(value).__name__}, expected "
                     f"{type(default).__name__}")
  return float(value) if isinstance(default, float) else value


def _no_counterpart(source: str, arg: str, value: Any, why: str) -> ValueError:
  return ValueError(f"{source}: args.{arg}={value!r} has no counterpart in this project ({why})")


def config_from_args(args: Any, overrides: Mapping[str, Any] | None = None,
                     source: str = "args") -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  """The stage-1 config of an original APM run.

  Args:
    args: the checkpoint's ``args`` (nested ``argparse.Namespace`` or dict; ``None``: the paper
      config).
    overrides: ``{"section.field": value}`` applied last; an override of ``optim.schedule`` also
      admits a ``training.lr_drop`` that decays within the run.
    source: the file, for error messages.

  Returns:
    ``(config, report)``: report ``{"ignored_args", "unmapped_args"}`` (sorted names).

  Raises:
    ValueError: naming the arg whose value (or type) has no counterpart here, or an override that
      is not a config field.
  """
  from configs import stage1 as stage1_config  # noqa: PLC0415 (configs/ beside the package, as stage2/diagnose.py)
  if args is not None and not isinstance(args, (argparse.Namespace, Mapping)):
    raise ValueError(f"{source}: args is a {type(args).__name__}, expected the original's "
                     "argparse.Namespace")
  config = stage1_config.get_config()
  config.model.dtype = "float32"  # the original computes in float32 (an override may say bf16)
  overrides = dict(overrides or {})
  flat, _ = flatten_args(args)
  for arg, key in ARG_KEYS:
    if arg in flat:
      _set_key(config, key, _typed(flat[arg], _get_key(config, key), arg, source), source)
  for arg, (allowed, why) in ARG_CHOICES.items():
    if arg in flat and not any(flat[arg] == a and type(flat[arg]) is type(a) for a in allowed):
      raise _no_counterpart(source, arg, flat[arg], why)
  kind = flat.get("loss.cl_loss_type", config.loss.contrastive_kind)
  config.loss.contrastive_kind = kind
  if "loss.cl_loss_weight" in flat:  # the original weights only its KL loss
    weight = _typed(flat["loss.cl_loss_weight"], 1.0, "loss.cl_loss_weight", source)
    config.loss.contrastive = weight if kind == "kl" else 1.0
  if "training.lr_drop" in flat:
    lr_drop = _typed(flat["training.lr_drop"], 1, "training.lr_drop", source)
    if lr_drop < config.train.epochs and "optim.schedule" not in overrides:
      raise _no_counterpart(source, "training.lr_drop", lr_drop,
                            f"the original's StepLR decays the rate 10× every {lr_drop} of its "
                            f"{config.train.epochs} epochs; optim.schedule has no step decay: "
                            "pass an optim.schedule override to import anyway")
    config.optim.schedule = "constant"
  if flat.get("model.dino_dir") is not None:
    raise _no_counterpart(source, "model.dino_dir", flat["model.dino_dir"],
                          "only the ResNet backbone is here")
  known = {a for a, _ in ARG_KEYS} | set(ARG_CHOICES) | set(RULE_ARGS)
  ignored, unmapped = [], []
  for name in sorted(flat):
    if name in known:
      continue
    if any(name == k or name.startswith(k + ".") for k in IGNORED_ARGS):
      ignored.append(name)
    else:
      unmapped.append(name)
  if unmapped:
    logging.warning("%s: args without a counterpart here, not imported: %s", source,
                    ", ".join(unmapped))
  for key, value in overrides.items():
    _set_key(config, key, value, "overrides")
  try:
    apm.APMConfig.from_config(config.model)
  except ValueError as err:
    raise ValueError(f"{source}: {err}") from None
  return config, {"ignored_args": ignored, "unmapped_args": unmapped}


def args_from_config(config: Any, base: Mapping[str, Any] | None = None,
                     path_args: tuple[str, ...] = ("output_dir",)) -> argparse.Namespace:
  """The original's ``args`` for a stage-1 config: ``base`` (flattened original args, default
  ``ORIGINAL_DEFAULT_ARGS``) with every mapped value taken from ``config``.

  Args:
    config: the stage-1 config.
    base: ``{dotted name: value}`` (``flatten_args``), e.g. the imported run's args.
    path_args: names written as ``pathlib`` paths.

  Returns:
    A nested ``argparse.Namespace`` (the ``apm`` section of the original's ``parse_args``).
  """
  flat, _ = flatten_args(ORIGINAL_DEFAULT_ARGS)
  flat.update(base or {})
  for arg, key in reversed(ARG_KEYS):  # data.batch_size: the train batch
    default = ORIGINAL_DEFAULT_ARGS
    for part in arg.split("."):
      default = default[part]
    value = _get_key(config, key)
    flat[arg] = float(value) if isinstance(default, float) else value
  for arg, (allowed, _) in ARG_CHOICES.items():
    if flat.get(arg) not in allowed:
      flat[arg] = allowed[0]
  flat["model.num_queries"] = int(config.model.num_queries)
  flat["loss.cl_loss_type"] = config.loss.contrastive_kind
  flat["loss.cl_loss_weight"] = float(config.loss.contrastive)
  flat["model.cl_temp"] = flat["loss.cl_temp"]
  epochs = int(config.train.epochs)
  if int(flat.get("training.lr_drop", 0)) < epochs:
    flat["training.lr_drop"] = max(200, epochs)
  paths = set(path_args)
  tree = _nest({k: pathlib.Path(v) if k in paths else v for k, v in flat.items()})

  def to_namespace(node):
    return argparse.Namespace(**{k: to_namespace(v) if isinstance(v, dict) else v
                                 for k, v in node.items()})

  return to_namespace(tree)


def _export_warnings(config: Any, text_dim: int) -> list[str]:
  """What the original cannot build as it stands (its code fixes these, whatever its args say)."""
  out = []
  m = config.model
  for field, value in ORIGINAL_FIXED.items():
    ours = tuple(m[field]) if field == "depths" else m[field]
    if ours != value:
      out.append(f"model.{field}={ours} (the original builds {value})")
  if text_dim:
    for field, value in (("text_dim", text_dim), ("text_hidden", m.text_hidden)):
      if value != ORIGINAL_TEXT_HEAD[field]:
        out.append(f"{field}={value} (the original's text head has {ORIGINAL_TEXT_HEAD[field]})")
  if config.optim.schedule != "constant" or int(config.optim.warmup_steps):
    out.append(f"optim.schedule={config.optim.schedule!r}, warmup_steps="
               f"{config.optim.warmup_steps} (the original's args have only a StepLR)")
  return out


# --- import ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class _ImportedRun:
  """What ``core.loop.checkpoint_meta`` reads of a task, for a workdir no training run wrote; the
  signature and metadata are ``Stage1Task``'s own, so the workdir is one trained with ``config``."""
  config: Any
  model: apm.APM
  original: dict
  name: str = "stage1"
  records_dir: str = ""
  num_steps: int = IMPORT_STEP

  model_signature = task_lib.Stage1Task.model_signature

  def meta(self) -> dict:
    return {**task_lib.Stage1Task.meta(self), "original": self.original}


def _text_head(state: Mapping[str, np.ndarray]) -> tuple[int, int]:
  """``(text_dim, text_hidden)`` of the checkpoint's text projection head, ``(0, 0)`` without."""
  first = state.get(f"{reference_apm.TEXT_PREFIX}{reference_apm.TEXT_HEAD}.0.weight")
  if first is None or first.ndim != 2:
    return 0, 0
  return int(first.shape[1]), int(first.shape[0])


def unit_rows(x: np.ndarray) -> np.ndarray:
  """Rows L2-normalised (float32); rows already of unit norm (±1e-6) are kept bit for bit, so
  normalising again is exact; zero rows stay zero."""
  x = np.asarray(x, np.float32)
  norms = np.linalg.norm(x.astype(np.float64), axis=-1, keepdims=True)
  scaled = (x / np.maximum(norms, 1e-12)).astype(np.float32)
  return np.where(np.abs(norms - 1.0) <= 1e-6, x, scaled)


def database_from_emb_db(path: str, proj_dim: int, temperature: float) -> database.RagDatabase:
  """The original's ``emb_db.pt`` as this project's RAG database (no counts, prior weight 0).

  Raises:
    ValueError: see ``convert.original_rag.read_emb_db``; embeddings of another width than the
      APM's ``proj_dim``.
  """
  sentences, embeddings = original_rag.read_emb_db(path)
  width = embeddings[0].shape[1]
  if width != proj_dim:
    raise ValueError(f"{path}: sentence embeddings are {width}-dimensional, the APM's anatomy "
                     f"embeddings {proj_dim}-dimensional (model.proj_dim): not this APM's database")
  meta = {"imported_from": os.path.abspath(path),
          "splits": ["test", "validate", "train"],  # create_rag_db.py's get_unique_texts
          "prior": {"weight": 0.0, "temperature": float(temperature),
                    "objective": "imported from the original's emb_db.pt, which has no sentence "
                                 "counts: pure cosine retrieval, as the original's"}}
  return database.RagDatabase(anatomy.ANATOMY_NAMES, sentences,
                              tuple(unit_rows(e) for e in embeddings), meta, counts=None)


def _write_checkpoint(workdir: str, config: Any, text_dim: int, params: Any, batch_stats: Any,
                      original: dict) -> None:
  """Step ``IMPORT_STEP`` of ``{workdir}/checkpoints``, as the training loop writes it."""
  mesh = sharding_lib.make_mesh(config.mesh)
  rules = tuple(tuple(r) for r in config.sharding_rules)
  built = load_lib.build(config, text_dim, IMPORT_STEP, mesh, rules)
  shardings = built.shardings
  params = jax.device_put(params, shardings.params)
  state = state_lib.TrainState(  # fresh optimizer moments (not the model's random init: no compile)
      step=jax.device_put(jnp.zeros((), jnp.int32), shardings.step), params=params,
      consts=jax.device_put(batch_stats, shardings.consts),
      opt_state=jax.jit(built.tx.init, out_shardings=shardings.opt_state)(params))
  meta = core_loop.checkpoint_meta(_ImportedRun(config, built.model, original), IMPORT_STEP)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), keep=1,
                                    async_save=False)
  try:
    ckpt.save(IMPORT_STEP, state, None, meta, force=True)
  finally:
    ckpt.close()


def _check_target(out_workdir: str) -> None:
  if os.path.exists(out_workdir) and (not os.path.isdir(out_workdir) or os.listdir(out_workdir)):
    raise FileExistsError(f"{out_workdir} exists and is not empty: import into a new workdir")


def import_apm(checkpoint_path: str | os.PathLike, out_workdir: str | os.PathLike, *,
               emb_db_path: str | os.PathLike | None = None,
               overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The original's APM checkpoint (and ``emb_db.pt``) → a new stage-1 workdir.

  Args:
    checkpoint_path: ``train_apm.py``'s checkpoint (``.pth``; a bare state dict or
      ``.safetensors`` too, then the paper config is assumed, with ``overrides``).
    out_workdir: the workdir to create (absent or empty).
    emb_db_path: ``create_rag_db.py``'s ``emb_db.pt`` → ``{out_workdir}/rag``.
    overrides: ``{"section.field": value}`` config fields set after the args are mapped, e.g.
      ``data.image_size`` or, for a non-ResNet-50 test model, ``model.depths``/``model.width``.

  Returns:
    ``{"workdir", "step", "epoch", "text_dim", "rag_dir", "num_sentences", "ignored_args",
    "unmapped_args"}``.

  Raises:
    ValueError: naming the file and the entry (key, arg or class) that cannot be imported;
    FileExistsError: ``out_workdir`` is not empty. Nothing is written then.
  """
  checkpoint_path, out_workdir = os.fspath(checkpoint_path), os.path.abspath(out_workdir)
  _check_target(out_workdir)
  state, extras = reference_apm.read_reference_file(checkpoint_path)
  if "args" not in extras:
    logging.warning("%s: no args: the paper config (configs/stage1.py) is assumed",
                    checkpoint_path)
  config, report = config_from_args(extras.get("args"), overrides, source=checkpoint_path)
  text_dim, text_hidden = _text_head(state)
  if text_dim:
    config.model.text_hidden = text_hidden
  apm_config = dataclasses.replace(apm.APMConfig.from_config(config.model), text_dim=text_dim)
  params, batch_stats = reference_apm.from_torch_state_dict(state, apm_config,
                                                           source=checkpoint_path)
  db = None
  if emb_db_path is not None:
    db = database_from_emb_db(os.fspath(emb_db_path), apm_config.proj_dim,
                              config.loss.contrastive_temperature)
  flat_args, path_args = flatten_args(extras.get("args"))
  epoch = extras.get("epoch")
  best_loss = extras.get("best_loss")
  original = {"file": os.path.abspath(checkpoint_path),
              "epoch": int(epoch) if isinstance(epoch, int) else None,
              "best_loss": float(best_loss) if isinstance(best_loss, (int, float)) else None,
              "args": _nest(flat_args), "path_args": path_args,
              "emb_db": os.path.abspath(emb_db_path) if emb_db_path is not None else None}
  parent = os.path.dirname(out_workdir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_workdir)}.importing-", dir=parent)
  try:
    _write_checkpoint(tmp, config, text_dim, params, batch_stats, original)
    if db is not None:
      database.save(db, os.path.join(tmp, "rag"))
    _check_target(out_workdir)
    if os.path.isdir(out_workdir):
      os.rmdir(out_workdir)
    os.rename(tmp, out_workdir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  out = {"workdir": out_workdir, "step": IMPORT_STEP, "epoch": original["epoch"],
         "text_dim": text_dim, "rag_dir": os.path.join(out_workdir, "rag") if db else None,
         "num_sentences": int(sum(db.sizes)) if db else 0, **report}
  logging.info("imported %s (epoch %s)%s → %s", checkpoint_path, original["epoch"],
               f" and {emb_db_path} ({out['num_sentences']} sentences)" if db else "",
               out_workdir)
  return out


# --- export ---------------------------------------------------------------------------------------

def _epoch(loaded: load_lib.Loaded) -> int:
  """The original's ``epoch`` of a checkpoint: the imported one, else the last finished epoch
  (0 when the run counted steps, not epochs)."""
  original = loaded.meta.get("original") or {}
  if original.get("epoch") is not None:
    return int(original["epoch"])
  epochs, num_steps = int(loaded.config.train.epochs), int(loaded.meta.get("num_steps", 0))
  if int(loaded.config.train.get("num_steps", 0)) > 0 or epochs <= 0 or num_steps <= 0:
    return 0
  return max(loaded.step * epochs // num_steps - 1, 0)


def export_apm(workdir: str | os.PathLike, out_dir: str | os.PathLike, *,
               which: str | int = "latest") -> dict[str, Any]:
  """A stage-1 workdir → the original's ``apm_checkpoint.pth`` (and ``emb_db.pt`` from ``rag/``).

  Args:
    workdir: a stage-1 workdir (trained here or imported).
    out_dir: where the files go (created; existing files of the same names are replaced).
    which: the checkpoint ("latest", "best" or a step).

  Returns:
    ``{"checkpoint", "emb_db" (None without rag/), "epoch", "step", "warnings"}``; warnings name
    what the original's code cannot build as it stands (e.g. a non-ResNet-50 backbone).
  """
  try:
    import torch  # noqa: PLC0415 (optional dependency)
  except ImportError as err:
    raise ValueError("exporting to the original's files needs torch; install it") from err
  workdir, out_dir = os.fspath(workdir), os.fspath(out_dir)
  loaded = load_lib.load(workdir, which)
  variables = jax.device_get(loaded.variables)
  cfg = loaded.model.config
  state = reference_apm.to_torch_state_dict(variables["params"], variables["batch_stats"], cfg)
  prefixed = {(reference_apm.TEXT_PREFIX if k.startswith(reference_apm.TEXT_HEAD)
               else reference_apm.VISION_PREFIX) + k: v for k, v in state.items()}
  model = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in sorted(
      prefixed.items(), key=lambda kv: kv[0].startswith(reference_apm.TEXT_PREFIX))}
  original = loaded.meta.get("original") or {}
  base, _ = flatten_args(original.get("args"))
  if not original:
    base["output_dir"] = os.path.abspath(out_dir)
  args = args_from_config(loaded.config, base,
                          tuple(original.get("path_args") or ()) + ("output_dir",))
  warnings = _export_warnings(loaded.config, cfg.text_dim)
  for w in warnings:
    logging.warning("export of %s: %s: the original's code needs changing to load it", workdir, w)
  epoch = _epoch(loaded)
  payload = {"model": model, "epoch": epoch, "args": args}
  if original.get("best_loss") is not None:
    payload["best_loss"] = original["best_loss"]
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, APM_FILE)
  torch.save(payload, path + ".tmp")
  os.replace(path + ".tmp", path)
  emb_path = None
  rag_dir = os.path.join(workdir, "rag")
  if os.path.exists(os.path.join(rag_dir, database.INDEX_FILE)):
    db = database.load(rag_dir)
    emb_path = os.path.join(out_dir, EMB_DB_FILE)
    original_rag.write_emb_db(emb_path, db.anatomies, db.sentences, db.embeddings)
  logging.info("exported %s (step %d, epoch %d) → %s%s", workdir, loaded.step, epoch, path,
               f", {emb_path}" if emb_path else "")
  return {"checkpoint": path, "emb_db": emb_path, "epoch": epoch, "step": loaded.step,
          "warnings": warnings}
