"""Orbax checkpoints of {train state, Grain iterator, metadata}, async, keep-N + best-by-metric.

Layout: ``{workdir}/checkpoints/{step}/{state,data,meta}``. Orbax commits each step directory
atomically (a crash mid-save leaves only a temporary directory that is ignored), so a finished
checkpoint is never lost to an interrupted one.

Preemption: SIGTERM (what TPU VMs, SLURM and Kubernetes send first) sets a flag that the loop polls
once per step; on several processes the decision goes through JAX's preemption sync point so that
every process saves the same step.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy as policies


class Checkpointer:
  """Saves and restores the composite checkpoint of one training run.

  Args:
    directory: where step directories live (created if missing).
    keep: how many of the latest checkpoints to keep.
    best_metric: metric name (in the metrics passed to :meth:`save`) whose best value is kept in
      addition to the latest ones (:meth:`best_step`); empty to disable.
    best_mode: "max" (higher is better, e.g. IoU) or "min" (e.g. a validation loss).
    async_save: write in a background thread (the step blocks only for the device→host copy).
  """

  def __init__(self, directory: str, keep: int = 3, best_metric: str = "", best_mode: str = "max",
               async_save: bool = True):
    if best_mode not in ("max", "min"):
      raise ValueError(f"train.best_mode={best_mode!r}: expected 'max' or 'min'")
    self.directory = os.path.abspath(directory)
    keepers = [policies.LatestN(n=keep)]
    best_fn = None
    if best_metric:
      best_fn = lambda m: m[best_metric]  # noqa: E731
      keepers.append(policies.BestN(get_metric_fn=best_fn, reverse=best_mode == "min", n=1,
                                    keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy(keepers), best_fn=best_fn,
        best_mode=best_mode, enable_async_checkpointing=async_save, create=True,
        cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data", "meta"))

  @classmethod
  def for_run(cls, workdir: str, train_cfg: Any) -> "Checkpointer":
    """``{workdir}/checkpoints`` with the run's ``keep_checkpoints``, ``best_metric``, ``best_mode``."""
    return cls(os.path.join(workdir, "checkpoints"), keep=int(train_cfg.keep_checkpoints),
               best_metric=train_cfg.get("best_metric", ""),
               best_mode=train_cfg.get("best_mode", "max"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    """The step with the best ``best_metric`` (the latest step when no metric is tracked)."""
    return self.manager.best_step()

  def step_for(self, which: str | int) -> int | None:
    """``"latest"``, ``"best"`` or a step number (< 0: the latest) → an existing step or None."""
    if which == "best":
      return self.best_step()
    if which == "latest" or (isinstance(which, int) and which < 0):
      return self.latest_step()
    if isinstance(which, int):
      return which if which in self.manager.all_steps() else None
    raise ValueError(f"checkpoint {which!r}: expected 'latest', 'best' or a step number")

  def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator | None,
           meta: dict, metrics: dict | None = None, force: bool = False) -> bool:
    """Starts saving ``step``; returns whether a save was started."""
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    saved = self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)
    if saved:
      logging.info("checkpoint: saving step %d to %s", step, self.directory)
    return saved

  def restore(self, step: int, abstract_state: Any,
              data_iterator: grain.DatasetIterator | None) -> tuple[Any, dict]:
    """Restores ``step`` onto the shardings of ``abstract_state`` (``jax.ShapeDtypeStruct`` leaves).

    The data iterator, if given, is set to its saved position in place. Restoring onto a different
    mesh or process count reshards.
    """
    items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"], restored["meta"]

  def read_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


class PreemptionWatcher:
  """Turns SIGTERM into a 'save and stop at the next step' decision shared by all processes."""

  def __init__(self):
    self._event = threading.Event()
    self._previous = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):  # noqa: ARG002
    logging.warning("SIGTERM received: saving a checkpoint and stopping after this step")
    self._event.set()

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      # jax.distributed installs the SIGTERM notifier; all processes agree on the step here.
      return multihost_utils.reached_preemption_sync_point(step)
    return self._event.is_set()

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
