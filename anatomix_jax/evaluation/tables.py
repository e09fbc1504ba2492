"""Markdown tables of evaluation results: the paper's Table 1 layout, then per task and dataset,
and (with ``results["baseline"]``) the model next to the trivial image-blind baseline."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from anatomix_jax.evaluation import scoring

# Per-group columns worth a glance, in order; groups show the ones they have.
GROUP_COLUMNS = (
    ("n", "samples"), ("fail", "failures"),
    ("IoU", "grounding_iou"), ("IoU strict", "grounding_iou_strict"), ("mAP", "grounding_map"),
    ("mAP strict", "grounding_map_strict"), ("parse", "grounding_parse_rate"),
    ("ROUGE-1", "rouge1"), ("ROUGE-L", "rougeL"), ("BLEU", "bleu"), ("BLEU corpus", "bleu_corpus"),
    ("METEOR", "meteor"), ("BERTScore", "bertscore_f1"), ("RadGraph", "radgraph_f1"),
    ("CheXbert-14", "chexbert-all_weighted_f1"), ("CheXbert-5", "chexbert-5_weighted_f1"),
    ("closed acc", "vqa_closed_accuracy"), ("open recall", "vqa_open_recall"),
    ("open F1", "vqa_open_f1"), ("cls exact", "classification_exact"),
    ("cls micro F1", "classification_micro_f1"), ("cls macro F1", "classification_macro_f1"),
    ("APM IoU", "apm_anatomy_iou"), ("side acc", "side_accuracy"),
    ("label micro F1", "report_label_micro_f1"), ("label macro F1", "report_label_macro_f1"),
)


def _cell(value: Any) -> str:
  if value is None:
    return "–"
  return f"{value:.3f}" if isinstance(value, float) else str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)


def markdown(results: Mapping[str, Any]) -> str:
  """``Scorer.summarize`` output (plus ``name`` and, for a stage-2 model, ``ablation``: its
  ``label`` names the setting, e.g. "context=skip, image=patches, phase=finetune"; ``baseline``:
  the trivial baseline's summary and ``name``, a row under Table 1 and ``baseline_section``)
  → Markdown."""
  table1 = results["table1"]
  main = [k for k in table1 if not k.endswith(("strict", "parse rate"))]
  rest = [k for k in table1 if k not in main]
  label = (results.get("ablation") or {}).get("label", "")
  setting = ["setting"] if label else []
  baseline = results.get("baseline")
  rows = [[results.get("name", "")] + ([label] if label else []) + [table1[k] for k in main]]
  strict = [[""] + [table1[k] for k in rest]]
  if baseline:
    rows.append([baseline.get("name", "")] + ([""] if label else [])
                + [baseline["table1"].get(k) for k in main])
    strict.append([baseline.get("name", "")] + [baseline["table1"].get(k) for k in rest])
  out = [f"# Evaluation: {results.get('name', '')}" + (f" ({label})" if label else ""), "",
         "## Table 1 layout (GD = Grounded Diagnosis, GC = Grounded Captioning"
         + (", RG = Report Generation" if any(k.startswith("RG ") for k in main) else "") + ")", "",
         _table(["model"] + setting + main, rows), "",
         _table(["strict / parse"] + rest, strict), "",
         "## Per task and dataset", ""]
  groups = results["groups"]
  present = [(name, key) for name, key in GROUP_COLUMNS
             if any(key in g for g in groups.values())]
  out.append(_table(["task", "dataset"] + [n for n, _ in present],
                    [group.split(" | ") + [g.get(k) for _, k in present]
                     for group, g in groups.items()]))
  if baseline:
    out += ["", *baseline_section(results, baseline)]
  if results.get("flip"):
    out += ["", *flip_section(results["flip"])]
  out += ["", "## Conventions", ""]
  out += [f"- `{k}`: {v}" for k, v in results["conventions"].items()]
  if results.get("skipped"):
    out += ["", "## Skipped", ""]
    out += [f"- {k}: {v}" for k, v in results["skipped"].items()]
  return "\n".join(out) + "\n"


def baseline_section(results: Mapping[str, Any], baseline: Mapping[str, Any]) -> list[str]:
  """Model vs the trivial image-blind baseline (``stage2.baselines``), each task's main metrics
  (``scoring.MAIN_METRICS``; those neither has are left out), as Markdown lines."""
  lines = ["## Trivial baseline (image-blind)", "",
           f"{baseline.get('name', 'baseline')}: the same samples answered without the image "
           "(grounding: the mean training box of each phrase; other tasks: the most common "
           "training answer of the instruction, else of the task and dataset).", ""]
  rows = []
  for group, g in results["groups"].items():
    task, source = group.split(" | ")
    b = baseline["groups"].get(group, {})
    if source != "all":
      continue
    for metric in scoring.MAIN_METRICS.get(task, ("rouge1",)):
      m, v = g.get(metric), b.get(metric)
      if m is None and v is None:
        continue
      delta = m - v if m is not None and v is not None else None
      rows.append([task, metric, g.get("samples"), m, v, delta])
  lines.append(_table(["task", "metric", "n", "model", "baseline", "model − baseline"], rows))
  return lines


def flip_section(flip: Mapping[str, Any]) -> list[str]:
  """The left/right flip test (``Scorer.flip_summary`` plus ``left_out``) as Markdown lines."""
  lines = ["## Left/right flip test", "",
           f"{flip['samples']} test samples mirrored (image flipped, boxes x → 1024 − x, "
           "left/right words and sided anatomies swapped)"
           + (f"; {flip['left_out']} left out (anatomy without a mirror partner)"
              if flip.get("left_out") else "") + ". ratio = mirrored / original.", ""]
  lines.append(_table(["task", "metric", "n original", "n mirrored", "original", "mirrored",
                       "ratio"],
                      [[r["task"], r["metric"], r["n_original"], r["n_mirrored"], r["original"],
                        r["mirrored"], r["ratio"]] for r in flip["rows"]]))
  return lines
