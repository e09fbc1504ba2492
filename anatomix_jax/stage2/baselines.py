"""A trivial image-blind baseline for ``--mode=eval``: what the training data alone answers.

``answers(train_records, records, rows)`` answers each evaluated record without its image:

* grounding (a reference that holds boxes: Anatomy Grounding, Phrase Grounding, Abnormality
  Detection): the reference itself with every box replaced by the mean training box (xyxy, mean of
  each coordinate) of the ``<ref>`` phrase before it (lower-cased, stripped; the parser's label,
  ``evaluation.boxes.parse``), else the mean box of the (source, task), else of every training box
  (the whole canvas when training has none). So the phrases are right by construction and only
  the boxes are guessed: the IoU a model must beat without looking.
* every other task: the most common training answer of the (source, task) records whose first
  instruction is the record's first instruction, when that instruction occurs at least twice in
  training; else the most common answer of the (source, task) (ties: the first seen; "" when
  training has no record of it).

Training answers are the records' first responses, placeholders filled (``prompt.first_response``
with the record's boxes). The rows are shaped like ``evaluate.generate_samples``'s (id, source,
task, instruction, reference, answer, meta; no ``apm_boxes``); given the model's sample rows they
copy its instruction and reference (the variants its evaluation drew), so both are scored against
the same text.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from anatomix_jax.evaluation import boxes as box_formats
from anatomix_jax.instruct import schema
from anatomix_jax.stage2 import prompt

NAME = "trivial baseline (image-blind)"


def _key(label: str) -> str:
  return label.strip().lower()


class Baseline:
  """The training statistics the baseline answers from.

  Attributes:
    by_phrase: phrase (lower-cased) → float64 ``[4]`` mean xyxy box.
    by_group: (source, task) → float64 ``[4]`` mean box of its training boxes.
    overall: float64 ``[4]`` mean of all training boxes (the whole canvas without any).
    by_instruction: (source, task, first instruction) → answer counts.
    by_task: (source, task) → answer counts.
  """

  def __init__(self, train_records: Iterable[Mapping[str, Any]]):
    phrases, groups, every = (collections.defaultdict(list), collections.defaultdict(list), [])
    self.by_instruction: dict[tuple[str, str, str], collections.Counter] = (
        collections.defaultdict(collections.Counter))
    self.by_task: dict[tuple[str, str], collections.Counter] = (
        collections.defaultdict(collections.Counter))
    for r in train_records:
      group, answer = (r["source"], r["task"]), prompt.first_response(r)
      found = box_formats.parse(answer)
      for box, label in zip(found.boxes, found.labels):
        phrases[_key(label)].append(box)
        groups[group].append(box)
        every.append(box)
      self.by_instruction[group + (r["instructions"][0],)][answer] += 1
      self.by_task[group][answer] += 1
    mean = lambda boxes: np.mean(np.asarray(boxes, np.float64), axis=0)  # noqa: E731
    self.by_phrase = {k: mean(v) for k, v in phrases.items()}
    self.by_group = {k: mean(v) for k, v in groups.items()}
    self.overall = mean(every) if every else np.array([0.0, 0.0, schema.CANVAS, schema.CANVAS])

  def box(self, label: str, source: str, task: str) -> np.ndarray:
    """float64 ``[4]`` the mean training box of a phrase, else of (source, task), else overall."""
    found = self.by_phrase.get(_key(label))
    if found is None:
      found = self.by_group.get((source, task), self.overall)
    return found

  def answer(self, record: Mapping[str, Any], reference: str) -> str:
    """The image-blind answer to ``record`` whose reference text is ``reference``."""
    source, task = record["source"], record["task"]
    if len(box_formats.parse(reference).boxes):  # the reference, each box replaced
      out, start = [], 0
      while (at := reference.find("<box>", start)) >= 0 and (
          end := reference.find("</box>", at)) >= 0:
        end += len("</box>")
        found = box_formats.parse(reference[start:end])  # this box and its label
        out += [reference[start:at], schema.boxed(self.box(found.labels[-1], source, task))
                if len(found.boxes) else reference[at:end]]  # not a box to the scorer either
        start = end
      return "".join(out) + reference[start:]
    counts = self.by_instruction.get((source, task, record["instructions"][0]))
    if counts is None or sum(counts.values()) < 2:
      counts = self.by_task.get((source, task))
    return counts.most_common(1)[0][0] if counts else ""


def answers(train_records: Iterable[Mapping[str, Any]], records: Sequence[Mapping[str, Any]],
            rows: Sequence[Mapping[str, Any]] = ()) -> list[dict[str, Any]]:
  """Baseline sample rows for ``records`` (module docstring).

  Args:
    train_records: the training split's records (of the sources evaluated).
    records: the evaluated records.
    rows: the model's sample rows; a record with a row (same source and id) takes its instruction
      and reference, the others their first instruction and first response (filled).

  Returns:
    One row per record: id, source, task, instruction, reference, answer (and meta).
  """
  baseline = Baseline(train_records)
  given = {(r["source"], r["id"]): r for r in rows}
  out = []
  for record in records:
    row = given.get((record["source"], record["id"]))
    instruction = (row or {}).get("instruction", record["instructions"][0])
    reference = row["reference"] if row else prompt.first_response(record)
    sample = {"id": record["id"], "source": record["source"], "task": record["task"],
              "instruction": instruction, "reference": reference,
              "answer": baseline.answer(record, reference)}
    if record.get("meta"):
      sample["meta"] = record["meta"]
    out.append(sample)
  return out
