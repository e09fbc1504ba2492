"""Stage-2 validation: loss on held-out records and grounding by generation.

Grounding: for records of the grounding tasks whose answers hold boxes, the model generates greedily
from the prompt (the reference's empty system prompt, no context dropout); ``<box>(x1,y1),(x2,y2)
</box>`` spans are parsed out of the text and scored against the boxes of the record's answer:

  parse_rate   fraction of answers with at least one box, over records whose true answer has
               boxes (the demo target: ≥ 0.8); records whose true answer has none ("No … detected.")
               give ``negative_accuracy``, the fraction answered without a box;
  iou          the reference's per-sample IoU (each predicted box's best IoU with a true box,
               averaged), averaged over parseable answers only;
  iou_strict   the same with unparseable answers counted as 0;
  apm_iou      for anatomy-grounding records: the frozen APM's own box for that anatomy, the
               number the LM's answer can be compared with;
  anatomy_grounding_copy_rate  the fraction of anatomy-grounding answers whose first box is the
               asked anatomy's box exactly as the context writes it (the LM copied it).

Each per-sample row (``score_grounding``, written to ``grounding_{split}_step{N}.jsonl``) holds the
question as asked, the true and predicted boxes and, for anatomy grounding, the context's box of
the asked anatomy, so a wrong answer can be diagnosed beside them (``stage2.diagnose``).

(The full metric suite — mAP, NLG and clinical scores, peers' box formats — belongs to
``--mode=eval``; these are the numbers training needs.)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from anatomix_jax import anatomy
from anatomix_jax.evaluation import grounding as eval_grounding
from anatomix_jax.instruct import schema
from anatomix_jax.models import anatomix, generate
from anatomix_jax.ops import boxes as box_ops
from anatomix_jax.stage2 import prompt

GROUNDING_TASKS = ("Phrase Grounding", "Anatomy Grounding", "Abnormality Detection")
_BOX = re.compile(r"<box>\s*\(\s*(-?\d+)\s*,\s*(-?\d+)\s*\)\s*,\s*\(\s*(-?\d+)\s*,\s*(-?\d+)\s*\)"
                  r"\s*</box>")


def parse_boxes(text: str) -> np.ndarray:
  """All ``<box>(x1,y1),(x2,y2)</box>`` spans of a text → float32[K, 4] (K may be 0)."""
  boxes = [[float(v) for v in m.groups()] for m in _BOX.finditer(text)]
  return np.asarray(boxes, np.float32).reshape(-1, 4)


def asked_anatomy(record: dict[str, Any]) -> int | None:
  """The anatomy an Anatomy Grounding record asks about (its ``meta.anatomy``), or None."""
  name = record.get("meta", {}).get("anatomy")
  if record.get("task") != "Anatomy Grounding" or name not in anatomy.NAME_TO_INDEX:
    return None
  return anatomy.NAME_TO_INDEX[name]


def with_true_boxes(records: Sequence[dict[str, Any]], boxes: np.ndarray) -> np.ndarray:
  """The APM's boxes [B, 36, 4] with each anatomy-grounding record's asked anatomy's box replaced
  by its true one (an oracle context: the answer's box is in the context, verbatim)."""
  out = np.array(boxes, np.float32, copy=True)
  for b, record in enumerate(records):
    index = asked_anatomy(record)
    if index is not None and record.get("boxes"):
      out[b, index] = record["boxes"][0]
  return out


def true_boxes(record: dict[str, Any]) -> np.ndarray:
  """The boxes of a record's answer (its first response, placeholders filled)."""
  return parse_boxes(prompt.first_response(record))


def generate_answers(model: anatomix.AnatomiX, params: Any, tok: Any,
                     encoded: Sequence[prompt.Encoded], features: dict[str, Any],
                     max_new_tokens: int, buckets: Sequence[int] = ()) -> list[str]:
  """Greedy answers for prompts that end with the generation prompt.

  Args:
    model: the stage-2 model; params: all its params.
    tok: the tokenizer.
    encoded: B prompts (``encode`` of examples built with ``answer=False``).
    features: ``memory`` [B, P, 256] and ``objects`` [B, 36, 16] from the APM.
    max_new_tokens: the generation budget.
    buckets: prompt lengths to left-pad to (the smallest that fits), so jit compiles few shapes.

  Returns:
    B decoded answers (special tokens kept, so ``<box>`` spans survive; up to the stop token).
  """
  longest = max(len(e) for e in encoded)
  length = next((b for b in buckets if b >= longest), longest)  # few distinct compiled shapes
  tokens, mask = generate.left_pad([e.input_ids for e in encoded], tok.pad_id, length)
  embeddings = _embed(model, params, jnp.asarray(tokens), features["memory"], features["objects"])
  out = generate.generate(model.config.lm, params["lm"], embeddings=embeddings,
                          attention_mask=jnp.asarray(mask), max_new_tokens=max_new_tokens,
                          stop_tokens=(tok.end_of_turn_id, tok.eos_id), pad_token_id=tok.pad_id)
  ids, lengths = np.asarray(out["tokens"]), np.asarray(out["lengths"])
  return [tok.tokenizer.decode(row[:n], skip_special_tokens=False) for row, n in zip(ids, lengths)]


_EMBED: dict = {}


def _embed(model, params, tokens, memory, objects):
  """``AnatomiX.embed`` jitted once per model config."""
  fn = _EMBED.setdefault(model.config, jax.jit(
      lambda p, t, m, o: model.apply({"params": p}, t, m, o, method=anatomix.AnatomiX.embed)))
  return fn(params, tokens, memory, objects)


def score_grounding(records: Sequence[dict[str, Any]], answers: Sequence[str],
                    apm_boxes: np.ndarray, questions: Sequence[str] | None = None
                    ) -> list[dict[str, Any]]:
  """Per-sample grounding results (see the module docstring), with what each answer is judged by.

  Args:
    records: B instruction records.
    answers: B generated answers.
    apm_boxes: float[B, 36, 4] the APM's boxes (xyxy, 1024 canvas), the prompt context's.
    questions: B instructions as asked (the drawn variant); None: each record's first one.

  Returns:
    One dict per record: ``id source task question answer true_boxes predicted_boxes expects_box
    parsed iou``; for anatomy grounding also ``anatomy``, ``apm_box`` (the asked anatomy's box as
    the context writes it, truncated), ``apm_iou`` (the APM's float box vs the truth),
    ``apm_box_iou`` (the written box vs the truth) and ``copied`` (the answer's first box equals
    the context's box).
  """
  rows = []
  for i, (record, answer) in enumerate(zip(records, answers)):
    truth, predicted = true_boxes(record), parse_boxes(answer)
    question = (questions[i] if questions is not None
                else (record.get("instructions") or [None])[0])
    row = {"id": record["id"], "source": record["source"], "task": record["task"],
           "question": question, "answer": answer, "true_boxes": truth.astype(int).tolist(),
           "predicted_boxes": predicted.astype(int).tolist(),
           "expects_box": bool(len(truth)), "parsed": bool(len(predicted)),
           "iou": eval_grounding.reference_iou(predicted, truth, dtype=None) if len(truth) else None}
    index = asked_anatomy(record)
    if index is not None and len(truth):
      apm_box = apm_boxes[i, index][None]
      written = parse_boxes(schema.boxed(apm_box[0]))  # as the context line writes it
      row["anatomy"] = record["meta"]["anatomy"]
      row["apm_box"] = written.astype(int)[0].tolist()
      row["apm_iou"] = float(box_ops.iou_matrix(apm_box, truth[:1], dtype=None)[0, 0])
      row["apm_box_iou"] = float(box_ops.iou_matrix(written, truth[:1], dtype=None)[0, 0])
      row["copied"] = bool(len(predicted)) and bool(np.array_equal(predicted[0], written[0]))
    rows.append(row)
  return rows


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
  """Means over samples: parse rate, IoU (reference: parseable only; strict: unparseable = 0)."""
  negatives = [r for r in rows if not r["expects_box"]]
  rows = [r for r in rows if r["expects_box"]]
  out = {"grounding_samples": float(len(rows))}
  if negatives:  # e.g. "No pleural effusion detected.": right when no box is produced
    out["negative_samples"] = float(len(negatives))
    out["negative_accuracy"] = float(np.mean([not r["parsed"] for r in negatives]))
  if not rows:
    return out
  ious = [r["iou"] for r in rows if r["iou"] is not None]
  out.update({"parse_rate": float(np.mean([r["parsed"] for r in rows])),
              "iou": float(np.mean(ious)) if ious else 0.0,
              "iou_strict": float(np.sum(ious) / len(rows))})
  apm = [r for r in rows if "apm_iou" in r]
  if apm:
    out["anatomy_grounding_iou"] = float(np.mean([r["iou"] or 0.0 for r in apm]))
    out["apm_anatomy_iou"] = float(np.mean([r["apm_iou"] for r in apm]))
    out["anatomy_grounding_copy_rate"] = float(np.mean([r.get("copied", False) for r in apm]))
  for task in sorted({r["task"] for r in rows}):
    sel = [r for r in rows if r["task"] == task]
    out[f"parse_rate/{task}"] = float(np.mean([r["parsed"] for r in sel]))
    out[f"iou_strict/{task}"] = float(np.mean([r["iou"] or 0.0 for r in sel]))
  return out
