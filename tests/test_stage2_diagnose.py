"""The stage-2 wiring diagnosis (``stage2.diagnose``) and the grounding rows, on hand-made data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anatomix_jax import anatomy
from anatomix_jax.models import anatomix, gemma3
from anatomix_jax.stage2 import diagnose, grounding, prompt
from anatomix_jax.stage2 import tokenizer as tokenizer_lib

ASKED = 5  # "Descending aorta"
TRUE_BOX = [100.0, 200.0, 300.0, 400.0]
K = 8      # context lines in the hand-made prompts (anatomies 0..7)


def _record(index=ASKED, box=TRUE_BOX, rid="r0"):
  name = anatomy.DISPLAY_NAMES[index]
  return {"id": rid, "source": "anatomy_grounding", "split": "validate",
          "task": "Anatomy Grounding", "image": "x.jpg",
          "instructions": [f"Where is the {name} in this X-ray?"],
          "responses": [f"The <ref>{name}</ref> is at <box>__BOX0__</box> on the image."],
          "boxes": [list(box)],
          "meta": {"anatomy": anatomy.ANATOMY_NAMES[index], "anatomy_index": index}}


def _apm(k=K, asked_box=None, index=ASKED):
  """APM-like boxes [k, 4] (distinct per anatomy) with the asked anatomy's box set."""
  boxes = np.array([[10.0 * i, 20.0 * i, 500.0 + i, 600.0 + i] for i in range(k)], np.float32)
  if asked_box is not None:
    boxes[index] = asked_box
  return boxes


def _sentences(k=K):
  return [f"{anatomy.ANATOMY_NAMES[i]} is healthy." for i in range(k)]


def _example(record, boxes, answer=True, seed=0, sentences=None):
  return prompt.build_example(record, boxes, sentences or _sentences(len(boxes)),
                              np.random.default_rng(seed), system_prompts=prompt.SYSTEM_PROMPTS,
                              context_drop_ratio=0.1, num_image_tokens=3, answer=answer)


# ------------------------------------------------------------------ (a) frame check, by hand

def test_frame_row_context_box_equals_answer_box():
  record = _record()
  # The APM's float box truncates to the answer's integers: the context line holds the answer's box
  # string verbatim.
  row = diagnose.frame_row(record, _example(record, _apm(asked_box=[100.7, 200.2, 300.9, 400.5])))
  assert row["context_line"] == ("emb:<emb><obj_5></emb> box:<box>(100,200),(300,400)</box> "
                                 "Descending aorta is healthy.")
  assert row["answer"] == ("The <ref>Descending aorta</ref> is at <box>(100,200),(300,400)</box> "
                           "on the image.")
  assert row["context_box"] == row["answer_box"] == [[100, 200, 300, 400]]
  assert row["iou"] == 1.0 and row["verbatim_in_line"] and row["verbatim_in_context"]
  assert row["ref_is_asked"] and row["ref_in_question"] and row["ref_in_line"]
  assert row["lines_with_obj"] == 1 and row["obj_line_order"] and row["other_lines_with_ref"] == 0


def test_frame_row_context_box_differs():
  record = _record()
  row = diagnose.frame_row(record, _example(record, _apm(asked_box=[200, 200, 400, 400])))
  # intersection 100 × 200 = 20,000; union 40,000 + 40,000 − 20,000 = 60,000.
  assert row["iou"] == pytest.approx(1 / 3)
  assert row["context_box"] == [[200, 200, 400, 400]]
  assert row["answer_box"] == [[100, 200, 300, 400]]
  assert not row["verbatim_in_line"] and not row["verbatim_in_context"]
  summary = diagnose.summarize_frame([row, diagnose.frame_row(
      record, _example(record, _apm(asked_box=TRUE_BOX)))])
  assert summary["records"] == 2 and summary["context_answer_iou"] == pytest.approx((1 / 3 + 1) / 2)
  assert summary["verbatim_in_line"] == 0.5


def test_oracle_boxes_make_the_answer_verbatim():
  records = [_record(), _record(index=2, box=[5, 6, 70, 80], rid="r1")]
  apm = np.stack([_apm(asked_box=[1, 2, 3, 4]), _apm()])
  oracle = grounding.with_true_boxes(records, apm)
  np.testing.assert_array_equal(oracle[0, ASKED], TRUE_BOX)
  np.testing.assert_array_equal(oracle[1, 2], [5, 6, 70, 80])
  np.testing.assert_array_equal(np.delete(oracle[0], ASKED, 0), np.delete(apm[0], ASKED, 0))
  rows = [diagnose.frame_row(r, _example(r, b)) for r, b in zip(records, oracle)]
  assert all(r["verbatim_in_line"] and r["iou"] == 1.0 for r in rows)
  assert rows[1]["ref"] == "Apical zone of left lung"


def test_names_that_differ_between_question_and_context_sentence():
  # The RAG sentences name anatomies by their scene-graph name (``scene_graph.finding_sentence``),
  # the questions and answers by the display name (the reference's ``text_to_prompt``): for
  # "Cardiac shadow viewed radiologically;;Heart" and "Trachea&&Main Bronchus" they differ.
  boxes = _apm(k=36)
  heart = diagnose.frame_row(_record(index=4), _example(_record(index=4), boxes))
  assert heart["ref"] == "Cardiac shadow viewed radiologically or Heart"
  assert heart["context_line"].endswith("Cardiac shadow viewed radiologically;;Heart is healthy.")
  assert heart["ref_in_question"] and not heart["ref_in_line"] and not heart["ref_in_line_ci"]
  # "Left lung" also appears (case-insensitively) in two other anatomies' sentences.
  lung = diagnose.frame_row(_record(index=11), _example(_record(index=11), boxes))
  assert lung["ref_in_line"] and lung["other_lines_with_ref"] == 2
  summary = diagnose.summarize_frame([heart, lung])
  assert summary["names"]["ref_in_line"] == 0.5 and summary["names"]["ambiguous"] == 0.5
  assert summary["names"]["ref_not_in_line"] == [{
      "asked": "Cardiac shadow viewed radiologically or Heart",
      "context_sentence": "Cardiac shadow viewed radiologically;;Heart is healthy."}]
  assert summary["names"]["ambiguous_names"] == {"Left lung": 2}


def test_non_grounding_records_are_skipped():
  record = dict(_record(), task="Phrase Grounding")
  assert grounding.asked_anatomy(record) is None
  assert diagnose.frame_row(record, _example(record, _apm())) is None
  assert diagnose.summarize_frame([None]) == {"records": 0}


# ------------------------------------------------------------------ grounding rows (jsonl)

def test_score_grounding_rows_hold_question_truth_and_context_box():
  records = [_record(), dict(_record(), id="r1")]
  apm = np.zeros((2, 36, 4), np.float32)
  apm[0, ASKED] = [100.9, 200.5, 300.2, 400.7]  # written (100,200),(300,400)
  apm[1, ASKED] = [200, 200, 400, 400]
  answers = ["The <ref>Descending aorta</ref> is at <box>(100,200),(300,400)</box>.",
             "At <box>(0,0),(100,100)</box>."]
  rows = grounding.score_grounding(records, answers, apm, questions=["Q0?", "Q1?"])
  assert [r["question"] for r in rows] == ["Q0?", "Q1?"]
  assert rows[0]["true_boxes"] == [[100, 200, 300, 400]]
  assert rows[0]["anatomy"] == "Descending aorta"
  assert rows[0]["apm_box"] == [100, 200, 300, 400] and rows[0]["apm_box_iou"] == 1.0
  # float box: intersection 199.1 × 199.5, union 200·200 + 199.3·200.2 − that.
  inter = 199.1 * 199.5
  assert rows[0]["apm_iou"] == pytest.approx(inter / (40000 + 199.3 * 200.2 - inter), rel=1e-5)
  assert rows[0]["copied"] and rows[0]["iou"] == 1.0
  assert rows[1]["apm_box"] == [200, 200, 400, 400] and rows[1]["apm_iou"] == pytest.approx(1 / 3)
  assert rows[1]["predicted_boxes"] == [[0, 0, 100, 100]] and not rows[1]["copied"]
  assert rows[1]["iou"] == 0.0
  out = grounding.summarize(rows)
  assert out["anatomy_grounding_copy_rate"] == 0.5 and out["anatomy_grounding_iou"] == 0.5
  # Without questions: the record's first instruction (or None when it has none).
  assert grounding.score_grounding(records[:1], answers[:1], apm[:1])[0]["question"] == (
      "Where is the Descending aorta in this X-ray?")


# ------------------------------------------------------------------ (b) tokens and the LM

CORPUS = [
    "Where is the Descending aorta in this X-ray? The <ref>Descending aorta</ref> is at "
    "<box>(100,200),(300,400)</box> on the image.",
    *(f"{n} is healthy." for n in anatomy.ANATOMY_NAMES[:K]),
    " ".join(f"({i},{i}),({i},{i})" for i in range(0, 1025, 7)),
] * 4


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  path = tokenizer_lib.train_demo_tokenizer(CORPUS, str(tmp_path_factory.mktemp("tok")), 600)
  return tokenizer_lib.load_tokenizer(path)


def test_context_and_answer_boxes_are_the_same_tokens(tok):
  # With the true box in the context, the box's tokens in the context line and in the answer are
  # the same ids: copying is possible token by token.
  record = _record()
  example = _example(record, _apm(asked_box=TRUE_BOX))
  enc = prompt.encode(tok, example)
  spans = diagnose.token_spans(tok, example, enc, ASKED)
  ids = enc.input_ids
  assert len(spans.answer) > 0
  np.testing.assert_array_equal(ids[spans.answer], ids[spans.context])
  assert tok.tokenizer.decode(ids[spans.answer]) == "(100,200),(300,400)"
  assert enc.loss_mask[spans.answer - 1].all()  # every box token is a training target
  assert sorted(spans.lines) == list(range(K))
  for k, (a, b) in spans.lines.items():
    assert tok.tokenizer.decode(ids[a:b], skip_special_tokens=False) == example.findings[k]
  a, b = spans.lines[ASKED]
  assert a < spans.context[0] and spans.context[-1] < b


def test_score_teacher_forced_by_hand():
  ids = np.array([0, 11, 12, 13, 20, 21, 22, 30, 31, 40, 12, 14, 0])
  spans = diagnose.Spans(answer=np.array([10, 11]), context=np.array([2, 3]),
                         lines={0: (1, 4), 1: (4, 7), 2: (7, 9)}, index=0)
  logits = np.zeros((len(ids), 50))
  logits[9, 12] = 1.0   # predicts ids[10] = 12: gold, and the context's 1st token (12)
  logits[10, 13] = 1.0  # predicts 13: the context's 2nd token, gold is 14
  attn = np.zeros((len(ids), len(ids)))
  attn[9, [1, 2, 3]] = 0.2   # 0.6 on the matching line
  attn[9, 5] = 0.3           # 0.3 on line 1
  attn[10, 2] = 1.0
  out = diagnose.score_teacher_forced(ids, logits, [attn, attn / 2], spans)
  assert out["gold"] == [True, False] and out["context"] == [True, True]
  assert out["context_is_gold"] == [True, False] and out["same_length"]
  assert out["match_mass"] == pytest.approx([0.8, 0.4])      # (0.6 + 1.0) / 2
  assert out["other_mass"] == pytest.approx([0.15, 0.075])   # (0.3 + 0) / 2
  assert out["other_per_line"] == pytest.approx([0.075, 0.0375])
  summary = diagnose.summarize_lm([out, None])
  assert summary["acc_gold"] == 0.5 and summary["acc_context"] == 1.0
  assert summary["where_context_differs"] == {"positions": 1, "acc_gold": 0.0, "acc_context": 1.0}
  assert summary["match_over_other_per_line"] == pytest.approx([0.8 / 0.075, 0.4 / 0.0375])


def test_lm_rows_on_a_tiny_model(tok):
  lm = gemma3.Gemma3Config(
      vocab_size=-(-tok.vocab_size // 64) * 64, hidden_size=16, intermediate_size=24,
      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
      sliding_window=64, query_pre_attn_scalar=8.0, pad_token_id=tok.pad_id,
      bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
  config = anatomix.AnatomiXConfig(lm, image_token_id=tok.image_id,
                                   first_object_token_id=tok.obj_ids[0], num_objects=36,
                                   image_dim=6, object_dim=4, projection_hidden=8)
  model = anatomix.AnatomiX(config)
  params = anatomix.init_params(config, jax.random.key(0))
  records = [_record(), _record(index=2, box=[5, 6, 70, 80], rid="r1")]
  examples = [_example(records[0], _apm()), _example(records[1], _apm(), seed=1)]
  features = {"memory": jnp.ones((2, 3, 6)), "objects": jnp.ones((2, 36, 4))}
  rows = diagnose.lm_rows(model, params, tok, records, examples, features)
  assert all(r["positions"] == len(r["gold"]) > 0 for r in rows)
  for r in rows:
    assert len(r["match_mass"]) == 2
    assert all(0 <= m + o <= 1 + 1e-5 for m, o in zip(r["match_mass"], r["other_mass"]))
  # The attention output is a no-op for the model's outputs and its rows are distributions.
  enc = prompt.encode(tok, examples[0])
  tokens = jnp.asarray(enc.input_ids[None])
  mask = jnp.ones_like(tokens)
  logits, attention = diagnose.forward_with_attention(
      model, params, np.asarray(tokens), np.asarray(mask), features["memory"][:1],
      features["objects"][:1])
  (plain,) = model.apply({"params": params}, tokens, features["memory"][:1],
                         features["objects"][:1], positions=gemma3.positions_from_mask(mask),
                         attention_mask=mask)
  np.testing.assert_allclose(logits, np.asarray(plain), rtol=1e-5, atol=1e-5)
  assert len(attention) == 2 and attention[0].shape == (1, len(enc), len(enc))
  np.testing.assert_allclose(attention[1].sum(-1), 1.0, rtol=1e-5)
  assert np.triu(attention[0][0], 1).max() == 0.0  # causal


def test_prior_baseline_by_hand():
  train = [_record(box=[0, 0, 100, 100]), _record(box=[100, 100, 200, 200]),
           _record(index=2, box=[0, 0, 10, 10])]
  # anatomy 5: mean box (50,50,150,150) vs truth (50,50,150,150) → 1; global mean box
  # (33.3, 33.3, 103.3, 103.3) → written (33,33,103,103): intersection 53², union
  # 100² + 70² − 53².
  out = diagnose.prior_baseline(train, [_record(box=[50, 50, 150, 150])])
  assert out["per_anatomy_mean_box_iou"] == pytest.approx(1.0)
  assert out["global_mean_box_iou"] == pytest.approx(53 ** 2 / (100 ** 2 + 70 ** 2 - 53 ** 2))
