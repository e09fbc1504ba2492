"""End to end through ``python -m anatomix_jax.main`` on tiny synthetic data: train, eval, preemption.

A run killed with SIGTERM mid-training and restarted must end with the same parameters, metrics and
data order as an uninterrupted run of the same length.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

import tiny
from anatomix_jax.data import preprocess
from anatomix_jax.synthetic import generator

pytestmark = pytest.mark.slow
STEPS = 12


@pytest.fixture(scope="module")
def records_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("synthetic")
  paths = generator.generate(str(root / "raw"), num_train=40, num_val=8, num_test=4, seed=3,
                             min_size=64, max_size=96, workers=1)
  out = str(root / "records")
  preprocess.preprocess(paths["mimic_dir"], paths["imagenome_dir"], out, image_size=64)
  return out


def _command(records_dir, workdir, mode="train"):
  return [sys.executable, "-m", "anatomix_jax.main", "--config=configs/stage1.py:demo",
          f"--workdir={workdir}", f"--mode={mode}",
          *tiny.flags(records_dir, **{"train.num_steps": STEPS, "train.log_every": 1,
                                      "train.eval_every": 6, "train.checkpoint_every": 3})]


def _run(cmd, timeout=300):
  proc = subprocess.run(cmd, cwd=tiny.REPO, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _metrics(workdir):
  """Last record per (step, split) of metrics.jsonl (a resumed run rewrites the steps it redoes)."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      rec = json.loads(line)
      out[(rec["step"], rec["split"])] = {k: v for k, v in rec.items()
                                          if k not in ("split", "time", "images_per_s", "eta_min")}
  return out


def _final_params(workdir):
  path = os.path.join(workdir, "checkpoints", str(STEPS), "state")
  tree = ocp.StandardCheckpointer().restore(path)
  return {"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(v)
          for p, v in __import__("jax").tree_util.tree_leaves_with_path(tree["params"])}


@pytest.fixture(scope="module")
def straight(records_dir, tmp_path_factory):
  """An uninterrupted training run (shared: each run costs a process start and compilations)."""
  workdir = tmp_path_factory.mktemp("straight")
  _run(_command(records_dir, workdir))
  return workdir


def test_preempted_run_resumes_exactly(records_dir, straight, tmp_path):
  preempted = tmp_path / "preempted"

  # Second run: SIGTERM once step 5 is logged, then restart in the same workdir.
  proc = subprocess.Popen(_command(records_dir, preempted), cwd=tiny.REPO, stderr=subprocess.PIPE,
                          stdout=subprocess.DEVNULL, text=True)
  log = []
  deadline = time.time() + 300
  for line in proc.stderr:
    log.append(line)
    if "step 5/" in line:
      proc.send_signal(signal.SIGTERM)
    assert time.time() < deadline, "".join(log[-50:])
  assert proc.wait(timeout=60) == 0, "".join(log[-50:])
  assert any("preempted: checkpoint of step" in line for line in log), "".join(log[-50:])
  saved = sorted(int(d) for d in os.listdir(preempted / "checkpoints") if d.isdigit())
  assert saved and 5 <= max(saved) < STEPS  # stopped early, with a checkpoint past step 5

  resumed = _run(_command(records_dir, preempted))
  assert "resumed from" in resumed.stderr

  want, got = _metrics(straight), _metrics(preempted)
  assert set(want) == set(got)
  for key in want:  # losses, grad norms, data fingerprints, eval metrics: all identical
    assert got[key].keys() == want[key].keys(), key
    for name, value in want[key].items():  # None: a NaN (an AUROC without positives)
      assert (got[key][name] is None) == (value is None), (key, name)
      if value is not None:
        assert got[key][name] == pytest.approx(value, rel=1e-6, abs=1e-7), (key, name)
  a, b = _final_params(straight), _final_params(preempted)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-8, err_msg=k)


def test_eval_mode_scores_the_checkpoint(records_dir, straight):
  workdir = straight
  report = workdir / f"eval_validate_step{STEPS}.json"
  report.unlink()  # the training run's final report; eval mode must write its own
  proc = _run(_command(records_dir, workdir, mode="eval"))
  result = json.loads(report.read_text())
  assert result["num_examples"] == 8 and 0.0 <= result["mean_iou"] <= 1.0
  assert "baseline_mean_iou" in result and "map_50" in result and "auroc" in result
  # the same numbers as the final evaluation of the training run
  final = _metrics(workdir)[(STEPS, "val")]
  assert result["mean_iou"] == pytest.approx(final["mean_iou"], rel=1e-6)
  assert os.listdir(workdir / "overlays") and os.path.isdir(workdir / "tensorboard")
  assert "final validate metrics at step" in proc.stderr


def test_build_rag_mode(records_dir, straight):
  from anatomix_jax import anatomy
  from anatomix_jax.rag import database

  proc = _run(_command(records_dir, straight, mode="build_rag"))
  db = database.load(str(straight / "rag"))
  assert db.meta["step"] == STEPS and db.meta["splits"] == ["train"]
  # Every train record's sentence for each anatomy is in that anatomy's table, nothing else.
  from anatomix_jax.data import sentences
  index = sentences.load(os.path.join(records_dir, sentences.INDEX_FILE))
  for a in range(anatomy.NUM_ANATOMIES):
    assert set(db.sentences[a]) == {index.sentences[i] for i in index.by_split["train"][a]}
    np.testing.assert_allclose(np.linalg.norm(db.embeddings[a], axis=1), 1.0, rtol=1e-5)
  result = json.loads((straight / "rag" / f"retrieval_validate_step{STEPS}.json").read_text())
  assert result["num_images"] == 8 and 0.0 <= result["r@1"] <= result["r@3"] <= result["r@5"] <= 1
  assert 0.0 < result["random_r@1"] < 1.0 and "retrieval on validate" in proc.stderr
  with pytest.raises(database.DatabaseError, match="anatomy list"):
    database.load(str(straight / "rag"), anatomies=anatomy.ANATOMY_NAMES[::-1])
