"""Host side of a stage-2 step: records + the APM's boxes/sentences → padded token batches.

Rows stay aligned with the images (and so with the APM features): a row whose image was
unreadable, or whose prompt is dropped for length (``data.truncation = "drop"``), stays in the
batch as an empty row with no loss weight, and is counted.

The random draws of each example (system prompt, context dropout, instruction and answer
variants) come from a generator seeded by (seed, step, row), so a resumed run renders the same
prompts as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from anatomix_jax.stage2 import prompt, tokenizer


class HostBatcher:
  """Renders and tokenizes one batch (``__call__``).

  Args:
    tok: the tokenizer.
    data_cfg: ``config.data`` (system prompts, context dropout, buckets, truncation, ``context``:
      ``prompt.CONTEXTS``, "full" when absent, as in configs saved before it existed;
      ``line_names``, False when absent).
    num_image_tokens: ``<image>`` tokens per prompt (the APM's patches, or 1 for its CLS token).
    seed: the run's seed.
  """

  def __init__(self, tok: tokenizer.TokenizerInfo, data_cfg: Any, num_image_tokens: int,
               seed: int):
    self.tok = tok
    self.buckets = tuple(int(b) for b in data_cfg.buckets)
    self.truncation = str(data_cfg.truncation)
    self.train_prompts = tuple(data_cfg.system_prompts)
    self.eval_prompts = tuple(data_cfg.eval_system_prompts)
    self.context_drop_ratio = float(data_cfg.context_drop_ratio)
    self.context = prompt.check_context(str(data_cfg.get("context", "full")))
    self.named_lines = bool(data_cfg.get("line_names", False))
    self.num_image_tokens = num_image_tokens
    self.seed = seed

  def examples(self, records: Sequence[Mapping[str, Any]], features: Mapping[str, Any],
               step: int, *, train: bool, answer: bool = True) -> list[prompt.Example]:
    """The conversations of a batch (see ``prompt.build_example``)."""
    out = []
    for i, record in enumerate(records):
      rng = np.random.default_rng([self.seed, int(step), i, int(train)])
      out.append(prompt.build_example(
          record, features["boxes"][i], features["sentences"][i], rng,
          system_prompts=self.train_prompts if train else self.eval_prompts,
          context_drop_ratio=self.context_drop_ratio if train else 0.0,
          num_image_tokens=self.num_image_tokens, answer=answer, context=self.context,
          named_lines=self.named_lines))
    return out

  def __call__(self, records: Sequence[Mapping[str, Any]], features: Mapping[str, Any],
               step: int, *, train: bool, valid: Sequence[float] | None = None
               ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """One batch of B rows.

    Args:
      records: B instruction records.
      features: ``boxes`` [B, 36, 4] and ``sentences`` [B][36] from the frozen APM.
      step: the training step (seeds the draws).
      train: training prompts (random system prompt, context dropout) or evaluation ones.
      valid: [B], 0 for rows whose image could not be read.

    Returns:
      ``(arrays, stats)``: ``tokens``/``attention_mask``/``targets`` int32[B, L],
      ``weights`` float32[B, L], ``valid`` float32[B]; stats ``tokens_padded`` (B·L),
      ``tokens_real``, ``dropped`` (rows dropped for length).
    """
    valid = np.ones(len(records), np.float32) if valid is None else np.asarray(valid, np.float32)
    encoded: list[prompt.Encoded | None] = []
    for ok, example in zip(valid, self.examples(records, features, step, train=train)):
      encoded.append(prompt.encode(self.tok, example, max_len=self.buckets[-1],
                                   truncation=self.truncation) if ok else None)
    kept = [e for e in encoded if e is not None]
    dropped = sum(1 for e, ok in zip(encoded, valid) if e is None and ok)
    packed, _ = prompt.pad_to_bucket(kept, self.buckets, self.tok.pad_id)
    length = packed["tokens"].shape[1] if kept else self.buckets[0]
    rows = len(records)
    arrays = {"tokens": np.full((rows, length), self.tok.pad_id, np.int32),
              "attention_mask": np.zeros((rows, length), np.int32),
              "targets": np.full((rows, length), self.tok.pad_id, np.int32),
              "weights": np.zeros((rows, length), np.float32),
              "valid": np.zeros((rows,), np.float32)}
    at = [i for i, e in enumerate(encoded) if e is not None]
    for key, value in arrays.items():
      if kept:
        value[at] = packed[key]
    # An empty row still needs one attended token (a fully masked softmax row is NaN-prone).
    arrays["attention_mask"][:, 0] = 1
    stats = {"tokens_padded": float(rows * length),
             "tokens_real": float(arrays["attention_mask"].sum()), "dropped": float(dropped)}
    return arrays, stats
