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
    ("APM IoU", "apm_anatomy_iou"), ("side acc", "side_accuracy"),
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
  ``label`` names the setting, e.g. "context=skip, image=patches, phase=finetune") → Markdown."""
  table1 = results["table1"]
  main = [k for k in table1 if not k.endswith(("strict", "parse rate"))]
  label = (results.get("ablation") or {}).get("label", "")
  setting = ["setting"] if label else []
  out = [f"# Evaluation: {results.get('name', '')}" + (f" ({label})" if label else ""), "",
         "## Table 1 layout (GD = Grounded Diagnosis, GC = Grounded Captioning)", "",
         _table(["model"] + setting + main,
                [[results.get("name", "")] + ([label] if label else [])
                 + [table1[k] for k in main]]), "",
         _table(["strict / parse"] + [k for k in table1 if k not in main],
                [[""] + [table1[k] for k in table1 if k not in main]]), "",
         "## Per task and dataset", ""]
  groups = results["groups"]
  present = [(name, key) for name, key in GROUP_COLUMNS
             if any(key in g for g in groups.values())]
  out.append(_table(["task", "dataset"] + [n for n, _ in present],
                    [group.split(" | ") + [g.get(k) for _, k in present]
                     for group, g in groups.items()]))
  if results.get("flip"):
    out += ["", *flip_section(results["flip"])]
  out += ["", "## Conventions", ""]
  out += [f"- `{k}`: {v}" for k, v in results["conventions"].items()]
  if results.get("skipped"):
    out += ["", "## Skipped", ""]
    out += [f"- {k}: {v}" for k, v in results["skipped"].items()]
  return "\n".join(out) + "\n"


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
