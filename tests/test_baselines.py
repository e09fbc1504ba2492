"""The trivial image-blind baseline (stage2.baselines) on hand-built records: mean boxes and
majority answers by hand, their fallbacks, its scored IoU against NumPy, the skip reasons of
``evaluate.baseline_samples`` and the baseline's rows in results.md."""

import ml_collections
import numpy as np
import pytest

from anatomix_jax.evaluation import scoring, tables
from anatomix_jax.instruct import schema
from anatomix_jax.stage2 import baselines
from anatomix_jax.stage2 import evaluate as runner

METRICS = ml_collections.ConfigDict(dict(
    semantic_matching="exact", match_threshold=0.8, bertscore_dir="", bertscore_layers=5,
    bertscore_baseline="", chexbert_weights="", chexbert_bert_dir="", radgraph_dir=""))


def _ag(i, name, box, split="train"):
  return {"id": f"ag{i}", "source": "anatomy_grounding", "split": split,
          "task": "Anatomy Grounding", "image": f"{i}.png",
          "instructions": [f"Where is the {name}?", f"Locate the {name}."],
          "responses": [f"The <ref>{name}</ref> is located at <box>__BOX0__</box>.",
                        f"<ref>{name}</ref><box>__BOX0__</box>"], "boxes": [box]}


def _vindr(i, text, split="train"):
  return {"id": f"vd{i}", "source": "vindr_instruct", "split": split,
          "task": "Abnormality Detection", "image": f"{i}.png",
          "instructions": ["Detect the abnormalities."], "responses": [text]}


def _vqa(i, question, answer, split="train"):
  return {"id": f"q{i}", "source": "mimic_vqa", "split": split, "task": "Close-Ended VQA",
          "image": f"{i}.png", "instructions": [question], "responses": [answer]}


TRAIN = [
    _ag(0, "Left lung", [100, 200, 300, 400]), _ag(1, "left lung ", [120, 220, 340, 420]),
    _ag(2, "Right lung", [500, 200, 700, 400]),
    _vindr(0, "<ref>Pleural effusion</ref><box>(566,571),(841,768)</box>"
              "<ref>Cardiomegaly</ref><box>(300,500),(700,800)</box>"),
    _vqa(0, "Is there a pleural effusion?", "Yes"), _vqa(1, "Is there a pleural effusion?", "Yes"),
    _vqa(2, "Is there a pleural effusion?", "No"), _vqa(3, "Is there cardiomegaly?", "No"),
    _vqa(4, "Is there edema?", "No"), _vqa(5, "Is there a nodule?", "No"),
]
LEFT = [110, 210, 320, 410]                         # mean of the two "left lung" boxes
AG_MEAN = [(100 + 120 + 500) / 3, 620 / 3, 1340 / 3, 1220 / 3]  # all anatomy-grounding boxes
ALL = np.mean([[100, 200, 300, 400], [120, 220, 340, 420], [500, 200, 700, 400],
               [566, 571, 841, 768], [300, 500, 700, 800]], axis=0)


def test_mean_boxes_by_hand():
  b = baselines.Baseline(TRAIN)
  np.testing.assert_allclose(b.by_phrase["left lung"], LEFT)   # lower-cased, stripped
  np.testing.assert_allclose(b.box("LEFT LUNG", "anatomy_grounding", "Anatomy Grounding"), LEFT)
  np.testing.assert_allclose(b.box("Pleural effusion", "x", "y"), [566, 571, 841, 768])
  # An unseen phrase: the (source, task) mean, then the mean of every training box.
  np.testing.assert_allclose(b.box("Trachea", "anatomy_grounding", "Anatomy Grounding"), AG_MEAN)
  np.testing.assert_allclose(b.box("Trachea", "ms_cxr", "Phrase Grounding"), ALL)
  np.testing.assert_allclose(baselines.Baseline([]).overall, [0, 0, schema.CANVAS, schema.CANVAS])


def test_grounding_answer_is_the_reference_with_mean_boxes():
  evals = [_ag(10, "Left lung", [90, 190, 310, 420], "test"),
           _ag(11, "Trachea", [400, 0, 600, 300], "test"),
           _vindr(10, "<ref>Cardiomegaly</ref><box>(310,510),(690,790)</box> and "
                      "<ref>Nodule</ref><box>(1,2),(3,4)</box>", "test")]
  rows = baselines.answers(TRAIN, evals)
  assert [r["reference"] for r in rows[:2]] == [
      "The <ref>Left lung</ref> is located at <box>(90,190),(310,420)</box>.",
      "The <ref>Trachea</ref> is located at <box>(400,0),(600,300)</box>."]
  assert rows[0]["answer"] == (
      "The <ref>Left lung</ref> is located at <box>(110,210),(320,410)</box>.")
  assert rows[1]["answer"] == ("The <ref>Trachea</ref> is located at "
                               f"{schema.boxed(AG_MEAN)}.")   # (240,206),(446,406)
  assert rows[2]["answer"] == ("<ref>Cardiomegaly</ref><box>(300,500),(700,800)</box> and "
                               "<ref>Nodule</ref><box>(433,535),(770,784)</box>")  # vindr mean
  # A malformed box (not a box to the scorer either) stays; the next one still gets its phrase's.
  assert baselines.Baseline(TRAIN).answer(
      evals[0], "<ref>A</ref><box>(1,2)</box> <ref>Left lung</ref><box>(9,9),(99,99)</box>") == (
      "<ref>A</ref><box>(1,2)</box> <ref>Left lung</ref><box>(110,210),(320,410)</box>")
  assert {k: rows[0][k] for k in ("id", "source", "task", "instruction")} == {
      "id": "ag10", "source": "anatomy_grounding", "task": "Anatomy Grounding",
      "instruction": "Where is the Left lung?"}


def test_majority_answer_and_its_fallbacks():
  evals = [_vqa(10, "Is there a pleural effusion?", "No", "test"),   # its instruction: 2 × Yes
           _vqa(11, "Is there cardiomegaly?", "Yes", "test"),        # seen once: the task's
           _vqa(12, "Is there a mass?", "Yes", "test"),              # unseen: the task's
           {**_vqa(13, "What is shown?", "Edema", "test"), "source": "slake"}]  # no training
  assert [r["answer"] for r in baselines.answers(TRAIN, evals)] == ["Yes", "No", "No", ""]


def test_model_rows_give_instruction_and_reference():
  record = _ag(10, "Left lung", [90, 190, 310, 420], "test")
  row = {"id": "ag10", "source": "anatomy_grounding", "instruction": "Locate the Left lung.",
         "reference": "<ref>Left lung</ref><box>(90,190),(310,420)</box>"}
  got = baselines.answers(TRAIN, [record], [row])[0]
  assert (got["instruction"], got["reference"]) == (row["instruction"], row["reference"])
  assert got["answer"] == "<ref>Left lung</ref><box>(110,210),(320,410)</box>"


def _iou(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  inter = np.prod(np.clip(np.minimum(a[2:], b[2:]) - np.maximum(a[:2], b[:2]), 0, None))
  return inter / (np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2]) - inter)


def test_scored_baseline_iou_and_tables():
  evals = [_ag(10, "Left lung", [90, 190, 310, 420], "test"),
           _vqa(10, "Is there a pleural effusion?", "Yes", "test"),
           _vqa(11, "Is there edema?", "Yes", "test")]
  scorer = scoring.Scorer(METRICS)
  base = scorer.score(baselines.answers(TRAIN, evals))
  want = _iou(LEFT, [90, 190, 310, 420])             # 40000 / 52600
  assert base[0]["scores"]["grounding_iou"] == pytest.approx(want)
  assert want == pytest.approx(40000 / 52600)
  model = scorer.score([dict(r, answer=a) for r, a in zip(
      baselines.answers([], evals), ["<ref>Left lung</ref><box>(90,190),(310,420)</box>", "Yes",
                                      "Yes"])])
  results = {**scorer.summarize(model), "name": "run step 5"}
  results["baseline"] = {**scorer.summarize(base), "name": baselines.NAME}
  assert results["baseline"]["groups"]["Close-Ended VQA | all"]["vqa_closed_accuracy"] == 0.5
  md = tables.markdown(results)
  assert f"| {baselines.NAME} |" in md                # a row under Table 1
  section = md[md.index("## Trivial baseline (image-blind)"):]
  assert "| task | metric | n | model | baseline | model − baseline |" in section
  assert (f"| Anatomy Grounding | grounding_iou | 1 | 1.000 | {want:.3f} | {1 - want:.3f} |"
          in section)
  assert "| Close-Ended VQA | vqa_closed_accuracy | 2 | 1.000 | 0.500 | 0.500 |" in section


def test_baseline_samples_skips_without_a_train_split(tmp_path):
  rows = [{"id": "q10", "source": "mimic_vqa", "task": "Close-Ended VQA", "instruction": "Q?",
           "reference": "Yes", "answer": "No"}]
  assert runner.baseline_samples("", "test", rows) == (None, "no data directory (evaluate."
                                                       "predictions without evaluate.data_dir)")
  schema.write_jsonl(str(tmp_path / "mimic_vqa" / "test.jsonl"),
                     [_vqa(10, "Is there edema?", "Yes", "test")])
  base, why = runner.baseline_samples(str(tmp_path), "test", rows)
  assert base is None and why.startswith("no train split: ") and "mimic_vqa/train.jsonl" in why
  schema.write_jsonl(str(tmp_path / "mimic_vqa" / "train.jsonl"), TRAIN[4:])
  base, why = runner.baseline_samples(str(tmp_path), "test", rows)   # records read from the split
  assert why == "" and [(r["id"], r["instruction"], r["answer"]) for r in base] == [
      ("q10", "Q?", "No")]
