"""``describe.read_labels`` inverts the synthetic report phrases: exact labels on random findings
(whole report, instruction answer, findings alone, impression alone) and on hand-written texts;
the scorer's report label F1 (``metrics.synthetic_labels``) by hand."""

import ml_collections
import numpy as np
import pytest

from anatomix_jax import anatomy
from anatomix_jax.evaluation import scoring, tables
from anatomix_jax.instruct import mimic
from anatomix_jax.synthetic import describe, phantom


def _names(labels):
  return sorted(n for n, v in zip(anatomy.CHEXPERT_LABELS, labels) if v)


def test_read_labels_inverts_random_reports():
  rng = np.random.default_rng(17)
  positives = set()
  for i in range(400):
    findings = phantom.sample_findings(rng)
    d = describe.describe(findings, rng)
    want = _names(describe.labels_of(findings))
    positives.update(want)
    report = describe.report_text(d, "Line placement, evaluate for pneumonia.", "AP" if i % 2
                                  else "PA")
    answer = mimic.report_target(report)   # the instruction record's "Findings:…Impression:…"
    assert answer.startswith("Findings:\n") and "\n\nImpression:\n" in answer
    for text in (report, answer, answer.upper(), " ".join(d.findings), " ".join(d.impression),
                 "Impression:\n" + " ".join(d.impression)):
      assert _names(describe.read_labels(text)) == want, (findings, text)
  assert positives == set(anatomy.CHEXPERT_LABELS)   # every label was drawn and read


@pytest.mark.parametrize("text, want", [
    ("", ["No Finding"]),
    ("Findings:\nThe heart size is normal. No pleural effusion or pneumothorax. No acute osseous "
     "abnormality.\n\nImpression:\nNo acute cardiopulmonary process.", ["No Finding"]),
    ("There is no pneumothorax; the lungs are clear without consolidation.", ["No Finding"]),
    ("No pleural effusion. There is a small left apical pneumothorax.", ["Pneumothorax"]),
    ("the heart is enlarged.", ["Cardiomegaly"]),
    ("Consolidation in the right lower lung zone.", ["Consolidation", "Lung Opacity"]),
    ("Patchy opacities in the left mid lung zone are concerning for pneumonia.",
     ["Lung Opacity", "Pneumonia"]),
    ("Band-like opacity at the left lung base with elevation of the left hemidiaphragm, "
     "consistent with atelectasis.", ["Atelectasis"]),
    ("Opacity in the right upper lung zone.", ["Lung Opacity"]),
    ("Support devices as described.", ["Support Devices"]),
    ("A right internal jugular line terminates in the superior vena cava.", ["Support Devices"]),
    ("INDICATION: Line placement.\n FINDINGS: The heart size is normal.", ["No Finding"]),
    ("Widened mediastinum. Pleural thickening in the left upper lung zone. Right clavicular "
     "fracture. Nodule in the left mid lung zone. Pulmonary edema. Small right pleural effusion.",
     ["Edema", "Enlarged Cardiomediastinum", "Fracture", "Lung Lesion", "Pleural Effusion",
      "Pleural Other"]),
])
def test_read_labels_by_hand(text, want):
  labels = describe.read_labels(text)
  assert labels.dtype == np.float32 and labels.shape == (anatomy.NUM_LABELS,)
  assert _names(labels) == want


METRICS = dict(semantic_matching="exact", match_threshold=0.8, bertscore_dir="", bertscore_layers=5,
               bertscore_baseline="", chexbert_weights="", chexbert_bert_dir="", radgraph_dir="")


def test_report_label_f1_by_hand():
  rows = [{"id": f"r{i}", "source": "mimic_report_gen", "task": "Report Generation",
           "reference": ref, "answer": answer} for i, (ref, answer) in enumerate([
               ("Findings:\nThe heart is enlarged.\n\nImpression:\nCardiomegaly. Small left "
                "pleural effusion.", "Impression:\nCardiomegaly."),
               ("Impression:\nNo acute cardiopulmonary process.", "Pulmonary edema."),
               ("Cardiomegaly.", None)])]            # a failed answer reads as No Finding
  rows.append({"id": "q", "source": "mimic_vqa", "task": "Close-Ended VQA", "reference": "Yes",
               "answer": "Yes"})
  scorer = scoring.Scorer(ml_collections.ConfigDict(dict(METRICS, synthetic_labels=True)))
  scored = scorer.score(rows)
  assert _names(scored[0]["report_labels"]["reference"]) == ["Cardiomegaly", "Pleural Effusion"]
  assert _names(scored[2]["report_labels"]["answer"]) == ["No Finding"]
  assert "report_labels" not in scored[3]
  summary = scorer.summarize(scored)
  g = summary["groups"]["Report Generation | all"]
  # Cardiomegaly tp 1, true 2, pred 1; Effusion true 1; No Finding true 1, pred 1 (tp 0);
  # Edema pred 1. micro = 2·1 / (4 + 3); macro over the 4 labels that occur: (2/3 + 0 + 0 + 0) / 4.
  assert g["report_label_micro_f1"] == pytest.approx(2 / 7)
  assert g["report_label_macro_f1"] == pytest.approx(2 / 3 / 4)
  assert summary["table1"]["RG label micro-F1"] == pytest.approx(2 / 7)
  assert "report_label_micro_f1" not in summary["groups"]["Close-Ended VQA | all"]
  md = tables.markdown({**summary, "name": "m"})
  assert "RG label micro-F1" in md and "label micro F1" in md and "report_label_*_f1" in md
  # Older configs (no synthetic_labels) do not read labels: Table 1 keeps its columns.
  old = scoring.Scorer(ml_collections.ConfigDict(METRICS))
  plain = old.summarize(old.score(rows))
  assert "report_label_micro_f1" not in plain["groups"]["Report Generation | all"]
  assert "RG label micro-F1" not in plain["table1"]


def test_label_f1_leaves_out_labels_that_never_occur():
  true = np.array([[1, 0, 0], [1, 0, 0]])
  pred = np.array([[1, 0, 0], [0, 1, 0]])
  # label 0: tp 1, true 2, pred 1 → 2/3; label 1: pred 1 → 0; label 2 never occurs.
  assert scoring.label_f1(true, pred) == pytest.approx((2 / 4, 1 / 3))
