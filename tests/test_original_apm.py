"""The original AnatomiX's stage-1 files in and out (``stage1/original.py``, ``convert/original_rag.py``).

The files are built here in the original's exact layouts: ``train_apm.py``'s checkpoint
(``torch.save`` of ``{"model", "vis_optimizer", "text_optimizer", "lr_scheduler", "epoch", "args",
"best_loss"}`` with a nested ``argparse.Namespace`` holding ``pathlib`` paths) and
``create_rag_db.py``'s ``emb_db.pt`` (anatomy → sentence → ``[1, 16]`` projection), around the
tiny torch reference APM of ``test_apm.py`` (its ``tiny`` fixture). Retrieval is re-enacted in torch
as ``APMModel.retrieve_rag_sentences`` does it (sorted anatomy names ↔ queries, arg-max cosine).
"""

from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import datetime
import os
import pathlib
import re
import types

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import save_file
from torch import nn as tnn

import test_apm
from test_apm import TINY, TorchVisionModel

from anatomix_jax import anatomy
from anatomix_jax.rag import database
from anatomix_jax.stage1 import load as load_lib, original, task as task_lib
from anatomix_jax.stage2 import frozen_apm

tiny = test_apm.tiny  # the tiny torch reference APM, its state dict and images (a fixture)
# TINY's backbone is not the original's ResNet-50 (which its args always name): given as overrides.
OVERRIDES = {"model.depths": TINY.depths, "model.width": TINY.width, "data.image_size": 64}
TEXT_DIM, TEXT_HIDDEN = 13, 7  # the text head at a tiny size (the original: 768 → 512 → 16)
TOL = 1e-4
OUTPUTS = ("boxes", "image_logits", "anatomy_embeddings")


def original_args(**changes) -> argparse.Namespace:
  """``parse_args(key="apm")`` at TINY's sizes, as ``train_apm.main`` leaves it (pathlib paths,
  ``model.cl_temp`` copied by ``build_apm_model``); ``changes``: ``{"section__field": value}``."""
  tree = {
      "config": "configs/anatomix_config.yaml", "mode": "train",
      "output_dir": pathlib.PosixPath("/runs/experiments/apm"), "experiment_name": "apm",
      "device": "cuda", "seed": 7, "return_model_only": False, "debug": False,
      "model": {"model_size": "small", "backbone": "resnet50", "dilation": False,
                "position_embedding": "sine", "pre_norm": False, "freeze_vis_enc": False,
                "enc_layers": 2, "dec_layers": 3, "dim_feedforward": 28, "hidden_dim": 20,
                "dropout": 0.1, "nheads": 4, "num_queries": 36, "return_oq": False,
                "mha_head_type": "S", "text_enc_type": "microsoft/BiomedNLP-PubMedBERT",
                "proj_dim": 16, "pca_proj": False, "frozen_text_model": "all", "cl_temp": 0.05},
      "training": {"resume": "", "start_epoch": 0, "epochs": 31, "lr": 0.0002,
                   "lr_backbone": 3e-05, "weight_decay": 0.0003, "lr_drop": 200,
                   "clip_max_norm": 0.2, "print_freq": 50, "eval_freq": 1},
      "loss": {"cl_temp": 0.05, "cl_loss_bidirectional": True, "cl_loss_type": "kl",
               "cl_loss_weight": 0.5, "object_weights_type": "0", "aux_loss": True,
               "set_cost_class": 1, "set_cost_bbox": 5, "set_cost_giou": 2, "mask_loss_coef": 0,
               "dice_loss_coef": 0, "label_loss_coef": 0, "image_label_loss_coef": 3,
               "bbox_loss_coef": 4, "giou_loss_coef": 2, "eos_coef": 0, "cl_loss_coef": 1},
      "data": {"image_dir": pathlib.PosixPath("/data/mimic/images"), "sg_dir": "/data/sg",
               "labels_csv_path": "/data/split.csv", "text_key": "findings", "num_workers": 2,
               "batch_size": 6},
      "rag": {"db_dir": "/runs/rag/"}, "inference": {"ckpt_path": "last_checkpoint.pth"},
      "logging": {"wandb": False, "wandb_project": "p", "wandb_run": "", "green_metric": False},
  }
  for key, value in changes.items():
    section, field = key.split("__")
    tree[section][field] = value

  def ns(node):
    return argparse.Namespace(**{k: ns(v) if isinstance(v, dict) else v for k, v in node.items()})

  return ns(tree)


def _optimizer_states() -> dict:
  """Real torch optimizer and scheduler state dicts, as the original saves them."""
  p = tnn.Parameter(torch.ones(3))
  opt = torch.optim.AdamW([p], lr=1e-4)
  p.sum().backward()
  opt.step()
  sched = torch.optim.lr_scheduler.StepLR(opt, 200)
  return {"vis_optimizer": opt.state_dict(), "text_optimizer": opt.state_dict(),
          "lr_scheduler": sched.state_dict()}


def text_head() -> tnn.Sequential:
  torch.manual_seed(3)
  return tnn.Sequential(tnn.Linear(TEXT_DIM, TEXT_HIDDEN), tnn.ReLU(),
                        tnn.Linear(TEXT_HIDDEN, TINY.proj_dim))


def save_checkpoint(path, state: dict, args=None, head: tnn.Module | None = None, **extra):
  """``train_apm.py``'s checkpoint: APMModel state (vis_model.*, text_model.*) and the rest."""
  model = {f"vis_model.{k}": torch.from_numpy(v) for k, v in state.items()}
  if head is not None:
    model.update({f"text_model.project_head.proj.{k}": v for k, v in head.state_dict().items()})
    model["text_model.model.embeddings.word_embeddings.weight"] = torch.zeros(5, TEXT_DIM)
  payload = {"model": model, **_optimizer_states(), "epoch": 29,
             "args": original_args() if args is None else args, "best_loss": 1.25, **extra}
  torch.save(payload, path)
  return path


def save_emb_db(path, rename: dict | None = None, seed: int = 0):
  """``create_rag_db.py``'s emb_db.pt: anatomies in scene-graph (not sorted) order, 2-6 sorted
  sentences each, raw (unnormalised) [1, 16] projections."""
  rng = np.random.default_rng(seed)
  names = list(anatomy.ANATOMY_NAMES)
  rng.shuffle(names)
  db = collections.OrderedDict()
  for name in names:
    sentences = sorted(f"{name} shows finding {j}." for j in range(int(rng.integers(2, 7))))
    db[(rename or {}).get(name, name)] = collections.OrderedDict(
        (s, torch.from_numpy(rng.normal(size=(1, TINY.proj_dim)).astype(np.float32) * 3))
        for s in sentences)
  torch.save(db, path)
  return path


def original_retrieval(emb_db: dict, object_embeddings: torch.Tensor) -> list[list[str]]:
  """``APMModel.retrieve_rag_sentences`` re-enacted: [B, 36, d] → per image its 36 sentences."""
  q = F.normalize(object_embeddings.reshape(-1, object_embeddings.shape[-1]), dim=1)
  batch = q.shape[0] // 36
  out = [[] for _ in range(batch)]
  for idx, name in enumerate(sorted(emb_db)):
    texts = list(emb_db[name])
    table = F.normalize(torch.stack(list(emb_db[name].values())).squeeze(1), dim=1)
    logits = torch.stack([q[i] for i in range(idx, q.shape[0], 36)]) @ table.T * 0.01
    for i, best in enumerate(logits.argmax(dim=1)):
      out[i].append(texts[best])
  return out


def _leftovers(parent) -> list[str]:
  return sorted(n for n in os.listdir(parent) if n.startswith("."))


@pytest.fixture(scope="module")
def imported(tiny, tmp_path_factory):
  root = tmp_path_factory.mktemp("original")
  head = text_head()
  ckpt = save_checkpoint(root / "checkpoint.pth", tiny["state"], head=head)
  emb_db = save_emb_db(root / "emb_db.pt")
  result = original.import_apm(ckpt, root / "run", emb_db_path=emb_db, overrides=OVERRIDES)
  return {"root": root, "checkpoint": ckpt, "emb_db": emb_db, "head": head, "result": result,
          "workdir": str(root / "run")}


# --- import: the model -----------------------------------------------------------------------------

def test_import_loads_and_predicts_like_the_torch_reference(imported, tiny):
  result = imported["result"]
  assert (result["step"], result["epoch"], result["text_dim"]) == (0, 29, TEXT_DIM)
  assert result["unmapped_args"] == [] and "model.text_enc_type" in result["ignored_args"]
  assert _leftovers(imported["root"]) == []
  loaded = load_lib.load(imported["workdir"])
  c = loaded.config
  # args → config (the mapped values differ from the paper config's)
  assert (c.seed, c.loss.contrastive_temperature, c.loss.contrastive, c.loss.labels, c.loss.l1,
          c.loss.giou) == (7, 0.05, 0.5, 3.0, 4.0, 2.0)
  assert (c.optim.lr, c.optim.backbone_lr, c.optim.weight_decay, c.optim.clip_norm,
          c.optim.schedule) == (2e-4, 3e-5, 3e-4, 0.2, "constant")
  assert (c.train.epochs, c.train.batch_size, c.eval.batch_size, c.data.image_size) == (31, 6, 6,
                                                                                       64)
  assert loaded.model.config == dataclasses.replace(TINY, text_dim=TEXT_DIM,
                                                    text_hidden=TEXT_HIDDEN)
  # the training loop's metadata layout, and a signature a run with this config accepts
  meta = loaded.meta
  assert {"step", "stage", "config", "process_count", "model", "records_dir", "num_steps",
          "text_dim"} <= set(meta)
  assert meta["original"]["epoch"] == 29 and meta["original"]["best_loss"] == 1.25
  assert meta["original"]["path_args"] == ["output_dir", "data.image_dir"]
  assert meta["model"] == task_lib.Stage1Task.model_signature(
      types.SimpleNamespace(config=c, model=loaded.model))  # what a run with this config has
  # predictions: boxes, image logits and anatomy embeddings equal the torch reference's
  images = tiny["images"]  # [3, 1, 64, 96]
  with torch.no_grad():
    want = tiny["model"](torch.from_numpy(images))
  ours = jax.jit(loaded.model.apply)(loaded.variables, images.transpose(0, 2, 3, 1))
  diffs = {k: float(np.max(np.abs(np.asarray(ours[k]) - want[k].numpy()))) for k in OUTPUTS}
  print("imported APM vs torch reference:", diffs)
  assert max(diffs.values()) <= TOL, diffs
  # the text projection head too
  x = np.random.default_rng(0).normal(size=(3, 36, TEXT_DIM)).astype(np.float32)
  out = loaded.model.apply(loaded.variables, images.transpose(0, 2, 3, 1), text_pooled=x)
  with torch.no_grad():
    np.testing.assert_allclose(out["text_projection"], imported["head"](torch.from_numpy(x)),
                               atol=TOL)


def test_imported_rag_retrieves_like_the_original(imported, tiny):
  db = database.load(os.path.join(imported["workdir"], "rag"))
  assert db.counts is None and db.meta["prior"]["weight"] == 0.0
  assert db.anatomies == anatomy.ANATOMY_NAMES == tuple(sorted(anatomy.ANATOMY_NAMES))
  emb_db = torch.load(imported["emb_db"], weights_only=True)
  assert sum(db.sizes) == sum(len(v) for v in emb_db.values()) == imported["result"][
      "num_sentences"]
  images = np.random.default_rng(5).uniform(size=(4, 1, 64, 64)).astype(np.float32)
  with torch.no_grad():
    want = tiny["model"](torch.from_numpy(images))
  expected = original_retrieval(emb_db, want["anatomy_embeddings"])
  # stage 2's reader of a stage-1 workdir, unchanged
  apm = frozen_apm.FrozenAPM(imported["workdir"])
  got = apm(images.transpose(0, 2, 3, 1))
  assert got["sentences"] == expected
  assert float(np.max(np.abs(np.asarray(got["objects"]) - want["anatomy_embeddings"].numpy()))
               ) <= TOL
  boxes = want["boxes"].numpy()
  xyxy = np.concatenate([boxes[..., :2] - boxes[..., 2:] / 2, boxes[..., :2] + boxes[..., 2:] / 2],
                        -1) * 1024
  assert float(np.max(np.abs(got["boxes"] - xyxy))) <= TOL * 1024
  # the retrieval is not trivial: different images retrieve different sentences
  assert len({tuple(s) for s in expected}) > 1


# --- export and the round trip ---------------------------------------------------------------------

def _arrays(workdir: str) -> dict:
  loaded = load_lib.load(workdir)
  flat = jax.tree_util.tree_flatten_with_path(jax.device_get(loaded.variables))[0]
  out = {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}
  db = database.load(os.path.join(workdir, "rag"))
  out.update({f"rag/{i}": e for i, e in enumerate(db.embeddings)})
  return out


def test_export_then_import_is_exact(imported, tmp_path):
  exported = original.export_apm(imported["workdir"], tmp_path / "out")
  assert exported["epoch"] == 29 and exported["warnings"]  # TINY is no ResNet-50
  ckpt = torch.load(exported["checkpoint"], weights_only=False)
  assert set(ckpt) == {"model", "epoch", "args", "best_loss"}
  # the original's own load_state_dict accepts the names and shapes (strict)
  vision = TorchVisionModel(TINY)
  vision.load_state_dict({k[len("vis_model."):]: v for k, v in ckpt["model"].items()
                          if k.startswith("vis_model.")})
  head = tnn.Sequential(tnn.Linear(TEXT_DIM, TEXT_HIDDEN), tnn.ReLU(),
                        tnn.Linear(TEXT_HIDDEN, TINY.proj_dim))
  head.load_state_dict({k[len("text_model.project_head.proj."):]: v
                        for k, v in ckpt["model"].items() if k.startswith("text_model.")})
  for key, value in head.state_dict().items():
    assert torch.equal(value, imported["head"].state_dict()[key])
  args = ckpt["args"]
  assert isinstance(args, argparse.Namespace) and isinstance(args.model, argparse.Namespace)
  assert args.output_dir == pathlib.PosixPath("/runs/experiments/apm")
  assert isinstance(args.data.image_dir, pathlib.PurePath)
  assert (args.model.hidden_dim, args.model.nheads, args.loss.cl_temp, args.training.lr,
          args.data.batch_size, args.seed) == (20, 4, 0.05, 2e-4, 6, 7)
  assert vars(args.model) == vars(original_args().model)
  emb_db = torch.load(exported["emb_db"], weights_only=True)
  assert isinstance(emb_db, collections.OrderedDict)
  assert list(emb_db) == list(anatomy.ANATOMY_NAMES)
  assert all(v.shape == (1, 16) and v.dtype == torch.float32
             for table in emb_db.values() for v in table.values())
  # … and back: every array equal, the same config, sentences and epoch
  again = original.import_apm(exported["checkpoint"], tmp_path / "again",
                              emb_db_path=exported["emb_db"], overrides=OVERRIDES)
  assert again["epoch"] == 29
  first, second = _arrays(imported["workdir"]), _arrays(str(tmp_path / "again"))
  assert list(first) == list(second)
  for key, value in first.items():
    assert value.dtype == second[key].dtype and np.array_equal(value, second[key]), key
  a, b = load_lib.load(imported["workdir"]), load_lib.load(str(tmp_path / "again"))
  assert a.config.to_dict() == b.config.to_dict()
  assert (database.load(os.path.join(imported["workdir"], "rag")).sentences
          == database.load(str(tmp_path / "again" / "rag")).sentences)


def test_paper_config_args_round_trip():
  from configs import stage1  # noqa: PLC0415
  paper = stage1.get_config()
  args = original.args_from_config(paper)
  assert args.model.hidden_dim == 256 and args.training.lr_drop == 200
  config, report = original.config_from_args(args)
  paper.model.dtype = "float32"  # an import computes as the original does; the paper config: bf16
  assert config.to_dict() == paper.to_dict()
  assert report["unmapped_args"] == []


def test_bare_state_dict_takes_the_paper_config_with_overrides(tiny, tmp_path):
  path = tmp_path / "vision.safetensors"
  save_file(tiny["state"], str(path))
  result = original.import_apm(path, tmp_path / "run", overrides={
      **OVERRIDES, "model.hidden_dim": 20, "model.num_heads": 4, "model.enc_layers": 2,
      "model.dec_layers": 3, "model.ffn_dim": 28})
  assert result["text_dim"] == 0 and result["epoch"] is None and result["rag_dir"] is None
  loaded = load_lib.load(result["workdir"])
  assert loaded.model.config == TINY


# --- bad input: a clear error naming the file and what is wrong, and nothing written --------------

def _truncated(path):
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])


BAD = {
    "another class": (lambda p, s: save_checkpoint(p, s, created=datetime.date(2024, 1, 1)),
                      None, r"holds a datetime\.date object, which is not allowed"),
    "truncated": (lambda p, s: _truncated(save_checkpoint(p, s)), None, "truncated or corrupt"),
    "no model": (lambda p, s: torch.save({"epoch": 3, "args": original_args()}, p), None,
                 r"no 'model' entry .*top-level keys: args, epoch"),
    "model not tensors": (lambda p, s: torch.save({"model": {"vis_model.x": [1.0]}}, p), None,
                          r"model\['vis_model\.x'\] is a list, expected a tensor"),
    "backbone": (lambda p, s: save_checkpoint(p, s, original_args(model__backbone="resnet101")),
                 None, r"args\.model\.backbone='resnet101' has no counterpart"),
    "positions": (lambda p, s: save_checkpoint(
        p, s, original_args(model__position_embedding="learned")), None,
                  r"args\.model\.position_embedding='learned' has no counterpart"),
    "lr drop": (lambda p, s: save_checkpoint(p, s, original_args(training__lr_drop=20)), None,
                r"args\.training\.lr_drop=20 has no counterpart .*StepLR"),
    "arg type": (lambda p, s: save_checkpoint(p, s, original_args(model__hidden_dim="20")), None,
                 r"args\.model\.hidden_dim='20' is a str, expected int"),
    "emb_db anatomies": (lambda p, s: save_checkpoint(p, s), {"Left lung": "Left lungs"},
                         r"made for another anatomy list .*unknown anatomies: Left "
                         r"lungs; missing anatomies: Left lung$"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_named_and_writes_nothing(case, tiny, tmp_path):
  make, rename, message = BAD[case]
  ckpt = tmp_path / "checkpoint.pth"
  make(ckpt, tiny["state"])
  emb_db = save_emb_db(tmp_path / "emb_db.pt", rename)
  source = emb_db if rename else ckpt
  with pytest.raises(ValueError, match=f"^{re.escape(str(source))}: .*{message}"):
    original.import_apm(ckpt, tmp_path / "run", emb_db_path=emb_db, overrides=OVERRIDES)
  assert not (tmp_path / "run").exists() and _leftovers(tmp_path) == []


def test_emb_db_of_another_width_and_a_used_workdir_are_refused(tiny, tmp_path):
  ckpt = save_checkpoint(tmp_path / "checkpoint.pth", tiny["state"])
  emb_db = torch.load(save_emb_db(tmp_path / "emb_db.pt"), weights_only=True)
  wide = copy.deepcopy(emb_db)
  for table in wide.values():
    for s in table:
      table[s] = torch.zeros(1, 8)
  torch.save(wide, tmp_path / "wide.pt")
  with pytest.raises(ValueError, match=f"{tmp_path / 'wide.pt'}: sentence embeddings are "
                                       "8-dimensional, the APM's anatomy embeddings 16"):
    original.import_apm(ckpt, tmp_path / "run", emb_db_path=tmp_path / "wide.pt",
                        overrides=OVERRIDES)
  assert not (tmp_path / "run").exists() and _leftovers(tmp_path) == []
  (tmp_path / "used").mkdir()
  (tmp_path / "used" / "file").write_text("x")
  with pytest.raises(FileExistsError, match="not empty"):
    original.import_apm(ckpt, tmp_path / "used", overrides=OVERRIDES)
