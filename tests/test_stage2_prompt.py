"""Stage-2 prompt text, tokens, loss masks, buckets and the demo tokenizer (REFERENCE.md §1.4)."""

import dataclasses
import json
import os
import re

import ml_collections
import numpy as np
import pytest

from anatomix_jax import anatomy
from anatomix_jax.stage2 import batching, prompt
from anatomix_jax.stage2 import tokenizer as tokenizer_lib

# google/gemma-3-*-it tokenizer_config.json "chat_template", as the JSON text of the file.
GEMMA3_TEMPLATE_JSON = r'''"{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- if messages[0]['content'] is string -%}\n        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n    {%- else -%}\n        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n    {%- endif -%}\n    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = \"\" -%}\n    {%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n    {%- endif -%}\n    {%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n    {%- else -%}\n        {%- set role = message['role'] -%}\n    {%- endif -%}\n    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n    {%- elif message['content'] is iterable -%}\n        {%- for item in message['content'] -%}\n            {%- if item['type'] == 'image' -%}\n                {{ '<start_of_image>' }}\n            {%- elif item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n            {%- endif -%}\n        {%- endfor -%}\n    {%- else -%}\n        {{ raise_exception(\"Invalid content type\") }}\n    {%- endif -%}\n    {{ '<end_of_turn>\n' }}\n{%- endfor -%}\n{%- if add_generation_prompt -%}\n    {{'<start_of_turn>model\n'}}\n{%- endif -%}\n"'''

CORPUS = [
    "Right lung shows atelectasis and lung opacity.",
    "The cardiac silhouette is enlarged. No pleural effusion.",
    "Findings:\nLungs are clear.\n\nImpression:\nNo acute cardiopulmonary process.",
    "Where is the Left lung located in this Chest X-ray?",
    "The <ref>Left lung</ref> is located at the coordinates <box>(112,170),(520,840)</box>.",
] * 8

RECORD = {
    "id": "ag-0001", "source": "anatomy_grounding", "split": "train", "task": "Anatomy Grounding",
    "image": "p10/s1.png",
    "instructions": ["Where is the Left lung located in this Chest X-ray?"],
    "responses": ["The <ref>Left lung</ref> is located at the coordinates <box>__BOX1__</box> on "
                  "the image."],
    "boxes": [[0.0, 0.0, 10.0, 10.0], [512.9, 100.2, 900.99, 1000.5]],
}
BOXES3 = [[12.7, 30.2, 500.9, 1023.99], [0.4, -0.6, 1024.0, 7.5], [100, 200, 300, 400]]
SENTENCES3 = ["The abdomen is unremarkable.", "", "Lungs are clear. "]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
  return tokenizer_lib.train_demo_tokenizer(CORPUS, str(tmp_path_factory.mktemp("demo_tok")), 420)


@pytest.fixture(scope="module")
def tok(demo_dir):
  return tokenizer_lib.load_tokenizer(demo_dir)


def _gemma_template_dir(path, with_chat_tokens=True):
  """A minimal word-level tokenizer directory carrying the real Gemma3 chat template."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  names = ["<pad>", "<eos>", "<bos>", "<unk>"]
  names += ["<start_of_turn>", "<end_of_turn>"] if with_chat_tokens else []
  names += ["model", "user"]
  t = Tokenizer(models.WordLevel({n: i for i, n in enumerate(names)}, unk_token="<unk>"))
  t.pre_tokenizer = pre_tokenizers.Whitespace()
  t.add_special_tokens(names[:6] if with_chat_tokens else names[:4])
  os.makedirs(path, exist_ok=True)
  t.save(os.path.join(path, "tokenizer.json"))
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>",
            "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
            "chat_template": json.loads(GEMMA3_TEMPLATE_JSON)}
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump(config, f)
  return str(path)


def _example(**kw):
  args = dict(system_prompts=("SYS prompt.",), context_drop_ratio=0.0, num_image_tokens=2)
  args.update(kw)
  return prompt.build_example(RECORD, BOXES3, SENTENCES3, np.random.default_rng(0), **args)


# ---------------------------------------------------------------- (a) rendered prompt text

def test_prompt_text_hand_written():
  expected = (
      "<bos><start_of_turn>user\nSYS prompt.\n\n"
      "Image: \n\n<image_start><image><image><image_end>\n\n\n"
      "Likely findings:\n"
      "emb:<emb><obj_0></emb> box:<box>(12,30),(500,1023)</box> The abdomen is unremarkable.\n"
      "emb:<emb><obj_1></emb> box:<box>(0,0),(1024,7)</box> \n"
      "emb:<emb><obj_2></emb> box:<box>(100,200),(300,400)</box> Lungs are clear. \n"
      "Task: Where is the Left lung located in this Chest X-ray?<end_of_turn>\n"
      "<start_of_turn>model\n"
      "The <ref>Left lung</ref> is located at the coordinates <box>(512,100),(900,1000)</box> on "
      "the image.<end_of_turn>")
  assert _example().text() == expected


def test_named_lines_put_the_anatomy_name_before_the_box():
  """``data.line_names`` (the CPU demo's layout): each line names its anatomy, nothing else moves."""
  named = _example(named_lines=True).text()
  assert named == _example().text().replace(
      "<obj_0></emb> box:", "<obj_0></emb> Abdominal cavity box:").replace(
      "<obj_1></emb> box:", "<obj_1></emb> Aortic arch structure box:").replace(
      "<obj_2></emb> box:", "<obj_2></emb> Apical zone of left lung box:")
  assert prompt.finding_lines(BOXES3[:1], ["s."], "only_emb", named=True) == (
      "emb:<emb><obj_0></emb> Abdominal cavity",)
  cfg = ml_collections.ConfigDict(dict(
      buckets=(512,), truncation="error", system_prompts=("",), eval_system_prompts=("",),
      context_drop_ratio=0.0, context="full", line_names=True))
  batcher = batching.HostBatcher(None, cfg, 2, seed=0)
  features = {"boxes": np.asarray(BOXES3)[None], "sentences": [SENTENCES3]}
  line = batcher.examples([RECORD], features, 0, train=False)[0].findings[2]
  assert line == "emb:<emb><obj_2></emb> Apical zone of left lung box:<box>(100,200),(300,400)</box> Lungs are clear. "


def test_prompt_text_context_dropout_and_generation():
  dropped = _example(context_drop_ratio=1.0).text()
  assert "Lungs are clear. \n\nTask: Where" in dropped       # DEFAULT_CONTEXT is not stripped
  gen = _example(system_prompts=("",), answer=False)
  assert gen.text() == (
      "<bos><start_of_turn>user\n\n\n"
      "Image: \n\n<image_start><image><image><image_end>\n\n\n"
      "Likely findings:\n"
      "emb:<emb><obj_0></emb> box:<box>(12,30),(500,1023)</box> The abdomen is unremarkable.\n"
      "emb:<emb><obj_1></emb> box:<box>(0,0),(1024,7)</box> \n"
      "emb:<emb><obj_2></emb> box:<box>(100,200),(300,400)</box> Lungs are clear. \n"
      "Task: Where is the Left lung located in this Chest X-ray?<end_of_turn>\n"
      "<start_of_turn>model\n")
  assert gen.response.endswith("<box>(512,100),(900,1000)</box> on the image.")


def test_default_and_full_context_format():
  default = prompt.default_context()
  lines = default.split("\n")
  assert default.endswith("\n") and len(lines) == 2 + 36 + 1 and lines[-1] == ""
  assert lines[2] == "emb:<emb><obj_0></emb> box:<box>__BOX0__</box> Abdominal cavity"
  assert lines[37].startswith("emb:<emb><obj_35></emb> box:<box>__BOX35__</box> ")
  rng = np.random.default_rng(1)
  boxes = rng.uniform(-5, 1030, (36, 4))
  context = prompt.render_context(boxes, [f"s{i}." for i in range(36)])
  lines = context.split("\n")
  assert lines[:2] == ["Image: <image_start>", "Likely findings:"] and len(lines) == 38
  pattern = re.compile(r"emb:<emb><obj_(\d+)></emb> box:<box>\((-?\d+),(-?\d+)\),\((-?\d+),(-?\d+)"
                       r"\)</box> s(\d+)\.")
  for i, line in enumerate(lines[2:]):
    m = pattern.fullmatch(line)
    assert m and int(m.group(1)) == i == int(m.group(6))
    assert [int(v) for v in m.group(2, 3, 4, 5)] == [int(v) for v in boxes[i]]  # toward zero


def _reference_text(hf, system, instruction, response, boxes, sentences, n, dropped):
  """The reference's steps, from InstructionData/collate_fn/LMTokenizer (module docstring)."""
  default = ("Image: <image_start>\nLikely findings:\n" + "\n".join(
      f"emb:<emb><obj_{i}></emb> box:<box>__BOX{i}__</box> {anatomy.ANATOMY_NAMES[i]}"
      for i in range(36)) + "\n")
  per_sample = ("Image: <image_start>\nLikely findings:\n" + "\n".join(
      f"emb:<emb><obj_{i}></emb> box:<box>__BOX{i}__</box> GT sentence {i}." for i in range(36))
      + "\n")
  context = default if dropped else per_sample.strip()
  messages = [{"role": "system", "content": system},
              {"role": "user", "content": f"{context}\nTask: {instruction}"},
              {"role": "assistant", "content": response}]
  text = hf.apply_chat_template(messages, tokenize=False).strip()
  lines = []
  for line in text.split("\n"):
    if "__BOX" in line:
      m = re.search(r"__BOX(\d{1,2}|36)__", line)
      if m:
        line = line.split("__</box>")[0] + "__</box> " + sentences[int(m.group(1))]
    lines.append(line)
  text = "\n".join(lines)
  for i, b in enumerate(boxes):
    text = text.replace(f"__BOX{i}__", "({},{}),({},{})".format(*[int(v) for v in b]))
  return text.replace("<image_start>", "\n\n<image_start>" + "<image>" * n + "<image_end>\n\n")


@pytest.mark.parametrize("dropped", [False, True])
def test_full_prompt_matches_reference_procedure(tmp_path, dropped):
  from transformers import AutoTokenizer
  hf = AutoTokenizer.from_pretrained(_gemma_template_dir(tmp_path / "g"), local_files_only=True)
  rng = np.random.default_rng(2)
  boxes = rng.uniform(0, 1024, (36, 4)).astype(np.float32)
  sentences = [f"Retrieved sentence {i} about opacity." for i in range(36)]
  record = dict(RECORD, instructions=["Generate report:\n"], responses=["Findings:\nClear.  \n"])
  ex = prompt.build_example(record, boxes, sentences, rng,
                            system_prompts=prompt.SYSTEM_PROMPTS[1:2],
                            context_drop_ratio=float(dropped), num_image_tokens=16)
  assert ex.context_dropped == dropped
  assert ex.text() == _reference_text(hf, prompt.SYSTEM_PROMPTS[1], "Generate report:\n",
                                      "Findings:\nClear.  \n", boxes, sentences, 16, dropped)


def test_placeholder_without_box_is_an_error():
  record = dict(RECORD, boxes=[[0, 0, 1, 1]])
  with pytest.raises(ValueError, match="ag-0001.*__BOX1__.*1 boxes"):
    prompt.build_example(record, BOXES3, SENTENCES3, np.random.default_rng(0),
                         system_prompts=("",), context_drop_ratio=0.0, num_image_tokens=2)
  with pytest.raises(ValueError, match="3 boxes but 2 sentences"):
    prompt.render_context(BOXES3, SENTENCES3[:2])


# ---------------------------------------------------------------- (b) chat template

def test_template_constant_is_gemma3():
  assert tokenizer_lib.GEMMA3_CHAT_TEMPLATE == json.loads(GEMMA3_TEMPLATE_JSON)


@pytest.mark.parametrize("system", [None, "You are a radiology assistant.", "", "  untrimmed  \n"])
@pytest.mark.parametrize("assistant", [None, "  The answer.\n\n"])
@pytest.mark.parametrize("generation", [False, True])
def test_render_chat_equals_apply_chat_template(tmp_path_factory, system, assistant, generation):
  from transformers import AutoTokenizer
  path = _gemma_template_dir(tmp_path_factory.mktemp("g"))
  hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
  user = "\n\u00a0 Image: <image_start>\nTask: Generate report:\n "
  messages = ([] if system is None else [{"role": "system", "content": system}])
  messages += [{"role": "user", "content": user}]
  messages += [] if assistant is None else [{"role": "assistant", "content": assistant}]
  want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
  assert prompt.render_chat(system, user, assistant, add_generation_prompt=generation) == want


def test_render_chat_literal():
  assert prompt.render_chat("S", " u ", "a", add_generation_prompt=False) == (
      "<bos><start_of_turn>user\nS\n\nu<end_of_turn>\n<start_of_turn>model\na<end_of_turn>\n")


# ---------------------------------------------------------------- (c) labels

def _target_text(tok, enc):
  ids = enc.targets[enc.loss_mask]
  return tok.tokenizer.decode(ids.tolist(), skip_special_tokens=False)


def test_loss_mask_assistant_only(tok):
  response = ("See <emb><obj_3></emb> at <box>(1,2),(3,4)</box>. <ref>x</ref><pad> "
              "2024<end_of_turn>not this")
  record = dict(RECORD, responses=[response])
  ex = prompt.build_example(record, BOXES3, SENTENCES3, np.random.default_rng(0),
                            system_prompts=("S",), context_drop_ratio=0.0, num_image_tokens=3)
  enc = prompt.encode(tok, ex)
  ids = enc.input_ids
  assert ids.dtype == np.int32 and enc.targets.dtype == np.int32
  assert ids[0] == ids[1] == tok.bos_id                              # the reference's double <bos>
  np.testing.assert_array_equal(enc.targets[:-1], ids[1:])            # logits[:, :-1] vs ids[:, 1:]
  assert not enc.loss_mask[-1]
  # Targets: "\n" after "<start_of_turn>model", the answer through the FIRST <end_of_turn>,
  # without <emb>, <obj_i>, </emb>, <pad>; <box>, <ref>, digits stay.
  assert _target_text(tok, enc) == (
      "\nSee  at <box>(1,2),(3,4)</box>. <ref>x</ref> 2024<end_of_turn>")
  targets = enc.targets[enc.loss_mask]
  assert not np.isin(targets, list(tok.never_target_ids)).any()
  assert np.isin([tok.box_id, tok.box_end_id, tok.ref_id, tok.ref_end_id], targets).all()
  m = len(tok.model_turn_ids)
  turn = next(i for i in range(len(ids)) if tuple(ids[i:i + m]) == tok.model_turn_ids)
  first = np.nonzero(enc.loss_mask)[0][0]
  assert first == turn + m - 1                                       # predicts the token after
  np.testing.assert_array_equal(enc.image_positions, np.nonzero(ids == tok.image_id)[0])
  assert len(enc.image_positions) == 3
  np.testing.assert_array_equal(enc.object_index, [0, 1, 2, 3])     # the 4th is the answer's
  assert (ids == tok.pad_id).sum() == 1                               # the answer's <pad>


def test_image_and_object_positions_single_bos(tok):
  enc = prompt.encode(tok, _example(num_image_tokens=5), double_bos=False)
  ids = enc.input_ids
  assert ids[0] == tok.bos_id and ids[1] == tok.start_of_turn_id
  assert len(enc.image_positions) == 5
  np.testing.assert_array_equal(np.diff(enc.image_positions), 1)
  assert ids[enc.image_positions[0] - 1] == tok.image_start_id
  assert ids[enc.image_positions[-1] + 1] == tok.image_end_id
  np.testing.assert_array_equal(enc.object_index, [0, 1, 2])
  np.testing.assert_array_equal(ids[enc.object_positions], np.array(tok.obj_ids[:3]))
  assert _target_text(tok, enc) == (
      "\nThe <ref>Left lung</ref> is located at the coordinates <box>(512,100),(900,1000)</box> on "
      "the image.<end_of_turn>")
  gen = prompt.encode(tok, _example(answer=False))
  assert not gen.loss_mask.any()
  text = tok.tokenizer.decode(gen.input_ids.tolist())
  assert text.endswith("<end_of_turn>\n<start_of_turn>model\n")


# ---------------------------------------------------------------- (d) demo tokenizer

def test_demo_tokenizer_round_trip_and_ids(demo_dir, tok):
  from transformers import AutoTokenizer
  hf = AutoTokenizer.from_pretrained(demo_dir)
  assert (hf.pad_token_id, hf.eos_token_id, hf.bos_token_id, hf.unk_token_id) == (0, 1, 2, 3)
  assert len(hf) == tok.vocab_size <= 420
  assert hf("lung").input_ids[0] == 2                                  # Gemma-like: prepends <bos>
  text = ("<bos><start_of_turn>user\nÜber 1024 ☃ <image><image_start><obj_35><obj_3>"
          "<box>(112,170),(520,840)</box>\t<ref>x</ref><end_of_turn>\n")
  ids = hf.encode(text, add_special_tokens=False)
  assert hf.decode(ids) == text
  assert hf.convert_ids_to_tokens(hf.encode("20245", add_special_tokens=False)) == list("20245")
  assert hf.encode("<obj_35><obj_3>", add_special_tokens=False) == [tok.obj_ids[35], tok.obj_ids[3]]
  assert tok.obj_ids == tuple(range(tok.obj_ids[0], tok.obj_ids[0] + 36))
  assert tok.start_of_turn_id == 4 and tok.end_of_turn_id == 5
  assert hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                add_generation_prompt=True) == prompt.render_chat(
                                    None, "hi", add_generation_prompt=True)


def test_demo_tokenizer_is_deterministic(tmp_path, demo_dir):
  again = tokenizer_lib.train_demo_tokenizer(CORPUS, str(tmp_path / "again"), 420)
  for name in ("tokenizer.json", "tokenizer_config.json"):
    with open(os.path.join(demo_dir, name), "rb") as a, open(os.path.join(again, name), "rb") as b:
      assert a.read() == b.read(), name
  other = tokenizer_lib.train_demo_tokenizer(CORPUS[:3], str(tmp_path / "other"), 420)
  with open(os.path.join(demo_dir, "tokenizer.json"), "rb") as a:
    with open(os.path.join(other, "tokenizer.json"), "rb") as b:
      assert a.read() != b.read()


def test_load_tokenizer_adds_tokens_and_errors(tmp_path):
  info = tokenizer_lib.load_tokenizer(_gemma_template_dir(tmp_path / "plain"))
  assert info.vocab_size == 8 + 45
  assert info.image_id == 8 and info.obj_ids[0] == 15 and info.ref_end_id == 8 + 44
  assert info.model_turn_ids == (4, 6)
  with pytest.raises(tokenizer_lib.TokenizerError, match="no such tokenizer directory"):
    tokenizer_lib.load_tokenizer(str(tmp_path / "absent"))
  os.makedirs(tmp_path / "empty")
  with pytest.raises(tokenizer_lib.TokenizerError, match="no tokenizer.json"):
    tokenizer_lib.load_tokenizer(str(tmp_path / "empty"))
  with pytest.raises(tokenizer_lib.TokenizerError, match="lacks Gemma's chat token"):
    tokenizer_lib.load_tokenizer(_gemma_template_dir(tmp_path / "nochat", with_chat_tokens=False))
  with pytest.raises(tokenizer_lib.TokenizerError, match="too small"):
    tokenizer_lib.train_demo_tokenizer(CORPUS, str(tmp_path / "small"), 300)


# ---------------------------------------------------------------- (e) buckets and truncation

def _enc(i, n, tok):
  ids = np.arange(1, n + 1, dtype=np.int32) + 10 * i
  mask = np.zeros(n, bool)
  mask[n // 2:-1] = True
  return prompt.Encoded(id=f"e{i}", input_ids=ids, targets=np.append(ids[1:], 0).astype(np.int32),
                        loss_mask=mask, image_positions=np.zeros(0, np.int32),
                        object_positions=np.zeros(0, np.int32),
                        object_index=np.zeros(0, np.int32), num_findings=0)


def test_pad_to_bucket(tok):
  batch, dropped = prompt.pad_to_bucket([_enc(0, 5, tok), _enc(1, 9, tok)], (4, 8, 12, 16),
                                        pad_id=0)
  assert dropped == [] and batch["tokens"].shape == (2, 12) and batch["tokens"].dtype == np.int32
  np.testing.assert_array_equal(batch["attention_mask"].sum(1), [5, 9])
  np.testing.assert_array_equal(batch["tokens"][0, :6], [1, 2, 3, 4, 5, 0])
  assert batch["weights"].dtype == np.float32 and batch["weights"][1].sum() == 4
  assert batch["weights"][:, 9:].sum() == 0 and (batch["targets"][0, 5:] == 0).all()
  batch, _ = prompt.pad_to_bucket([_enc(0, 8, tok)], (4, 8, 12), pad_id=7, batch_size=3)
  assert batch["tokens"].shape == (3, 8) and (batch["tokens"][1:] == 7).all()
  np.testing.assert_array_equal(batch["valid"], [1, 0, 0])
  with pytest.raises(prompt.PromptTooLongError, match="'e1': 13 tokens > the largest bucket 12"):
    prompt.pad_to_bucket([_enc(0, 3, tok), _enc(1, 13, tok)], (4, 8, 12), pad_id=0)
  batch, dropped = prompt.pad_to_bucket([_enc(0, 3, tok), _enc(1, 13, tok)], (4, 8, 12), pad_id=0,
                                        truncation="drop", batch_size=2)
  assert dropped == ["e1"] and batch["tokens"].shape == (2, 4)
  np.testing.assert_array_equal(batch["valid"], [1, 0])
  with pytest.raises(ValueError, match="increasing"):
    prompt.pad_to_bucket([_enc(0, 3, tok)], (8, 4), pad_id=0)


def test_encode_truncation_policies(tok):
  sentences = [f"Finding {i} here." for i in range(36)]
  ex = prompt.build_example(RECORD, np.full((36, 4), 123.0), sentences, np.random.default_rng(0),
                            system_prompts=("",), context_drop_ratio=0.0, num_image_tokens=4)
  full = prompt.encode(tok, ex)
  assert full.num_findings == 36 and len(full.object_positions) == 36
  limit = len(full) - 40
  with pytest.raises(prompt.PromptTooLongError, match=rf"'ag-0001': {len(full)} tokens > max_len "
                     rf"{limit}"):
    prompt.encode(tok, ex, max_len=limit)
  assert prompt.encode(tok, ex, max_len=limit, truncation="drop") is None
  cut = prompt.encode(tok, ex, max_len=limit, truncation="left_context")
  assert 0 < cut.num_findings < 36 and len(cut) <= limit
  one_more = dataclasses.replace(ex, findings=ex.findings[:cut.num_findings + 1])
  assert len(prompt.encode(tok, one_more)) > limit                    # the most findings that fit
  np.testing.assert_array_equal(cut.object_index, np.arange(cut.num_findings))
  assert _target_text(tok, cut) == _target_text(tok, full)            # the answer is never cut
  assert "Finding 35" not in tok.tokenizer.decode(cut.input_ids.tolist())
  with pytest.raises(prompt.PromptTooLongError, match="even without findings"):
    prompt.encode(tok, ex, max_len=20, truncation="left_context")
  assert prompt.encode(tok, ex, max_len=len(full)).num_findings == 36
