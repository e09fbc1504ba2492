"""Entry point: ``python -m anatomix_jax.main --config=configs/stage1.py[:demo] --workdir=DIR``.

Flags: ``--mode=train|eval|build_rag|export|predict|compile_check|import|export_original``;
``--config.a.b=value`` overrides any config field (the config is locked, so an unknown key fails
at flag parsing, before any work starts). Multi-process runs (TPU pod slices, SLURM, or explicit
``--coordinator_address``) initialise ``jax.distributed`` first; a single machine skips it.
``--mode=compile_check --topology=v5e:2x4`` compiles the train step for a TPU topology without
TPUs (libtpu extra).
"""

from __future__ import annotations

import logging as py_logging
import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and data.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "build_rag", "export", "predict",
                                            "compile_check", "import", "export_original"],
                          "train: stage 1 or 2 (resumes); eval: score a stage-1 checkpoint, or a "
                          "stage-2 one with configs/eval.py (all tasks' test records, the paper's "
                          "metrics); build_rag: the per-anatomy sentence database from a stage-1 "
                          "checkpoint, with retrieval metrics; export: a stage-2 checkpoint as a "
                          "Hugging Face model (LoRA merged), a PEFT adapter and the projection "
                          "heads; predict: a stage-2 checkpoint on image files (configs/predict.py); "
                          "compile_check: compile the config's train step for --topology "
                          "(libtpu, no TPU needed) and report memory, FLOPs and a roofline "
                          "step time; import / export_original: the original AnatomiX's "
                          "checkpoint files in / out (configs/original.py).")
_TOPOLOGY = flags.DEFINE_string("topology", None, "--mode=compile_check: a TPU topology such as "
                                "v5e:2x4, v5p:2x2x1 or v5e:16x16.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 for multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def _check_process_flags() -> None:
  """Clear errors for process flags that would make ``jax.distributed`` hang or fail later."""
  n, i = _NUM_PROCESSES.value, _PROCESS_ID.value
  if n is not None and n < 1:
    raise app.UsageError(f"--num_processes={n}: must be ≥ 1")
  if n is not None and i is not None and not 0 <= i < n:
    raise app.UsageError(f"--process_id={i} is outside [0, --num_processes={n})")
  cluster = (os.environ.get("JAX_COORDINATOR_ADDRESS") or int(os.environ.get("SLURM_NTASKS", "1")) > 1
             or "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""))
  if (n or 1) > 1 and not _COORDINATOR.value and not cluster:
    raise app.UsageError(f"--num_processes={n} needs --coordinator_address=HOST:PORT (process 0's "
                         "address) or a cluster environment (SLURM, Cloud TPU VM) that provides it")
  if _COORDINATOR.value and (n is None or i is None):
    raise app.UsageError("--coordinator_address needs --num_processes and --process_id as well")


def _multi_process_requested() -> bool:
  """Whether this launch is one of several processes (explicit flags or a cluster environment)."""
  if _COORDINATOR.value or os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return True
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")  # a multi-host TPU slice


class _QuietLibraries(py_logging.Filter):
  """Drops INFO chatter of Orbax (dozens of lines per checkpoint); warnings and errors pass."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  _check_process_flags()
  if _MODE.value == "compile_check":
    return _compile_check()
  import jax  # pylint: disable=import-outside-toplevel

  if _multi_process_requested():
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  logging.info("process %d of %d; %d local / %d global devices (%s)", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)

  config = _CONFIG.value
  runner = _runner(config, _MODE.value)
  result = runner(config, _WORKDIR.value)
  if jax.process_index() == 0 and result:
    logging.info("done: %s", {k: v for k, v in result.items() if "/" not in k})


# (stage, mode) → (module, function, the config kind it needs). Modules import on demand, so a
# mode loads only its own dependencies (the metric packages load only for eval).
_STAGE2_TRAIN = ("phase", "configs/stage2_{align,finetune}.py")
RUNNERS = {
    ("stage1", "train"): ("anatomix_jax.stage1.task", "train_and_evaluate", None),
    ("stage1", "eval"): ("anatomix_jax.stage1.task", "evaluate_checkpoint", None),
    ("stage1", "build_rag"): ("anatomix_jax.stage1.rag", "build_and_evaluate", None),
    ("stage2", "train"): ("anatomix_jax.stage2.task", "train", _STAGE2_TRAIN),
    ("stage2", "export"): ("anatomix_jax.stage2.export", "export", _STAGE2_TRAIN),
    ("stage2", "eval"): ("anatomix_jax.stage2.evaluate", "evaluate",
                         ("evaluate", "configs/eval.py")),
    ("stage2", "predict"): ("anatomix_jax.stage2.predict", "predict",
                            ("predict", "configs/predict.py")),
    ("original", "import"): ("anatomix_jax.original", "run_import", None),
    ("original", "export_original"): ("anatomix_jax.original", "run_export", None),
}


def _runner(config, mode: str):
  """The function that runs ``mode`` for the config's stage; usage errors name what fits."""
  import importlib  # pylint: disable=import-outside-toplevel

  stage = config.get("stage")
  if stage not in ("stage1", "stage2", "original"):
    raise app.UsageError(f"config stage {stage!r} is not runnable by this build")
  if (stage, mode) not in RUNNERS:
    modes = sorted(m for s, m in RUNNERS if s == stage)
    hint = " (--mode=predict takes a stage-2 model: configs/predict.py)" if mode == "predict" else ""
    raise app.UsageError(f"--mode={mode} is not available for {stage} ({modes}){hint}")
  module, function, needs = RUNNERS[(stage, mode)]
  if needs is not None and needs[0] not in config:
    raise app.UsageError(f"--mode={mode} for {stage} takes {needs[1]}")
  return getattr(importlib.import_module(module), function)


def _compile_check() -> None:
  """--mode=compile_check: one process, no data, no checkpoints; the report goes to the workdir."""
  if not _TOPOLOGY.value:
    raise app.UsageError("--mode=compile_check needs --topology (e.g. v5e:2x4)")
  config = _CONFIG.value
  if config.stage == "stage2" and "phase" not in config:
    raise app.UsageError("--mode=compile_check for stage 2 takes configs/stage2_{align,finetune}.py")
  import json  # pylint: disable=import-outside-toplevel
  from anatomix_jax.aot import compile_check  # pylint: disable=import-outside-toplevel

  report = compile_check.check(config, _TOPOLOGY.value)
  os.makedirs(_WORKDIR.value, exist_ok=True)
  path = os.path.join(_WORKDIR.value, "compile_check.json")
  with open(path, "w", encoding="utf-8") as f:
    json.dump(report, f, indent=1)
  print(compile_check.table([report]))
  for note in report["notes"]:
    print("note:", note)
  logging.info("compile check written to %s", path)


if __name__ == "__main__":
  app.run(main)
