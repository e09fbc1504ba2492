"""Stage 2 end to end through ``python -m anatomix_jax.main``: a tiny stage-1 run (+ RAG database),
the align demo (which builds its base LM, tokenizer and instruction data), preemption and exact
resume, then the finetune demo from the align checkpoint with grounding evaluation.
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
from anatomix_jax.instruct import schema
from anatomix_jax.stage2 import demo_data

pytestmark = pytest.mark.slow
STEPS = 6
# A tiny LM (the prompts are still ~1,400 tokens: 36 context lines) and few steps.
TINY_LM = {"lm.demo.vocab_size": 700, "lm.demo.hidden_size": 16, "lm.demo.intermediate_size": 24,
           "lm.demo.num_hidden_layers": 2, "lm.demo.num_attention_heads": 2,
           "lm.demo.num_key_value_heads": 1, "lm.demo.head_dim": 8, "lm.projection_hidden": 8,
           "lm.lora.rank": 2, "data.buckets": "(1536,2048,3072)", "train.batch_size": 2,
           "train.log_every": 1, "train.checkpoint_every": 3, "train.eval_limit": 4,
           "eval.max_new_tokens": 8, "lm.demo.pretrain_steps": 20}


# One CPU device in the subprocesses (the demo's global batch of 2 does not split 8 ways; the
# sharded stage-2 step is tested on 8 fake devices in test_stage2_steps.py).
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


def _run(cmd, timeout=600):
  proc = subprocess.run(cmd, cwd=tiny.REPO, capture_output=True, text=True, timeout=timeout,
                        env=ENV)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
  """A tiny stage-1 workdir on generated synthetic data (data.records_dir empty), with its RAG."""
  workdir = str(tmp_path_factory.mktemp("stage1"))
  items = {k: v for k, v in tiny.OVERRIDES.items()}
  items.update({"data.synthetic.num_train": 24, "data.synthetic.num_val": 8,
                "data.synthetic.num_test": 4, "data.synthetic.min_size": 64,
                "data.synthetic.max_size": 96, "train.num_steps": 2, "train.eval_every": 2,
                "eval.batch_size": 8})
  flags = [f"--config.{k}={v}" for k, v in items.items()]
  base = [sys.executable, "-m", "anatomix_jax.main", "--config=configs/stage1.py:demo",
          f"--workdir={workdir}", *flags]
  _run(base)
  _run(base + ["--mode=build_rag"])
  return workdir


def _stage2(step, workdir, apm_workdir, **extra):
  items = {**TINY_LM, "apm.workdir": apm_workdir, "train.num_steps": STEPS, **extra}
  return [sys.executable, "-m", "anatomix_jax.main", f"--config=configs/stage2_{step}.py:demo",
          f"--workdir={workdir}", *[f"--config.{k}={v}" for k, v in items.items()]]


def _metrics(workdir, split="train"):
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      rec = json.loads(line)
      if rec["split"] == split:
        out[rec["step"]] = {k: v for k, v in rec.items() if k in ("loss", "grad_norm", "tokens")}
  return out


def _state(workdir, step):
  tree = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step),
                                                         "state"))
  return {"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(v)
          for p, v in __import__("jax").tree_util.tree_leaves_with_path(tree["params"])}


@pytest.fixture(scope="module")
def align(stage1, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("align"))
  proc = _run(_stage2("align", workdir, stage1))
  return workdir, proc


def test_align_demo_builds_its_inputs_and_trains_the_heads(stage1, align):
  workdir, proc = align
  # The demo made its instruction data from the stage-1 synthetic tree, with every source.
  data_dir = os.path.join(stage1, "data", demo_data.DIR_NAME)
  sources = {s for s in schema.SOURCES if os.path.isfile(os.path.join(data_dir, s, "train.jsonl"))}
  assert {"mimic_report_gen", "anatomy_grounding", "mscxr", "vindr_instruct", "mimic_vqa",
          "radialog_instruct", "mimic_cxr_classification"} <= sources
  # ... and its base LM as a Hugging Face directory (what MedGemma arrives as).
  base = os.path.join(workdir, "base_lm")
  assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(base))
  assert "stage 2 align" in proc.stderr
  state = _state(workdir, STEPS)
  assert state and all(k.startswith(("image_projection/", "object_projection/")) for k in state)
  losses = [m["loss"] for m in _metrics(workdir).values()]
  assert len(losses) == STEPS and all(np.isfinite(losses))


def test_preempted_align_resumes_exactly(stage1, align, tmp_path):
  straight, _ = align
  preempted = str(tmp_path / "preempted")
  # Each align run makes its own base LM in its workdir; seeded, so both are identical.
  cmd = _stage2("align", preempted, stage1)
  proc = subprocess.Popen(cmd, cwd=tiny.REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                          text=True, env=ENV)
  log, deadline = [], time.time() + 600
  for line in proc.stderr:
    log.append(line)
    if f"step 2/{STEPS}" in line:
      proc.send_signal(signal.SIGTERM)
    assert time.time() < deadline, "".join(log[-40:])
  assert proc.wait(timeout=60) == 0, "".join(log[-40:])
  assert any("preempted: checkpoint of step" in line for line in log), "".join(log[-40:])
  resumed = _run(cmd)
  assert "resumed from" in resumed.stderr
  want, got = _metrics(straight), _metrics(preempted)
  assert want.keys() == got.keys()
  for step in want:  # same data order (mixture position), same prompts, same updates
    for name in want[step]:
      assert got[step][name] == pytest.approx(want[step][name], rel=1e-5), (step, name)
  a, b = _state(straight, STEPS), _state(preempted, STEPS)
  for k in a:
    np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_finetune_demo_starts_from_align_and_evaluates_grounding(stage1, align, tmp_path):
  align_dir, _ = align
  workdir = str(tmp_path / "finetune")
  proc = _run(_stage2("finetune", workdir, stage1, init_from=align_dir, **{"train.num_steps": 3}))
  assert "finetune: ('projection',) from" in proc.stderr
  state = _state(workdir, 3)
  groups = {("lora" if k.endswith(("lora_a", "lora_b")) else k.split("/")[0]) for k in state}
  assert groups == {"lora", "image_projection", "object_projection", "lm"}  # lm = the embedding
  assert [k for k in state if k.startswith("lm/") and "lora" not in k] == [
      "lm/embedder/embedding"]
  val = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))
         if json.loads(line)["split"] == "val"]
  assert val and 0.0 <= val[-1]["parse_rate"] <= 1.0 and val[-1]["grounding_samples"] > 0
  rows = [json.loads(line) for line in open(os.path.join(workdir,
                                                          "grounding_validate_step3.jsonl"))]
  assert rows and all(r["task"] in ("Phrase Grounding", "Anatomy Grounding",
                                    "Abnormality Detection") for r in rows)


def test_export_mode_writes_loadable_files(stage1, align, tmp_path):
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415
  from safetensors.numpy import load_file  # noqa: PLC0415
  align_dir, _ = align
  workdir = str(tmp_path / "finetune")
  cmd = _stage2("finetune", workdir, stage1, init_from=align_dir, **{"train.num_steps": 1,
                                                                     "train.eval_limit": 2})
  _run(cmd)
  _run(cmd + ["--mode=export"])
  out = os.path.join(workdir, "export", "step_1")
  model = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(out, "lm")).eval()
  tok = transformers.AutoTokenizer.from_pretrained(os.path.join(out, "lm"))
  ids = tok("Findings: <box>(1,2),(3,4)</box>", return_tensors="pt")["input_ids"]
  with torch.no_grad():
    logits = model(input_ids=ids).logits
  assert logits.shape[-1] == model.config.vocab_size >= len(tok) and torch.isfinite(logits).all()
  adapter = load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))
  assert len(adapter) == 2 * 7 * 2  # 2 layers × 7 projections × (A, B)
  heads = load_file(os.path.join(out, "projection_heads.safetensors"))
  assert heads["image_projectionhead.proj.0.weight"].shape == (8, 12)  # Linear(256→512) in tiny
  assert heads["obj_projectionhead.proj.3.weight"].shape == (16, 8)
