"""Markdown tables of evaluation results: the paper's Table 1 layout, then per task and dataset."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

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
  """``Scorer.summarize`` output (plus ``name``) → Markdown."""
  table1 = results["table1"]
  main = [k for k in table1 if not k.endswith(("strict", "parse rate"))]
  out = [f"# Evaluation: {results.get('name', '')}", "",
         "## Table 1 layout (GD = Grounded Diagnosis, GC = Grounded Captioning)", "",
         _table(["model"] + main, [[results.get("name", "")] + [table1[k] for k in main]]), "",
         _table(["strict / parse"] + [k for k in table1 if k not in main],
                [[""] + [table1[k] for k in table1 if k not in main]]), "",
         "## Per task and dataset", ""]
  groups = results["groups"]
  present = [(name, key) for name, key in GROUP_COLUMNS
             if any(key in g for g in groups.values())]
  out.append(_table(["task", "dataset"] + [n for n, _ in present],
                    [group.split(" | ") + [g.get(k) for _, k in present]
                     for group, g in groups.items()]))
  out += ["", "## Conventions", ""]
  out += [f"- `{k}`: {v}" for k, v in results["conventions"].items()]
  if results.get("skipped"):
    out += ["", "## Skipped", ""]
    out += [f"- {k}: {v}" for k, v in results["skipped"].items()]
  return "\n".join(out) + "\n"
