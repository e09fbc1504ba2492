"""Multi-process runs for real: 2 processes × 4 CPU devices on localhost (jax.distributed, gloo)
against one process with 8 devices, a checkpoint restored onto another process/device count, and
clear errors for bad process flags (before any compilation)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import portpicker
import pytest

import tiny
from anatomix_jax.data import preprocess
from anatomix_jax.synthetic import generator

pytestmark = pytest.mark.slow
STEPS = 3


@pytest.fixture(scope="module")
def records_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("synthetic")
  paths = generator.generate(str(root / "raw"), num_train=40, num_val=8, num_test=4, seed=3,
                             min_size=64, max_size=96, workers=1)
  out = str(root / "records")
  preprocess.preprocess(paths["mimic_dir"], paths["imagenome_dir"], out, image_size=64)
  return out


def _env(devices):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return {**env, "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def _command(records_dir, workdir, steps, *extra):
  return [sys.executable, "-m", "anatomix_jax.main", "--config=configs/stage1.py:demo",
          f"--workdir={workdir}",
          *tiny.flags(records_dir, **{"train.num_steps": steps, "train.log_every": 1,
                                      "train.eval_every": 100, "train.checkpoint_every": STEPS,
                                      # Dropout on: its masks must not depend on the layout.
                                      "model.dropout": 0.1}), *extra]  # extra flags win


def _run_processes(records_dir, workdir, steps, processes, devices):
  port = portpicker.pick_unused_port()
  procs = []
  for i in range(processes):
    extra = ([f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",
              f"--process_id={i}"] if processes > 1 else [])
    procs.append(subprocess.Popen(_command(records_dir, workdir, steps, *extra), cwd=tiny.REPO,
                                  env=_env(devices), stderr=subprocess.PIPE, text=True))
  logs = [p.communicate(timeout=600)[1] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  return logs


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def _params(workdir, step):
  """The checkpoint's params on this test process's first device, whatever saved them."""
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  checkpointer = ocp.StandardCheckpointer()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        checkpointer.metadata(path).item_metadata.tree)
  tree = checkpointer.restore(path, target)
  return {"/".join(str(getattr(k, "key", k)) for k in key): np.asarray(v)
          for key, v in jax.tree_util.tree_flatten_with_path(tree["params"])[0]}


def test_two_processes_equal_one_and_resume_on_four_devices(records_dir, tmp_path):
  two, one = str(tmp_path / "two"), str(tmp_path / "one")
  logs = _run_processes(records_dir, two, STEPS, processes=2, devices=4)
  assert "process 1 of 2; 4 local / 8 global devices" in logs[1]
  _run_processes(records_dir, one, STEPS, processes=1, devices=8)
  want, got = _losses(one), _losses(two)
  assert sorted(got) == list(range(1, STEPS + 1)) and want.keys() == got.keys()
  for step in want:
    assert got[step] == pytest.approx(want[step], rel=1e-5), step
  a, b = _params(one, STEPS), _params(two, STEPS)
  assert a.keys() == b.keys()
  for k in a:
    # atol: attention key biases get only rounding noise as gradient (softmax ignores them).
    np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-5, err_msg=k)
  # The 2-process checkpoint continues in 1 process on 4 devices: the state is resharded from the
  # saved one (the data stream of a new process count restarts, with a warning).
  resumed = _run_processes(records_dir, two, STEPS + 2, processes=1, devices=4)[0]
  assert f"resumed from {two}/checkpoints at step {STEPS}" in resumed
  assert "written by 2 processes, this run has 1" in resumed
  losses = _losses(two)
  assert set(losses) == set(range(1, STEPS + 3)) and all(np.isfinite(list(losses.values())))
  b2 = _params(two, STEPS + 2)
  assert any(not np.allclose(b2[k], b[k]) for k in b)  # it trained on from the restored state


@pytest.mark.parametrize("flags, message", [
    (["--num_processes=2"], "needs --coordinator_address"),
    (["--num_processes=2", "--process_id=2", "--coordinator_address=127.0.0.1:1"],
     "--process_id=2 is outside"),
    (["--coordinator_address=127.0.0.1:1"], "needs --num_processes and --process_id"),
    (["--config.mesh.shape=(3,1,1)"], "does not divide the 8 devices"),
    (["--config.train.batch_size=12", "--config.mesh.shape=(8,1,1)"],
     "global batch 12 is not divisible by the 8 data-parallel shards"),
])
def test_bad_process_and_mesh_settings_fail_before_compiling(tmp_path, flags, message):
  env = {k: v for k, v in _env(8).items()
         if k not in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "JAX_COORDINATOR_ADDRESS")}
  proc = subprocess.run(_command(str(tmp_path / "none"), str(tmp_path / "w"), 1, *flags),
                        cwd=tiny.REPO, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
  assert "Compiling" not in proc.stderr
