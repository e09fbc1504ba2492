"""The left/right flip test of --mode=eval (stage2.flip, scoring.flip_summary, tables): mirrored
boxes, texts and anatomies against hand-computed values, the side accuracy, the ratio table, and
the flip pass of the evaluation with stand-in models (an image-reading oracle and a blind one)."""

import json
import os
import types

import cv2
import ml_collections
import numpy as np
import pytest

from anatomix_jax import anatomy
from anatomix_jax.data import augment, images
from anatomix_jax.evaluation import scoring, tables
from anatomix_jax.instruct import schema
from anatomix_jax.stage2 import baselines, data, flip, prompt
from anatomix_jax.stage2 import evaluate as runner

METRICS = ml_collections.ConfigDict(dict(
    semantic_matching="exact", match_threshold=0.8, bertscore_dir="", bertscore_layers=5,
    bertscore_baseline="", chexbert_weights="", chexbert_bert_dir="", radgraph_dir=""))
LEFT_LUNG, RIGHT_LUNG = anatomy.NAME_TO_INDEX["Left lung"], anatomy.NAME_TO_INDEX["Right lung"]


def _ag(i, index, box, source="anatomy_grounding"):
  name = anatomy.DISPLAY_NAMES[index]
  return {"id": f"ag{i}", "source": source, "split": "test", "task": "Anatomy Grounding",
          "image": f"img{i}.png", "instructions": [f"Where is the {name}?"],
          "responses": [f"The {name} is at <box>__BOX0__</box>."], "boxes": [list(box)],
          "meta": {"anatomy": anatomy.ANATOMY_NAMES[index], "anatomy_index": index}}


# --- boxes ----------------------------------------------------------------------------------------

def test_boxes_mirror_on_the_canvas():
  # x1' = 1024 − x2, x2' = 1024 − x1; y kept; an all-zero (absent) box stays zero.
  np.testing.assert_allclose(flip.mirror_boxes([[100, 50, 300.5, 400], [0, 0, 0, 0]]),
                             [[723.5, 50, 924, 400], [0, 0, 0, 0]])
  np.testing.assert_allclose(augment.hflip_boxes([[10, 1, 30, 2]], 100), [[70, 1, 90, 2]])
  image = np.arange(12, dtype=np.uint8).reshape(3, 4)
  flipped, boxes = augment.hflip(image, np.array([[0, 0, 1, 3]], np.float32))
  np.testing.assert_array_equal(flipped, image[:, ::-1])
  np.testing.assert_array_equal(boxes, [[3, 0, 4, 3]])
  record = flip.mirror_record(_ag(0, LEFT_LUNG, [100.25, 50, 300, 400]))
  assert record["boxes"] == [[724.0, 50.0, 923.75, 400.0]]


def test_mirroring_after_the_letterbox_is_the_letterbox_of_the_mirrored_image():
  """A portrait 60×40 image: the letterbox pads 10 columns each side, then scales by 1024/60."""
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (60, 40)).astype(np.uint8)
  box = np.array([[5, 10, 15, 30]], np.float64)  # original pixels
  square, t = images.letterbox(pixels, schema.CANVAS)
  f = 1024 / 60
  np.testing.assert_allclose(t.forward_boxes(box), [[15 * f, 10 * f, 25 * f, 30 * f]])
  # mirrored on the canvas: x → 1024 − x (1024 − 25f = 35f, 1024 − 15f = 45f).
  want = [[35 * f, 10 * f, 45 * f, 30 * f]]
  np.testing.assert_allclose(flip.mirror_boxes(t.forward_boxes(box)), want, rtol=1e-12)
  # ... = the mirrored original (x → 40 − x: [25, 35]) through the same letterbox.
  mirrored, mirrored_box = augment.hflip(pixels, box)
  np.testing.assert_allclose(t.forward_boxes(mirrored_box.astype(np.float64)), want, rtol=1e-6)
  np.testing.assert_array_equal(images.letterbox(mirrored, schema.CANVAS)[0], square[:, ::-1])
  # The model input (stretch + resize to the APM's side) commutes with the flip as well.
  s = data.model_input(pixels, 64)
  np.testing.assert_allclose(data.model_input(mirrored, 64).astype(int), s[:, ::-1].astype(int),
                             atol=1)
  batch = np.stack([s, s])[..., None]
  np.testing.assert_array_equal(flip.mirror_images(batch), batch[:, :, ::-1])


# --- texts and anatomies --------------------------------------------------------------------------

def test_side_words_swap_with_their_case_and_nothing_else():
  assert flip.swap_side_words("left pleural effusion") == "right pleural effusion"
  assert flip.swap_side_words("Left pleural effusion. RIGHT lung clear, left-sided line.") == (
      "Right pleural effusion. LEFT lung clear, right-sided line.")
  untouched = "bright upright copyright rightward lefty cleft heart"
  assert flip.swap_side_words(untouched) == untouched
  assert flip.mirror_text("Detect Left pleural effusion <box>(100,20),(300,400)</box> (1,2),(3,4)"
                          ) == ("Detect Right pleural effusion <box>(724,20),(924,400)</box> "
                                "(1,2),(3,4)")  # only boxes in <box> tags are coordinates


def test_anatomy_indices_swap_for_sided_and_stay_for_midline():
  assert flip.mirror_anatomy(LEFT_LUNG) == RIGHT_LUNG
  assert flip.mirror_anatomy(RIGHT_LUNG) == LEFT_LUNG
  for name in ("Trachea&&Main Bronchus", "Mediastinum", "Vertebral column", "Structure of carina"):
    assert flip.mirror_anatomy(anatomy.NAME_TO_INDEX[name]) == anatomy.NAME_TO_INDEX[name]
  assert flip.mirror_anatomy(anatomy.BBOX_NAME_TO_INDEX["left costophrenic angle"]) == (
      anatomy.BBOX_NAME_TO_INDEX["right costophrenic angle"])
  right_border = anatomy.BBOX_NAME_TO_INDEX["right cardiac silhouette"]
  left_margin = anatomy.BBOX_NAME_TO_INDEX["left cardiac silhouette"]
  assert flip.mirror_anatomy(right_border) == left_margin
  assert flip.mirror_anatomy(anatomy.BBOX_NAME_TO_INDEX["right atrium"]) is None
  # Every partner is mutual; midline = no side word in the name.
  for i, j in enumerate(flip.MIRROR_INDEX):
    assert j is None or flip.MIRROR_INDEX[j] == i
  # 11 midline anatomies, 12 left/right pairs, the right atrium alone.
  assert sum(j == i for i, j in enumerate(flip.MIRROR_INDEX)) == 11
  assert sum(j is not None and j != i for i, j in enumerate(flip.MIRROR_INDEX)) == 24


def test_mirrored_records():
  left = flip.mirror_record(_ag(0, LEFT_LUNG, [600, 100, 900, 700]))
  assert left["instructions"] == ["Where is the Right lung?"]
  assert left["responses"] == ["The Right lung is at <box>__BOX0__</box>."]
  assert left["boxes"] == [[124.0, 100.0, 424.0, 700.0]]
  assert left["meta"] == {"anatomy": "Right lung", "anatomy_index": RIGHT_LUNG,
                          "mirror_of_anatomy_index": LEFT_LUNG, "mirrored": True}
  trachea = anatomy.NAME_TO_INDEX["Trachea&&Main Bronchus"]
  mid = flip.mirror_record(_ag(1, trachea, [500, 0, 540, 300]))
  assert mid["meta"]["anatomy_index"] == trachea and mid["boxes"] == [[484.0, 0.0, 524.0, 300.0]]
  assert mid["instructions"] == ["Where is the Trachea and Main Bronchus?"]
  # A name whose partner is not its word swap: "Right border of heart ..." ↔ "Structure of left
  # margin of heart".
  border = flip.mirror_record(_ag(2, anatomy.BBOX_NAME_TO_INDEX["right cardiac silhouette"],
                                  [0, 0, 1, 1]))
  assert border["instructions"] == ["Where is the Structure of left margin of heart?"]
  assert border["meta"]["anatomy"] == "Structure of left margin of heart"
  atrium = anatomy.BBOX_NAME_TO_INDEX["right atrium"]
  assert flip.mirror_record(_ag(3, atrium, [0, 0, 1, 1])) is None
  # Synthetic RQA records name the anatomy by index.
  rqa = {"id": "q", "source": "radialog_instruct", "split": "test", "task": "RQA", "image": "x",
         "instructions": ["Describe the left lower lung zone."],
         "responses": ["Left lower lung zone shows a small opacity."], "meta": {"anatomy": 10}}
  m = flip.mirror_record(rqa)
  assert m["meta"]["anatomy"] == 19 and m["instructions"] == ["Describe the right lower lung zone."]
  assert m["responses"] == ["Right lower lung zone shows a small opacity."] and "boxes" not in m
  assert rqa["meta"] == {"anatomy": 10}  # the original is not touched


def test_variants_are_pinned_to_the_original_sample():
  record = dict(_ag(0, LEFT_LUNG, [600, 100, 900, 700]),
                instructions=["Where is the Left lung?", "Locate the Left lung."],
                responses=["Left lung: <box>__BOX0__</box>", "It is at <box>__BOX0__</box>."])
  sample = {"instruction": "Locate the Left lung.",
            "reference": "It is at <box>(600,100),(900,700)</box>."}
  pinned = flip.pin_variant(record, sample)
  assert pinned["instructions"] == ["Locate the Left lung."]
  assert pinned["responses"] == ["It is at <box>__BOX0__</box>."]
  records = [record, _ag(1, anatomy.BBOX_NAME_TO_INDEX["right atrium"], [0, 0, 1, 1])]
  mirrored, left_out = flip.mirror_records(records, {("anatomy_grounding", "ag0"): sample})
  assert left_out == 1 and [r["id"] for r in mirrored] == ["ag0"]
  assert mirrored[0]["instructions"] == ["Locate the Right lung."]
  filled = prompt.fill_placeholders(mirrored[0]["responses"][0], mirrored[0]["boxes"], "ag0")
  assert filled == "It is at <box>(124,100),(424,700)</box>."


# --- scores and tables ----------------------------------------------------------------------------

def test_side_accuracy_by_hand():
  q = "Where is the pleural effusion?"
  assert scoring.side_correct(q, "left lower lung zone", "Left lower lung zone.") == 1.0
  assert scoring.side_correct(q, "left lower lung zone", "right lower lung zone") == 0.0
  assert scoring.side_correct(q, "left lower lung zone", "left and right bases") == 0.0
  assert scoring.side_correct(q, "left lower lung zone", "the bases") is None  # names no side
  assert scoring.side_correct(q, "bilateral, left and right", "left") is None  # truth: two sides
  assert scoring.side_correct("Is there a left effusion?", "Yes, left.", "left") is None  # copied
  assert scoring.side_correct(q, "bright spot on the left", "upright, left") == 1.0


def test_apm_iou_of_the_asked_and_of_the_unswapped_anatomy():
  boxes = np.zeros((36, 4))
  boxes[RIGHT_LUNG] = [0, 0, 10, 10]   # vs truth [0,0,10,5]: 50 / 100
  boxes[LEFT_LUNG] = [0, 0, 2.5, 5]    # 12.5 / 50
  row = {"task": "Anatomy Grounding", "reference": "Right lung: <box>(0,0),(10,5)</box>",
         "apm_boxes": boxes.tolist(),
         "meta": {"anatomy": "Right lung", "anatomy_index": RIGHT_LUNG,
                  "mirror_of_anatomy_index": LEFT_LUNG}}
  assert scoring.apm_ious(row) == pytest.approx({"apm_anatomy_iou": 0.5,
                                                 "apm_anatomy_iou_unswapped": 0.25})
  original = dict(row, meta={"anatomy": "Right lung"})  # name only, no mirror: one IoU
  assert scoring.apm_ious(original) == pytest.approx({"apm_anatomy_iou": 0.5})
  assert scoring.apm_ious(dict(row, task="Phrase Grounding")) == {}


def _vqa(i, reference, answer):
  return {"id": f"v{i}", "source": "mimic_vqa", "task": "Close-Ended VQA" if reference in (
      "Yes", "No") else "Open-Ended VQA", "instruction": "Where is the pleural effusion?",
      "reference": reference, "answer": answer}


def test_flip_summary_ratios_and_table():
  boxes = np.zeros((36, 4))
  boxes[LEFT_LUNG] = [0, 0, 10, 10]
  ag = {"id": "a", "source": "anatomy_grounding", "task": "Anatomy Grounding",
        "instruction": "Where is the Left lung?", "reference": "<box>(0,0),(10,10)</box>",
        "answer": "<box>(0,0),(10,10)</box>", "apm_boxes": boxes.tolist(),
        "meta": {"anatomy": "Left lung", "anatomy_index": LEFT_LUNG}}
  mboxes = np.zeros((36, 4))
  mboxes[RIGHT_LUNG] = [1014, 0, 1024, 5]     # IoU 0.5 with the mirrored truth
  mboxes[LEFT_LUNG] = [1014, 0, 1024, 10]     # the label-kept box: IoU 1
  ag_m = dict(ag, instruction="Where is the Right lung?", reference="<box>(1014,0),(1024,10)</box>",
              answer="<box>(1014,0),(1024,5)</box>", apm_boxes=mboxes.tolist(),
              meta={"anatomy": "Right lung", "anatomy_index": RIGHT_LUNG,
                    "mirror_of_anatomy_index": LEFT_LUNG, "mirrored": True})
  original = [ag, _vqa(1, "left lower lung zone", "left lower lung zone"),
              _vqa(2, "left lung", "left lung"), _vqa(3, "right lung", "the bases"),
              _vqa(9, "left lung", "left lung")]   # v9 has no mirrored sample: not compared
  mirrored = [ag_m, _vqa(1, "right lower lung zone", "right lower lung zone"),
              _vqa(2, "right lung", "left lung"), _vqa(3, "left lung", "left lung")]
  scorer = scoring.Scorer(METRICS)
  summary = scorer.flip_summary(scorer.score(original), scorer.score(mirrored))
  got = {(r["task"], r["metric"]): r for r in summary["rows"]}
  assert summary["samples"] == 4
  iou = got[("Anatomy Grounding", "grounding_iou")]
  assert (iou["original"], iou["mirrored"], iou["ratio"]) == pytest.approx((1.0, 0.5, 0.5))
  apm = got[("Anatomy Grounding", "apm_anatomy_iou")]
  assert (apm["original"], apm["mirrored"], apm["ratio"]) == pytest.approx((1.0, 0.5, 0.5))
  kept = got[("Anatomy Grounding", "apm_anatomy_iou_unswapped")]
  assert (kept["original"], kept["mirrored"], kept["ratio"]) == pytest.approx((1.0, 1.0, 1.0))
  # Side accuracy: original v1 ✓ v2 ✓ (v3 names no side); mirrored v1 ✓ v2 ✗ v3 ✓.
  side = got[("Open-Ended VQA", "side_accuracy")]
  assert (side["n_original"], side["n_mirrored"]) == (2, 3)
  assert (side["original"], side["mirrored"], side["ratio"]) == pytest.approx((1.0, 2 / 3, 2 / 3))
  assert got[("all", "side_accuracy")]["mirrored"] == pytest.approx(2 / 3)
  recall = got[("Open-Ended VQA", "vqa_open_recall")]
  assert recall["n_original"] == 3 and recall["original"] == pytest.approx(2 / 3)
  assert ("Open-Ended VQA", "apm_anatomy_iou") not in got  # no anatomy-grounding sample there
  assert ("Anatomy Grounding", "side_accuracy") not in got  # its questions name the side
  # The ratio table in results.md.
  results = scorer.summarize(scorer.score(original))
  results["flip"] = {**summary, "left_out": 1}
  md = tables.markdown(results)
  section = md[md.index("## Left/right flip test"):]
  assert "4 test samples mirrored" in section and "1 left out" in section
  assert "| task | metric | n original | n mirrored | original | mirrored | ratio |" in section
  assert "| Anatomy Grounding | grounding_iou | 1 | 1 | 1.000 | 0.500 | 0.500 |" in section
  assert "| Open-Ended VQA | side_accuracy | 2 | 3 | 1.000 | 0.667 | 0.667 |" in section
  assert "side acc" in md and "APM IoU" in md   # the per-group columns


# --- the flip pass of --mode=eval, with stand-in models -------------------------------------------

S = 128  # the stand-in APM's input side


class _StandIn:
  """A stage-2 stand-in: its "APM" finds the bright blob of the image and puts its box in the row
  of the lung it would be (image right = the patient's left); its "LM" answers that box and that
  side. ``blind``: the same answers and boxes whatever the image."""

  def __init__(self, root, blind=False):
    cfg = ml_collections.ConfigDict({"data": {"image_roots": {"default": root},
                                              "intensity": "minmax"}})
    self.run = types.SimpleNamespace(config=cfg, apm=types.SimpleNamespace(image_size=S))
    self.blind, self.calls = blind, 0

  def answer(self, batch, records, max_new_tokens):
    self.calls += 1
    boxes = np.zeros((len(records), 36, 4), np.float32)
    examples, answers = [], []
    for b, record in enumerate(batch):
      ys, xs = np.nonzero(record[..., 0] > 0.5)
      found = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) * (schema.CANVAS / S)
      if self.blind:
        found = np.array([614.4, 307.2, 819.2, 614.4])
      on_right = (found[0] + found[2]) / 2 > schema.CANVAS / 2
      side = "left" if on_right else "right"
      boxes[b, LEFT_LUNG if on_right else RIGHT_LUNG] = found
      r = records[b]
      examples.append(types.SimpleNamespace(
          instruction=r["instructions"][0],
          response=prompt.fill_placeholders(r["responses"][0], r.get("boxes"), r["id"])))
      answers.append(schema.boxed(found) if r["task"] == "Anatomy Grounding"
                     else f"{side} lower lung zone")
    return {"boxes": boxes}, examples, answers


@pytest.fixture(scope="module")
def study(tmp_path_factory):
  """Portrait 100×80 images with a bright blob at x 50..70, y 30..60 (the image's right: the
  patient's left), an anatomy-grounding and a VQA record on each."""
  root = tmp_path_factory.mktemp("flip")
  pixels = np.full((100, 80), 20, np.uint8)
  pixels[30:60, 50:70] = 230
  cv2.imwrite(str(root / "img.png"), pixels)
  t = images.letterbox_transform(100, 80, schema.CANVAS)
  # [614.4, 307.2, 819.2, 614.4]: pad 10 columns each side, scale 1024 / 100.
  blob = t.forward_boxes(np.array([[50, 30, 70, 60]], np.float64))[0]
  records = [dict(_ag(0, LEFT_LUNG, blob.tolist()), image="img.png"),
             dict(_ag(1, anatomy.BBOX_NAME_TO_INDEX["right atrium"], [0, 0, 9, 9]),
                  image="img.png"),
             {"id": "v0", "source": "mimic_vqa", "split": "test", "task": "Open-Ended VQA",
              "image": "img.png", "instructions": ["Where is the pleural effusion?"],
              "responses": ["left lower lung zone"]}]
  return str(root), records


def _flip_test(tmp_path, root, records, blind):
  model = _StandIn(root, blind)
  ev = ml_collections.ConfigDict({"batch_size": 2, "max_new_tokens": 4})
  runner.generate_samples(model, records, str(tmp_path / runner.SAMPLES), ev)
  rows = runner.read_samples(str(tmp_path / runner.SAMPLES))
  mirrored, left_out = runner.mirrored_samples(model, records, rows, str(tmp_path), ev)
  calls = model.calls
  again, _ = runner.mirrored_samples(model, records, rows, str(tmp_path), ev)  # resumed: no work
  assert model.calls == calls and again == mirrored
  scorer = scoring.Scorer(METRICS)
  summary = scorer.flip_summary(scorer.score(rows), scorer.score(mirrored))
  return left_out, mirrored, {(r["task"], r["metric"]): r for r in summary["rows"]}


def test_flip_pass_with_an_image_reading_stand_in(tmp_path, study):
  left_out, mirrored, got = _flip_test(tmp_path, *study, blind=False)
  assert left_out == 1 and sorted(r["id"] for r in mirrored) == ["ag0", "v0"]
  ag = next(r for r in mirrored if r["id"] == "ag0")
  assert ag["instruction"] == "Where is the Right lung?"
  assert ag["reference"] == "The Right lung is at <box>(204,307),(409,614)</box>."  # 1024 − x
  assert ag["meta"]["anatomy_index"] == RIGHT_LUNG
  for metric in ("grounding_iou", "apm_anatomy_iou"):
    r = got[("Anatomy Grounding", metric)]
    assert r["original"] > 0.9 and r["mirrored"] > 0.9 and r["ratio"] == pytest.approx(1, abs=0.05)
  assert got[("Anatomy Grounding", "apm_anatomy_iou_unswapped")]["mirrored"] == 0.0
  side = got[("Open-Ended VQA", "side_accuracy")]
  assert (side["original"], side["mirrored"], side["ratio"]) == (1.0, 1.0, 1.0)


def test_flip_pass_with_a_blind_stand_in(tmp_path, study):
  _, _, got = _flip_test(tmp_path, *study, blind=True)
  r = got[("Anatomy Grounding", "apm_anatomy_iou")]
  # (the reference writes the box truncated to whole pixels: IoU 0.995, not 1)
  assert r["original"] == pytest.approx(1.0, abs=0.01) and r["mirrored"] == r["ratio"] == 0.0
  side = got[("Open-Ended VQA", "side_accuracy")]
  assert (side["original"], side["mirrored"], side["ratio"]) == (1.0, 0.0, 0.0)


def test_eval_mode_writes_the_flip_test(tmp_path, study, monkeypatch):
  """``evaluate.flip=True`` through ``evaluate.evaluate`` (the stand-in in place of the checkpoint):
  the mirrored sample files and the ``flip`` section of results.json / results.md; and the trivial
  baseline (on by default), trained on a train split that holds the test records' twins."""
  import configs.eval as eval_config  # noqa: PLC0415
  from anatomix_jax.stage2 import inference  # noqa: PLC0415
  root, records = study
  data_dir = tmp_path / "instr"
  schema.write_jsonl(str(data_dir / "anatomy_grounding" / "test.jsonl"), records[:2])
  schema.write_jsonl(str(data_dir / "mimic_vqa" / "test.jsonl"), records[2:])
  twins = [dict(r, id=f"t{r['id']}", split="train") for r in records]
  schema.write_jsonl(str(data_dir / "anatomy_grounding" / "train.jsonl"), twins[:2])
  schema.write_jsonl(str(data_dir / "mimic_vqa" / "train.jsonl"), twins[2:])
  model = _StandIn(root)
  model.run.config.data.dir, model.step = str(data_dir), 7
  trained_cfg = ml_collections.ConfigDict({"data": {"context": "full"},
                                           "lm": {"image_tokens": "patches"}, "phase": "finetune"})
  monkeypatch.setattr(inference, "training_config", lambda *a, **k: (trained_cfg, 7))
  monkeypatch.setattr(inference, "load", lambda *a, **k: model)
  c = eval_config.get_config()
  c.evaluate.update(dict(flip=True, batch_size=2, output_dir=str(tmp_path / "out")))
  c.evaluate.metrics.semantic_matching = "exact"
  runner.evaluate(c, str(tmp_path))
  out = tmp_path / "out"
  assert {"samples_mirrored.jsonl", "scored_samples_mirrored.jsonl"} <= set(os.listdir(out))
  flip_results = json.load(open(out / "results.json"))["flip"]
  assert flip_results["samples"] == 2 and flip_results["left_out"] == 1
  got = {(r["task"], r["metric"]): r["ratio"] for r in flip_results["rows"]}
  assert got[("Anatomy Grounding", "apm_anatomy_iou")] == pytest.approx(1.0)
  assert got[("Open-Ended VQA", "side_accuracy")] == 1.0
  assert "## Left/right flip test" in open(out / "results.md").read()
  # The baseline: every test record has one training twin, so its answers are the references.
  results = json.load(open(out / "results.json"))
  assert results["baseline"]["name"] == baselines.NAME and results["baseline"]["samples"] == 3
  base = results["baseline"]["groups"]
  assert base["Anatomy Grounding | all"]["grounding_iou"] == pytest.approx(1.0)
  assert base["Open-Ended VQA | all"]["vqa_open_recall"] == pytest.approx(1.0)
  assert len(runner.read_samples(str(out / "scored_baseline_samples.jsonl"))) == 3
  markdown = open(out / "results.md").read()
  assert "## Trivial baseline (image-blind)" in markdown and f"| {baselines.NAME} |" in markdown
