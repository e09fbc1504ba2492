"""evaluation.clinical: DistilBERT loading, BERTScore and CheXbert against torch re-enactments
written here with transformers' models, CheXbert F1 against hand-computed values, RadGraph."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from anatomix_jax.convert import hf_bert
from anatomix_jax.evaluation import clinical
from anatomix_jax.models.bert import BertModel

# Prime-ish sizes (a transposed or mis-split tensor cannot pass by symmetry).
TINY_BERT = dict(vocab_size=97, hidden_size=21, num_hidden_layers=3, num_attention_heads=3,
                 intermediate_size=37, max_position_embeddings=40, type_vocab_size=2)
TINY_DISTIL = dict(vocab_size=97, dim=21, n_layers=3, n_heads=3, hidden_dim=37,
                   max_position_embeddings=40, activation="gelu")
WORDS = ["the", "lung", "lungs", "heart", "is", "are", "normal", "no", "effusion", "left", "right",
         "small", "clear", "size", "pleural", "pneumothorax", "opacity", "base", "mild", "with",
         "and", "of", "in", "at", "stable", "."]
LETTERS = "abcdefghijklmnopqrstuvwxyz"
LONG = ("the heart is enlarged with bilateral lower lobe edema and a moderate right pleural "
        "effusion")  # > 40 tokens: out-of-vocabulary words split into letters
REFS = ["the lungs are clear.", "no pleural effusion.", "mild cardiomegaly.", "",
        "stable right base opacity", LONG, "no pneumothorax."]
HYPS = ["the lungs are clear.", "small left pleural effusion.", "the heart size is normal.",
        "no effusion", "   ", "the heart is normal", "no pneumothorax. the lungs are clear."]


def _vocab(size: int) -> dict[str, int]:
  tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + list(LETTERS)
  tokens += ["##" + c for c in LETTERS]
  tokens += [f"[unused{i}]" for i in range(size - len(tokens))]
  return {t: i for i, t in enumerate(tokens)}


def _save_tokenizer(path: str) -> None:
  transformers.BertTokenizer(vocab=_vocab(97)).save_pretrained(path)


@pytest.fixture(scope="module")
def distil(tmp_path_factory):
  """(directory, torch DistilBertModel): random tiny DistilBERT as safetensors + tokenizer."""
  path = str(tmp_path_factory.mktemp("tiny_distilbert"))
  torch.manual_seed(0)
  model = transformers.DistilBertModel(transformers.DistilBertConfig(**TINY_DISTIL)).eval()
  model.save_pretrained(path, safe_serialization=True)
  _save_tokenizer(path)
  return path, model


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
  """(directory, torch BertModel): random tiny BERT as safetensors + tokenizer."""
  path = str(tmp_path_factory.mktemp("tiny_bert"))
  torch.manual_seed(1)
  model = transformers.BertModel(transformers.BertConfig(**TINY_BERT)).eval()
  model.save_pretrained(path, safe_serialization=True)
  _save_tokenizer(path)
  return path, model


def _batch():
  """Three right-padded sequences of lengths 7, 3 and 11 (T = 11)."""
  rng = np.random.default_rng(0)
  ids = np.zeros((3, 11), np.int64)
  mask = np.zeros((3, 11), np.int64)
  for i, n in enumerate((7, 3, 11)):
    ids[i, :n] = [2, *rng.integers(5, 97, n - 2), 3]
    mask[i, :n] = 1
  return ids, mask


# --- DistilBERT loading ---------------------------------------------------------------------------

def test_distilbert_matches_transformers(distil):
  path, torch_model = distil
  assert hf_bert.read_model_type(path) == "distilbert"
  config, params = hf_bert.load_bert(path)
  assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
          config.intermediate_size, config.type_vocab_size, config.layer_norm_eps,
          config.hidden_act) == (21, 3, 3, 37, 1, 1e-12, "gelu")
  np.testing.assert_array_equal(params["embeddings"]["token_type_embeddings"]["embedding"],
                                np.zeros((1, 21)))
  ids, mask = _batch()
  with torch.no_grad():
    ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
  ref = ref.last_hidden_state.numpy()
  ours = np.asarray(BertModel(config).apply({"params": params}, jnp.asarray(ids),
                                            jnp.asarray(mask)))
  assert np.abs((ours - ref) * mask[..., None]).max() <= 1e-5


def test_distilbert_masked_lm_layout(tmp_path):
  torch.manual_seed(2)
  mlm = transformers.DistilBertForMaskedLM(transformers.DistilBertConfig(**TINY_DISTIL)).eval()
  mlm.save_pretrained(tmp_path, safe_serialization=True)
  config, params = hf_bert.load_bert(tmp_path)  # "distilbert." prefix; vocab_* heads ignored
  ids, mask = _batch()
  with torch.no_grad():
    ref = mlm.distilbert(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
  ours = np.asarray(BertModel(config).apply({"params": params}, jnp.asarray(ids),
                                            jnp.asarray(mask)))
  assert np.abs((ours - ref.last_hidden_state.numpy()) * mask[..., None]).max() <= 1e-5


def test_distilbert_name_table_covers_the_state_dict(distil):
  config = hf_bert.read_config(distil[0])
  keys = {k for k in distil[1].state_dict() if not k.endswith("position_ids")}
  assert set(hf_bert.expected_hf_shapes(config, "distilbert")) == keys


def _edit_config(src: str, dst, **change) -> str:
  os.makedirs(dst, exist_ok=True)
  with open(os.path.join(src, "config.json")) as f:
    cfg = json.load(f)
  cfg.update(change)
  cfg = {k: v for k, v in cfg.items() if v is not None}
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(cfg, f)
  return str(dst)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "roberta"}, "model_type 'roberta' is not supported; supported: bert, "
                                "distilbert"),
    ({"dim": None}, "missing required field.*dim"),
    ({"activation": "swish"}, "activation 'swish' is not supported"),
])
def test_distilbert_bad_config(distil, tmp_path, change, message):
  path = _edit_config(distil[0], tmp_path, **change)
  with pytest.raises(ValueError, match=r"config\.json: .*" + message):
    hf_bert.read_config(path)


def test_distilbert_wrong_shape_names_the_tensor(distil, tmp_path):
  from safetensors.numpy import load_file, save_file  # noqa: PLC0415
  path = str(tmp_path / "m")
  shutil.copytree(distil[0], path)
  tensors = load_file(os.path.join(path, "model.safetensors"))
  tensors["transformer.layer.1.ffn.lin1.weight"] = np.zeros((36, 21), np.float32)
  save_file(tensors, os.path.join(path, "model.safetensors"))
  with pytest.raises(ValueError, match=r"model\.safetensors: transformer\.layer\.1\.ffn\.lin1\."
                                       r"weight has shape \(36, 21\), expected \(37, 21\)"):
    hf_bert.load_bert(path)


# --- BERTScore ------------------------------------------------------------------------------------

def _bertscore_reference(torch_model, tokenizer, refs, hyps, layer, max_tokens, baseline=None):
  """bert_score with idf=False at batch size 1, re-enacted: hidden_states[layer], unit vectors,
  greedy max over the cosine matrix, [CLS]/[SEP] left out of the averages; empty → 0."""

  def encode(text):
    text = text.strip()
    if not text:
      return [tokenizer.cls_token_id, tokenizer.sep_token_id]
    return tokenizer.encode(text, add_special_tokens=True, truncation=True, max_length=max_tokens)

  def embed(ids):
    with torch.no_grad():
      out = torch_model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    h = out.hidden_states[layer][0].double().numpy()
    return h / np.linalg.norm(h, axis=-1, keepdims=True)

  rows = []
  for ref, hyp in zip(refs, hyps):
    r_ids, h_ids = encode(ref), encode(hyp)
    if len(r_ids) == 2 or len(h_ids) == 2:
      rows.append((0.0, 0.0, 0.0))
      continue
    sim = embed(h_ids) @ embed(r_ids).T  # [hyp tokens, ref tokens]
    p = sim[1:-1].max(axis=1).mean()
    r = sim[:, 1:-1].max(axis=0).mean()
    rows.append((p, r, 2 * p * r / (p + r)))
  scores = np.asarray(rows)
  if baseline is not None:
    scores = (scores - np.asarray(baseline)) / (1 - np.asarray(baseline))
  return scores


@pytest.mark.parametrize("which", ["bert", "distil"])
def test_bertscore_matches_reenactment(which, request):
  path, torch_model = request.getfixturevalue(which)
  scorer = clinical.BertScorer(path, num_layers=2, batch_size=4)
  assert "NOT rescaled" in scorer.variant and "layer 2 of 3" in scorer.variant
  out = scorer(REFS, HYPS)
  assert set(out) == {"precision", "recall", "f1"}
  assert all(v.shape == (7,) and v.dtype == np.float32 for v in out.values())
  want = _bertscore_reference(torch_model, scorer.tokenizer, REFS, HYPS, 2, 40)
  got = np.stack([out["precision"], out["recall"], out["f1"]], axis=1)
  assert np.abs(got - want).max() <= 1e-5
  assert len(scorer.encode(LONG)) == 40  # truncated to max_position_embeddings
  np.testing.assert_allclose(got[0], 1.0, atol=1e-6)  # identical strings
  np.testing.assert_array_equal(got[3:5], 0.0)  # an empty reference / candidate


def test_bertscore_rescaling(distil, tmp_path):
  path, torch_model = distil
  baseline = (0.3, 0.4, 0.5)
  by_numbers = clinical.BertScorer(path, num_layers=1, baseline=baseline)
  assert "rescaled with baseline (P, R, F) = (0.3, 0.4, 0.5)" in by_numbers.variant
  tsv = tmp_path / "distilbert-base-uncased.tsv"
  tsv.write_text("LAYER,P,R,F\n0,0.1,0.1,0.1\n1,0.3,0.4,0.5\n2,0.6,0.6,0.6\n")
  by_file = clinical.BertScorer(path, num_layers=1, baseline=str(tsv))
  want = _bertscore_reference(torch_model, by_numbers.tokenizer, REFS, HYPS, 1, 40, baseline)
  for scorer in (by_numbers, by_file):
    out = scorer(REFS, HYPS)
    got = np.stack([out["precision"], out["recall"], out["f1"]], axis=1)
    assert np.abs(got - want).max() <= 1e-5
  np.testing.assert_allclose(got[3], [-0.3 / 0.7, -0.4 / 0.6, -1.0], rtol=1e-6)  # empty pair


def test_bertscore_bad_arguments(distil, tmp_path):
  path = distil[0]
  with pytest.raises(ValueError, match=r"num_layers must be in \[1, 3\]"):
    clinical.BertScorer(path, num_layers=4)
  with pytest.raises(FileNotFoundError, match="nope.tsv: no such BERTScore baseline file"):
    clinical.BertScorer(path, num_layers=1, baseline=str(tmp_path / "nope.tsv"))
  tsv = tmp_path / "short.tsv"
  tsv.write_text("LAYER\tP\tR\tF\n0\t0.1\t0.1\t0.1\n")
  with pytest.raises(ValueError, match="short.tsv: no baseline row for layer 2"):
    clinical.BertScorer(path, num_layers=2, baseline=str(tsv))
  scorer = clinical.BertScorer(path, num_layers=1)
  with pytest.raises(ValueError, match="differ in length: 2 vs 1"):
    scorer(["a", "b"], ["a"])
  with pytest.raises(TypeError, match=r"hyps\[0\] is a NoneType"):
    scorer(["a"], [None])
  assert scorer([], [])["f1"].shape == (0,)


# --- CheXbert -------------------------------------------------------------------------------------

class _TorchCheXbert(torch.nn.Module):
  """CheXbert's bert_labeler layout: ``bert`` + ``linear_heads`` (13 × 4-way, 1 × 2-way)."""

  def __init__(self, config):
    super().__init__()
    self.bert = transformers.BertModel(config)
    heads = [torch.nn.Linear(config.hidden_size, 4) for _ in range(13)]
    self.linear_heads = torch.nn.ModuleList(heads + [torch.nn.Linear(config.hidden_size, 2)])


REPORTS = ["the lungs are clear.", "No pleural effusion.\n\n  Mild   cardiomegaly.", "",
           LONG + " " + LONG, "stable left base opacity", "small right pneumothorax",
           "the heart size is normal. no effusion.", "mild opacity at the right lung base"]


@pytest.fixture(scope="module")
def chexbert(tmp_path_factory):
  """(checkpoint path, bert dir, torch module, state dict as saved)."""
  root = tmp_path_factory.mktemp("chexbert")
  torch.manual_seed(3)
  config = transformers.BertConfig(**TINY_BERT)
  module = _TorchCheXbert(config).eval()
  bert_dir = str(root / "bert-base-uncased")
  config.save_pretrained(bert_dir)  # config.json only: no weights
  _save_tokenizer(bert_dir)
  # A random BERT's [CLS] state barely moves with the text: centre each head on the reports'
  # mean [CLS] state and scale it up, so that the labels vary from report to report.
  tokenizer = transformers.BertTokenizer.from_pretrained(bert_dir)
  enc = tokenizer(REPORTS, padding=True, truncation=True, max_length=40, return_tensors="pt")
  with torch.no_grad():
    mean_cls = module.bert(**enc).last_hidden_state[:, 0].mean(0)
    for head in module.linear_heads:
      head.weight.mul_(20.0)
      head.bias.copy_(-head.weight @ mean_cls)
  state = {"module." + k: v for k, v in module.state_dict().items()}
  state["module.bert.embeddings.position_ids"] = torch.arange(40)[None]  # older checkpoints
  checkpoint = str(root / "chexbert.pth")
  torch.save({"epoch": 4, "model_state_dict": state,
              "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 2e-5}]}}, checkpoint)
  return checkpoint, bert_dir, module, state


def _chexbert_reference(module, tokenizer, texts, max_tokens):
  """CheXbert's label.py re-enacted: its report cleaning and tokenisation, padded batch, the
  [CLS] state through each head, argmax."""
  seqs = []
  for text in texts:
    text = re.sub(r"\s+", " ", text.strip().replace("\n", " ")).strip()
    pieces = tokenizer.tokenize(text)
    if pieces:
      res = [tokenizer.cls_token_id] + tokenizer.convert_tokens_to_ids(pieces) + [
          tokenizer.sep_token_id]
      if len(res) > max_tokens:
        res = res[:max_tokens - 1] + [tokenizer.sep_token_id]
    else:
      res = [tokenizer.cls_token_id, tokenizer.sep_token_id]
    seqs.append(res)
  ids = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
  mask = torch.zeros(ids.shape, dtype=torch.float)
  for i, s in enumerate(seqs):
    ids[i, :len(s)] = torch.tensor(s)
    mask[i, :len(s)] = 1
  with torch.no_grad():
    cls = module.bert(ids, attention_mask=mask)[0][:, 0]
    return seqs, np.stack([head(cls).argmax(dim=1).numpy() for head in module.linear_heads], 1)


def test_chexbert_matches_reenactment(chexbert):
  checkpoint, bert_dir, module, _ = chexbert
  labeler = clinical.CheXbert(checkpoint, bert_dir, batch_size=3)
  seqs, want = _chexbert_reference(module, labeler.tokenizer, REPORTS, 40)
  assert [labeler.encode(t) for t in REPORTS] == seqs
  # RadEval's f1chexbert tokenises with tokenizer(report, truncation=True, max_length=512): same.
  radeval = [labeler.tokenizer(t, truncation=True, max_length=40)["input_ids"] for t in REPORTS]
  assert radeval == seqs
  got = labeler.label(REPORTS)
  assert got.shape == (8, 14) and got.dtype == np.int64
  np.testing.assert_array_equal(got, want)
  assert len(np.unique(got[:, :13])) >= 3 and len({tuple(r) for r in got}) >= 3  # not constant
  assert set(np.unique(got[:, 13])) <= {0, 1}


def test_chexbert_safetensors_checkpoint(chexbert, tmp_path):
  from safetensors.torch import save_file  # noqa: PLC0415
  checkpoint, bert_dir, _, state = chexbert
  path = str(tmp_path / "chexbert.safetensors")
  save_file({k: v.contiguous() for k, v in state.items()}, path)
  want = clinical.CheXbert(checkpoint, bert_dir).label(REPORTS)
  np.testing.assert_array_equal(clinical.CheXbert(path, bert_dir).label(REPORTS), want)


def _save_variant(state, path, **edits):
  state = dict(state)
  for key, value in edits.items():
    if value is None:
      del state[key]
    else:
      state[key] = value
  torch.save({"model_state_dict": state}, path)
  return str(path)


@pytest.mark.parametrize("edits, error, message", [
    ({"module.linear_heads.13.weight": torch.zeros(3, 21)}, clinical.CheXbertLoadError,
     r"linear_heads\.13\.weight has shape \(3, 21\), expected \(2, 21\)"),
    ({"module.linear_heads.5.bias": None}, clinical.CheXbertLoadError,
     r"missing tensor\(s\): linear_heads\.5\.bias"),
    ({"module.linear_heads.14.bias": torch.zeros(2)}, clinical.CheXbertLoadError,
     r"unexpected tensor\(s\): linear_heads\.14\.bias"),
    ({"module.bert.encoder.layer.0.intermediate.dense.weight": torch.zeros(36, 21)},
     hf_bert.BertLoadError,
     r"encoder\.layer\.0\.intermediate\.dense\.weight has shape \(36, 21\), expected \(37, 21\)"),
    ({"module.bert.encoder.layer.2.output.dense.bias": None}, hf_bert.BertLoadError,
     r"missing tensor\(s\): encoder\.layer\.2\.output\.dense\.bias"),
])
def test_chexbert_bad_checkpoint_names_the_tensor(chexbert, tmp_path, edits, error, message):
  path = _save_variant(chexbert[3], tmp_path / "bad.pth", **edits)
  with pytest.raises(error, match=r"bad\.pth: .*" + message):
    clinical.CheXbert(path, chexbert[1])


def test_chexbert_missing_files(chexbert, tmp_path):
  checkpoint, bert_dir, _, _ = chexbert
  with pytest.raises(FileNotFoundError, match=r"nope\.pth: no such CheXbert checkpoint"):
    clinical.CheXbert(str(tmp_path / "nope.pth"), bert_dir)
  with pytest.raises(FileNotFoundError, match="no such BERT model directory"):
    clinical.CheXbert(checkpoint, str(tmp_path / "no_bert"))


def test_chexbert_pth_without_torch(chexbert, monkeypatch):
  checkpoint, bert_dir, _, _ = chexbert
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(ValueError, match=r"chexbert\.pth: reading a PyTorch checkpoint needs torch"):
    clinical.CheXbert(checkpoint, bert_dir)


def test_chexbert_label_names():
  assert len(clinical.CHEXBERT_LABELS) == 14 and clinical.CHEXBERT_LABELS[13] == "No Finding"
  assert [clinical.CHEXBERT_LABELS.index(n) for n in clinical.CHEXBERT_TOP5] == [1, 4, 5, 7, 9]
  assert clinical.CHEXBERT_CLASSES == ("blank", "positive", "negative", "uncertain")


# --- CheXbert F1 (values computed by hand) --------------------------------------------------------

def _labels(rows):
  """{column: class} per row → int[N, 14]."""
  out = np.zeros((len(rows), 14), np.int64)
  for i, row in enumerate(rows):
    for column, value in row.items():
      out[i, column] = value
  return out


# Binarised ("rrg": 1 or 3 → 1): true {1, 4}, {7, 12}, {13}; pred {1, 2, 9}, {1, 7}, {8, 13}.
TRUE = _labels([{1: 1, 4: 3, 9: 2, 13: 0}, {1: 2, 7: 1, 12: 1}, {13: 1}])
PRED = _labels([{1: 1, 4: 0, 9: 1, 2: 3}, {1: 1, 7: 3, 12: 2}, {13: 1, 8: 1}])


def test_chexbert_f1_corpus_by_hand():
  got = clinical.chexbert_f1(TRUE, PRED)
  # 14 labels: F1 Cardiomegaly 2/3, Atelectasis 1, No Finding 1, others 0; TP 3, |true| 5,
  # |pred| 7; supports 1 each for Cardiomegaly, Edema, Atelectasis, Support Devices, No Finding.
  # Top 5: F1 Cardiomegaly 2/3, Atelectasis 1; TP 2, |true| 3, |pred| 4; supports 1, 1, 0, 1, 0.
  want = {"chexbert-all_micro_f1": 6 / 12, "chexbert-all_macro_f1": (2 / 3 + 2) / 14,
          "chexbert-all_weighted_f1": (2 / 3 + 2) / 5,
          "chexbert-5_micro_f1": 4 / 7, "chexbert-5_macro_f1": (2 / 3 + 1) / 5,
          "chexbert-5_weighted_f1": (2 / 3 + 1) / 3}
  assert got.keys() == want.keys()
  for key, value in want.items():
    assert got[key] == pytest.approx(value, abs=1e-12), key


def test_chexbert_f1_per_sample_by_hand():
  rows = clinical.chexbert_f1_per_sample(TRUE, PRED)
  want_rows = {"chexbert-all_micro_f1": [2 / 5, 2 / 4, 2 / 3],
               "chexbert-all_macro_f1": [1 / 14] * 3,
               "chexbert-all_weighted_f1": [1 / 2, 1 / 2, 1.0],
               "chexbert-5_micro_f1": [2 / 4, 2 / 3, 0.0],  # row 3: nothing true or predicted
               "chexbert-5_macro_f1": [1 / 5, 1 / 5, 0.0],
               "chexbert-5_weighted_f1": [1 / 2, 1.0, 0.0]}
  for key, values in want_rows.items():
    np.testing.assert_allclose(rows[key], values, atol=1e-12, err_msg=key)
  means = clinical.chexbert_f1(TRUE, PRED, per_sample=True)
  assert means["chexbert-all_micro_f1"] == pytest.approx(47 / 90)
  assert means["chexbert-all_weighted_f1"] == pytest.approx(2 / 3)
  assert means["chexbert-5_micro_f1"] == pytest.approx(7 / 18)
  assert means["chexbert-5_macro_f1"] == pytest.approx(2 / 15)
  one = clinical.chexbert_f1(TRUE[:1], PRED[:1])  # one report = that sample's scores
  assert one["chexbert-all_micro_f1"] == pytest.approx(0.4)


def test_chexbert_f1_edge_cases():
  blank = np.zeros((2, 14), np.int64)
  assert set(clinical.chexbert_f1(blank, blank).values()) == {0.0}  # sklearn zero_division=0
  negative = np.full((2, 14), 2)
  assert set(clinical.chexbert_f1(negative, blank).values()) == {0.0}
  uncertain = np.full((1, 14), 3)
  assert set(clinical.chexbert_f1(uncertain, np.ones((1, 14), np.int64)).values()) == {1.0}
  with pytest.raises(ValueError, match=r"outside CheXbert's classes 0\.\.3: \[4\]"):
    clinical.chexbert_f1(blank + 4, blank)
  with pytest.raises(ValueError, match=r"\[N ≥ 1, 14\].*\(2, 13\)"):
    clinical.chexbert_f1(blank[:, :13], blank[:, :13])
  with pytest.raises(ValueError, match="differ in shape"):
    clinical.chexbert_f1(blank, blank[:1])


# --- RadGraph -------------------------------------------------------------------------------------

def test_radgraph_unavailable_says_why(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "radgraph", None)  # not importable
  score, why = clinical.radgraph_scorer(str(tmp_path))
  assert score is None and "radgraph package is not installed" in why
  score, why = clinical.radgraph_scorer(None)
  assert score is None and "no RadGraph model directory is configured" in why
  with pytest.raises(clinical.RadGraphUnavailable, match="not installed"):
    clinical.radgraph_f1(["a"], ["a"], str(tmp_path))


def test_radgraph_wrapper_with_a_stand_in_package(tmp_path, monkeypatch):
  """Only the wrapper: a stand-in module with radgraph 0.1's F1RadGraph interface."""
  fake = types.ModuleType("radgraph")
  fake.CACHE_DIR = "/default/cache"
  built = {}

  class F1RadGraph:
    def __init__(self, reward_level, model_type=None, **kwargs):
      built.update(reward_level=reward_level, model_type=model_type, kwargs=kwargs,
                   cache=fake.CACHE_DIR, offline=os.environ.get("HF_HUB_OFFLINE"))

    def __call__(self, refs, hyps):
      rewards = [((1.0, 1.0, 0.25 * i), (0.0, 0.0, 0.0), (0.0, 0.0, 0.0)) for i in range(len(refs))]
      return None, rewards, [], []

  F1RadGraph.__module__ = "radgraph"
  fake.F1RadGraph = F1RadGraph
  monkeypatch.setitem(sys.modules, "radgraph", fake)
  monkeypatch.setenv("HF_HUB_OFFLINE", "0")
  monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
  score, why = clinical.radgraph_scorer(str(tmp_path))
  assert "radgraph-xl" in why
  assert built == {"reward_level": "all", "model_type": "radgraph-xl", "kwargs": {},
                   "cache": str(tmp_path), "offline": "1"}
  np.testing.assert_array_equal(score(["a", "b", "c"], ["x", "y", "z"]), [0.0, 0.25, 0.5])
