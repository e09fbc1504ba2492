"""Stage-2 training loop (align or finetune): data → frozen APM → prompts → jitted LM step.

Per step: a Grain batch of images + records → the frozen APM (boxes, embeddings, retrieved
sentences) → prompts rendered and tokenized on the host, padded to a length bucket → the pure,
sharded ``train_step(state, frozen, batch, rng)``. The state holds only the trainable leaves; the
frozen base comes from the base model directory each run (the checkpoint's ``meta`` names it).
Checkpoints (Orbax composite: state, data iterator position incl. the mixture, meta) are written
every ``train.checkpoint_every`` steps and on SIGTERM; a run resumes from its workdir.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from anatomix_jax.convert import hf_gemma3
from anatomix_jax.models import anatomix, lora as lora_lib
from anatomix_jax.stage2 import (batching, data, grounding as evaluate, frozen_apm, prompt, steps, tokenizer)
from anatomix_jax.stage2.demo import data as demo_data, lm as demo_lm
from anatomix_jax.core import checkpointing, sharding as sharding_lib
from anatomix_jax.core.writers import MetricWriter

BASE_DIR = "base_lm"  # where a demo run keeps the tiny base LM it made (HF format)
_TIMERS = ("apm_s", "host_s", "lm_s")


def base_model_dir(config: Any, workdir: str) -> str:
  """The base LM directory: ``lm.model_dir``, or the demo's (made by the align step)."""
  if config.lm.model_dir:
    return config.lm.model_dir
  if not config.lm.demo.enabled:
    raise ValueError("lm.model_dir is empty: set it to a local MedGemma / Gemma3 directory "
                     "(or use a :demo config)")
  if config.step == "finetune":
    if not config.init_from:
      raise ValueError("the finetune demo needs init_from = the align demo's workdir")
    return os.path.join(config.init_from, BASE_DIR)
  return os.path.join(workdir, BASE_DIR)


class Stage2:
  """What a stage-2 run needs: APM, tokenizer, model, shardings, optimizer, checkpointer."""

  def __init__(self, config: Any, workdir: str, needs_data: bool = True):
    """``needs_data``: False for runs that read no instruction data (prediction)."""
    c = self.config = config
    self.workdir = workdir
    if c.step not in steps.STEP_GROUPS:
      raise ValueError(f"step {c.step!r} is not one of {sorted(steps.STEP_GROUPS)}")
    if not c.apm.workdir:
      raise ValueError("apm.workdir is empty: point it at a trained stage-1 workdir")
    if needs_data and not c.data.dir:
      if not c.lm.demo.enabled:
        raise ValueError("data.dir is empty: build instruction data first (anatomix_jax.instruct)")
      demo_data.configure(c)  # the demo builds its own from the stage-1 synthetic data
    self.mesh = sharding_lib.make_mesh(c.mesh)
    self.rules = tuple(tuple(r) for r in c.sharding_rules)
    self.host_batch = sharding_lib.check_global_batch(c.train.batch_size, self.mesh, self.rules)
    self.batch_sharding = sharding_lib.batch_sharding(self.mesh, self.rules)
    self.apm = frozen_apm.FrozenAPM(c.apm.workdir, c.apm.rag_dir, c.apm.checkpoint)
    self.base_dir = base_model_dir(c, workdir)
    if c.lm.demo.enabled and c.step == "align" and not os.path.isdir(self.base_dir):
      demo_lm.make_base(self.base_dir, c, self.apm)
    self.tok = tokenizer.load_tokenizer(c.lm.tokenizer_dir or self.base_dir)
    self.groups = steps.STEP_GROUPS[c.step]
    spec = lora_lib.LoraSpec(**c.lm.lora.to_dict()) if "lora" in self.groups else lora_lib.LoraSpec()
    self.file_lm_config, _ = hf_gemma3.read_config(self.base_dir, dtype=c.lm.dtype,
                                                   param_dtype=c.lm.param_dtype,
                                                   remat=c.lm.remat, lora=spec,
                                                   scan_layers=c.lm.scan_layers)
    lm_config = self.file_lm_config
    # The 45 stage-2 tokens need embedding rows. MedGemma's table (262,208 rows) already holds
    # its 262,190 tokens, so the reference never resizes; a smaller table grows here (to a
    # multiple of 64), new rows = the mean of the old ones (HF's mean resizing).
    if self.tok.vocab_size > lm_config.vocab_size:
      lm_config = dataclasses.replace(lm_config, vocab_size=-(-self.tok.vocab_size // 64) * 64)
      logging.warning("embedding table resized from %d to %d rows for the tokenizer's %d tokens",
                      self.file_lm_config.vocab_size, lm_config.vocab_size, self.tok.vocab_size)
    apm_cfg = self.apm.model_config
    self.model_config = anatomix.AnatomiXConfig(
        lm_config, image_token_id=self.tok.image_id, first_object_token_id=self.tok.obj_ids[0],
        num_objects=len(self.tok.obj_ids), image_dim=apm_cfg.hidden_dim,
        object_dim=apm_cfg.proj_dim, projection_hidden=c.lm.projection_hidden,
        bidirectional_image=c.lm.bidirectional_image)
    self.model = anatomix.AnatomiX(self.model_config)
    # The schedule's length only matters to training (the optimizer state's shapes do not use it).
    self.num_steps = self._num_steps() if needs_data else 1
    self.tx = steps.make_optimizer(c.optim, self.num_steps)
    # Shardings from the logical axis names (boxed abstract params; the optimizer state inherits
    # its params' boxes), as in stage 1.
    boxed_train, boxed_frozen = steps.split(
        anatomix.abstract_variables(self.model_config)["params"], self.groups)
    shard = lambda tree: sharding_lib.logical_shardings(tree, self.mesh, self.rules)  # noqa: E731
    self.state_shardings = shard(jax.eval_shape(lambda p: steps.init_state(p, self.tx),
                                                boxed_train))
    self.frozen_shardings = shard(boxed_frozen)
    self.param_shardings = anatomix.combine(self.state_shardings.params, self.frozen_shardings)
    self.batcher = batching.HostBatcher(self.tok, c.data, self.apm.num_patches, seed=c.seed)
    self.checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                                   keep=c.train.keep_checkpoints)

  def _num_steps(self) -> int:
    c = self.config
    if c.train.num_steps > 0:
      return int(c.train.num_steps)
    weights = {k: v for k, v in c.data.weights.items() if v > 0}
    n = sum(len(data.load_records(c.data.dir, s, c.data.train_split, c.data.tasks or None))
            for s in weights)
    return max(c.train.epochs * n // c.train.batch_size, 1)

  def meta(self, step: int) -> dict:
    return {"step": int(step), "stage": "stage2", "step_name": self.config.step,
            "base_model_dir": os.path.abspath(self.base_dir), "apm_step": self.apm.step,
            "trainable_groups": list(self.groups),
            "config": json.loads(self.config.to_json_best_effort())}

  # --- data --------------------------------------------------------------------------------------

  def dataset(self, split: str, *, train: bool, tasks: Any = None):
    """The host's instruction batches of ``split`` (training: the endless weighted mixture with
    augmentation; evaluation: one pass, ``train.eval_limit`` records, unreadable images skipped)."""
    c = self.config
    return data.instruction_dataset(
        c.data.dir, split, {k: float(v) for k, v in c.data.weights.items()},
        image_roots=c.data.image_roots.to_dict(), image_size=self.apm.image_size,
        batch_size=self.host_batch, train=train, seed=c.seed,
        tasks=tasks if tasks is not None else (tuple(c.data.tasks) or None),
        augment=c.data.augment if train and c.data.augment.enabled else None,
        intensity=c.data.intensity, skip_bad=c.data.skip_bad if train else True,
        process_index=jax.process_index(), process_count=jax.process_count(),
        limit=None if train else c.train.eval_limit)

  def device_batch(self, local: dict, step: int, *, train: bool,
                   timing: dict | None = None) -> tuple[dict, dict]:
    """Host batch → frozen APM → prompts → global arrays for the step.

    Returns:
      ``(batch, stats)``; ``timing`` (optional) accumulates ``apm_s`` and ``host_s``.
    """
    t0 = time.time()
    features = self.apm(local["image"])
    t1 = time.time()
    arrays, stats = self.batcher(local["records"], features, step, train=train,
                                 valid=local["valid"])
    arrays.pop("valid")
    if timing is not None:
      timing["apm_s"] += t1 - t0
      timing["host_s"] += time.time() - t1
    batch = sharding_lib.host_to_global(arrays, self.batch_sharding)
    batch["image_features"] = jax.device_put(features["memory"], self.batch_sharding)
    batch["object_features"] = jax.device_put(features["objects"], self.batch_sharding)
    return batch, stats

  # --- parameters --------------------------------------------------------------------------------

  def load_frozen_and_trainable(self, from_init: bool = True) -> tuple[Any, Any]:
    """Base LM (sharded, from files) + fresh heads/LoRA, or heads from ``init_from`` (unless
    ``from_init`` is off: a checkpoint restore replaces them anyway); split."""
    c = self.config
    _, base = hf_gemma3.load_gemma3(self.base_dir, self.mesh, self.rules, c.lm.dtype,
                                    param_dtype=c.lm.param_dtype, remat=c.lm.remat,
                                    lora=self.model_config.lm.lora,
                                    scan_layers=self.model_config.lm.scan_layers)
    table = base["embedder"]["embedding"]
    extra = self.model_config.lm.vocab_size - table.shape[0]
    if extra > 0:
      rows = jnp.broadcast_to(table.mean(axis=0, keepdims=True), (extra, table.shape[1]))
      sharding = self.param_shardings["lm"]["embedder"]["embedding"]
      base["embedder"]["embedding"] = jax.device_put(
          jnp.concatenate([table, rows.astype(table.dtype)]), sharding)
    fresh = anatomix.init_subtree(
        self.model_config, jax.random.key(c.seed),
        lambda path: not path.startswith("lm/") or path.endswith(lora_lib.LORA_LEAVES),
        self.param_shardings)
    params = anatomix.combine({"lm": base}, fresh)
    if from_init and c.init_from and c.step == "finetune":
      params = self._with_align_heads(params)
    return steps.split(params, self.groups)

  def restore_params(self, step: int | None = None) -> tuple[Any, int]:
    """All params (frozen base + the trained leaves of checkpoint ``step``, default the latest).

    Call under the run's mesh and logical axis rules.
    """
    step = self.checkpointer.latest_step() if step is None else step
    if step is None or step not in self.checkpointer.manager.all_steps():
      raise FileNotFoundError(f"no stage-2 checkpoint{'' if step is None else f' of step {step}'}"
                              f" in {self.checkpointer.directory}: train stage 2 first")
    trainable, frozen = self.load_frozen_and_trainable(from_init=False)
    template = jax.jit(lambda p: steps.init_state(p, self.tx),
                       out_shardings=self.state_shardings)(trainable)
    state, _ = self.checkpointer.restore(step, abstract_like(template), None)
    return anatomix.combine(frozen, state.params), step

  def _with_align_heads(self, params: Any) -> Any:
    """``params`` with the leaves the align run trained (its latest checkpoint) swapped in."""
    ckpt = checkpointing.Checkpointer(os.path.join(self.config.init_from, "checkpoints"))
    try:
      step = ckpt.latest_step()
      if step is None:
        raise FileNotFoundError(f"no align checkpoint in {self.config.init_from}/checkpoints: "
                                "run the align step first")
      groups = tuple(ckpt.read_meta(step)["trainable_groups"])
      trained, rest = steps.split(params, groups)
      abstract = jax.eval_shape(lambda p: steps.init_state(p, self.tx), trained)
      replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
      abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                             sharding=replicated), abstract)
      state, _ = ckpt.restore(step, abstract.replace(params=abstract_like(trained)), None)
    finally:
      ckpt.close()
    logging.info("finetune: %s from %s step %d", groups, self.config.init_from, step)
    return anatomix.combine(rest, state.params)


def abstract_like(tree: Any) -> Any:
  """Arrays → ShapeDtypeStructs with their shardings (an Orbax restore target)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def run_eval(run: Stage2, state: steps.Stage2State, frozen: Any, eval_step: Any,
             step: int) -> dict:
  """Validation loss over the mixture's eval split and, for grounding tasks in the mixture,
  generation-based grounding metrics (``evaluate``); writes per-sample JSONL (process 0)."""
  c = run.config
  loss_sum = tokens = 0.0
  for local in run.dataset(c.data.eval_split, train=False):
    batch, _ = run.device_batch(local, step, train=False)
    out = jax.device_get(eval_step(state, frozen, batch))
    loss_sum, tokens = loss_sum + float(out["loss_sum"]), tokens + float(out["tokens"])
  metrics = {"loss": loss_sum / max(tokens, 1.0), "tokens": tokens}
  tasks = [t for t in evaluate.GROUNDING_TASKS if not c.data.tasks or t in c.data.tasks]
  rows: list[dict] = []
  try:
    grounding = run.dataset(c.data.eval_split, train=False, tasks=tasks)
  except data.InstructionDataError:
    grounding = []  # no grounding records in this step's mixture
  params = anatomix.combine(frozen, state.params)
  for local in grounding:
    features = run.apm(local["image"])
    keep = [i for i, v in enumerate(local["valid"]) if v]
    examples = run.batcher.examples(local["records"], features, step, train=False, answer=False)
    encoded = [prompt.encode(run.tok, examples[i]) for i in keep]
    answers = evaluate.generate_answers(
        run.model, params, run.tok, encoded,
        {k: features[k][np.asarray(keep)] for k in ("memory", "objects")},
        c.eval.max_new_tokens, run.batcher.buckets)
    rows += evaluate.score_grounding([local["records"][i] for i in keep], answers,
                                     features["boxes"][keep])
  metrics.update(evaluate.summarize(rows))
  if rows and jax.process_index() == 0:
    path = os.path.join(run.workdir, f"grounding_{c.data.eval_split}_step{step}.jsonl")
    with open(path, "w", encoding="utf-8") as f:
      for row in rows:
        f.write(json.dumps(row) + "\n")
  return metrics


def train(config: Any, workdir: str) -> dict:
  """Trains one stage-2 step, resuming from ``{workdir}/checkpoints``; returns the last metrics."""
  run = Stage2(config, workdir)
  c = config
  train_iter = iter(run.dataset(c.data.train_split, train=True))
  with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
    trainable, frozen = run.load_frozen_and_trainable()
    state = jax.jit(lambda p: steps.init_state(p, run.tx),
                    out_shardings=run.state_shardings)(trainable)
    start = run.checkpointer.latest_step()
    if start is not None:
      state, _ = run.checkpointer.restore(start, abstract_like(state), train_iter)
      logging.info("resumed from %s at step %d", run.checkpointer.directory, start)
    start = start or 0
    n_train = sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))
    n_frozen = sum(math.prod(x.shape) for x in jax.tree.leaves(frozen))
    logging.info("stage 2 %s: %d trainable / %d frozen parameters, %d steps, global batch %d",
                 c.step, n_train, n_frozen, run.num_steps, c.train.batch_size)
    chunk = c.train.loss_chunk
    train_step = steps.jit_train_step(steps.make_train_step(run.model, run.tx, chunk),
                                      run.state_shardings, run.frozen_shardings,
                                      run.batch_sharding, run.mesh)
    eval_step = jax.jit(steps.make_eval_step(run.model, chunk))
    writer = MetricWriter(workdir)
    watcher = checkpointing.PreemptionWatcher()
    rng = jax.random.key(c.seed + 1)
    pending, t_log, step_log, timing = [], time.time(), start, dict.fromkeys(_TIMERS, 0.0)
    step, last = start, {}
    try:
      while step < run.num_steps:
        batch, stats = run.device_batch(next(train_iter), step, train=True, timing=timing)
        t2 = time.time()
        state, metrics = train_step(state, frozen, batch, rng)
        # Wait for the step, so the timers split APM / prompt / LM time truthfully (the next
        # APM call would wait for it anyway: one device stream).
        jax.block_until_ready(metrics)
        timing["lm_s"] += time.time() - t2
        step += 1
        pending.append({**metrics, **stats})
        if step % c.train.log_every == 0 or step == run.num_steps:
          last = _log(writer, pending, step, step_log, t_log, run, timing)
          pending, t_log, step_log = [], time.time(), step
          timing = dict.fromkeys(_TIMERS, 0.0)
        evaluated = (c.train.eval_every > 0 and step % c.train.eval_every == 0) or (
            step == run.num_steps)
        if evaluated:
          last = {**last, **{f"val/{k}": v for k, v in
                             run_eval(run, state, frozen, eval_step, step).items()}}
          writer.write(step, "val", {k[4:]: v for k, v in last.items() if k.startswith("val/")})
          logging.info("eval step %d (%s): %s", step, c.data.eval_split,
                       " ".join(f"{k}={v:.4f}" for k, v in last.items()
                                if k.startswith("val/") and "/" not in k[4:]))
        if step % c.train.checkpoint_every == 0 or step == run.num_steps:
          run.checkpointer.save(step, state, train_iter, run.meta(step))
        if watcher.should_stop(step):
          if run.checkpointer.latest_step() != step:
            run.checkpointer.save(step, state, train_iter, run.meta(step), force=True)
          run.checkpointer.wait()
          logging.warning("preempted: checkpoint of step %d saved; exiting", step)
          return {"preempted": True, "step": step}
    finally:
      run.checkpointer.close()
      writer.close()
      watcher.close()
  last["step"] = step
  return last


def _log(writer: MetricWriter, pending: list, step: int, step_log: int, t_log: float,
         run: Stage2, timing: dict) -> dict:
  host = jax.device_get(pending)
  if any(int(m["nonfinite"]) for m in host):
    raise FloatingPointError(
        f"non-finite loss or gradient between steps {step_log + 1} and {step}: those updates were "
        f"not applied; nothing after checkpoint {run.checkpointer.latest_step()} was saved")
  mean = {k: float(np.mean([m[k] for m in host])) for k in host[0] if k != "nonfinite"}
  elapsed = max(time.time() - t_log, 1e-9)
  n = step - step_log
  mean["tokens_per_s"] = float(np.sum([m["tokens_padded"] for m in host])) / elapsed
  mean["step_s"] = elapsed / n
  for key in _TIMERS:
    mean[f"{key}_per_step"] = timing[key] / n
  writer.write(step, "train", mean)
  logging.info("step %d/%d loss=%.4f grad_norm=%.3f %.2f s/step (APM %.3f s, prompts %.3f s, "
               "LM %.2f s) %.0f tokens/s", step, run.num_steps, mean["loss"], mean["grad_norm"],
               mean["step_s"], mean["apm_s_per_step"], mean["host_s_per_step"],
               mean["lm_s_per_step"], mean["tokens_per_s"])
  return mean


