"""The shared training loop (core.loop) on a toy task: cadence, best checkpoint, resume checks.

Both stages run through this loop (stage1.task.Stage1Task, stage2.task.Stage2Task), so what is
asserted here holds for both; the stages' own end-to-end tests cover their tasks.
"""

import logging as py_logging

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import AxisType

from anatomix_jax.core import checkpointing, config as config_lib, loop


class ToyTask:
  """w ← w + mean(batch) each step; validation metric = a scripted sequence per evaluation."""

  name = "toy"
  log_keys = ("loss",)

  def __init__(self, workdir, *, num_steps=12, steps_per_epoch=5, scores=None, width=3, **train):
    self.workdir = str(workdir)
    self.config = ml_collections.ConfigDict({"train": config_lib.train_config(log_every=2, **train),
                                             "width": width})
    self.mesh = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Auto,))
    self.rules = ()
    self.checkpointer = checkpointing.Checkpointer.for_run(self.workdir, self.config.train)
    self.num_steps, self.steps_per_epoch = num_steps, steps_per_epoch
    self.scores = list(scores or [])
    self.evaluated, self.seen, self.reported = [], [], None

  def model_signature(self):
    return {"width": self.config.width}

  def meta(self):
    return {}

  def train_iterator(self):
    return iter(grain.MapDataset.range(10_000).map(lambda i: np.full((2,), i, np.float32)))

  def setup(self):
    pass

  def init_state(self):
    return {"w": jnp.zeros((self.config.width,), jnp.float32), "step": jnp.zeros((), jnp.int32)}

  def abstract_state(self):
    return jax.eval_shape(self.init_state)

  def make_train_step(self):
    def step(state, batch, step):
      self.seen.append(float(batch[0]))
      new = {"w": state["w"] + batch.mean(), "step": state["step"] + 1}
      return new, {"loss": jnp.float32(step), "nonfinite": jnp.int32(0)}, {}
    return step

  def log_extras(self, stats, elapsed_s, steps):
    return {}

  def evaluate(self, state, step):
    self.evaluated.append(step)
    return {"score": self.scores.pop(0) if self.scores else 0.0}

  def report(self, metrics):
    self.reported = metrics


@pytest.mark.parametrize("eval_every, checkpoint_every, evals, checkpoints", [
    (-1, -1, [5, 10, 12], [5, 10, 12]),   # once per epoch (5 steps), checkpoints with each eval
    (4, -1, [4, 8, 12], [4, 8, 12]),
    (-1, 3, [5, 10, 12], [3, 5, 6, 9, 10, 12]),
    (6, 4, [6, 12], [4, 6, 8, 12]),
])
def test_cadence_means_the_same_for_every_task(tmp_path, eval_every, checkpoint_every, evals,
                                               checkpoints):
  task = ToyTask(tmp_path, eval_every=eval_every, checkpoint_every=checkpoint_every,
                 keep_checkpoints=100)
  out = loop.train(task)
  assert task.evaluated == evals
  assert task.checkpointer.directory and sorted(
      checkpointing.Checkpointer(task.checkpointer.directory).manager.all_steps()) == checkpoints
  assert out["step"] == 12 and task.reported["step"] == 12


@pytest.mark.parametrize("bad", [{"eval_every": 0}, {"checkpoint_every": -2}, {"log_every": 0}])
def test_bad_cadence_is_refused(tmp_path, bad):
  with pytest.raises(ValueError, match="train." + next(iter(bad))):
    loop.Cadence.from_config(config_lib.train_config(**bad), 10, 5)


@pytest.mark.parametrize("mode, best", [("max", 6), ("min", 9)])
def test_best_checkpoint_is_kept_by_the_configured_metric(tmp_path, mode, best):
  # Evaluations at 3, 6, 9, 12 score 0.5, 0.9, 0.1, 0.3; two latest kept plus the best.
  task = ToyTask(tmp_path, eval_every=3, keep_checkpoints=2, best_metric="score", best_mode=mode,
                 scores=[0.5, 0.9, 0.1, 0.3])
  loop.train(task)
  reopened = checkpointing.Checkpointer.for_run(task.workdir, task.config.train)
  try:
    assert reopened.best_step() == best and reopened.step_for("best") == best
    assert sorted(reopened.manager.all_steps()) == sorted({best, 9, 12})
  finally:
    reopened.close()


def test_resume_continues_the_data_stream_and_refuses_another_model(tmp_path):
  first = ToyTask(tmp_path, num_steps=6, eval_every=3)
  loop.train(first)
  resumed = ToyTask(tmp_path, num_steps=9, eval_every=3)
  loop.train(resumed)
  assert first.seen == [0, 1, 2, 3, 4, 5] and resumed.seen == [6, 7, 8]
  with pytest.raises(ValueError, match=r"different model: width: saved 3, this run 4"):
    loop.train(ToyTask(tmp_path, num_steps=12, eval_every=3, width=4))


def test_another_process_count_warns_and_restarts_the_data_stream(tmp_path, monkeypatch, caplog):
  loop.train(ToyTask(tmp_path, num_steps=4, eval_every=2))
  real_meta = loop.checkpoint_meta
  monkeypatch.setattr(checkpointing.Checkpointer, "read_meta",
                      lambda self, step: {**real_meta(ToyTask(tmp_path / "x"), step),
                                          "process_count": 2})
  resumed = ToyTask(tmp_path, num_steps=6, eval_every=2)
  with caplog.at_level(py_logging.WARNING):
    loop.train(resumed)
  assert resumed.seen == [0, 1]  # the stream started afresh
  assert "written by 2 processes" in caplog.text


def test_nonfinite_step_stops_before_the_next_checkpoint(tmp_path):
  task = ToyTask(tmp_path, num_steps=8, eval_every=4)
  make = task.make_train_step

  def poisoned():
    step_fn = make()

    def step(state, batch, step):
      state, metrics, stats = step_fn(state, batch, step)
      return state, {**metrics, "nonfinite": jnp.int32(step == 5)}, stats
    return step

  task.make_train_step = poisoned
  with pytest.raises(FloatingPointError, match=r"steps 5 and 6.*checkpoint 4"):
    loop.train(task)
  assert checkpointing.Checkpointer(task.checkpointer.directory).latest_step() == 4
