"""Stage 2 end to end through ``python -m anatomix_jax.main``: a tiny stage-1 run (+ RAG database),
the align demo (which builds its base LM, tokenizer and instruction data), preemption and exact
resume, then the finetune demo from the align checkpoint with grounding evaluation.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

import tiny
from anatomix_jax.instruct import schema
from anatomix_jax.stage2.demo import data as demo_data

pytestmark = pytest.mark.slow
STEPS = 6
# A tiny LM (the prompts are still ~1,400 tokens: 36 context lines) and few steps.
TINY_LM = {"lm.demo.vocab_size": 700, "lm.demo.hidden_size": 16, "lm.demo.intermediate_size": 24,
           "lm.demo.num_hidden_layers": 2, "lm.demo.num_attention_heads": 2,
           "lm.demo.num_key_value_heads": 1, "lm.demo.head_dim": 8, "lm.projection_hidden": 8,
           "lm.lora.rank": 2, "data.buckets": "(1536,2048,3072)", "train.batch_size": 2,
           "train.log_every": 1, "train.checkpoint_every": 3, "train.eval_limit": 4,
           "eval.max_new_tokens": 8, "lm.demo.pretrain_steps": 20, "lm.demo.pretrain_batch_size": 8,
           "lm.demo.context_pretrain_steps": 4, "lm.demo.context_batch_size": 4}


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


def test_resuming_with_another_model_fails_clearly(stage1, align):
  workdir, _ = align
  proc = subprocess.run(_stage2("align", workdir, stage1, **{"lm.projection_hidden": 12,
                                                              "train.num_steps": STEPS + 2}),
                        cwd=tiny.REPO, capture_output=True, text=True, timeout=600, env=ENV)
  assert proc.returncode != 0
  assert "holds checkpoints of a different model: projection_hidden: saved 8, this run 12" in (
      proc.stderr), proc.stderr[-3000:]
  assert max(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))
             if d.isdigit()) == STEPS  # nothing trained or saved


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


@pytest.fixture(scope="module")
def finetuned(stage1, align, tmp_path_factory):
  """A 1-step finetune workdir (export, eval and predict start from it) and its command."""
  workdir = str(tmp_path_factory.mktemp("finetuned"))
  cmd = _stage2("finetune", workdir, stage1, init_from=align[0], **{"train.num_steps": 1,
                                                                     "train.eval_limit": 2})
  _run(cmd)
  return workdir, cmd


def test_export_mode_writes_loadable_files(finetuned):
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415
  from safetensors.numpy import load_file  # noqa: PLC0415
  workdir, cmd = finetuned
  _run(cmd + ["--mode=export"])
  out = os.path.join(workdir, "export", "step_1")
  model = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(out, "lm")).eval()
  tok = transformers.AutoTokenizer.from_pretrained(os.path.join(out, "lm"))
  ids = tok("Findings: <box>(1,2),(3,4)</box>", return_tensors="pt")["input_ids"]
  with torch.no_grad():
    logits = model(input_ids=ids).logits
  assert logits.shape[-1] == model.config.vocab_size >= len(tok) and torch.isfinite(logits).all()
  adapter = load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))
  assert len(adapter) == 2 * 7 * 2 + 2  # 2 layers × 7 projections × (A, B) + the trained table
  assert "base_model.model.lm_head.weight" in adapter  # the trained table, as modules_to_save
  heads = load_file(os.path.join(out, "projection_heads.safetensors"))
  assert heads["image_projectionhead.proj.0.weight"].shape == (8, 12)  # Linear(256→512) in tiny
  assert heads["obj_projectionhead.proj.3.weight"].shape == (16, 8)


def _main(config, workdir, *flags):
  return [sys.executable, "-m", "anatomix_jax.main", f"--config={config}", f"--workdir={workdir}",
          *flags]


def _jsonl(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_eval_mode_scores_every_task_writes_tables_and_resumes(stage1, finetuned):
  workdir, _ = finetuned
  cmd = _main("configs/eval.py:demo", workdir, "--mode=eval", "--config.evaluate.max_per_task=2",
              "--config.evaluate.max_new_tokens=8", "--config.evaluate.batch_size=4",
              "--config.evaluate.metrics.semantic_matching=exact")
  _run(cmd)
  out = os.path.join(workdir, "eval", "test_step1")
  samples = _jsonl(os.path.join(out, "samples.jsonl"))
  # Two records per (source, task) of the demo's test split (VinDr: of its 35 % subsample).
  data_dir = os.path.join(stage1, "data", demo_data.DIR_NAME)
  want = {}
  for source in os.listdir(data_dir):
    for r in _jsonl(os.path.join(data_dir, source, "test.jsonl")):
      want.setdefault((source, r["task"]), 0)
      want[(source, r["task"])] += 1
  got = {}
  for r in samples:
    got[(r["source"], r["task"])] = got.get((r["source"], r["task"]), 0) + 1
  assert got.keys() == want.keys()
  assert all(got[k] == min(2, want[k]) for k in got if k[0] != "vindr_instruct")
  assert len({(r["source"], r["id"]) for r in samples}) == len(samples)
  results = json.load(open(os.path.join(out, "results.json")))
  groups = results["groups"]
  assert groups["Phrase Grounding | all"]["samples"] == sum(
      v for (s, t), v in got.items() if t == "Phrase Grounding")
  assert 0.0 <= groups["Anatomy Grounding | all"]["grounding_parse_rate"] <= 1.0
  assert "rouge1" in groups["Report Generation | mimic_report_gen"]
  assert "report_label_micro_f1" in groups["Report Generation | mimic_report_gen"]  # :demo
  assert "vqa_closed_accuracy" in groups["Close-Ended VQA | mimic_vqa"]
  assert set(results["table1"]) >= {"ROUGE GD", "METEOR GC", "PG IoU", "AG mAP"}
  assert {"bertscore", "chexbert", "radgraph"} <= set(results["skipped"])  # no local weights
  markdown = open(os.path.join(out, "results.md")).read()
  assert "Table 1" in markdown and "Anatomy Grounding | anatomy_grounding" in markdown
  # The trivial image-blind baseline on the same samples, from the demo data's train split.
  assert results["baseline"]["samples"] == len(samples) and "baseline" not in results["skipped"]
  assert "## Trivial baseline (image-blind)" in markdown and "RG label micro-F1" in markdown

  # Interrupted: keep 3 sample lines and a torn 4th; the rerun generates only the rest.
  path = os.path.join(out, "samples.jsonl")
  lines = open(path).read().splitlines(keepends=True)
  with open(path, "w") as f:
    f.writelines(lines[:3] + [lines[3][:20]])
  proc = _run(cmd)
  assert f"({3} already in" in proc.stderr
  again = _jsonl(os.path.join(out, "scored_samples.jsonl"))
  assert sorted((r["source"], r["id"]) for r in again) == sorted(
      (r["source"], r["id"]) for r in samples)
  assert [r["answer"] for r in again[:3]] == [r["answer"] for r in samples[:3]]


def test_predict_on_png_16bit_png_and_dicom(finetuned, tmp_path):
  import cv2  # noqa: PLC0415
  from test_images_dicom import make_dicom  # noqa: PLC0415
  workdir, _ = finetuned
  rng = np.random.default_rng(0)
  height, width = 150, 110  # portrait: the letterbox pads left and right
  yy, xx = np.mgrid[:height, :width]
  grey = np.clip(40 + 160 * np.exp(-((xx - 40) ** 2 + (yy - 70) ** 2) / 900.0)
                 + rng.integers(0, 30, (height, width)), 0, 255).astype(np.uint8)
  grey[0, 0], grey[-1, -1] = 0, 255  # the full range: the DICOM's rendering (min-max) is grey/255
  # Multiples of 257: the 16-bit and DICOM renderings equal the 8-bit image exactly (k·257/65535
  # = k/255), so all four files must give the same model input and the same result.
  pixels = grey.astype(np.uint16) * 257
  images = tmp_path / "images"
  images.mkdir()
  cv2.imwrite(str(images / "b_16bit.png"), pixels)
  cv2.imwrite(str(images / "a_8bit.png"), grey)
  (images / "c_mono2.dcm").write_bytes(make_dicom(pixels))
  (images / "d_mono1.dcm").write_bytes(make_dicom(65535 - pixels, photometric="MONOCHROME1"))
  (images / "e_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
  out = tmp_path / "predictions"
  proc = _run(_main("configs/predict.py", workdir, "--mode=predict",
                    f"--config.predict.inputs={images}", f"--config.predict.output_dir={out}",
                    "--config.predict.task=phrase_grounding",
                    "--config.predict.query=left pleural effusion",
                    "--config.predict.max_new_tokens=8", "--config.predict.batch_size=2"))
  assert "images/s" in proc.stdout
  summary = json.load(open(out / "summary.json"))
  assert summary["images"] == 4 and [os.path.basename(f["file"]) for f in summary["failures"]] == [
      "e_broken.png"]
  results = {n: json.load(open(out / f"{n}.json")) for n in ("a_8bit", "b_16bit", "c_mono2",
                                                              "d_mono1")}
  pad = (height - width) / 2  # letterbox: pad columns on each side, then scale 1024 / height
  for name, r in results.items():
    assert (out / f"{name}.png").is_file()
    assert r["image_size"] == [height, width] and len(r["anatomy"]) == 36
    for item in r["anatomy"]:
      canvas, image = np.asarray(item["box_canvas"]), np.asarray(item["box_image"])
      expected = canvas * height / 1024 - [pad, 0, pad, 0]
      expected = np.clip(expected, 0, [width, height, width, height])
      np.testing.assert_allclose(image, expected, atol=0.11)  # rounded to 0.1 px
      assert (image >= 0).all() and (image[[0, 2]] <= width).all() and (
          image[[1, 3]] <= height).all()
    assert isinstance(r["answer"], str)
  # PNG (8- and 16-bit) and DICOM (both photometric interpretations) of the same rendered pixels.
  for name in ("a_8bit", "c_mono2", "d_mono1"):
    assert results[name]["anatomy"] == results["b_16bit"]["anatomy"]
    assert results[name]["answer"] == results["b_16bit"]["answer"]


def test_eval_and_predict_need_only_the_stage1_checkpoint_and_rag(stage1, finetuned, tmp_path):
  """The stage-1 workdir's data/ and text_cache/ are moved away: eval (pointed at the moved
  instruction data) and predict read only its checkpoints/ and rag/."""
  from anatomix_jax.stage2 import inference  # noqa: PLC0415
  workdir, _ = finetuned
  moved = {name: tmp_path / name for name in ("data", "text_cache")}
  for name, target in moved.items():
    shutil.move(os.path.join(stage1, name), target)
  try:
    assert {"checkpoints", "rag"} <= set(os.listdir(stage1))
    assert not {"data", "text_cache"} & set(os.listdir(stage1))
    trained, _ = inference.training_config(workdir)
    old_root = os.path.join(stage1, "data")
    image_root = trained.data.image_roots.default.replace(old_root, str(moved["data"]))
    out = tmp_path / "eval"
    _run(_main("configs/eval.py:demo", workdir, "--mode=eval",
               "--config.evaluate.max_per_task=1", "--config.evaluate.max_new_tokens=4",
               "--config.evaluate.metrics.semantic_matching=exact",
               f"--config.evaluate.data_dir={moved['data'] / demo_data.DIR_NAME}",
               f"--config.evaluate.image_root={image_root}", f"--config.evaluate.output_dir={out}"))
    results = json.load(open(out / "results.json"))
    assert results["groups"]["Anatomy Grounding | all"]["samples"] == 1
    image = next(os.path.join(d, f) for d, _, files in sorted(os.walk(moved["data"]))
                 for f in sorted(files) if f.endswith(".jpg"))
    predictions = tmp_path / "predictions"
    _run(_main("configs/predict.py", workdir, "--mode=predict", f"--config.predict.inputs={image}",
               f"--config.predict.output_dir={predictions}", "--config.predict.max_new_tokens=4"))
    assert json.load(open(predictions / "summary.json"))["images"] == 1
    assert not {"data", "text_cache"} & set(os.listdir(stage1))  # nothing re-created them
  finally:
    for name, target in moved.items():
      shutil.move(target, os.path.join(stage1, name))
