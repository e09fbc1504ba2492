"""The paper's stage-2 ablations as config switches (REFERENCE.md §6.2 "Ablations in the code"):
``data.context`` (full / skip / only_emb / names), ``lm.image_tokens`` (patches / cls), and their
``--mode=eval`` overrides and labels (the run's phase tells step 1 only from both steps)."""

import json
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import tiny
from anatomix_jax import anatomy
from anatomix_jax.evaluation import tables
from anatomix_jax.instruct import schema
from anatomix_jax.models import apm as apm_lib
from anatomix_jax.rag import database
from anatomix_jax.stage1 import load as stage1_load
from anatomix_jax.stage2 import (batching, config as stage2_config, evaluate, frozen_apm, inference,
                                 prompt, tokenizer as tokenizer_lib)
from configs import eval as eval_config
from test_stage2_prompt import BOXES3, RECORD, SENTENCES3  # the shared hand-built record

CORPUS = [
    "Right lung shows atelectasis and lung opacity.",
    "The cardiac silhouette is enlarged. No pleural effusion.",
    "Where is the Left lung located in this Chest X-ray?",
    "The <ref>Left lung</ref> is located at the coordinates <box>(112,170),(520,840)</box>.",
    "Abdominal cavity Aortic arch structure Apical zone of left lung",
] * 8

HEAD = "<bos><start_of_turn>user\nSYS prompt.\n\nImage: \n\n<image_start><image><image><image_end>\n\n\n"
TAIL = ("Task: Where is the Left lung located in this Chest X-ray?<end_of_turn>\n"
        "<start_of_turn>model\n"
        "The <ref>Left lung</ref> is located at the coordinates <box>(512,100),(900,1000)</box> on "
        "the image.<end_of_turn>")
EXPECTED = {
    # Today's prompt (tests/test_stage2_prompt.py::test_prompt_text_hand_written), unchanged.
    "full": HEAD + (
        "Likely findings:\n"
        "emb:<emb><obj_0></emb> box:<box>(12,30),(500,1023)</box> The abdomen is unremarkable.\n"
        "emb:<emb><obj_1></emb> box:<box>(0,0),(1024,7)</box> \n"
        "emb:<emb><obj_2></emb> box:<box>(100,200),(300,400)</box> Lungs are clear. \n") + TAIL,
    # The fixed contexts are inserted unstripped (their trailing newline: a blank line).
    "skip": HEAD.removesuffix("\n") + "\n\n" + TAIL,
    "only_emb": HEAD + (
        "emb:<emb><obj_0></emb>\n"
        "emb:<emb><obj_1></emb>\n"
        "emb:<emb><obj_2></emb>\n\n") + TAIL,
    "names": HEAD + (
        "Likely findings:\n"
        "emb:<emb><obj_0></emb> box:<box>(12,30),(500,1023)</box> Abdominal cavity\n"
        "emb:<emb><obj_1></emb> box:<box>(0,0),(1024,7)</box> Aortic arch structure\n"
        "emb:<emb><obj_2></emb> box:<box>(100,200),(300,400)</box> Apical zone of left lung\n"
        "\n") + TAIL,
}


def _example(boxes=BOXES3, sentences=SENTENCES3, record=RECORD, seed=0, **kw):
  args = dict(system_prompts=("SYS prompt.",), context_drop_ratio=0.0, num_image_tokens=2)
  args.update(kw)
  return prompt.build_example(record, boxes, sentences, np.random.default_rng(seed), **args)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  path = tokenizer_lib.train_demo_tokenizer(CORPUS, str(tmp_path_factory.mktemp("tok")), 420)
  return tokenizer_lib.load_tokenizer(path)


# ---------------------------------------------------------------- rendered text

@pytest.mark.parametrize("context", prompt.CONTEXTS)
def test_each_context_renders_the_hand_written_prompt(context):
  assert _example(context=context).text() == EXPECTED[context]


def test_full_is_todays_prompt_byte_for_byte():
  for kw in ({}, {"context_drop_ratio": 1.0}, {"answer": False, "system_prompts": ("",)}):
    assert _example(**kw).text() == _example(context="full", **kw).text()
  assert prompt.CONTEXTS[0] == "full"
  assert stage2_config.base_config("align").data.context == "full"
  assert stage2_config.base_config("finetune").lm.image_tokens == "patches"


def test_fixed_contexts_are_the_references_default_context_texts():
  """``get_default_context()`` / ``(only_embeddings=True)`` (src/util/data_utils.py), verbatim,
  with the APM's boxes in the ``__BOX{i}__`` placeholders (``add_bboxes_to_placeholders``)."""
  boxes = np.random.default_rng(3).uniform(0, 1024, (36, 4))
  sentences = [f"retrieved {i}." for i in range(36)]
  names = ("Image: <image_start>\nLikely findings:\n" + "\n".join(
      f"emb:<emb><obj_{i}></emb> box:<box>__BOX{i}__</box> {anatomy.ANATOMY_NAMES[i]}"
      for i in range(36)) + "\n")
  only_emb = "Image: <image_start>\n" + "\n".join(
      f"emb:<emb><obj_{i}></emb>" for i in range(36)) + "\n"
  fill = lambda text: prompt.fill_placeholders(text, boxes, "test")  # noqa: E731
  assert _example(boxes, sentences, context="names").context() == fill(names)
  assert fill(names) == fill(prompt.default_context())
  assert _example(boxes, sentences, context="only_emb").context() == only_emb
  assert _example(boxes, sentences, context="skip").context() == "Image: <image_start>\n"


def test_context_dropout_only_changes_full_and_keeps_the_draws():
  for context in ("skip", "only_emb", "names"):
    dropped = _example(context=context, context_drop_ratio=1.0)
    assert not dropped.context_dropped and dropped.text() == EXPECTED[context]
  record = dict(RECORD, instructions=[f"Question {i}?" for i in range(5)],
                responses=[f"Answer {i}." for i in range(5)])
  for seed in range(5):
    full = _example(record=record, seed=seed, context_drop_ratio=0.5,
                    system_prompts=prompt.SYSTEM_PROMPTS)
    skip = _example(record=record, seed=seed, context_drop_ratio=0.5, context="skip",
                    system_prompts=prompt.SYSTEM_PROMPTS)
    assert (full.system, full.instruction, full.response) == (
        skip.system, skip.instruction, skip.response)


def test_unknown_context_is_an_error():
  with pytest.raises(ValueError, match="data.context must be one of"):
    _example(context="none")
  cfg = stage2_config.base_config("finetune").data
  cfg.context = "emb_only"
  with pytest.raises(ValueError, match="data.context must be one of"):
    batching.HostBatcher(None, cfg, 4, seed=0)


# ---------------------------------------------------------------- tokens

@pytest.mark.parametrize("n", [2, 1])
@pytest.mark.parametrize("context", prompt.CONTEXTS)
def test_token_positions_match_the_text(tok, context, n):
  example = _example(context=context, num_image_tokens=n)
  enc = prompt.encode(tok, example)
  ids = enc.input_ids
  assert tok.tokenizer.decode(ids[1:].tolist()) == example.text()     # after the double <bos>
  in_text = [int(i) for i in re.findall(r"<obj_(\d+)>", example.text())]
  assert in_text == ([] if context == "skip" else [0, 1, 2])
  np.testing.assert_array_equal(enc.object_index, in_text)
  np.testing.assert_array_equal(ids[enc.object_positions], [tok.obj_ids[i] for i in in_text])
  assert len(enc.image_positions) == example.text().count("<image>") == n
  np.testing.assert_array_equal(enc.image_positions, np.nonzero(ids == tok.image_id)[0])
  assert ids[enc.image_positions[0] - 1] == tok.image_start_id
  assert ids[enc.image_positions[-1] + 1] == tok.image_end_id
  assert tok.tokenizer.decode(ids[enc.loss_mask.nonzero()[0] + 1].tolist()).startswith(
      "\nThe <ref>Left lung</ref>")                                   # the answer is the target


@pytest.mark.parametrize("context, image_tokens", [("skip", "cls"), ("only_emb", "patches"),
                                                   ("names", "cls")])
def test_host_batcher_renders_the_configured_context(tok, context, image_tokens):
  cfg = stage2_config.base_config("finetune")
  cfg.data.context, cfg.lm.image_tokens = context, image_tokens
  n = 1 if image_tokens == "cls" else 4
  batcher = batching.HostBatcher(tok, cfg.data, n, seed=0)
  features = {"boxes": np.tile(np.asarray(BOXES3, np.float32), (2, 1, 1)),
              "sentences": [SENTENCES3] * 2}
  arrays, _ = batcher([RECORD, RECORD], features, 0, train=True)
  tokens = arrays["tokens"]
  assert ((tokens == tok.image_id).sum(axis=1) == n).all()
  obj = np.isin(tokens, tok.obj_ids).sum(axis=1)
  assert (obj == (0 if context == "skip" else 3)).all()
  (example,) = batcher.examples([RECORD], features, 0, train=False, answer=False)
  assert example.context_mode == context and example.num_image_tokens == n


def test_configs_saved_before_the_switches_read_as_full():
  data = stage2_config.base_config("finetune").data.to_dict()
  del data["context"]
  batcher = batching.HostBatcher(None, ml_collections.ConfigDict(data), 4, seed=0)
  assert batcher.context == "full"


# ---------------------------------------------------------------- CLS image tokens

def test_lm_image_features_cls_is_one_token():
  memory, cls = jnp.ones((3, 1024, 256)), jnp.arange(3 * 256.0).reshape(3, 256)
  assert frozen_apm.lm_image_features(memory, cls).shape == (3, 1024, 256)
  one = frozen_apm.lm_image_features(memory, cls, "cls")
  assert one.shape == (3, 1, 256)
  np.testing.assert_array_equal(one[:, 0], cls)
  with pytest.raises(ValueError, match="lm.image_tokens must be one of"):
    frozen_apm.lm_image_features(memory, cls, "clsIT")


@pytest.fixture(scope="module")
def tiny_apm():
  """A tiny, randomly initialised APM (64 px: 2×2 patches) and a 2-sentence RAG database."""
  c = tiny.config("unused")
  model = apm_lib.APM(apm_lib.APMConfig.from_config(c.model))
  variables = model.init({"params": jax.random.key(0)}, jnp.zeros((1, 64, 64, 1)), train=False)
  variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
  rng = np.random.default_rng(0)
  emb = [rng.normal(size=(2, model.config.proj_dim)).astype(np.float32) for _ in range(36)]
  db = database.RagDatabase(anatomies=anatomy.ANATOMY_NAMES,
                            sentences=tuple((f"a{i}.", f"b{i}.") for i in range(36)),
                            embeddings=tuple(e / np.linalg.norm(e, axis=-1, keepdims=True)
                                             for e in emb), meta={})
  return c, model, variables, db


@pytest.mark.parametrize("image_tokens", frozen_apm.IMAGE_TOKENS)
def test_frozen_apm_cls_mode(tiny_apm, monkeypatch, image_tokens):
  c, model, variables, db = tiny_apm
  monkeypatch.setattr(frozen_apm.stage1_load, "load", lambda workdir, which: stage1_load.Loaded(
      c, model, variables, 7, {}))
  monkeypatch.setattr(frozen_apm.database, "load", lambda path: db)
  apm = frozen_apm.FrozenAPM("apm_workdir", image_tokens=image_tokens)
  images = np.random.default_rng(1).uniform(size=(2, 64, 64, 1)).astype(np.float32)
  out = apm(images)
  ref = model.apply(variables, jnp.asarray(images), train=False)
  d = model.config.hidden_dim
  assert apm.num_patches == 4 and out["cls"].shape == (2, d)
  np.testing.assert_allclose(out["cls"], ref["cls"], rtol=1e-5, atol=1e-6)
  if image_tokens == "cls":
    assert apm.num_image_tokens == 1 and out["memory"].shape == (2, 1, d)
    np.testing.assert_allclose(out["memory"][:, 0], ref["cls"], rtol=1e-5, atol=1e-6)
  else:
    assert apm.num_image_tokens == 4 and out["memory"].shape == (2, 4, d)
    np.testing.assert_allclose(out["memory"], ref["memory"], rtol=1e-5, atol=1e-6)
  assert out["boxes"].shape == (2, 36, 4) and len(out["sentences"][0]) == 36


def test_frozen_apm_rejects_unknown_image_tokens():
  with pytest.raises(ValueError, match="lm.image_tokens must be one of"):
    frozen_apm.FrozenAPM("never_read", image_tokens="CLS")


# ---------------------------------------------------------------- --mode=eval overrides, labels

def _train_cfg(phase, **fields):
  cfg = stage2_config.base_config(phase)
  for key, value in fields.items():
    section, field = key.split(".")
    cfg[section][field] = value
  return cfg


def test_ablation_labels():
  ev = eval_config.get_config().evaluate
  setting = evaluate.ablation(_train_cfg("finetune"), ev)
  assert setting["label"] == "context=full, image=patches, phase=finetune"
  assert setting["overridden"] == []
  align = evaluate.ablation(_train_cfg("align", **{"lm.image_tokens": "cls"}), ev)
  assert align["label"] == "context=full, image=cls, phase=align"       # step 1 only
  ev.context = "skip"
  skip = evaluate.ablation(_train_cfg("finetune"), ev)
  assert skip["label"] == "context=skip, image=patches, phase=finetune (trained: context=full)"
  assert (skip["context"], skip["trained"]["context"], skip["overridden"]) == (
      "skip", "full", ["context"])
  same = evaluate.ablation(_train_cfg("finetune", **{"data.context": "skip"}), ev)
  assert same["label"] == "context=skip, image=patches, phase=finetune"  # trained with skip
  old = _train_cfg("finetune").to_dict()                 # a config saved before the switches
  del old["data"]["context"], old["lm"]["image_tokens"]
  ev.context = ""
  assert evaluate.ablation(ml_collections.ConfigDict(old), ev)["label"] == (
      "context=full, image=patches, phase=finetune")


class _FakeRun:
  """What ``inference.load`` needs of a ``task.Stage2Task``; its batcher is built from the config
  it is given, as the real one (``num_image_tokens`` as ``FrozenAPM``: 1 for CLS)."""

  def __init__(self, config, workdir, needs_data=True):
    del workdir, needs_data
    self.config = config
    self.mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
    self.rules = ()
    self.checkpointer = type("C", (), {"close": lambda self: None})()
    n = 1 if config.lm.get("image_tokens", "patches") == "cls" else 4
    self.batcher = batching.HostBatcher(None, config.data, n, seed=config.seed)

  def restore_params(self, step):
    return {}, step


def _fake_generate(trained, records, path, ev):
  """``generate_samples`` without images or a model: the prompts the run would generate from."""
  del ev
  features = {"boxes": np.tile(np.asarray(BOXES3, np.float32), (len(records), 1, 1)),
              "sentences": [SENTENCES3] * len(records)}
  examples = trained.run.batcher.examples(records, features, 0, train=False, answer=False)
  rows = [{"id": r["id"], "source": r["source"], "task": r["task"], "instruction": e.instruction,
           "reference": e.response, "answer": e.response, "prompt": e.text()}
          for r, e in zip(records, examples)]
  evaluate._write_rows(path, rows)
  return len(rows)


@pytest.mark.parametrize("phase, context, image_tokens", [
    ("finetune", "", ""), ("finetune", "skip", ""), ("align", "only_emb", "cls"),
    ("finetune", "names", "")])
def test_eval_override_reaches_the_prompt_and_labels_results(tmp_path, monkeypatch, phase,
                                                             context, image_tokens):
  data_dir = tmp_path / "data"
  records = [{**{k: v for k, v in RECORD.items() if k != "boxes"}, "id": f"v{i}",
              "source": "mimic_vqa", "split": "test", "task": "Close-Ended VQA",
              "responses": ["Yes"]} for i in range(2)]
  (data_dir / "mimic_vqa").mkdir(parents=True)
  schema.write_jsonl(str(data_dir / "mimic_vqa" / "test.jsonl"), records)
  train_cfg = _train_cfg(phase, **{"data.dir": str(data_dir)})
  monkeypatch.setattr(inference, "training_config",
                      lambda workdir, step=None: (ml_collections.ConfigDict(train_cfg.to_dict()), 5))
  monkeypatch.setattr(inference.task, "Stage2Task", _FakeRun)
  monkeypatch.setattr(evaluate, "generate_samples", _fake_generate)
  config = eval_config.get_config()
  config.evaluate.update(dict(context=context, image_tokens=image_tokens))
  config.evaluate.metrics.semantic_matching = "exact"
  workdir = tmp_path / "run"
  out = evaluate.evaluate(config, str(workdir))

  want_context = context or "full"
  suffix = "".join(f"_{k}-{v}" for k, v in (("context", context), ("image_tokens", image_tokens))
                   if v)
  assert out["out_dir"] == str(workdir / "eval" / f"test_step5{suffix}")
  samples = [json.loads(line) for line in open(f"{out['out_dir']}/samples.jsonl")]
  assert len(samples) == 2
  n = 1 if image_tokens == "cls" else 4
  rendered = _example(context=want_context, num_image_tokens=n, system_prompts=("",),
                      answer=False, record=records[0]).text()
  assert samples[0]["prompt"] == rendered
  assert ("Likely findings:" in rendered) == (want_context in ("full", "names"))
  assert rendered.count("<image>") == n
  label = f"context={want_context}, image={image_tokens or 'patches'}, phase={phase}"
  overridden = [f"{k}={v}" for k, v, given in (("context", "full", context),
                                               ("image_tokens", "patches", image_tokens)) if given]
  if overridden:
    label += " (trained: " + ", ".join(overridden) + ")"
  results = json.load(open(f"{out['out_dir']}/results.json"))
  assert results["ablation"]["label"] == label
  assert results["ablation"]["phase"] == phase
  assert results["skipped"]["baseline"].startswith("no train split: ")  # test split only
  markdown = open(f"{out['out_dir']}/results.md").read()
  assert markdown.splitlines()[0] == f"# Evaluation: run step 5 ({label})"
  assert f"| run step 5 | {label} |" in markdown


def test_markdown_without_a_setting_is_unchanged():
  results = {"table1": {"AG IoU": 0.5}, "groups": {}, "conventions": {}}
  text = tables.markdown({**results, "name": "other system"})
  assert text.splitlines()[0] == "# Evaluation: other system"
  assert "| model | AG IoU |" in text and "setting" not in text
