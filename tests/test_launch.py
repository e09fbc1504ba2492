"""The launch scripts: syntax, and their dry runs print exactly the expected commands and run nothing."""

import os
import shlex
import shutil
import subprocess

import pytest

import tiny

LAUNCH = os.path.join(tiny.REPO, "launch")
SCRIPTS = ("common.sh", "tpu_pod.sh", "slurm.sh", "single_vm.sh")
# A PATH with bash's basics but without gcloud, sbatch or srun: a dry run must not need them.
ENV = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")}


def _dry(script, *args):
  proc = subprocess.run(["bash", os.path.join(LAUNCH, script), *args], capture_output=True,
                        text=True, env={**ENV, "DRY_RUN": "1"}, timeout=30)
  return proc


@pytest.mark.parametrize("script", SCRIPTS)
def test_syntax(script):
  subprocess.run(["bash", "-n", os.path.join(LAUNCH, script)], check=True)
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed")
  subprocess.run(["shellcheck", "-x", os.path.join(LAUNCH, script)], check=True, cwd=LAUNCH)


def test_tpu_pod_all_prints_create_install_run():
  proc = _dry("tpu_pod.sh", "all", "--name=ax", "--zone=us-west4-a", "--project=p",
              "--accelerator=v5litepod-16", "--repo=https://example.com/ax.git", "--ref=v1",
              "--config=configs/stage1.py", "--workdir=gs://bucket/apm", "--",
              "--config.data.records_dir=/data/records_1024")
  assert proc.returncode == 0, proc.stderr
  lines = [shlex.split(line) for line in proc.stdout.splitlines()]
  assert lines[0] == ["gcloud", "--project=p", "compute", "tpus", "tpu-vm", "create", "ax",
                      "--zone=us-west4-a", "--accelerator-type=v5litepod-16",
                      "--version=v2-alpha-tpuv5-lite"]
  ssh = ["gcloud", "--project=p", "compute", "tpus", "tpu-vm", "ssh", "ax", "--zone=us-west4-a",
         "--worker=all"]
  assert lines[1][:-1] == ssh and lines[2][:-1] == ssh and len(lines) == 3
  install, run = lines[1][-1], lines[2][-1]
  assert "git clone https://example.com/ax.git" in install and "git checkout v1" in install
  assert "pip install -q -e '.[tpu]'" in install
  assert run.startswith("--command=") and (
      "python -m anatomix_jax.main --config=configs/stage1.py --workdir=gs://bucket/apm "
      "--mode=train --config.data.records_dir=/data/records_1024 > run.log" in run)


def test_tpu_pod_spot_and_delete():
  proc = _dry("tpu_pod.sh", "create", "--name=ax", "--zone=z", "--accelerator=v5p-8", "--spot")
  assert proc.stdout.splitlines()[0].startswith(
      "gcloud compute tpus queued-resources create ax --node-id=ax --zone=z "
      "--accelerator-type=v5p-8")
  assert proc.stdout.splitlines()[0].endswith("--spot")
  proc = _dry("tpu_pod.sh", "delete", "--name=ax", "--zone=z")
  assert proc.stdout == "gcloud compute tpus tpu-vm delete ax --zone=z --quiet\n"


def test_slurm_script_and_submission(tmp_path):
  proc = _dry("slurm.sh", "--nodes=2", "--gpus-per-node=4", "--config=configs/stage1.py",
              f"--workdir={tmp_path}", "--", "--config.train.batch_size=96")
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout.splitlines()
  assert "#SBATCH --nodes=2" in out and "#SBATCH --ntasks-per-node=4" in out
  assert "#SBATCH --gpus-per-task=1" in out
  srun = next(line for line in out if line.startswith("srun "))
  assert ("python -m anatomix_jax.main --config=configs/stage1.py --workdir=" in srun
          and "--config.train.batch_size=96 --coordinator_address=" in srun
          and "--num_processes=$SLURM_NTASKS --process_id=$SLURM_PROCID" in srun)
  assert 'HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in out
  assert out[-1] == f"sbatch {tmp_path}/launch.sbatch"
  assert not (tmp_path / "launch.sbatch").exists()  # a dry run writes nothing
  per_node = _dry("slurm.sh", "--per=node", "--config=c", f"--workdir={tmp_path}").stdout
  assert "#SBATCH --ntasks-per-node=1" in per_node and "#SBATCH --gpus-per-node=8" in per_node


def test_single_vm():
  proc = _dry("single_vm.sh", "--accelerator=tpu", "--config=configs/stage1.py:demo",
              "--workdir=runs/demo", "--", "--config.train.num_steps=10")
  assert proc.stdout.splitlines() == [
      "python3 -m venv .venv", ".venv/bin/pip install -q -e '.[tpu]'",
      ".venv/bin/python -m anatomix_jax.main --config=configs/stage1.py:demo "
      "--workdir=runs/demo --mode=train --config.train.num_steps=10"]


@pytest.mark.parametrize("script, args, message", [
    ("tpu_pod.sh", ["run", "--name=ax"], "--zone is required"),
    ("tpu_pod.sh", ["run", "--name=ax", "--zone=z"], "--config is required"),
    ("tpu_pod.sh", ["create", "--name=ax", "--zone=z"], "--accelerator is required"),
    ("tpu_pod.sh", ["reboot", "--name=ax", "--zone=z"], "unknown command reboot"),
    ("slurm.sh", ["--config=c"], "--workdir is required"),
    ("slurm.sh", ["--config=c", "--workdir=w", "--per=rack"], "--per must be gpu or node"),
    ("single_vm.sh", ["--workdir=w"], "--config is required"),
    ("single_vm.sh", ["--bogus"], "unknown option --bogus"),
])
def test_missing_or_bad_options_fail_clearly(script, args, message):
  proc = _dry(script, *args)
  assert proc.returncode == 2 and message in proc.stderr and proc.stdout == ""
