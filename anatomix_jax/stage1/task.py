"""Stage 1 as a task of the shared loop (``core.loop``): config → mesh → data → model → steps.

``train_and_evaluate(config, workdir)`` trains with periodic evaluation and checkpoints and resumes
from the workdir automatically; ``evaluate_checkpoint(config, workdir)`` scores a saved checkpoint.
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import logging

from anatomix_jax import anatomy
from anatomix_jax.core import checkpointing, loop as core_loop, sharding as sharding_lib
from anatomix_jax.data import sentences
from anatomix_jax.evaluation import overlays
from anatomix_jax.stage1 import (data as pipeline, load as load_lib, metrics as metrics_lib,
                                 records_dir as stage1_data, steps as steps_lib,
                                 text as text_embeddings)


class Stage1Task:
  """What training, evaluation and the RAG build share: mesh, data, model, optimizer, state.

  Implements ``core.loop.Task``.
  """

  name = "stage1"
  log_keys = ("loss", "l1", "giou", "labels", "contrastive", "images_per_s")

  def __init__(self, config: Any, workdir: str, text: bool | None = None):
    """``text``: load the sentence index and frozen-encoder embeddings (default: when the
    contrastive loss is on); the model then has its text projection head."""
    self.config, self.workdir = config, workdir
    text = bool(config.loss.contrastive) if text is None else text
    if text:
      text_embeddings.check_config(config.text)  # before any data is generated or read
    self.mesh = sharding_lib.make_mesh(config.mesh)
    self.rules = tuple(tuple(r) for r in config.sharding_rules)
    # Validate batch layouts before any data is generated or anything is compiled.
    self.host_batch = sharding_lib.check_global_batch(config.train.batch_size, self.mesh, self.rules)
    self.host_eval_batch = sharding_lib.check_global_batch(config.eval.batch_size, self.mesh,
                                                           self.rules)
    self.batch_sharding = sharding_lib.batch_sharding(self.mesh, self.rules)
    self.records_dir = stage1_data.resolve_records_dir(config.data, workdir)
    self.num_train = stage1_data.split_count(self.records_dir, config.data.train_split)
    self.steps_per_epoch = max(self.num_train // config.train.batch_size, 1)
    self.num_steps = (config.train.num_steps if config.train.num_steps > 0
                      else config.train.epochs * self.steps_per_epoch)
    self.sentence_index, self.text_table = None, None
    if text:
      self.sentence_index = sentences.load_or_build(self.records_dir)
      encoder_dir = text_embeddings.resolve_encoder_dir(config.text, workdir,
                                                        self.sentence_index.sentences)
      self.text_table = text_embeddings.pooled_embeddings(
          encoder_dir, self.sentence_index.sentences, os.path.join(workdir, "text_cache"),
          config.text.encode_batch)
    self.sentence_ids = self.sentence_index.ids() if self.sentence_index else None
    text_dim = 0 if self.text_table is None else int(self.text_table.shape[1])
    built = load_lib.build(config, text_dim, self.num_steps, self.mesh, self.rules)
    self.model, self.tx, self.state_shardings = built.model, built.tx, built.shardings
    self._abstract_state, self._init = built.abstract, built.init
    self.init_rng, self.train_rng = jax.random.split(jax.random.key(config.seed))
    self.checkpointer = checkpointing.Checkpointer.for_run(workdir, config.train)
    self.baseline_boxes = None
    self._eval_step = None
    self._data_crc = 0

  # --- core.loop.Task ----------------------------------------------------------------------------

  def model_signature(self) -> dict:
    return {"model": json.loads(self.config.model.to_json_best_effort()),
            "text_dim": self.model.config.text_dim}

  def meta(self) -> dict:
    return {"records_dir": self.records_dir, "num_steps": self.num_steps,
            "text_dim": self.model.config.text_dim}

  def train_iterator(self):
    c = self.config
    return iter(pipeline.stage1_dataset(
        self.records_dir, c.data.train_split, image_size=c.data.image_size,
        batch_size=self.host_batch, train=True, seed=c.seed,
        augment=c.data.augment if c.data.augment.enabled else None,
        process_index=jax.process_index(), process_count=jax.process_count(),
        num_workers=c.data.num_workers, skip_bad=c.data.skip_bad, sentence_ids=self.sentence_ids))

  def setup(self) -> None:
    self.baseline_boxes = stage1_data.mean_train_boxes(self.records_dir,
                                                       self.config.data.train_split)
    logging.info("stage 1: %d parameters, %d train examples, global batch %d",
                 sum(x.size for x in jax.tree.leaves(self._abstract_state.params)),
                 self.num_train, self.config.train.batch_size)

  def init_state(self):
    return self._init(self.init_rng)

  def abstract_state(self):
    return self._abstract_state

  def make_train_step(self):
    step_fn = steps_lib.jit_train_step(
        steps_lib.make_train_step(self.model, self.tx, self.config.loss, self.config.optim),
        self.state_shardings, self.batch_sharding, self.mesh)

    def train_step(state, local, step):
      del step
      batch = sharding_lib.host_to_global(self.with_text(local), self.batch_sharding)
      state, metrics = step_fn(state, batch, self.train_rng)
      return state, metrics, {"index": np.asarray(local["index"])}

    return train_step

  def log_extras(self, stats: list[dict], elapsed_s: float, steps: int) -> dict:
    # A fingerprint of the examples seen since the last log line: equal logs ⇔ equal data order.
    crc = 0
    for s in stats:
      crc = zlib.crc32(s["index"].tobytes(), crc)
    return {"images_per_s": steps * self.config.train.batch_size / elapsed_s, "data_crc": crc}

  def evaluate(self, state, step: int) -> dict:
    return run_eval(self, self.eval_step(), state, self.config.data.eval_split, step,
                    self.baseline_boxes)

  def report(self, metrics: dict) -> None:
    _report(self, metrics, self.config.data.eval_split)

  # --- evaluation --------------------------------------------------------------------------------

  def eval_step(self):
    """The jitted eval step (built once)."""
    if self._eval_step is None:
      self._eval_step = steps_lib.jit_eval_step(
          steps_lib.make_eval_step(self.model, self.config.loss), self.state_shardings,
          self.batch_sharding)
    return self._eval_step

  def restore_for_eval(self) -> tuple[Any, int]:
    """The state of the ``eval.checkpoint`` ("latest" or "best") checkpoint, and its step."""
    which = self.config.eval.checkpoint
    step = self.checkpointer.step_for(which)
    if step is None:
      raise FileNotFoundError(f"no {which!r} checkpoint in {self.checkpointer.directory}: train "
                              "stage 1 first (--mode=train) with the same --workdir")
    core_loop.check_same_model(self, self.checkpointer.read_meta(step))
    state, _ = self.checkpointer.restore(step, self._abstract_state, None)
    return state, step

  def with_text(self, local: dict) -> dict:
    """Adds ``text_pooled [b, N, D_text]`` (the cached embeddings of ``sentence_ids``) to a host
    batch when the text branch is on; padding rows (id −1) get sentence 0's, masked by ``valid``."""
    if self.text_table is None:
      return local
    return {**local, "text_pooled": self.text_table[np.maximum(local["sentence_ids"], 0)]}

  def eval_dataset(self, split: str):
    c = self.config.data
    return pipeline.stage1_dataset(
        self.records_dir, split, image_size=c.image_size, batch_size=self.host_eval_batch,
        train=False, seed=self.config.seed, process_index=jax.process_index(),
        process_count=jax.process_count(), num_workers=0, skip_bad=c.skip_bad,
        sentence_ids=self.sentence_ids)


def run_eval(run: Stage1Task, eval_step, state, split: str, step: int,
             baseline_boxes: np.ndarray | None = None) -> dict[str, float]:
  """Scores ``state`` on every example of ``split`` once; writes box overlays of a few of them."""
  keys = ("boxes", "box_mask", "labels", "valid", "index")
  collected = {k: [] for k in ("pred_boxes", "logits", *keys)}
  loss_sums, num_batches, overlay_batch = {}, 0, None
  for local in run.eval_dataset(split):
    batch = sharding_lib.host_to_global(run.with_text(local), run.batch_sharding)
    outputs, parts = eval_step(state, batch)
    collected["pred_boxes"].append(sharding_lib.to_host(outputs["boxes"]))
    collected["logits"].append(sharding_lib.to_host(outputs["image_logits"]))
    for k in keys:
      collected[k].append(sharding_lib.to_host(batch[k]))
    for k, v in jax.device_get(parts).items():
      loss_sums[k] = loss_sums.get(k, 0.0) + float(v)
    num_batches += 1
    if overlay_batch is None:
      overlay_batch = local
  data = {k: np.concatenate(v) for k, v in collected.items()}
  keep = data["valid"] > 0
  data = {k: v[keep] for k, v in data.items()}
  out = metrics_lib.stage1_metrics(data["pred_boxes"], data["boxes"], data["box_mask"],
                                   data["logits"], data["labels"], anatomy.ANATOMY_NAMES,
                                   anatomy.CHEXPERT_LABELS)
  out.update({f"loss/{k}": v / max(num_batches, 1) for k, v in loss_sums.items()})
  out["num_examples"] = int(keep.sum())
  if baseline_boxes is not None:
    per_anatomy, _ = metrics_lib.anatomy_iou(
        np.broadcast_to(baseline_boxes, data["boxes"].shape), data["boxes"], data["box_mask"])
    out["baseline_mean_iou"] = float(np.nanmean(per_anatomy))
  if jax.process_index() == 0 and run.config.eval.num_overlays and overlay_batch is not None:
    _write_overlays(run, overlay_batch, data, step, split)
  return out


def _write_overlays(run: Stage1Task, local: dict, data: dict, step: int, split: str) -> None:
  directory = os.path.join(run.workdir, "overlays")
  os.makedirs(directory, exist_ok=True)
  row_of = {int(i): r for r, i in enumerate(data["index"])}
  for j in range(min(run.config.eval.num_overlays, len(local["index"]))):
    idx = int(local["index"][j])
    if idx < 0 or idx not in row_of:
      continue
    r = row_of[idx]
    image = local["image"][j]
    scale = max(1, 512 // image.shape[0])
    overlays.draw_boxes(image, data["pred_boxes"][r], data["boxes"][r], data["box_mask"][r],
                        scale_up=scale).save(os.path.join(directory, f"{split}_step{step:07d}_{idx}.png"))


def _summary(metrics: dict) -> str:
  keys = ("mean_iou", "baseline_mean_iou", "map", "map_50", "auroc", "f1", "loss/contrastive",
          "loss/loss")
  return " ".join(f"{k}={metrics[k]:.4f}" for k in keys if k in metrics)


def train_and_evaluate(config: Any, workdir: str) -> dict:
  """Trains stage 1, resuming from ``{workdir}/checkpoints`` if present; returns the final metrics."""
  return core_loop.train(Stage1Task(config, workdir))


def _report(run: Stage1Task, metrics: dict, split: str) -> None:
  """Logs the per-anatomy IoU table and the headline numbers; saves them as JSON (process 0)."""
  if jax.process_index() != 0:
    return
  rows = [f"  {name[:44]:<44} {metrics[f'iou/{name}']:.3f}" for name in anatomy.ANATOMY_NAMES
          if f"iou/{name}" in metrics]
  logging.info("per-anatomy IoU on %s (step %d):\n%s", split, metrics["step"], "\n".join(rows))
  path = os.path.join(run.workdir, f"eval_{split}_step{metrics['step']}.json")
  with open(path, "w") as f:
    json.dump(metrics, f, indent=2)
  logging.info("final %s metrics at step %d: %s (all metrics in %s)", split, metrics["step"],
               _summary(metrics), path)


def evaluate_checkpoint(config: Any, workdir: str) -> dict:
  """Scores the workdir's latest (or best, per ``eval.checkpoint``) checkpoint on the eval split."""
  run = Stage1Task(config, workdir)
  try:
    state, step = run.restore_for_eval()
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
      run.setup()
      out = run.evaluate(state, step)
  finally:
    run.checkpointer.close()
  out["step"] = step
  _report(run, out, config.data.eval_split)
  return out
