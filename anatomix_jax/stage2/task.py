"""Stage 2 (align or finetune) as a task of the shared loop (``core.loop``).

Per step: a Grain batch of images + records → the frozen APM (boxes, embeddings, retrieved
sentences) → prompts rendered and tokenized on the host, padded to a length bucket → the pure,
sharded ``train_step(state, frozen, batch, rng)``. The state holds only the trainable leaves; the
frozen base comes from the base model directory each run (the checkpoint's ``meta`` names it).
Cadence, checkpoints (Orbax composite: state, data iterator position incl. the mixture, meta),
the best checkpoint, resuming and SIGTERM are the shared loop's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from anatomix_jax.convert import hf_gemma3
from anatomix_jax.core import checkpointing, loop as core_loop, sharding as sharding_lib
from anatomix_jax.models import anatomix, gemma3_config, lora as lora_lib
from anatomix_jax.stage2 import batching, data, frozen_apm, grounding, prompt, steps, tokenizer
from anatomix_jax.stage2.demo import data as demo_data, lm as demo_lm

BASE_DIR = "base_lm"  # where a demo run keeps the tiny base LM it made (HF format)
_TIMERS = ("apm_s", "host_s", "lm_s")


def base_model_dir(config: Any, workdir: str) -> str:
  """The base LM directory: ``lm.model_dir``, or the demo's (made by the align phase)."""
  if config.lm.model_dir:
    return config.lm.model_dir
  if not config.lm.demo.enabled:
    raise ValueError("lm.model_dir is empty: set it to a local MedGemma / Gemma3 directory "
                     "(or use a :demo config)")
  if config.phase == "finetune":
    if not config.init_from:
      raise ValueError("the finetune demo needs init_from = the align demo's workdir")
    return os.path.join(config.init_from, BASE_DIR)
  return os.path.join(workdir, BASE_DIR)


def check_receptive_field(lm: Any, longest: int, where: str) -> None:
  """Refuses an LM whose answers cannot attend to the start of the longest prompt.

  With only sliding-window layers, a token sees ``sliding_window`` tokens back per layer; the
  answer must read context lines ~1,400 tokens (demo) or ~3,000 (paper) earlier, so at least one
  full-attention layer, or a window as long as the longest bucket, is needed (MedGemma: a full
  layer every 6th). Found by the stage-2 learning diagnosis: a 4-layer demo LM with Gemma3's
  default pattern had no full layer and a 512-token window.

  Raises:
    ValueError: naming the model directory, its layer types and window, and the bucket.
  """
  if gemma3_config.FULL not in lm.layer_types and lm.sliding_window < longest:
    raise ValueError(
        f"{where}: every layer is a sliding-window layer (window {lm.sliding_window}) but prompts "
        f"are up to {longest} tokens (data.buckets): answers could not attend to the start of "
        "the context. Use a model with full-attention layers (config.json layer_types) or a "
        "window ≥ the longest bucket")


class Stage2Task:
  """What a stage-2 run needs: APM, tokenizer, model, shardings, optimizer, checkpointer.

  Implements ``core.loop.Task`` for training; eval, predict and export use the same object.
  """

  name = "stage2"
  log_keys = ("loss", "grad_norm", "step_s", "apm_s_per_step", "host_s_per_step",
              "lm_s_per_step", "tokens_per_s")

  def __init__(self, config: Any, workdir: str, needs_data: bool = True):
    """``needs_data``: False for runs that read no instruction data (prediction)."""
    c = self.config = config
    self.workdir = workdir
    if c.phase not in steps.PHASE_GROUPS:
      raise ValueError(f"phase {c.phase!r} is not one of {sorted(steps.PHASE_GROUPS)}")
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
    self.apm = frozen_apm.FrozenAPM(c.apm.workdir, c.apm.rag_dir, c.apm.checkpoint,
                                    image_tokens=c.lm.get("image_tokens", "patches"))
    self.base_dir = base_model_dir(c, workdir)
    if c.lm.demo.enabled and c.phase == "align" and not os.path.isdir(self.base_dir):
      demo_lm.make_base(self.base_dir, c, self.apm)
    self.tok = tokenizer.load_tokenizer(c.lm.tokenizer_dir or self.base_dir)
    self.groups = steps.PHASE_GROUPS[c.phase]
    spec = lora_lib.LoraSpec(**c.lm.lora.to_dict()) if "lora" in self.groups else lora_lib.LoraSpec()
    # lm.tie_word_embeddings (absent or None: the base's config.json) False unties the output
    # table: it starts as the base's lm_head, or a copy of its tied table (stage2.original sets it
    # for the original's two trained copies).
    untie = {} if c.lm.get("tie_word_embeddings") is None else {
        "tie_word_embeddings": bool(c.lm.tie_word_embeddings)}
    self.file_lm_config, _ = hf_gemma3.read_config(self.base_dir, dtype=c.lm.dtype,
                                                   param_dtype=c.lm.param_dtype,
                                                   remat=c.lm.remat, lora=spec,
                                                   scan_layers=c.lm.scan_layers,
                                                   attention=c.lm.get("attention", "xla"), **untie)
    lm_config = self.file_lm_config
    check_receptive_field(lm_config, max(c.data.buckets), self.base_dir)
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
    self.steps_per_epoch = self._steps_per_epoch() if needs_data else 1
    self.num_steps = (int(c.train.num_steps) if c.train.num_steps > 0
                      else max(c.train.epochs * self.steps_per_epoch, 1))
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
    self.batcher = batching.HostBatcher(self.tok, c.data, self.apm.num_image_tokens, seed=c.seed)
    self.checkpointer = checkpointing.Checkpointer.for_run(workdir, c.train)
    self.frozen, self._trainable, self._abstract_state = None, None, None
    self._eval_step = None

  def _steps_per_epoch(self) -> int:
    """Global batches in one pass over the train records of the mixture's sources."""
    c = self.config
    weights = {k: v for k, v in c.data.weights.items() if v > 0}
    n = sum(len(data.load_records(c.data.dir, s, c.data.train_split, c.data.tasks or None))
            for s in weights)
    return max(n // c.train.batch_size, 1)

  # --- core.loop.Task ----------------------------------------------------------------------------

  def model_signature(self) -> dict:
    """The trained leaves' layout: phase, heads, LoRA and the base LM's shape."""
    lm = self.model_config.lm
    return {"phase": self.config.phase, "trainable_groups": list(self.groups),
            "projection_hidden": int(self.config.lm.projection_hidden),
            "bidirectional_image": bool(self.config.lm.bidirectional_image),
            "lora": ({"rank": lm.lora.rank, "alpha": lm.lora.alpha,
                      "targets": sorted(lm.lora.targets)} if "lora" in self.groups else None),
            "base": {"vocab_size": lm.vocab_size, "hidden_size": lm.hidden_size,
                     "num_layers": lm.num_hidden_layers,
                     **({} if lm.tie_word_embeddings else {"tie_word_embeddings": False})}}

  def meta(self) -> dict:
    return {"phase": self.config.phase, "base_model_dir": os.path.abspath(self.base_dir),
            "apm_step": self.apm.step, "trainable_groups": list(self.groups),
            "num_steps": self.num_steps}

  def train_iterator(self):
    return iter(self.dataset(self.config.data.train_split, train=True))

  def setup(self) -> None:
    """Loads the frozen base and the fresh (or align-initialised) trainable leaves."""
    self._trainable, self.frozen = self.load_frozen_and_trainable()
    self._abstract_state = self.abstract_state_of(self._trainable)
    n_train = sum(x.size for x in jax.tree.leaves(self._trainable))
    n_frozen = sum(x.size for x in jax.tree.leaves(self.frozen))
    logging.info("stage 2 %s: %d trainable / %d frozen parameters, global batch %d",
                 self.config.phase, n_train, n_frozen, self.config.train.batch_size)

  def init_state(self):
    trainable, self._trainable = self._trainable, None  # the state owns them from here on
    return jax.jit(lambda p: steps.init_state(p, self.tx),
                   out_shardings=self.state_shardings)(trainable)

  def abstract_state(self):
    self._trainable = None  # a restore replaces them
    return self._abstract_state

  def abstract_state_of(self, trainable: Any) -> Any:
    """The restore target of a state around ``trainable`` (shapes, dtypes, the state shardings)."""
    shapes = jax.eval_shape(lambda p: steps.init_state(p, self.tx), trainable)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes,
                        self.state_shardings)

  def make_train_step(self):
    step_fn = steps.jit_train_step(
        steps.make_train_step(self.model, self.tx, self.config.train.loss_chunk),
        self.state_shardings, self.frozen_shardings, self.batch_sharding, self.mesh)
    rng = jax.random.key(self.config.seed + 1)

    def train_step(state, local, step):
      timing = dict.fromkeys(_TIMERS, 0.0)
      batch, stats = self.device_batch(local, step, train=True, timing=timing)
      t0 = time.time()
      state, metrics = step_fn(state, self.frozen, batch, rng)
      # Wait for the step, so the timers split APM / prompt / LM time truthfully (the next
      # APM call would wait for it anyway: one device stream).
      jax.block_until_ready(metrics)
      timing["lm_s"] = time.time() - t0
      return state, metrics, {**stats, **timing}

    return train_step

  def log_extras(self, stats: list[dict], elapsed_s: float, steps: int) -> dict:
    out = {k: float(np.mean([s[k] for s in stats])) for k in ("tokens_real", "dropped")}
    out["tokens_per_s"] = float(np.sum([s["tokens_padded"] for s in stats])) / elapsed_s
    out["step_s"] = elapsed_s / steps
    for key in _TIMERS:
      out[f"{key}_per_step"] = float(np.sum([s[key] for s in stats])) / steps
    return out

  def evaluate(self, state, step: int) -> dict:
    if self._eval_step is None:
      self._eval_step = jax.jit(steps.make_eval_step(self.model, self.config.train.loss_chunk))
    return run_eval(self, state, self.frozen, self._eval_step, step)

  def report(self, metrics: dict) -> None:
    if jax.process_index() == 0:
      logging.info("final %s metrics at step %d: %s", self.config.data.eval_split,
                   metrics["step"], " ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                                             if "/" not in k and isinstance(v, float)))

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
    lm = self.model_config.lm
    _, base = hf_gemma3.load_gemma3(self.base_dir, self.mesh, self.rules, c.lm.dtype,
                                    param_dtype=c.lm.param_dtype, remat=c.lm.remat,
                                    lora=lm.lora, scan_layers=lm.scan_layers,
                                    tie_word_embeddings=lm.tie_word_embeddings)
    for name in base["embedder"]:  # the embedding, and an untied lm_head
      table = base["embedder"][name]
      extra = lm.vocab_size - table.shape[0]
      if extra > 0:
        rows = jnp.broadcast_to(table.mean(axis=0, keepdims=True), (extra, table.shape[1]))
        base["embedder"][name] = jax.device_put(
            jnp.concatenate([table, rows.astype(table.dtype)]),
            self.param_shardings["lm"]["embedder"][name])
    fresh = anatomix.init_subtree(
        self.model_config, jax.random.key(c.seed),
        lambda path: not path.startswith("lm/") or path.endswith(lora_lib.LORA_LEAVES),
        self.param_shardings)
    params = anatomix.combine({"lm": base}, fresh)
    if from_init and c.init_from and c.phase == "finetune":
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
    state, _ = self.checkpointer.restore(step, self.abstract_state_of(trainable), None)
    return anatomix.combine(frozen, state.params), step

  def _with_align_heads(self, params: Any) -> Any:
    """``params`` with the leaves the align run trained (its latest checkpoint) swapped in."""
    ckpt = checkpointing.Checkpointer(os.path.join(self.config.init_from, "checkpoints"))
    try:
      step = ckpt.latest_step()
      if step is None:
        raise FileNotFoundError(f"no align checkpoint in {self.config.init_from}/checkpoints: "
                                "run the align phase first")
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


def run_eval(run: Stage2Task, state: steps.Stage2State, frozen: Any, eval_step: Any,
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
  tasks = [t for t in grounding.GROUNDING_TASKS if not c.data.tasks or t in c.data.tasks]
  rows: list[dict] = []
  try:
    grounding_batches = run.dataset(c.data.eval_split, train=False, tasks=tasks)
  except data.InstructionDataError:
    grounding_batches = []  # no grounding records in this step's mixture
  params = anatomix.combine(frozen, state.params)
  for local in grounding_batches:
    features = run.apm(local["image"])
    keep = [i for i, v in enumerate(local["valid"]) if v]
    examples = run.batcher.examples(local["records"], features, step, train=False, answer=False)
    encoded = [prompt.encode(run.tok, examples[i]) for i in keep]
    answers = grounding.generate_answers(
        run.model, params, run.tok, encoded,
        {k: features[k][np.asarray(keep)] for k in ("memory", "objects")},
        c.eval.max_new_tokens, run.batcher.buckets)
    rows += grounding.score_grounding([local["records"][i] for i in keep], answers,
                                     features["boxes"][keep],
                                     questions=[examples[i].instruction for i in keep])
  metrics.update(grounding.summarize(rows))
  if rows and jax.process_index() == 0:
    path = os.path.join(run.workdir, f"grounding_{c.data.eval_split}_step{step}.jsonl")
    with open(path, "w", encoding="utf-8") as f:
      for row in rows:
        f.write(json.dumps(row) + "\n")
  return metrics


def train(config: Any, workdir: str) -> dict:
  """Trains one stage-2 phase, resuming from ``{workdir}/checkpoints``; returns the last
  evaluation's metrics."""
  return core_loop.train(Stage2Task(config, workdir))
