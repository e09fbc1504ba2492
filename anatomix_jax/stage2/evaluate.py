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

``evaluate.context`` / ``evaluate.image_tokens`` evaluate under another prompt context or image
tokens than the run was trained with (the paper's test-time ablations; empty: as trained). Every
result carries its setting, e.g. "context=skip, image=patches, phase=finetune (trained:
context=full)" (``ablation``), as ``results.json``'s ``ablation`` and in ``results.md``'s rows; an
overridden setting writes under ``{split}_step{N}_context-skip`` etc., apart from the run's own.

``evaluate.predictions`` scores an existing JSONL of another system's answers instead (fields id,
source, task, reference, answer), with ``evaluate.box_format`` naming how it writes boxes.

Records follow the reference's benchmark (REFERENCE.md §5): the test split, VinDr subsampled to
35 % (``evaluate.sources`` fractions, a seeded choice), the evaluation system prompt "", no context
dropout, greedy decoding up to ``max_new_tokens``, answers post-processed.

``evaluate.flip`` adds the left/right flip test (``stage2.flip``): every record again on its image
mirrored left–right, with boxes mirrored and left/right words and sided anatomies swapped, the
same instruction/answer variants as its original sample; ``samples_mirrored.jsonl`` (resumable
too) and ``scored_samples_mirrored.jsonl``, and in ``results.json`` / ``results.md`` ``flip``: per
task, each main metric, the APM's anatomy-box IoU and the side accuracy on the original and the
mirrored samples, and their ratio (``scoring.Scorer.flip_summary``).

``evaluate.baseline`` (default on) scores a trivial image-blind baseline on the same samples
(``stage2.baselines``: mean training box per phrase, most common training answer), built from the
train split of the evaluated data (``{data_dir}/{source}/{train_split}.jsonl``, the run's
``data.train_split``; "train" for predictions) and scored by the same
scorer: ``scored_baseline_samples.jsonl``, ``results.json``'s ``baseline`` (its summary and name)
and in ``results.md`` a baseline row under Table 1 and a model-vs-baseline table per task. It is
skipped, with the reason in ``skipped.baseline``, when a train split is missing or (with
``evaluate.predictions``) no ``evaluate.data_dir`` is given.
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
from anatomix_jax.stage2 import baselines, data, flip, inference

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
                     path: str, ev: Any, mirror: bool = False) -> int:
  """Generates answers for ``records`` batch by batch, appending sample lines to ``path``.

  ``mirror``: the model sees each image flipped left–right (``flip.mirror_images``; the flip test
  passes ``flip.mirror_records`` as ``records``).

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
      images = local["image"][keep]
      features, examples, answers = trained.answer(
          flip.mirror_images(images) if mirror else images, records_ok, ev.max_new_tokens)
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


def mirrored_samples(trained: inference.Trained, records: Sequence[dict[str, Any]],
                     rows: Sequence[Mapping[str, Any]], out_dir: str, ev: Any
                     ) -> tuple[list[dict[str, Any]], int]:
  """The flip test's samples: ``records`` mirrored (``flip.mirror_records``, each pinned to the
  variants its original sample in ``rows`` drew), answered on the flipped images into
  ``{out_dir}/samples_mirrored.jsonl`` (appended and resumed like ``samples.jsonl``).

  Returns:
    ``(samples, left_out)``: the mirrored sample rows, and how many records have no mirror (an
    anatomy without a left/right partner).
  """
  path = os.path.join(out_dir, flip.SAMPLES)
  previous = read_samples(path)
  if previous:  # rewritten without a torn last line
    _write_rows(path + ".tmp", previous, mode="w")
    os.replace(path + ".tmp", path)
  mirrored, left_out = flip.mirror_records(records, {_sample_key(r): r for r in rows})
  done = {_sample_key(r) for r in previous}
  todo = [r for r in mirrored if _sample_key(r) not in done]
  logging.info("eval flip test: %d mirrored records (%d already in %s, %d without a mirror)",
               len(mirrored), len(mirrored) - len(todo), path, left_out)
  if todo:
    generate_samples(trained, todo, path, ev, mirror=True)
  wanted = {_sample_key(r) for r in mirrored}
  return [r for r in read_samples(path) if _sample_key(r) in wanted], left_out


def _failure(record: Mapping[str, Any], reason: str) -> dict[str, Any]:
  return {"id": record["id"], "source": record["source"], "task": record["task"],
          "instruction": record["instructions"][0], "reference": record["responses"][0],
          "answer": None, "error": reason}


def ablation(train_cfg: Any, ev: Any) -> dict[str, Any]:
  """The evaluated setting: the trained run's context / image tokens unless ``ev`` (the
  ``evaluate`` config) overrides them, and its phase (align: step 1 only; finetune: both steps).

  Returns:
    ``context``, ``image_tokens``, ``phase``, ``trained`` (the run's own context and image tokens),
    ``overridden`` (the keys that differ from it) and ``label`` (the row label of the tables).
  """
  trained = {"context": str(train_cfg.data.get("context", "full")),
             "image_tokens": str(train_cfg.lm.get("image_tokens", "patches"))}
  setting = {k: str(ev.get(k, "") or v) for k, v in trained.items()}
  overridden = [k for k in trained if setting[k] != trained[k]]
  label = (f"context={setting['context']}, image={setting['image_tokens']}, "
           f"phase={train_cfg.phase}")
  if overridden:
    label += " (trained: " + ", ".join(f"{k}={trained[k]}" for k in overridden) + ")"
  return {**setting, "phase": str(train_cfg.phase), "trained": trained, "overridden": overridden,
          "label": label}


def baseline_samples(data_dir: str, split: str, rows: Sequence[Mapping[str, Any]],
                     records: Sequence[Mapping[str, Any]] | None = None,
                     train_split: str = "train") -> tuple[list[dict[str, Any]] | None, str]:
  """The trivial baseline's sample rows for the model's ``rows`` (``baselines.answers``, trained on
  ``data_dir``'s train split of the rows' sources).

  Args:
    data_dir: the evaluated instruction data ("" : none).
    split: the evaluated split; its records are read when ``records`` is None.
    rows: the model's sample rows (their instructions and references are kept).
    records: the evaluated records (None: read from ``data_dir``).
    train_split: the split the baseline learns from.

  Returns:
    ``(rows, "")``, or ``(None, why)`` when it cannot be built.
  """
  if not data_dir:
    return None, "no data directory (evaluate.predictions without evaluate.data_dir)"
  sources = sorted({r["source"] for r in rows})
  unknown = [s for s in sources if s not in schema.SOURCES]
  missing = [data.jsonl_path(data_dir, s, train_split) for s in sources if s not in unknown
             and not os.path.isfile(data.jsonl_path(data_dir, s, train_split))]
  if unknown or missing:
    return None, "no train split: " + ", ".join(unknown + missing)
  if records is None:
    records = select_records(data_dir, split, {s: 1.0 for s in sources})
  wanted = {_sample_key(r) for r in rows}
  records = [r for r in records if _sample_key(r) in wanted]
  train = (r for s in sources
           for r in schema.read_jsonl(data.jsonl_path(data_dir, s, train_split)))
  return baselines.answers(train, records, rows), ""


def evaluate(config: Any, workdir: str) -> dict[str, Any]:
  """Runs the evaluation described in the module docstring; returns the per-task summary."""
  ev = config.evaluate
  if ev.predictions:
    rows = read_samples(ev.predictions)
    if not rows:
      raise FileNotFoundError(f"evaluate.predictions: {ev.predictions} has no samples")
    out_dir = ev.output_dir or os.path.splitext(ev.predictions)[0] + "_scored"
    name = os.path.basename(ev.predictions)
    data_dir, records, train_split = ev.data_dir, None, "train"
    mirrored = None  # the flip test needs the model: another system's answers have no mirror
    if ev.get("flip", False):
      logging.warning("evaluate.flip is ignored with evaluate.predictions (nothing to generate)")
  else:
    if jax.process_count() > 1:
      raise NotImplementedError("--mode=eval runs as one process (all its local devices); start it "
                                "on one host")
    setting = ablation(inference.training_config(workdir, ev.checkpoint)[0], ev)
    trained = inference.load(config, workdir, step=ev.checkpoint,
                             overrides={"data.dir": ev.data_dir,
                                        "data.image_roots.default": ev.image_root,
                                        "data.context": setting["context"],
                                        "lm.image_tokens": setting["image_tokens"]})
    suffix = "".join(f"_{k}-{setting[k]}" for k in setting["overridden"])
    out_dir = ev.output_dir or os.path.join(workdir, "eval",
                                            f"{ev.split}_step{trained.step}{suffix}")
    name = f"{os.path.basename(os.path.normpath(workdir))} step {trained.step}"
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, SAMPLES)
    previous = read_samples(path)
    if previous:  # rewritten without a torn last line, so appended lines start on a fresh line
      _write_rows(path + ".tmp", previous, mode="w")
      os.replace(path + ".tmp", path)
    done = {_sample_key(r) for r in previous}
    data_dir = trained.run.config.data.dir
    train_split = trained.run.config.data.get("train_split", "train")
    records = select_records(data_dir, ev.split, ev.sources.to_dict(), tuple(ev.tasks),
                             ev.max_per_task, ev.seed)
    todo = [r for r in records if _sample_key(r) not in done]
    logging.info("eval: %d records (%d already in %s)", len(records), len(records) - len(todo),
                 path)
    if todo:
      generate_samples(trained, todo, path, ev)
    wanted = {_sample_key(r) for r in records}
    rows = [r for r in read_samples(path) if _sample_key(r) in wanted]
    mirrored = (mirrored_samples(trained, records, rows, out_dir, ev)
                if ev.get("flip", False) else None)
  scorer = scoring.Scorer(ev.metrics, box_format=ev.box_format)
  rows = scorer.score(rows)
  results = scorer.summarize(rows)
  results["name"] = name
  if not ev.predictions:
    results["ablation"] = setting
  os.makedirs(out_dir, exist_ok=True)
  _write_rows(os.path.join(out_dir, "scored_" + SAMPLES), rows, mode="w")
  if mirrored is not None:  # the flip test: mirrored samples scored alike, compared per task
    mirrored_rows = scorer.score(mirrored[0])
    results["flip"] = {**scorer.flip_summary(rows, mirrored_rows), "left_out": mirrored[1]}
    _write_rows(os.path.join(out_dir, "scored_" + flip.SAMPLES), mirrored_rows, mode="w")
  if ev.get("baseline", True):  # the image-blind baseline on the same samples, scored alike
    base, why = baseline_samples(data_dir, ev.split, rows, records, train_split)
    if base is None:
      results["skipped"]["baseline"] = why
      logging.warning("eval: the trivial baseline is skipped: %s", why)
    else:
      base = scorer.score(base)
      summary = scorer.summarize(base)
      results["baseline"] = {"name": baselines.NAME, **{k: v for k, v in summary.items()
                                                         if k not in ("conventions", "skipped")}}
      _write_rows(os.path.join(out_dir, "scored_baseline_" + SAMPLES), base, mode="w")
  with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=1)
  markdown = tables.markdown(results)
  with open(os.path.join(out_dir, "results.md"), "w", encoding="utf-8") as f:
    f.write(markdown)
  logging.info("eval results in %s:\n%s", out_dir, markdown)
  return {"out_dir": out_dir, **{k: v for k, v in results.get("table1", {}).items()
                                 if isinstance(v, float)}}
