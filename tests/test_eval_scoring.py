"""--mode=eval's scoring, tables and record selection on hand-made samples (values by hand or from
the metric packages called directly)."""

import json

import ml_collections
import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer

from anatomix_jax.stage2 import evaluate as runner
from anatomix_jax.evaluation import scoring, tables
from anatomix_jax.instruct import schema

METRICS = ml_collections.ConfigDict(dict(
    semantic_matching="exact", match_threshold=0.8, bertscore_dir="", bertscore_layers=5,
    bertscore_baseline="", chexbert_weights="", chexbert_bert_dir="", radgraph_dir=""))
BOX = "<ref>Left lung</ref><box>(0,0),(10,10)</box>"


def _row(task, reference, answer, source="mimic_vqa", i=[0]):  # noqa: B006 (a counter)
  i[0] += 1
  return {"id": f"r{i[0]}", "source": source, "task": task, "reference": reference,
          "answer": answer}


@pytest.fixture(scope="module")
def results():
  rows = [
      # IoU([0,0,10,5], [0,0,10,10]) = 50 / 100 = 0.5: AP 1 at thresholds 0.25 and 0.5 (≥),
      # 0 at 0.75 and 0.95 → mAP 0.5.
      _row("Anatomy Grounding", BOX, "<ref>Left lung</ref><box>(0,0),(10,5)</box>",
           "anatomy_grounding"),
      _row("Anatomy Grounding", BOX, "<ref>Left lung</ref><box>(0,0),(10", "anatomy_grounding"),
      _row("Anatomy Grounding", BOX, None, "anatomy_grounding"),  # a failed generation
      _row("Close-Ended VQA", "Yes", "yes."),
      _row("Close-Ended VQA", "(B) No", "B"),
      _row("Close-Ended VQA", "No", "Yes"),
      _row("Report Generation", "Heart size is normal. No effusion.",
           "The heart is normal in size.", "mimic_report_gen"),
      _row("Report Generation", "Small left pleural effusion.", "Left pleural effusion is small.",
           "mimic_report_gen"),
      _row("Image Classification", "Edema, Pneumonia", "Edema", "mimic_cxr_classification"),
  ]
  scorer = scoring.Scorer(METRICS)
  scored = scorer.score(rows)
  return scored, scorer.summarize(scored)


def test_grounding_reference_and_strict_means(results):
  _, summary = results
  g = summary["groups"]["Anatomy Grounding | all"]
  assert g["samples"] == 3 and g["failures"] == 1
  assert g["grounding_parse_rate"] == pytest.approx(1 / 3)
  assert g["grounding_iou"] == pytest.approx(0.5)          # the reference: parsed samples only
  assert g["grounding_iou_strict"] == pytest.approx(0.5 / 3)  # unparsed = 0
  assert g["grounding_map"] == pytest.approx(0.5)
  assert g["grounding_map_strict"] == pytest.approx(0.5 / 3)
  assert summary["table1"]["AG IoU"] == pytest.approx(0.5)
  assert summary["table1"]["AG mAP"] == pytest.approx(0.5)


def test_vqa_text_and_classification(results):
  scored, summary = results
  groups = summary["groups"]
  assert groups["Close-Ended VQA | mimic_vqa"]["vqa_closed_accuracy"] == pytest.approx(2 / 3)
  reports = [r for r in scored if r["task"] == "Report Generation"]
  rouge = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
  want = np.mean([rouge.score(r["reference"], r["answer"])["rouge1"].fmeasure for r in reports])
  assert groups["Report Generation | all"]["rouge1"] == pytest.approx(want)
  corpus = sacrebleu.corpus_bleu([r["answer"] for r in reports],
                                 [[r["reference"] for r in reports]]).score / 100
  assert groups["Report Generation | all"]["bleu_corpus"] == pytest.approx(corpus)
  cls = groups["Image Classification | all"]
  # truth {Edema, Pneumonia}, answer {Edema}: micro 2·1 / (2 + 1); macro: Edema 1, the other
  # 13 labels 0 → 1/14; weighted by support: (1·1 + 0·1) / 2.
  assert cls["classification_micro_f1"] == pytest.approx(2 / 3)
  assert cls["classification_macro_f1"] == pytest.approx(1 / 14)
  assert cls["classification_weighted_f1"] == pytest.approx(0.5)
  assert {"bertscore", "chexbert", "radgraph"} <= set(summary["skipped"])


def test_markdown_tables(results):
  _, summary = results
  text = tables.markdown({**summary, "name": "hand"})
  assert "| hand |" in text
  assert "| Anatomy Grounding | anatomy_grounding | 3 | 1 | 0.500 |" in text
  header = next(line for line in text.splitlines() if line.startswith("| task | dataset"))
  separator = text.splitlines()[text.splitlines().index(header) + 1]
  assert header.count("|") == separator.count("|")


def test_peer_box_format_is_scored_on_the_canvas():
  # CheXagent writes 0-100: (0,0),(50,50) is (0,0),(512,512) on the 1024 canvas → IoU 1.
  row = _row("Phrase Grounding", "<ref>x</ref><box>(0,0),(512,512)</box>",
             "<|ref|>x<|/ref|><|box|>(0,0),(50,50)<|/box|>", "mscxr")
  scored = scoring.Scorer(METRICS, box_format="chexagent").score([row])
  assert scored[0]["scores"]["grounding_iou"] == pytest.approx(1.0)
  with pytest.raises(ValueError, match="box_format"):
    scoring.Scorer(METRICS, box_format="yolo")


def _write(path, records):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_select_records_fraction_cap_and_tasks(tmp_path):
  def record(source, i, task):
    return {"id": f"{source}{i}", "source": source, "split": "test", "task": task,
            "image": "x.png", "instructions": ["q"], "responses": ["a"]}
  _write(tmp_path / "vindr_instruct" / "test.jsonl",
         [record("vindr_instruct", i, "Phrase Grounding") for i in range(20)])
  _write(tmp_path / "mscxr" / "test.jsonl",
         [record("mscxr", i, t) for i in range(6) for t in ("Phrase Grounding",
                                                            "Grounded Diagnosis")])
  chosen = runner.select_records(str(tmp_path), "test", {"vindr_instruct": 0.35, "mscxr": 1.0,
                                                          "slake": 1.0})
  vindr = [r for r in chosen if r["source"] == "vindr_instruct"]
  assert len(vindr) == 7  # ceil(0.35 · 20)
  ids = [int(r["id"][len("vindr_instruct"):]) for r in vindr]
  assert ids == sorted(ids)  # file order kept
  capped = runner.select_records(str(tmp_path), "test", {"mscxr": 1.0}, max_per_task=2)
  assert [(r["id"], r["task"]) for r in capped] == [
      ("mscxr0", "Phrase Grounding"), ("mscxr0", "Grounded Diagnosis"),
      ("mscxr1", "Phrase Grounding"), ("mscxr1", "Grounded Diagnosis")]
  only = runner.select_records(str(tmp_path), "test", {"mscxr": 1.0},
                               tasks=("Grounded Diagnosis",))
  assert {r["task"] for r in only} == {"Grounded Diagnosis"} and len(only) == 6
  with pytest.raises(ValueError, match="unknown source"):
    runner.select_records(str(tmp_path), "test", {"mimic": 1.0})
  with pytest.raises(ValueError, match="fraction"):
    runner.select_records(str(tmp_path), "test", {"mscxr": 1.5})
  assert set(schema.SOURCES) >= {r["source"] for r in chosen}


def test_read_samples_drops_a_torn_line(tmp_path):
  path = tmp_path / "samples.jsonl"
  path.write_text(json.dumps({"id": "a"}) + "\n" + json.dumps({"id": "b"})[:5])
  assert runner.read_samples(str(path)) == [{"id": "a"}]
  assert runner.read_samples(str(tmp_path / "missing.jsonl")) == []
