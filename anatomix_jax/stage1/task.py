"""The stage-1 training loop: config → mesh → data → abstract state → init or restore → steps.

``train_and_evaluate(config, workdir)`` trains with periodic evaluation and checkpoints and resumes
from the workdir automatically; ``evaluate_checkpoint(config, workdir)`` scores a saved checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import zlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from anatomix_jax import anatomy
from anatomix_jax.stage1 import (data as pipeline, records_dir as stage1_data, text as text_embeddings)
from anatomix_jax.data import sentences
from anatomix_jax.models import apm
from anatomix_jax.core import checkpointing
from anatomix_jax.stage1 import metrics as metrics_lib
from anatomix_jax.evaluation import overlays
from anatomix_jax.core import sharding as sharding_lib, state as state_lib
from anatomix_jax.stage1 import steps as steps_lib
from anatomix_jax.core.writers import MetricWriter


class Stage1:
  """What training and evaluation share: mesh, data location, model, optimizer, abstract state."""

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
    self.model = apm.APM(dataclasses.replace(apm.APMConfig.from_config(config.model),
                                             text_dim=text_dim))
    self.tx = state_lib.make_optimizer(config.optim, self.num_steps)
    size = config.data.image_size
    init_variables = lambda rng: self.model.init(  # noqa: E731
        {"params": rng, "dropout": rng}, jnp.zeros((1, size, size, 1), jnp.float32), train=False)
    self.init_rng, self.train_rng = jax.random.split(jax.random.key(config.seed))
    self.abstract_state, self.state_shardings, self.init_state = state_lib.train_state_factory(
        init_variables, self.tx, self.init_rng, self.mesh, self.rules)
    self.checkpointer = checkpointing.Checkpointer(
        os.path.join(workdir, "checkpoints"), keep=config.train.keep_checkpoints,
        best_metric=config.train.best_metric)

  def meta(self, step: int) -> dict:
    return {"step": int(step), "stage": self.config.stage,
            "config": json.loads(self.config.to_json_best_effort()),
            "records_dir": self.records_dir, "num_steps": self.num_steps,
            "process_count": jax.process_count(),
            "text_dim": self.model.config.text_dim}

  def check_compatible(self, meta: dict) -> None:
    """A workdir's checkpoint must come from the same model; anything else may change on resume."""
    saved = meta.get("config", {}).get("model")
    current = json.loads(self.config.model.to_json_best_effort())
    if saved is not None and saved != current:
      raise ValueError(f"{self.checkpointer.directory} holds checkpoints of a different model "
                       f"({saved} vs {current}); use another --workdir")
    if meta.get("text_dim", self.model.config.text_dim) != self.model.config.text_dim:
      raise ValueError(f"{self.checkpointer.directory} holds checkpoints with a text branch of "
                       f"width {meta['text_dim']}, this run's is {self.model.config.text_dim} "
                       "(another text encoder, or loss.contrastive switched); use another --workdir")

  def restore_for_eval(self) -> tuple[Any, int]:
    """The state of the ``eval.checkpoint`` ("latest" or "best") checkpoint, and its step."""
    which = self.config.eval.checkpoint
    step = {"latest": self.checkpointer.latest_step(),
            "best": self.checkpointer.best_step()}.get(which)
    if step is None:
      raise FileNotFoundError(f"no {which!r} checkpoint in {self.checkpointer.directory}: train "
                              "stage 1 first (--mode=train) with the same --workdir")
    self.check_compatible(self.checkpointer.read_meta(step))
    state, _ = self.checkpointer.restore(step, self.abstract_state, None)
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


def to_host(x: jax.Array) -> np.ndarray:
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def run_eval(run: Stage1, eval_step, state, split: str, step: int,
             baseline_boxes: np.ndarray | None = None) -> dict[str, float]:
  """Scores ``state`` on every example of ``split`` once; writes box overlays of a few of them."""
  keys = ("boxes", "box_mask", "labels", "valid", "index")
  collected = {k: [] for k in ("pred_boxes", "logits", *keys)}
  loss_sums, num_batches, overlay_batch = {}, 0, None
  for local in run.eval_dataset(split):
    batch = sharding_lib.host_to_global(run.with_text(local), run.batch_sharding)
    outputs, parts = eval_step(state, batch)
    collected["pred_boxes"].append(to_host(outputs["boxes"]))
    collected["logits"].append(to_host(outputs["image_logits"]))
    for k in keys:
      collected[k].append(to_host(batch[k]))
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


def _write_overlays(run: Stage1, local: dict, data: dict, step: int, split: str) -> None:
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
  run = Stage1(config, workdir)
  c = config
  eval_every = c.train.eval_every if c.train.eval_every > 0 else run.steps_per_epoch
  ckpt_every = c.train.checkpoint_every if c.train.checkpoint_every > 0 else eval_every
  augment = c.data.augment if c.data.augment.enabled else None
  train_iter = iter(pipeline.stage1_dataset(
      run.records_dir, c.data.train_split, image_size=c.data.image_size, batch_size=run.host_batch,
      train=True, seed=c.seed, augment=augment, process_index=jax.process_index(),
      process_count=jax.process_count(), num_workers=c.data.num_workers, skip_bad=c.data.skip_bad,
      sentence_ids=run.sentence_ids))

  start = run.checkpointer.latest_step()
  if start is not None:
    meta = run.checkpointer.read_meta(start)
    run.check_compatible(meta)
    saved_processes = meta.get("process_count", jax.process_count())
    if saved_processes != jax.process_count():
      # Each process saved its own shard's position; with another process count the shards are
      # different streams, so the model state is resharded and the data stream starts afresh.
      logging.warning("checkpoint %d was written by %d processes, this run has %d: the state is "
                      "resharded; the data stream restarts (its saved positions do not apply)",
                      start, saved_processes, jax.process_count())
    state, _ = run.checkpointer.restore(
        start, run.abstract_state, train_iter if saved_processes == jax.process_count() else None)
    logging.info("resumed from %s at step %d", run.checkpointer.directory, start)
  else:
    state, start = run.init_state(run.init_rng), 0
  num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(run.abstract_state.params))
  logging.info("stage 1: %d parameters, %d train examples, %d steps (%d per epoch), global batch "
               "%d, mesh %s", num_params, run.num_train, run.num_steps, run.steps_per_epoch,
               c.train.batch_size, dict(run.mesh.shape))

  writer = MetricWriter(workdir)
  watcher = checkpointing.PreemptionWatcher()
  baseline = stage1_data.mean_train_boxes(run.records_dir, c.data.train_split)
  final: dict = {}
  try:
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
      train_step = steps_lib.jit_train_step(
          steps_lib.make_train_step(run.model, run.tx, c.loss, c.optim), run.state_shardings,
          run.batch_sharding, run.mesh)
      eval_step = steps_lib.jit_eval_step(steps_lib.make_eval_step(run.model, c.loss),
                                          run.state_shardings, run.batch_sharding)
      pending, t_log, step_log, data_crc = [], time.time(), start, 0
      step = start
      while step < run.num_steps:
        local = next(train_iter)
        # A fingerprint of the examples seen since the last log line: equal logs ⇔ equal data order.
        data_crc = zlib.crc32(np.asarray(local["index"]).tobytes(), data_crc)
        batch = sharding_lib.host_to_global(run.with_text(local), run.batch_sharding)
        state, step_metrics = train_step(state, batch, run.train_rng)
        step += 1
        pending.append(step_metrics)
        if step % c.train.log_every == 0 or step == run.num_steps:
          _log_train(writer, pending, step, step_log, t_log, run, data_crc)
          pending, t_log, step_log, data_crc = [], time.time(), step, 0
        evaluated = step % eval_every == 0 or step == run.num_steps
        if evaluated:
          final = run_eval(run, eval_step, state, c.data.eval_split, step, baseline)
          writer.write(step, "val", final)
          logging.info("eval step %d (%s): %s", step, c.data.eval_split, _summary(final))
        if evaluated or step % ckpt_every == 0:
          run.checkpointer.save(step, state, train_iter, run.meta(step),
                                metrics=final if evaluated else None)
        if watcher.should_stop(step):
          if run.checkpointer.latest_step() != step:  # this step may have just been saved
            run.checkpointer.save(step, state, train_iter, run.meta(step), force=True)
          run.checkpointer.wait()
          logging.warning("preempted: checkpoint of step %d saved; exiting", step)
          return {"preempted": True, "step": step}
      if not final:  # nothing left to train (a finished workdir): evaluate what is there
        final = run_eval(run, eval_step, state, c.data.eval_split, step, baseline)
  finally:
    run.checkpointer.close()
    writer.close()
    watcher.close()
  final["step"] = step
  _report(run, final, c.data.eval_split)
  return final


def _report(run: Stage1, metrics: dict, split: str) -> None:
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


def _log_train(writer: MetricWriter, pending: list, step: int, step_log: int, t_log: float,
               run: Stage1, data_crc: int = 0) -> None:
  host = jax.device_get(pending)
  if any(int(m["nonfinite"]) for m in host):
    raise FloatingPointError(
        f"non-finite loss or gradient between steps {step_log + 1} and {step}: those updates were "
        f"not applied and nothing after checkpoint {run.checkpointer.latest_step()} was saved; "
        "lower the learning rate or check the data")
  mean = {k: float(np.mean([m[k] for m in host])) for k in host[0] if k != "nonfinite"}
  elapsed = max(time.time() - t_log, 1e-9)
  steps_per_s = (step - step_log) / elapsed
  mean["images_per_s"] = steps_per_s * run.config.train.batch_size
  mean["eta_min"] = (run.num_steps - step) / max(steps_per_s, 1e-9) / 60
  mean["data_crc"] = data_crc
  writer.write(step, "train", mean)
  parts = " ".join(f"{k}={mean[k]:.4f}" for k in ("loss", "l1", "giou", "labels", "contrastive")
                   if k in mean)
  logging.info("step %d/%d %s %.1f img/s ETA %.1f min", step, run.num_steps, parts,
               mean["images_per_s"], mean["eta_min"])


def evaluate_checkpoint(config: Any, workdir: str) -> dict:
  """Scores the workdir's latest (or best, per ``eval.checkpoint``) checkpoint on the eval split."""
  run = Stage1(config, workdir)
  state, step = run.restore_for_eval()
  baseline = stage1_data.mean_train_boxes(run.records_dir, config.data.train_split)
  try:
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
      eval_step = steps_lib.jit_eval_step(steps_lib.make_eval_step(run.model, config.loss),
                                          run.state_shardings, run.batch_sharding)
      out = run_eval(run, eval_step, state, config.data.eval_split, step, baseline)
  finally:
    run.checkpointer.close()
  out["step"] = step
  _report(run, out, config.data.eval_split)
  return out
