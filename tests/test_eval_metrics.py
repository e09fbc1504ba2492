"""Box parsers, grounding metrics and text metrics against hand-computed values and the metric
packages' own results (called directly here)."""

import numpy as np
import pytest
import sacrebleu
from nltk.translate import meteor_score as nltk_meteor
from rouge_score import rouge_scorer

from anatomix_jax.evaluation import boxes, grounding, text
from anatomix_jax.ops import boxes as box_ops


# --- box formats -----------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, answer, labels, want", [
    ("anatomix", "Findings: <ref>A</ref> text <box>(1,2),(3,4)</box> then plain text "
     "<box>(5,6),(7,8)</box> <box>(1,2),(3</box> <box>(1,2),(3,x)</box> <box>(9,9),(10,10)",
     ("A", "then plain text"), [[1, 2, 3, 4], [5, 6, 7, 8]]),
    # 0-100 grid × 1024/100 = 10.24
    ("chexagent", "<|ref|>Left lower lobe opacity<|/ref|><|box|>(10,20),(30,40)<|/box|>",
     ("Left lower lobe opacity",), [[102.4, 204.8, 307.2, 409.6]]),
    ("radvlm", "The opacity is at [0.25, 0.5, 0.75, 1.0].", ("The opacity is at",),
     [[256, 512, 768, 1024]]),
    # 100 bins read at their centres: (10 + 0.5) / 100 · 1024 = 107.52, …
    ("maira2", "<obj>Pleural effusion</obj><box><x10><y20><x30><y40></box>",
     ("Pleural effusion",), [[107.52, 209.92, 312.32, 414.72]]),
    ("maira2", "Effusion (0.1, 0.2, 0.3, 0.4)", ("Effusion",), [[102.4, 204.8, 307.2, 409.6]]),
    # 0-999: 111 / 999 · 1024 = 113.778, 222 → 227.556, 333 → 341.333, 444 → 455.111
    ("medrega", "<ref>Nodules</ref><box>[[0, 0, 999, 999], [111, 222, 333, 444]]</box>",
     ("Nodules", "Nodules"), [[0, 0, 1024, 1024], [113.778, 227.556, 341.333, 455.111]]),
    # y-first 1024 bins: y1 256, x1 512, y2 768, x2 1023 → xyxy (512, 256, 1023, 768)
    ("paligemma", "<loc0256><loc0512><loc0768><loc1023> effusion ; <loc0000><loc0010><loc0100>"
     "<loc0200> heart", ("effusion", "heart"), [[512, 256, 1023, 768], [10, 0, 200, 100]]),
])
def test_parse_formats(fmt, answer, labels, want):
  got = boxes.parse(answer, fmt)
  assert got.labels == labels
  np.testing.assert_allclose(got.boxes, want, atol=1e-3)


@pytest.mark.parametrize("fmt, tolerance", [
    ("anatomix", 1.0),            # integer truncation
    ("chexagent", 1024 / 200),    # rounding to 1/100 of the canvas
    ("radvlm", 1024 / 200),       # 2 decimals
    ("maira2", 1024 / 200),       # bin centre: at most half a bin away
    ("medrega", 1024 / 999 / 2),  # rounding to 1/999
    ("paligemma", 1024 / 2048),   # rounding to 1/1024
])
def test_render_parse_round_trip(fmt, tolerance):
  labels = ["left lung", "heart shadow"]
  canvas_boxes = np.array([[100.3, 200.7, 300.2, 400.9], [500.0, 512.5, 700.25, 800.0]])
  got = boxes.parse(boxes.render(labels, canvas_boxes, fmt), fmt)
  assert got.labels == tuple(labels)
  assert np.abs(got.boxes - canvas_boxes).max() <= tolerance + 1e-4


@pytest.mark.parametrize("garbage", ["", "<box>", "<box>(1,2),(3,4)", "<|box|>(", "[1, 2",
                                     "<loc0001><loc0002>", "<box><x1><y2></box>", None])
def test_malformed_text_gives_no_box(garbage):
  for fmt in boxes.FORMATS:
    assert boxes.parse(garbage, fmt).boxes.shape == (0, 4)
  with pytest.raises(ValueError, match="box format"):
    boxes.parse("x", "yolo")


# --- grounding -------------------------------------------------------------------------------------

A = [0, 0, 10, 10]


def test_iou_matrix():
  # overlap: [0,0,10,10] ∩ [5,0,15,10] = 50; union 150 → 1/3; disjoint → 0; reversed box → 0
  got = box_ops.iou_matrix([A], [[5, 0, 15, 10], [20, 20, 30, 30], [10, 10, 0, 0]])
  np.testing.assert_allclose(got, [[1 / 3, 0, 0]])


def test_reference_and_strict_iou():
  # two predictions, one perfect, one disjoint → (1 + 0) / 2
  assert grounding.reference_iou([A, [50, 50, 60, 60]], [A]) == pytest.approx(0.5)
  assert grounding.reference_iou(np.zeros((0, 4)), [A]) is None
  # one of two true boxes found: the reference does not penalise (1.0), strict does (1 / 2)
  two = [A, [20, 20, 30, 30]]
  assert grounding.reference_iou([A], two) == pytest.approx(1.0)
  assert grounding.strict_iou([A], two) == pytest.approx(0.5)
  assert grounding.strict_iou(np.zeros((0, 4)), two) == 0.0


def test_map_threshold_cases():
  # IoU([0,0,10,6], A) = 60 / 100 = 0.6 → AP 1 at 0.25 and 0.5, 0 at 0.75 and 0.95 → mAP 0.5
  got = grounding.mean_average_precision([[0, 0, 10, 6]], [0], [A], [0])
  assert got == pytest.approx({"map": 0.5, "map_25": 1.0, "map_50": 1.0, "map_75": 0.0,
                               "map_95": 0.0})
  assert grounding.mean_average_precision([A], [0], [A], [0])["map"] == 1.0


def test_map_false_positive_before_the_match():
  # detections in order: a miss, then the hit. recall (0, 1), precision (0, 1/2); the
  # interpolated envelope is 1/2 at every recall point → AP 0.5 at every threshold.
  got = grounding.mean_average_precision([[50, 50, 60, 60], A], [0, 0], [A], [0])
  assert got["map"] == pytest.approx(0.5)
  # the duplicate AFTER the hit costs nothing: recall reaches 1 at precision 1
  assert grounding.mean_average_precision([A, A], [0, 0], [A], [0])["map"] == 1.0


def test_map_classes_and_unmatched_labels():
  heart = [20, 20, 30, 30]
  # two true classes; only class 0 found → (1 + 0) / 2
  assert grounding.mean_average_precision([A], [0], [A, heart], [0, 1])["map"] == 0.5
  # an extra prediction with a label no truth has (class 2) is left out, as COCO's −1
  assert grounding.mean_average_precision([A, heart], [0, 2], [A, heart], [0, 1])["map"] == 0.5


def test_label_matcher():
  vectors = {"left lung": [1.0, 0.0], "heart": [0.0, 1.0],
             "near": [0.81, np.sqrt(1 - 0.81 ** 2)], "far": [0.79, np.sqrt(1 - 0.79 ** 2)]}
  matcher = grounding.LabelMatcher(lambda texts: np.array([vectors[t] for t in texts]), 0.8)
  pred, truth = matcher(["near", "far", "heart"], ["left lung", "heart"])
  assert truth.tolist() == [0, 1]
  assert pred.tolist() == [0, 2 + 1, 1]  # cos 0.81 ≥ 0.8 matches; 0.79 gets a class of its own
  pred, truth = matcher(["far", "heart"], ["left lung", "left lung"])  # one phrase: agnostic
  assert pred.tolist() == [0, 0] and truth.tolist() == [0, 0]
  exact = grounding.LabelMatcher(None)
  assert exact(["Heart ", "lung"], ["heart", "left lung"])[0].tolist() == [0, 2 + 1]


def test_score_sample_and_aggregate():
  truth = "<ref>Left lung</ref><box>(0,0),(10,10)</box><ref>Heart</ref><box>(20,20),(30,30)</box>"
  found_one = grounding.score_sample(truth, "<ref>Left lung</ref><box>(0,0),(10,10)</box>")
  assert found_one["iou"] == 1.0 and found_one["iou_strict"] == 0.5
  assert found_one["map"] == 0.5  # 'Heart' class missed
  unparsed = grounding.score_sample(truth, "<ref>Left lung</ref><box>(0,0),(10")
  assert not unparsed["parsed"] and unparsed["iou"] is None and unparsed["map_strict"] == 0.0
  assert grounding.score_sample("No pneumonia detected.", "<box>(0,0),(1,1)</box>") is None
  agg = grounding.aggregate([found_one, unparsed])
  assert agg["iou"] == 1.0 and agg["iou_strict"] == 0.25 and agg["parse_rate"] == 0.5
  assert agg["map"] == 0.5 and agg["map_strict"] == 0.25


# --- text ------------------------------------------------------------------------------------------

SENTENCES = [("Heart size is normal. No pleural effusion.", "The heart is normal in size."),
             ("Small left pleural effusion with adjacent atelectasis.",
              "Left pleural effusion is small."),
             ("No acute cardiopulmonary process.", "No acute process."),
             ("Moderate cardiomegaly.", "Mild cardiomegaly is seen.")]


def test_postprocess_and_prepare():
  assert text.postprocess("  a\n\nb\na\n  c  \n") == "a\nb\nc"
  assert text.prepare("", "") == ("No findings or impressions.", "No findings.")


def test_rouge_bleu_match_the_packages():
  scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
  for ref, hyp in SENTENCES:
    want = scorer.score(ref, hyp)
    got = text.rouge(ref, hyp)
    assert got == pytest.approx({k: v.fmeasure for k, v in want.items()})
    assert text.sentence_bleu(ref, hyp) == pytest.approx(
        sacrebleu.sentence_bleu(hyp, [ref]).score / 100)
  refs, hyps = zip(*SENTENCES)
  assert text.corpus_bleu(refs, hyps) == pytest.approx(
      sacrebleu.corpus_bleu(list(hyps), [list(refs)]).score / 100)
  # by hand: "heart is normal" vs "heart normal": P 2/2, R 2/3 → F 0.8
  assert text.rouge("heart is normal", "heart normal")["rouge1"] == pytest.approx(0.8)


def test_meteor():
  class NoSynonyms:
    def synsets(self, *args, **kwargs):
      return []

  for ref, hyp in SENTENCES:
    want = nltk_meteor.meteor_score([ref.split()], hyp.split(), wordnet=NoSynonyms())
    if "WordNet data absent" in text.meteor_variant():
      assert text.meteor(ref, hyp) == pytest.approx(want)
    else:
      assert text.meteor(ref, hyp) >= want  # synonyms only add matches
  # exact match of 4 words: P = R = 1, one chunk → penalty 0.5 · (1/4)^3 = 0.0078125
  assert text.meteor("a b c d", "a b c d") == pytest.approx(1 - 0.0078125)


def test_vqa_and_classification():
  assert text.vqa_closed("Yes", "yes.") == 1.0
  assert text.vqa_closed("(B) No", "B") == 1.0
  assert text.vqa_closed("(B) No", "No") == 1.0
  assert text.vqa_closed("No", "(A) Yes") == 0.0
  # tokens: ref (left, pleural, effusion), hyp (small, left, effusion): 2 shared
  got = text.vqa_open("left pleural effusion", "small left effusion")
  assert got == pytest.approx({"recall": 2 / 3, "f1": 2 * 2 / 6, "exact": 0.0})
  # A: tp 1, |true| 1, |pred| 1 → 1; B: tp 1, 2, 1 → 2/3; C: tp 0, 1, 1 → 0
  # micro 2·2 / (4 + 3) = 4/7; macro 5/9; weighted (1·1 + 2/3·2 + 0·1) / 4 = 7/12
  f1 = text.classification_f1([{"A", "B"}, {"B"}, {"C"}], [{"A"}, {"B", "C"}, set()],
                              ["A", "B", "C"])
  assert f1 == pytest.approx({"micro": 4 / 7, "macro": 5 / 9, "weighted": 7 / 12})
  assert text.parse_labels("(A) Edema, (C) Pleural Effusion", ["Edema", "Pleural Effusion",
                                                               "Effusion X"]) == {
      "Edema", "Pleural Effusion"}
