"""The training loop of both stages: resume, steps, logging, evaluation, checkpoints, preemption.

A stage describes itself with a :class:`Task` (``stage1.task.Stage1Task``,
``stage2.task.Stage2Task``); :func:`train` is written once. What the loop decides, the same for
every stage (``config.train``):

* cadence — a log line every ``log_every`` steps; an evaluation every ``eval_every`` steps
  (``-1``: once per epoch); a checkpoint every ``checkpoint_every`` steps (``-1``: with every
  evaluation); the last step always logs, evaluates and checkpoints;
* the best checkpoint — ``best_metric`` of the validation metrics, ``best_mode`` "max" or "min",
  is kept besides the ``keep_checkpoints`` latest ones;
* resuming — from the workdir's latest checkpoint, after checking that it holds the same model
  (``Task.model_signature``); a checkpoint written by another number of processes is resharded
  and the data stream restarts (each process saved its own shard's position), with a warning;
* the non-finite guard — a step whose loss or gradient is not finite was not applied (the pure
  steps see to that); the loop stops with an error naming the steps, so nothing after the last
  good checkpoint is saved;
* preemption — SIGTERM (or the multi-process preemption sync point) saves the current step and
  stops.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable, Protocol

import flax.linen as nn
import jax
import numpy as np
from absl import logging

from anatomix_jax.core import checkpointing
from anatomix_jax.core.writers import MetricWriter

# (state, host batch, step) -> (state, device metrics, host statistics)
StepFn = Callable[[Any, Any, int], tuple[Any, dict, dict]]


class Task(Protocol):
  """What a stage gives the loop.

  Attributes:
    name: "stage1" / "stage2" (logs and checkpoint metadata).
    config: the run's config (its ``train`` section sets the cadence).
    workdir: the run directory.
    mesh, rules: device mesh and logical-axis rules (the loop runs under both).
    checkpointer: the workdir's :class:`checkpointing.Checkpointer` (``Checkpointer.for_run``).
    num_steps: steps to train in total.
    steps_per_epoch: what ``eval_every = -1`` counts.
    log_keys: train metrics shown in the log line (all are written to ``metrics.jsonl``).
  """
  name: str
  config: Any
  workdir: str
  mesh: Any
  rules: Any
  checkpointer: checkpointing.Checkpointer
  num_steps: int
  steps_per_epoch: int
  log_keys: tuple[str, ...]

  def model_signature(self) -> dict:
    """What must not change between a checkpoint and a run that resumes from it (JSON values)."""

  def meta(self) -> dict:
    """Stage-specific metadata saved with every checkpoint (the loop adds step, stage, config,
    process count and the model signature)."""

  def train_iterator(self) -> Any:
    """The endless, checkpointable (Grain) iterator of host batches."""

  def setup(self) -> None:
    """Loads what both a fresh start and a resume need (called under the mesh)."""

  def init_state(self) -> Any:
    """A fresh, sharded train state."""

  def abstract_state(self) -> Any:
    """The restore target: ``jax.ShapeDtypeStruct`` leaves carrying their shardings."""

  def make_train_step(self) -> StepFn:
    """The jitted step, wrapped to take one host batch (called once, under the mesh)."""

  def log_extras(self, stats: list[dict], elapsed_s: float, steps: int) -> dict:
    """Throughput and other host-side figures of the steps since the last log line."""

  def evaluate(self, state: Any, step: int) -> dict:
    """Validation metrics of ``state`` (scalars; may write files)."""

  def report(self, metrics: dict) -> None:
    """Final logging of the last evaluation (process 0 writes files)."""


@dataclasses.dataclass(frozen=True)
class Cadence:
  """When the loop logs, evaluates and checkpoints (steps count from 1)."""
  num_steps: int
  log_every: int
  eval_every: int
  checkpoint_every: int

  @classmethod
  def from_config(cls, train_cfg: Any, num_steps: int, steps_per_epoch: int) -> "Cadence":
    """``eval_every`` -1: once per epoch; ``checkpoint_every`` -1: with every evaluation."""
    for field in ("eval_every", "checkpoint_every", "log_every"):
      value = int(train_cfg[field])
      if value == 0 or value < -1 or (field == "log_every" and value < 1):
        raise ValueError(f"train.{field}={value}: expected a positive number of steps"
                         + ("" if field == "log_every" else " or -1"))
    eval_every = int(train_cfg.eval_every) if train_cfg.eval_every > 0 else max(steps_per_epoch, 1)
    ckpt_every = int(train_cfg.checkpoint_every) if train_cfg.checkpoint_every > 0 else eval_every
    return cls(int(num_steps), int(train_cfg.log_every), eval_every, ckpt_every)

  def logs(self, step: int) -> bool:
    return step % self.log_every == 0 or step == self.num_steps

  def evaluates(self, step: int) -> bool:
    return step % self.eval_every == 0 or step == self.num_steps

  def checkpoints(self, step: int) -> bool:
    return self.evaluates(step) or step % self.checkpoint_every == 0


def checkpoint_meta(task: Task, step: int) -> dict:
  """Everything saved beside the state of checkpoint ``step``."""
  return {"step": int(step), "stage": task.name,
          "config": json.loads(task.config.to_json_best_effort()),
          "process_count": jax.process_count(), "model": task.model_signature(), **task.meta()}


def check_same_model(task: Task, meta: dict) -> None:
  """Raises when the checkpoint's model signature differs from this run's."""
  saved, current = meta.get("model"), task.model_signature()
  if saved is None:
    logging.warning("%s: checkpoint metadata without a model signature (written by an older "
                    "version): the model is not checked", task.checkpointer.directory)
  elif saved != current:
    diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    raise ValueError(
        f"{task.checkpointer.directory} holds checkpoints of a different model: "
        + "; ".join(f"{k}: saved {saved.get(k)!r}, this run {current.get(k)!r}" for k in diff)
        + ". Use another --workdir (or the config the checkpoints were trained with)")


def _restore_or_init(task: Task, train_iter: Any) -> tuple[Any, int]:
  start = task.checkpointer.latest_step()
  if start is None:
    return task.init_state(), 0
  meta = task.checkpointer.read_meta(start)
  check_same_model(task, meta)
  saved_processes = meta.get("process_count", jax.process_count())
  same_processes = saved_processes == jax.process_count()
  if not same_processes:
    # Each process saved its own shard's position; with another process count the shards are
    # different streams, so the model state is resharded and the data stream starts afresh.
    logging.warning("checkpoint %d was written by %d processes, this run has %d: the state is "
                    "resharded; the data stream restarts (its saved positions do not apply)",
                    start, saved_processes, jax.process_count())
  state, _ = task.checkpointer.restore(start, task.abstract_state(),
                                       train_iter if same_processes else None)
  logging.info("resumed from %s at step %d", task.checkpointer.directory, start)
  return state, start


def summarize_train(task: Task, pending: list[dict], stats: list[dict], step: int, step_log: int,
                    elapsed_s: float) -> dict:
  """Means of the steps since the last log line, plus the task's throughput figures.

  Raises:
    FloatingPointError: when any of those steps had a non-finite loss or gradient.
  """
  host = jax.device_get(pending)
  if any(int(m["nonfinite"]) for m in host):
    raise FloatingPointError(
        f"non-finite loss or gradient between steps {step_log + 1} and {step}: those updates were "
        f"not applied and nothing after checkpoint {task.checkpointer.latest_step()} was saved; "
        "lower the learning rate or check the data")
  mean = {k: float(np.mean([m[k] for m in host])) for k in host[0] if k != "nonfinite"}
  steps = step - step_log
  elapsed_s = max(elapsed_s, 1e-9)
  mean.update(task.log_extras(stats, elapsed_s, steps))
  mean["eta_min"] = (task.num_steps - step) * elapsed_s / steps / 60
  return mean


def _scalars(metrics: dict) -> str:
  return " ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                  if "/" not in k and isinstance(v, (int, float)))


def train(task: Task) -> dict:
  """Trains ``task`` to ``task.num_steps``, resuming from its workdir; returns the last evaluation's
  metrics with ``step`` (``{"preempted": True, "step": N}`` when stopped by SIGTERM)."""
  c = task.config.train
  cadence = Cadence.from_config(c, task.num_steps, task.steps_per_epoch)
  writer = MetricWriter(task.workdir)
  watcher = checkpointing.PreemptionWatcher()
  final: dict = {}
  try:
    train_iter = task.train_iterator()
    with jax.set_mesh(task.mesh), nn.logical_axis_rules(task.rules):
      task.setup()
      state, step = _restore_or_init(task, train_iter)
      logging.info("%s: %d steps (%d per epoch), evaluation every %d, checkpoint every %d steps, "
                   "mesh %s", task.name, task.num_steps, task.steps_per_epoch,
                   cadence.eval_every, cadence.checkpoint_every, dict(task.mesh.shape))
      train_step = task.make_train_step()
      pending, stats, t_log, step_log = [], [], time.time(), step
      while step < task.num_steps:
        state, metrics, host_stats = train_step(state, next(train_iter), step)
        step += 1
        pending.append(metrics)
        stats.append(host_stats)
        if cadence.logs(step):
          mean = summarize_train(task, pending, stats, step, step_log, time.time() - t_log)
          writer.write(step, "train", mean)
          logging.info("%s step %d/%d %s ETA %.1f min", task.name, step, task.num_steps,
                       " ".join(f"{k}={mean[k]:.4f}" for k in task.log_keys if k in mean),
                       mean["eta_min"])
          pending, stats, t_log, step_log = [], [], time.time(), step
        evaluated = cadence.evaluates(step)
        if evaluated:
          final = task.evaluate(state, step)
          writer.write(step, "val", final)
          logging.info("eval step %d: %s", step, _scalars(final))
        if cadence.checkpoints(step):
          task.checkpointer.save(step, state, train_iter, checkpoint_meta(task, step),
                                 metrics=final if evaluated else None)
        if watcher.should_stop(step):
          if task.checkpointer.latest_step() != step:  # this step may have just been saved
            task.checkpointer.save(step, state, train_iter, checkpoint_meta(task, step),
                                   force=True)
          task.checkpointer.wait()
          logging.warning("preempted: checkpoint of step %d saved; exiting", step)
          return {"preempted": True, "step": step}
      if not final:  # nothing left to train (a finished workdir): evaluate what is there
        final = task.evaluate(state, step)
  finally:
    task.checkpointer.close()
    writer.close()
    watcher.close()
  final = {**final, "step": step}
  task.report(final)
  return final
