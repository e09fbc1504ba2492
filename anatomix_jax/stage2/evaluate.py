"""``--mode=eval`` for stage 2: generate on each task's test records, score, write the tables.

    python -m anatomix_jax.main --config=configs/eval.py[:demo] --workdir=<stage-2 workdir> --mode=eval

The model, frozen APM and instruction data are those the workdir was trained with (the config saved
in its checkpoint); ``configs/eval.py`` says what to evaluate and how to score it. Output, under
``{workdir}/eval/{split}_step{N}/``:
  ``samples.jsonl``  one line per record: id, source, task, instruction, reference, answer, the
                     APM's boxes. Lines are appended and flushed batch by batch, so an interrupted
                     evaluation resumes where it stopped (records already in the file are not
                     generated again);
  ``scored_samples.jsonl``  the same lines with their per-sample ``scores``;
  ``results.json``   per (task, source) and per task: sample counts and metric means, the Table-1
                     layout, which metric is a mean of per-sample scores and which corpus-level,
                     and which optional metrics were skipped and why;
  ``results.md``     the same as Markdown tables.

``evaluate.predictions`` scores an existing JSONL of another system's answers instead (fields id,
source, task, reference, answer), with ``evaluate.box_format`` naming how it writes boxes.

Records follow the reference's benchmark (REFERENCE.md §5): the test split, VinDr subsampled to
35 % (``evaluate.sources`` fractions, a seeded choice), the evaluation system prompt "", no context
dropout, greedy decoding up to ``max_new_tokens``, answers post-processed.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
from absl import logging

from anatomix_jax.evaluation import scoring, tables
from anatomix_jax.instruct import schema
from anatomix_jax.stage2 import data, inference

SAMPLES = "samples.jsonl"


def select_records(data_dir: str, split: str, fractions: Mapping[str, float],
                   tasks: Sequence[str] = (), max_per_task: int = 0, seed: int = 0
                   ) -> list[dict[str, Any]]:
  """The records to evaluate, in file order.

  Args:
    data_dir: ``{source}/{split}.jsonl`` files.
    split: usually "test".
    fractions: source → fraction of its records (a seeded random subset, as the reference's
      ``subset=0.35`` for VinDr); 0 leaves a source out. Sources without a file are skipped.
    tasks: only these tasks (empty: all).
    max_per_task: at most this many records per (source, task), the first after subsampling
      (0: no cap) — the demo's budget.
    seed: the subsampling seed.
  """
  out = []
  for source, fraction in sorted(fractions.items()):
    if source not in schema.SOURCES:
      raise ValueError(f"evaluate.sources: unknown source {source!r} (one of {schema.SOURCES})")
    if not 0.0 <= fraction <= 1.0:
      raise ValueError(f"evaluate.sources.{source} = {fraction}: a fraction must be in [0, 1]")
    path = data.jsonl_path(data_dir, source, split)
    if fraction == 0 or not os.path.isfile(path):
      continue
    records = [r for r in schema.read_jsonl(path) if not tasks or r["task"] in tasks]
    if fraction < 1:
      rng = np.random.default_rng([seed, schema.SOURCES.index(source)])
      chosen = np.sort(rng.permutation(len(records))[:math.ceil(fraction * len(records))])
      records = [records[i] for i in chosen]
    if max_per_task:
      counts: dict[str, int] = {}
      capped = []
      for r in records:
        counts[r["task"]] = counts.get(r["task"], 0) + 1
        if counts[r["task"]] <= max_per_task:
          capped.append(r)
      records = capped
    out += records
  return out


def read_samples(path: str) -> list[dict[str, Any]]:
  """The sample lines written so far (a torn last line from an interruption is dropped)."""
  if not os.path.isfile(path):
    return []
  rows = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        logging.warning("%s: dropping a torn line (interrupted write); it will be redone", path)
  return rows


def _sample_key(row: Mapping[str, Any]) -> tuple[str, str]:
  return row["source"], row["id"]


def _write_rows(path: str, rows: Sequence[Mapping[str, Any]], mode: str = "a") -> None:
  with open(path, mode, encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


def generate_samples(trained: inference.Trained, records: Sequence[dict[str, Any]],
                     path: str, ev: Any) -> int:
  """Generates answers for ``records`` batch by batch, appending sample lines to ``path``.

  Unreadable images and prompts longer than the largest bucket become failure rows (``answer``
  None, ``error`` set), scored as failures rather than stopping the evaluation.

  Returns:
    The number of rows written.
  """
  run = trained.run
  c = run.config
  ds = data.batches(grain.MapDataset.source(list(records)), image_roots=c.data.image_roots.to_dict(),
                    image_size=run.apm.image_size, batch_size=ev.batch_size, train=False,
                    intensity=c.data.intensity, skip_bad=True)
  written = 0
  for local in ds:
    valid = [i for i, v in enumerate(local["valid"]) if v]
    invalid = [i for i, (v, r) in enumerate(zip(local["valid"], local["records"]))
               if not v and r["id"] != "__padding__"]
    rows = [_failure(local["records"][i], "unreadable image") for i in invalid]
    if valid:
      keep = np.asarray(valid)
      records_ok = [local["records"][i] for i in valid]
      features, examples, answers = trained.answer(local["image"][keep], records_ok,
                                                   ev.max_new_tokens)
      for j, (record, example, answer) in enumerate(zip(records_ok, examples, answers)):
        row = {"id": record["id"], "source": record["source"], "task": record["task"],
               "instruction": example.instruction, "reference": example.response,
               "answer": answer, "apm_boxes": np.round(features["boxes"][j], 1).tolist()}
        if answer is None:
          row["error"] = "prompt longer than the largest length bucket"
        if record.get("meta"):
          row["meta"] = record["meta"]
        rows.append(row)
    if jax.process_index() == 0 and rows:
      _write_rows(path, rows)
    written += len(rows)
    logging.info("eval: %d / %d samples", written, len(records))
  return written


def _failure(record: Mapping[str, Any], reason: str) -> dict[str, Any]:
  return {"id": record["id"], "source": record["source"], "task": record["task"],
          "instruction": record["instructions"][0], "reference": record["responses"][0],
          "answer": None, "error": reason}


def evaluate(config: Any, workdir: str) -> dict[str, Any]:
  """Runs the evaluation described in the module docstring; returns the per-task summary."""
  ev = config.evaluate
  if ev.predictions:
    rows = read_samples(ev.predictions)
    if not rows:
      raise FileNotFoundError(f"evaluate.predictions: {ev.predictions} has no samples")
    out_dir = ev.output_dir or os.path.splitext(ev.predictions)[0] + "_scored"
    name = os.path.basename(ev.predictions)
  else:
    if jax.process_count() > 1:
      raise NotImplementedError("--mode=eval runs as one process (all its local devices); start it "
                                "on one host")
    trained = inference.load(config, workdir, step=ev.checkpoint,
                             overrides={"data.dir": ev.data_dir,
                                        "data.image_roots.default": ev.image_root})
    out_dir = ev.output_dir or os.path.join(workdir, "eval", f"{ev.split}_step{trained.step}")
    name = f"{os.path.basename(os.path.normpath(workdir))} step {trained.step}"
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, SAMPLES)
    previous = read_samples(path)
    if previous:  # rewritten without a torn last line, so appended lines start on a fresh line
      _write_rows(path + ".tmp", previous, mode="w")
      os.replace(path + ".tmp", path)
    done = {_sample_key(r) for r in previous}
    records = select_records(trained.run.config.data.dir, ev.split, ev.sources.to_dict(),
                             tuple(ev.tasks), ev.max_per_task, ev.seed)
    todo = [r for r in records if _sample_key(r) not in done]
    logging.info("eval: %d records (%d already in %s)", len(records), len(records) - len(todo),
                 path)
    if todo:
      generate_samples(trained, todo, path, ev)
    wanted = {_sample_key(r) for r in records}
    rows = [r for r in read_samples(path) if _sample_key(r) in wanted]
  scorer = scoring.Scorer(ev.metrics, box_format=ev.box_format)
  rows = scorer.score(rows)
  results = scorer.summarize(rows)
  results["name"] = name
  os.makedirs(out_dir, exist_ok=True)
  _write_rows(os.path.join(out_dir, "scored_" + SAMPLES), rows, mode="w")
  with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=1)
  markdown = tables.markdown(results)
  with open(os.path.join(out_dir, "results.md"), "w", encoding="utf-8") as f:
    f.write(markdown)
  logging.info("eval results in %s:\n%s", out_dir, markdown)
  return {"out_dir": out_dir, **{k: v for k, v in results.get("table1", {}).items()
                                 if isinstance(v, float)}}
