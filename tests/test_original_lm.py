"""The original AnatomiX's stage-2 model.pt in and out (stage2/original.py).

A model.pt is built here in the original's layout (PEFT's keys around a tiny random
Gemma3ForConditionalGeneration, nonzero LoRA A and B, a trained embedding table, the projection
heads; the dtypes PEFT gives a bfloat16 base), imported into a finetune workdir, and checked:
our logits against a torch re-enactment of the original's forward (LoRA merged as
W + (alpha/r)·B·A, its heads, the embeddings written at the placeholder tokens) and against the
PEFT model the original itself builds and loads; export back gives the same file; the workdir
serves --mode=predict and init_from; differing embed_tokens / lm_head copies import as an untied LM
(both tables); bad inputs are named.
"""

from __future__ import annotations

import json
import os
import shutil

import cv2
import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
import torch
import transformers

import tiny
from anatomix_jax import anatomy
from anatomix_jax.core import checkpointing, config as config_lib, sharding
from anatomix_jax.models import anatomix, gemma3
from anatomix_jax.rag import database
from anatomix_jax.stage1 import load as stage1_load
from anatomix_jax.stage2 import inference, original, predict, steps, task, tokenizer
from configs import predict as predict_config

S, F = "sliding_attention", "full_attention"
VOCAB, HIDDEN, LAYERS, RANK, ALPHA, HEAD_HIDDEN = 384, 24, 2, 2, 6.0, 8
OVERRIDES = {"lm.dtype": "float32", "lm.lora.rank": RANK, "lm.lora.alpha": ALPHA,
             "lm.projection_hidden": HEAD_HIDDEN}
PREFIX = "base_model.model.model.language_model."
HEAD = "base_model.model.lm_head."
MODULES = [("self_attn", n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
    ("mlp", n) for n in ("gate_proj", "up_proj", "down_proj")]
CORPUS = ["Image: the left lung shows an opacity.", "Likely findings: no pleural effusion.",
          "Task: find the right hemidiaphragm.", "box: (12,34),(56,78) heart size normal."] * 4


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """A tiny random Gemma3ForConditionalGeneration (MedGemma's layout) + a tokenizer with the 45
  AnatomiX tokens, saved as a HF directory; (path, torch model)."""
  path = str(tmp_path_factory.mktemp("base"))
  tok_dir = tokenizer.train_demo_tokenizer(CORPUS, os.path.join(path, "tok"), 340)
  tok = tokenizer.load_tokenizer(tok_dir)
  assert tok.vocab_size <= VOCAB
  text = transformers.Gemma3TextConfig(
      vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=37, num_hidden_layers=LAYERS,
      num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=5,
      layer_types=[S, F], query_pre_attn_scalar=11, max_position_embeddings=4096,
      final_logit_softcapping=None, pad_token_id=tok.pad_id, bos_token_id=tok.bos_id,
      eos_token_id=tok.eos_id).to_dict()
  vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=20,
                                           num_hidden_layers=1, num_attention_heads=2,
                                           image_size=28, patch_size=14).to_dict()
  config = transformers.Gemma3Config(text_config=text, vision_config=vision,
                                     mm_tokens_per_image=4, attn_implementation="eager")
  torch.manual_seed(0)
  model = transformers.Gemma3ForConditionalGeneration(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.normal_(0.0, 0.3 if "norm" in name else 0.15)
  model.save_pretrained(path)
  for name in os.listdir(tok_dir):
    shutil.copy(os.path.join(tok_dir, name), path)
  shutil.rmtree(tok_dir)
  return path, model


@pytest.fixture(scope="module")
def apm_workdir(tmp_path_factory):
  """A stage-1 workdir: a randomly initialised tiny APM (64 px: 2×2 patches) + a RAG database."""
  path = str(tmp_path_factory.mktemp("stage1"))
  c = tiny.config("unused")
  built = stage1_load.build(c, 0, 1, sharding.make_mesh(c.mesh),
                            tuple(tuple(r) for r in c.sharding_rules))
  ckpt = checkpointing.Checkpointer(os.path.join(path, "checkpoints"))
  ckpt.save(1, built.init(jax.random.key(0)), None,
            {"stage": "stage1", "config": json.loads(c.to_json_best_effort()), "text_dim": 0,
             "num_steps": 1}, force=True)
  ckpt.close()
  rng = np.random.default_rng(0)
  emb = [rng.normal(size=(2, built.model.config.proj_dim)) for _ in range(36)]
  database.save(database.RagDatabase(
      anatomies=anatomy.ANATOMY_NAMES, sentences=tuple((f"a{i}.", f"b{i}.") for i in range(36)),
      embeddings=tuple(e / np.linalg.norm(e, axis=-1, keepdims=True) for e in emb), meta={}),
      os.path.join(path, "rag"))
  return path, built.model.config


def _head(in_dim: int, seed: int) -> torch.nn.Sequential:
  """The original's MultiModalProjectionhead.proj, random (LayerNorm affine too)."""
  torch.manual_seed(seed)
  head = torch.nn.Sequential(torch.nn.Linear(in_dim, HEAD_HIDDEN), torch.nn.GELU(),
                             torch.nn.LayerNorm(HEAD_HIDDEN), torch.nn.Linear(HEAD_HIDDEN, HIDDEN))
  with torch.no_grad():
    head[2].weight.normal_(1.0, 0.3)
    head[2].bias.normal_(0.0, 0.3)
  return head


def _original_lm(model, apm_config) -> dict:
  """``LM`` of a step-2 model.pt (``LMModel.save_pretrained``): LoRA float32, tables bfloat16
  (the two ``original_module`` keys one tensor, as MedGemma's tied table), heads float32."""
  torch.manual_seed(2)
  base_table = model.get_input_embeddings().weight.detach().to(torch.bfloat16)
  trained = (model.get_input_embeddings().weight.detach()
             + 0.05 * torch.randn(VOCAB, HIDDEN)).to(torch.bfloat16)
  core = {f"{PREFIX}embed_tokens.original_module.weight": base_table,
          f"{PREFIX}embed_tokens.modules_to_save.default.weight": trained}
  for i in range(LAYERS):
    for group, name in MODULES:
      out_dim, in_dim = model.get_submodule(
          f"model.language_model.layers.{i}.{group}.{name}").weight.shape
      key = f"{PREFIX}layers.{i}.{group}.{name}"
      core[f"{key}.lora_A.default.weight"] = 0.2 * torch.randn(RANK, in_dim)
      core[f"{key}.lora_B.default.weight"] = 0.2 * torch.randn(out_dim, RANK)
  core[f"{HEAD}original_module.weight"] = base_table
  core[f"{HEAD}modules_to_save.default.weight"] = trained.clone()
  wrapper = {}
  for name, in_dim, seed in (("image_projectionhead", apm_config.hidden_dim, 3),
                             ("obj_projectionhead", apm_config.proj_dim, 4)):
    wrapper.update({f"{name}.proj.{k}": v for k, v in _head(in_dim, seed).state_dict().items()})
  return {"core_model": core, "wrapper": wrapper}


@pytest.fixture(scope="module")
def model_pt(base, apm_workdir, tmp_path_factory):
  """A HF Trainer output directory holding checkpoint-7/model.pt (and an older checkpoint-3)."""
  root = tmp_path_factory.mktemp("original")
  lm = _original_lm(base[1], apm_workdir[1])
  for step in (3, 7):
    os.makedirs(root / f"checkpoint-{step}")
    torch.save({"apm": None, "LM": lm}, root / f"checkpoint-{step}" / "model.pt")
  return str(root), lm


@pytest.fixture(scope="module")
def imported(base, apm_workdir, model_pt, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("imported") / "workdir")
  info = original.import_lm(model_pt[0], base[0], apm_workdir[0], out, overrides=OVERRIDES)
  return out, info


def _eval_config():
  return ml_collections.ConfigDict({"mesh": config_lib.mesh_config(shape=(1, -1, 1)),
                                    "sharding_rules": config_lib.DEFAULT_RULES})


@pytest.fixture(scope="module")
def trained(imported):
  return inference.load(_eval_config(), imported[0])


def _prompt(tok) -> np.ndarray:
  text = ("<start_of_turn>user\nImage: <image_start>" + "<image>" * 4 + "<image_end>\n"
          "Likely findings:\nemb:<emb><obj_3></emb> box:<box>(12,34),(56,78)</box> left lung\n"
          "emb:<emb><obj_35></emb> box:<box>(1,2),(3,4)</box> heart\nTask: find the heart"
          "<end_of_turn>\n<start_of_turn>model\n")
  return np.asarray([tok.tokenizer.encode(text)])


def _features():
  rng = np.random.default_rng(5)
  return (rng.normal(size=(1, 4, 12)).astype(np.float32),
          rng.normal(size=(1, 36, 16)).astype(np.float32))


def _inject(embeds, ids, image, objects, tok):
  """The original's LMModel.forward: projected features masked_scatter-ed at the placeholders."""
  mask = (ids == tok.image_id)[..., None].expand_as(embeds)
  embeds = embeds.masked_scatter(mask, image)
  for i, token in enumerate(tok.obj_ids):
    mask = (ids == token)[..., None].expand_as(embeds)
    if mask.any():
      embeds = embeds.masked_scatter(mask, objects[:, i:i + 1])
  return embeds


def _torch_heads(wrapper):
  heads = {}
  for name in ("image_projectionhead", "obj_projectionhead"):
    state = {k.removeprefix(f"{name}.proj."): v.float() for k, v in wrapper.items()
             if k.startswith(name)}
    heads[name] = _head(state["0.weight"].shape[1], 0)
    heads[name].load_state_dict(state)
  return heads


def _reenacted_logits(base_dir, lm, ids, image, objects, tok):
  """HF Gemma3 with W + (alpha/r)·B·A merged, the trained tables, the original's injection."""
  model = transformers.Gemma3ForConditionalGeneration.from_pretrained(
      base_dir, dtype=torch.float32, attn_implementation="eager").eval()
  core = lm["core_model"]
  with torch.no_grad():
    for key, a in core.items():
      if ".lora_A." in key:
        module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
        b = core[key.replace(".lora_A.", ".lora_B.")]
        model.get_submodule(module).weight += (ALPHA / RANK) * (b.float() @ a.float())
    text = model.model.language_model
    text.embed_tokens.weight = torch.nn.Parameter(
        core[f"{PREFIX}embed_tokens.modules_to_save.default.weight"].float())
    model.lm_head.weight = torch.nn.Parameter(core[f"{HEAD}modules_to_save.default.weight"].float())
    heads = _torch_heads(lm["wrapper"])
    ids = torch.tensor(ids)
    embeds = _inject(text.embed_tokens(ids), ids, heads["image_projectionhead"](torch.tensor(image)),
                     heads["obj_projectionhead"](torch.tensor(objects)), tok)
    hidden = text(inputs_embeds=embeds, attention_mask=torch.ones_like(ids)).last_hidden_state
    return model.lm_head(hidden).numpy()


def _our_logits(trained, ids, image, objects):
  params = jax.device_get(trained.params)
  mask = np.ones_like(ids, np.int32)
  logits, = anatomix.AnatomiX(trained.run.model_config).apply(
      {"params": params}, ids.astype(np.int32), image, objects,
      positions=gemma3.positions_from_mask(mask), attention_mask=mask)
  return np.asarray(logits)


def test_import_writes_a_finetune_workdir(imported, model_pt):
  workdir, info = imported
  assert info["step"] == 7 and info["source"].endswith("checkpoint-7/model.pt")
  assert (info["rank"], info["alpha"], info["lm_head_max_abs_diff"]) == (RANK, ALPHA, 0.0)
  assert info["table"] == "tied"  # the default for equal copies: one table, the same logits
  assert sorted(os.listdir(os.path.dirname(workdir))) == ["workdir"]  # no temporary left
  config, step = inference.training_config(workdir)
  assert step == 7 and config.phase == "finetune" and config.lm.lora.rank == RANK
  meta = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints")).read_meta(7)
  assert meta["stage"] == "stage2" and meta["trainable_groups"] == ["projection", "lora",
                                                                    "embedding"]
  assert meta["imported_from"]["file"] == info["source"]


def test_logits_equal_the_originals_forward(base, model_pt, trained):
  tok = trained.run.tok
  ids = _prompt(tok)
  assert (ids == tok.image_id).sum() == 4 and ids.shape[1] > 10  # longer than the window (5)
  image, objects = _features()
  ours = _our_logits(trained, ids, image, objects)
  ref = _reenacted_logits(base[0], model_pt[1], ids, image, objects, tok)
  assert np.abs(ref).max() > 1.0
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def _read(path):
  return torch.load(path, weights_only=True, map_location="cpu")


def test_export_round_trip(imported, model_pt, tmp_path):
  out = original.export_lm(imported[0], str(tmp_path))
  assert out["path"] == str(tmp_path / "model.pt") and out["step"] == 7
  got, want = _read(out["path"]), {"apm": None, "LM": model_pt[1]}
  assert got.keys() == want.keys() and got["apm"] is None
  for part in ("core_model", "wrapper"):
    assert list(got["LM"][part]) == list(want["LM"][part])
    for key, value in want["LM"][part].items():
      assert got["LM"][part][key].dtype == value.dtype, key
      assert torch.equal(got["LM"][part][key], value), key
  core = got["LM"]["core_model"]
  # MedGemma's tied table is stored once, as in the original's file.
  assert (core[f"{PREFIX}embed_tokens.original_module.weight"].data_ptr()
          == core[f"{HEAD}original_module.weight"].data_ptr())


def test_scanned_layers_round_trip(base, apm_workdir, model_pt, tmp_path):
  workdir = str(tmp_path / "scanned")
  original.import_lm(model_pt[0], base[0], apm_workdir[0], workdir,
                     overrides={**OVERRIDES, "lm.scan_layers": True})
  got = _read(original.export_lm(workdir, str(tmp_path / "m.pt"))["path"])["LM"]
  for part in ("core_model", "wrapper"):
    assert list(got[part]) == list(model_pt[1][part])
    assert all(torch.equal(got[part][k], v) for k, v in model_pt[1][part].items())


def test_peft_loads_the_export_as_the_original_does(base, imported, trained, tmp_path):
  """The original's own path: PEFT around Gemma3ForConditionalGeneration (vision tower removed),
  ``load_state_dict(core_model, strict=False)``, its forward."""
  peft = pytest.importorskip("peft")
  lm = _read(original.export_lm(imported[0], str(tmp_path / "m.pt"))["path"])["LM"]
  model = transformers.Gemma3ForConditionalGeneration.from_pretrained(
      base[0], dtype=torch.float32, attn_implementation="eager")
  model.model.vision_tower = model.model.multi_modal_projector = None
  peft_model = peft.get_peft_model(model, peft.LoraConfig(
      r=RANK, lora_alpha=ALPHA, lora_dropout=0.05, bias="none", target_modules="all-linear",
      task_type="CAUSAL_LM", modules_to_save=["lm_head", "embed_tokens"])).eval()
  saved = {k for k in peft_model.state_dict()
           if "lora_" in k or "lm_head" in k or "embed_tokens" in k}  # LMModel.save_pretrained
  assert saved == set(lm["core_model"])
  result = peft_model.load_state_dict(lm["core_model"], strict=False)
  assert result.unexpected_keys == []
  tok = trained.run.tok
  ids = _prompt(tok)
  image, objects = _features()
  heads = _torch_heads(lm["wrapper"])
  with torch.no_grad():
    t = torch.tensor(ids)
    embeds = _inject(peft_model.get_input_embeddings()(t), t,
                     heads["image_projectionhead"](torch.tensor(image)),
                     heads["obj_projectionhead"](torch.tensor(objects)), tok)
    hidden = peft_model.model.model.language_model(
        inputs_embeds=embeds, attention_mask=torch.ones_like(t)).last_hidden_state
    ref = peft_model.lm_head(hidden).numpy()
  # The export rounds the table to bfloat16 (as the original stores it); the import was exact.
  np.testing.assert_allclose(_our_logits(trained, ids, image, objects), ref, atol=1e-4, rtol=0)


def test_predict_and_init_from_take_the_workdir(base, apm_workdir, imported, trained, tmp_path):
  image = np.full((80, 64), 30, np.uint8)
  image[20:50, 10:40] = 200
  cv2.imwrite(str(tmp_path / "x.png"), image)
  c = predict_config.get_config()
  c.predict.update(dict(inputs=str(tmp_path / "x.png"), max_new_tokens=2, overlay=False,
                        output_dir=str(tmp_path / "predict"), task="anatomy_grounding",
                        query="left lung"))
  summary = predict.predict(c, imported[0])
  assert summary["images"] == 1 and summary["checkpoint_step"] == 7
  with open(tmp_path / "predict" / "x.json") as f:
    assert isinstance(json.load(f)["answer"], str)
  # A finetune run with init_from = the imported workdir starts from its leaves.
  config = original.import_config(base[0], apm_workdir[0], OVERRIDES)
  config.init_from = imported[0]
  run = task.Stage2Task(config, str(tmp_path / "ft"), needs_data=False)
  try:
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
      started, _ = run.load_frozen_and_trainable()
  finally:
    run.checkpointer.close()
  want, _ = steps.split(jax.device_get(trained.params), run.groups)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(started), want)


# --- bad inputs ------------------------------------------------------------------------------------

def _variant(lm, tmp_path, edit):
  lm = {"core_model": dict(lm["core_model"]), "wrapper": dict(lm["wrapper"])}
  obj = edit(lm)
  path = tmp_path / "model.pt"
  torch.save({"apm": None, "LM": lm} if obj is None else obj, path)
  return str(path)


def _drop(key):
  def edit(lm):
    part = "wrapper" if key in lm["wrapper"] else "core_model"
    del lm[part][key]
  return edit


def _untie(lm):
  key = f"{HEAD}modules_to_save.default.weight"
  lm["core_model"][key] = lm["core_model"][key] + 1


@pytest.mark.parametrize("edit, overrides, match", [
    (lambda lm: {"apm": None}, {}, r"model.pt: no 'LM' entry"),
    (lambda lm: {"apm": None, "LM": {"core_model": lm["core_model"]}}, {},
     r"model.pt: 'LM' has no 'wrapper' dict"),
    (lambda lm: None, {"lm.lora.rank": 4},
     r"model.pt: LM.core_model.base_model.*lora_[AB].default.weight has shape .* rank 2; the "
     r"config's lm.lora.rank is 4"),
    (_drop(f"{PREFIX}layers.1.mlp.down_proj.lora_B.default.weight"), {},
     r"model.pt: LM.core_model lacks base_model.model.model.language_model.layers.1.mlp.down_proj"
     r".lora_B.default.weight"),
    (lambda lm: None, {"lm.lora.targets": ("q_proj", "v_proj")},
     r"model.pt: LM.core_model.base_model.*\.(k|o|gate|up|down)_proj.lora_[AB].default.weight: .* "
     r"is not a LoRA target"),
    (lambda lm: lm["core_model"].update({
        f"{PREFIX}embed_tokens.original_module.weight":
            lm["core_model"][f"{PREFIX}embed_tokens.original_module.weight"] * 2}), {},
     r"model.pt: LM.core_model.*embed_tokens.original_module.weight differs from the base "
     r"model's embedding table"),
    (_drop("obj_projectionhead.proj.2.bias"), {},
     r"model.pt: LM.wrapper lacks obj_projectionhead.proj.2.bias"),
    (lambda lm: None, {"lm.projection_hidden": 16},
     r"model.pt: LM.wrapper.\w+.proj.0.weight has shape \(8, \d+\), this model needs \(16,"),
])
def test_bad_model_pt_is_named(base, apm_workdir, model_pt, tmp_path, edit, overrides, match):
  path = _variant(model_pt[1], tmp_path, edit)
  out = tmp_path / "out" / "workdir"
  with pytest.raises(original.OriginalCheckpointError, match=match):
    original.import_lm(path, base[0], apm_workdir[0], str(out), overrides={**OVERRIDES,
                                                                          **overrides})
  assert not out.exists() and (not (tmp_path / "out").exists()
                               or os.listdir(tmp_path / "out") == [])


def _train_apart(lm):
  """The original's lm_head copy trained apart from its embed_tokens copy (stored bfloat16)."""
  key = f"{HEAD}modules_to_save.default.weight"
  torch.manual_seed(6)
  lm["core_model"][key] = (lm["core_model"][key].float()
                           + 0.05 * torch.randn(VOCAB, HIDDEN)).to(torch.bfloat16)


def test_untied_tables_import_both_by_default(base, apm_workdir, model_pt, trained, tmp_path):
  """Differing embed_tokens / lm_head copies → an untied LM by default (the workdir's config sets
  lm.tie_word_embeddings = False; the finetune phase trains both tables): the original's forward
  with both tables, and export writes the same file back."""
  lm = {"core_model": dict(model_pt[1]["core_model"]), "wrapper": dict(model_pt[1]["wrapper"])}
  _train_apart(lm)
  path = tmp_path / "model.pt"
  torch.save({"apm": None, "LM": lm}, path)
  workdir = str(tmp_path / "w")
  info = original.import_lm(str(path), base[0], apm_workdir[0], workdir, overrides=OVERRIDES)
  assert info["table"] == "untied" and info["lm_head_max_abs_diff"] > 0.05
  config, _ = inference.training_config(workdir)
  assert config.lm.tie_word_embeddings is False
  untied = inference.load(_eval_config(), workdir)
  assert not untied.run.model_config.lm.tie_word_embeddings
  assert sorted(untied.run.groups) == ["embedding", "lora", "projection"]
  assert {"lm/embedder/embedding", "lm/embedder/lm_head"} <= {
      "/".join(k.key for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(
          steps.split(jax.device_get(untied.params), untied.run.groups)[0])}
  tok = untied.run.tok
  ids = _prompt(tok)
  image, objects = _features()
  ours = _our_logits(untied, ids, image, objects)
  ref = _reenacted_logits(base[0], lm, ids, image, objects, tok)
  print(f"untied import: max |ours - original's forward| = {np.abs(ours - ref).max():.2e}")
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
  assert np.abs(ours - _our_logits(trained, ids, image, objects)).max() > 0.1  # lm_head matters
  got = _read(original.export_lm(workdir, str(tmp_path / "out.pt"))["path"])["LM"]
  for part in ("core_model", "wrapper"):
    assert list(got[part]) == list(lm[part])
    for key, value in lm[part].items():
      assert got[part][key].dtype == value.dtype and torch.equal(got[part][key], value), key
  # table="tied" refuses the differing copies, naming both keys.
  with pytest.raises(original.OriginalCheckpointError,
                     match=r"model.pt: the input table .*embed_tokens.modules_to_save.default"
                           r".weight and the output table .*lm_head.modules_to_save.default"
                           r".weight differ .*table='untied'"):
    original.import_lm(str(path), base[0], apm_workdir[0], str(tmp_path / "t"),
                       overrides=OVERRIDES, table="tied")
  assert not (tmp_path / "t").exists()


def test_untied_tables_import_one_copy_on_request(base, apm_workdir, model_pt, tmp_path):
  # Saved as LMModel.save_pretrained(path) writes it (src/models/LM.py): the LM dict alone.
  path = _variant(model_pt[1], tmp_path, lambda lm: _untie(lm) or lm)
  info = original.import_lm(path, base[0], apm_workdir[0], str(tmp_path / "w"),
                            overrides=OVERRIDES, table="lm_head")
  assert info["lm_head_max_abs_diff"] > 0.9 and info["step"] == 0 and info["table"] == "lm_head"


def test_base_without_rows_for_the_anatomix_tokens(base, apm_workdir, model_pt, tmp_path):
  small = tmp_path / "small"
  shutil.copytree(base[0], small)
  with open(small / "config.json") as f:
    config = json.load(f)
  config["text_config"]["vocab_size"] = 300  # < the tokenizer's 45 added ids
  with open(small / "config.json", "w") as f:
    json.dump(config, f)
  out = tmp_path / "out"
  with pytest.raises(original.OriginalCheckpointError,
                     match=r"small: its embedding table has 300 rows, but its tokenizer with the "
                           r"45 AnatomiX tokens has \d+"):
    original.import_lm(os.path.join(model_pt[0], "checkpoint-7"), str(small), apm_workdir[0],
                       str(out / "w"), overrides=OVERRIDES)
  assert os.listdir(out) == []


def test_existing_workdir_and_missing_file(base, apm_workdir, imported, tmp_path):
  with pytest.raises(FileExistsError, match="exists"):
    original.import_lm(str(tmp_path), base[0], apm_workdir[0], imported[0])
  with pytest.raises(FileNotFoundError, match="no model.pt and no checkpoint-N/model.pt"):
    original.import_lm(str(tmp_path), base[0], apm_workdir[0], str(tmp_path / "w"))


def test_import_and_export_commands_run_the_library(base, apm_workdir, model_pt, tmp_path,
                                                    monkeypatch):
  """``--mode=import`` / ``--mode=export_original`` (anatomix_jax.original with
  configs/original.py): a stage-2-only import beside an existing stage-1 workdir, then back."""
  import functools  # noqa: PLC0415

  from anatomix_jax import main, original as commands  # noqa: PLC0415
  from configs import original as original_config  # noqa: PLC0415

  # The tiny test LM's LoRA rank/alpha differ from the paper's defaults that the command uses.
  monkeypatch.setattr(commands.stage2_original, "import_lm",
                      functools.partial(original.import_lm, overrides=OVERRIDES))
  config = original_config.get_config()
  assert main._runner(config, "import") is commands.run_import  # noqa: SLF001
  with pytest.raises(ValueError, match="stage1_workdir"):
    commands.run_import(ml_collections.ConfigDict({**config.to_dict(),
                                                   "lm_checkpoint": model_pt[0]}), str(tmp_path))
  config.update(dict(lm_checkpoint=model_pt[0], lm_model_dir=base[0], stage1_workdir=apm_workdir[0]))
  written = commands.run_import(config, str(tmp_path / "imported"))
  assert written["stage2"]["workdir"] == str(tmp_path / "imported" / "stage2")
  assert written["stage2"]["table"] == config.lm_table == "untied"  # both copies, equal here
  assert not os.path.exists(tmp_path / "imported" / "stage1")  # no APM file given: none written
  export = original_config.get_config()
  export.stage2_workdir = written["stage2"]["workdir"]
  out = commands.run_export(export, str(tmp_path / "exported"))
  got = _read(out["stage2"]["path"])["LM"]["core_model"]
  for key, value in model_pt[1]["core_model"].items():
    assert torch.equal(got[key], value), key
