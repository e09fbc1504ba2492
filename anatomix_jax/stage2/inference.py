"""A trained stage-2 model, ready to answer: what ``--mode=eval`` and ``--mode=predict`` share.

``load(config, workdir)`` rebuilds the run a stage-2 workdir was trained with from the config saved
in its checkpoint (model, tokenizer, frozen APM + RAG, data location), places the params on this
run's mesh, and ``Trained.answer`` turns a batch of letterboxed images and instruction records into
generated answers, the reference's way (REFERENCE.md §5): the evaluation system prompt (""), no
context dropout, greedy decoding, ``postprocess_llm_output``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from anatomix_jax.stage2 import grounding, prompt, task
from anatomix_jax.core import checkpointing


def training_config(workdir: str, step: int | None = None
                    ) -> tuple[ml_collections.ConfigDict, int]:
  """The config saved with checkpoint ``step`` (default: the latest) of a stage-2 workdir."""
  ckpt = checkpointing.Checkpointer(f"{workdir}/checkpoints")
  try:
    step = ckpt.latest_step() if step is None or step < 0 else step
    if step is None or step not in ckpt.manager.all_steps():
      raise FileNotFoundError(f"no stage-2 checkpoint{'' if step is None else f' of step {step}'} "
                              f"in {workdir}/checkpoints: train stage 2 there first")
    meta = ckpt.read_meta(step)
  finally:
    ckpt.close()
  if meta.get("stage") != "stage2":
    raise ValueError(f"{workdir}/checkpoints/{step} is a {meta.get('stage')} checkpoint; "
                     "--mode=eval/predict take a stage-2 workdir")
  saved = dict(meta["config"])
  if "phase" not in saved and saved.get("step") in ("align", "finetune"):
    saved["phase"] = saved.pop("step")  # checkpoints written before ``step`` became ``phase``
  return ml_collections.ConfigDict(saved), step


@dataclasses.dataclass
class Trained:
  """A stage-2 run with its params restored.

  Attributes:
    run: the ``task.Stage2Task`` (model, tokenizer, frozen APM, batcher, mesh).
    params: all params (frozen base + trained leaves), placed on ``run.mesh``.
    step: the checkpoint's step.
  """

  run: task.Stage2Task
  params: Any
  step: int

  def answer(self, images: Any, records: Sequence[Mapping[str, Any]], max_new_tokens: int
             ) -> tuple[dict[str, Any], list[prompt.Example], list[str | None]]:
    """Greedy answers for one batch.

    Args:
      images: float32[B, S, S, 1] in [0, 1], letterboxed (``stage2.data`` / ``images``).
      records: B instruction records (their drawn instruction is asked; ``responses`` give the
        reference answer the examples carry, which generation never sees).
      max_new_tokens: the generation budget.

    Returns:
      ``(features, examples, answers)``: the APM's outputs (``boxes`` [B, 36, 4] xyxy canvas,
      ``sentences`` [B][36], device ``memory``/``objects``), the B rendered conversations, and the
      B post-processed answers (None for a prompt longer than the largest length bucket).
    """
    run = self.run
    features = run.apm(images)
    examples = run.batcher.examples(records, features, 0, train=False, answer=False)
    encoded, keep = [], []
    for i, example in enumerate(examples):
      try:
        encoded.append(prompt.encode(run.tok, example, max_len=run.batcher.buckets[-1],
                                     truncation="error"))
        keep.append(i)
      except prompt.PromptTooLongError:
        pass
    answers: list[str | None] = [None] * len(records)
    if keep:
      rows = np.asarray(keep)
      with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
        raw = grounding.generate_answers(
            run.model, self.params, run.tok, encoded,
            {k: features[k][rows] for k in ("memory", "objects")}, max_new_tokens,
            run.batcher.buckets)
      for i, text in zip(keep, raw):
        answers[i] = clean_answer(text, self.stop_texts)
    return features, examples, answers

  @property
  def stop_texts(self) -> tuple[str, ...]:
    tok = self.run.tok
    return tuple(tok.tokenizer.convert_ids_to_tokens([tok.end_of_turn_id, tok.eos_id]))


def clean_answer(text: str, stop_texts: Sequence[str]) -> str:
  """A decoded answer without its stop token, then the reference's ``postprocess_llm_output``."""
  from anatomix_jax.evaluation import text as text_metrics  # noqa: PLC0415 (metric packages)
  for stop in stop_texts:
    if text.endswith(stop):
      text = text[: -len(stop)]
  return text_metrics.postprocess(text)


def load(config: Any, workdir: str, *, step: int | None = None,
         overrides: Mapping[str, Any] | None = None) -> Trained:
  """Restores the stage-2 run of ``workdir`` onto this run's mesh.

  Args:
    config: the eval/predict config (its ``mesh`` and ``sharding_rules`` are used).
    workdir: a stage-2 (finetune or align) workdir.
    step: the checkpoint (None or < 0: the latest).
    overrides: dotted training-config fields to replace (e.g. ``{"data.dir": ...}``); empty
      values are ignored.
  """
  train_cfg, step = training_config(workdir, step)
  with train_cfg.unlocked():
    train_cfg.mesh = ml_collections.ConfigDict(config.mesh.to_dict())
    train_cfg.sharding_rules = tuple(tuple(r) for r in config.sharding_rules)
    for key, value in (overrides or {}).items():
      if value:
        node = train_cfg
        *parents, leaf = key.split(".")
        for name in parents:
          node = node[name]
        node[leaf] = value
  run = task.Stage2Task(train_cfg, workdir, needs_data=False)
  try:
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
      params, step = run.restore_params(step)
  finally:
    run.checkpointer.close()
  return Trained(run, params, step)
