"""Model-based report metrics: BERTScore, CheXbert labels and F1, RadGraph-F1 (REFERENCE.md §5).

The reference scores reports with RadEval, which wraps three public tools; these are their
re-enactments in JAX/NumPy, loading weights only from local paths (nothing is downloaded):

* ``BertScorer``: ``bert_score.BERTScorer(model_type=<dir>, num_layers=L, idf=False,
  rescale_with_baseline=…)`` (Tiiiger/bert_score 0.3.13, ``utils.py``/``scorer.py``). The
  reference uses ``distilbert-base-uncased`` at layer 5 with bert_score's English baseline.
* ``CheXbert`` + ``chexbert_f1``: the CheXbert labeler (stanfordmlgroup/CheXbert
  ``src/models/bert_labeler.py``, ``src/label.py``) and RadEval/f1chexbert's "rrg" F1 (a
  ``sklearn.metrics.classification_report`` over binarised labels), computed here with NumPy.
* ``radgraph_scorer``: a thin wrapper over the ``radgraph`` package when it and its model are
  installed locally (not the case here, so that path is untested).

Axis letters: N pairs/reports, B batch rows, T tokens, H hidden size.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from anatomix_jax.convert import hf_bert
from anatomix_jax.convert.tensors import read_safetensors, read_torch_file, to_numpy
from anatomix_jax.models.bert import BertConfig, BertModel

Array = jax.Array

SEQUENCE_MULTIPLE = 16  # token lengths are padded to a multiple of this (fewer recompiles)
# Metrics compare against float32 torch: no TF32/bf16 matmul passes on accelerators.
MATMUL_PRECISION = "highest"


# --- Shared helpers -------------------------------------------------------------------------------

def _check_texts(texts: Sequence[str], name: str) -> list[str]:
  """A list of the strings; TypeError naming the first non-string."""
  out = list(texts)
  for i, text in enumerate(out):
    if not isinstance(text, str):
      raise TypeError(f"{name}[{i}] is a {type(text).__name__}, not a str")
  return out


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _pad(seqs: Sequence[Sequence[int]], rows: int, length: int, pad_id: int
         ) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads token id lists into int32 ``ids`` [rows, length] and ``mask`` [rows, length]."""
  ids = np.full((rows, length), pad_id, np.int32)
  mask = np.zeros((rows, length), np.int32)
  for i, seq in enumerate(seqs):
    ids[i, :len(seq)] = seq
    mask[i, :len(seq)] = 1
  return ids, mask


def _bucket_length(seqs: Sequence[Sequence[int]], cap: int) -> int:
  """The longest sequence rounded up to ``SEQUENCE_MULTIPLE``, at most ``cap``."""
  return min(_round_up(max(len(s) for s in seqs), SEQUENCE_MULTIPLE), cap)


def _special_id(tokenizer: Any, name: str) -> int:
  value = getattr(tokenizer, f"{name}_token_id", None)
  if value is None:
    raise ValueError(f"the tokenizer has no {name} token (a BERT WordPiece tokenizer is expected)")
  return int(value)


# --- BERTScore ------------------------------------------------------------------------------------

BASELINE_COLUMNS = ("LAYER", "P", "R", "F")  # bert_score's rescale_baseline/<lang>/<model>.tsv
# The reference's setting: bert_score 0.3.13 rescale_baseline/en/distilbert-base-uncased.tsv,
# LAYER 5 (P, R, F); ``BertScorer(dir, 5, baseline=DISTILBERT_BASE_UNCASED_L5_BASELINE)``.
DISTILBERT_BASE_UNCASED_L5_BASELINE = (0.6666034, 0.66660464, 0.66620487)


def read_baseline(path: str | os.PathLike, num_layers: int) -> np.ndarray:
  """bert_score's rescaling baseline (P, R, F) for one layer.

  bert_score's files (``rescale_baseline/en/distilbert-base-uncased.tsv``) are comma-separated
  despite the name, with a ``LAYER,P,R,F`` header and one row per layer; tab-separated files are
  read too. The row whose LAYER equals ``num_layers`` is taken (bert_score takes row
  ``iloc[num_layers]``, the same row in its files).

  Args:
    path: the baseline file.
    num_layers: L, the layer the scorer uses.

  Returns:
    float32[3] (P, R, F).

  Raises:
    FileNotFoundError: naming a missing file.
    ValueError: naming the file for a bad header, a malformed row or no row for L.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such BERTScore baseline file")
  with open(path, encoding="utf-8") as f:
    lines = [line.strip() for line in f if line.strip()]
  if not lines:
    raise ValueError(f"{path}: empty BERTScore baseline file")
  sep = "\t" if "\t" in lines[0] else ","
  header = tuple(h.strip().upper() for h in lines[0].split(sep))
  if header[:4] != BASELINE_COLUMNS:
    raise ValueError(f"{path}: expected the header {','.join(BASELINE_COLUMNS)}, got {lines[0]!r}")
  for line in lines[1:]:
    fields = [x.strip() for x in line.split(sep)]
    try:
      layer, values = int(float(fields[0])), [float(x) for x in fields[1:4]]
    except (ValueError, IndexError) as err:
      raise ValueError(f"{path}: malformed row {line!r}") from err
    if layer == num_layers and len(values) == 3:
      return np.asarray(values, np.float32)
  raise ValueError(f"{path}: no baseline row for layer {num_layers}")


def _baseline_values(baseline: Sequence[float] | str | os.PathLike | None, num_layers: int
                     ) -> np.ndarray | None:
  """float32[3] from (P, R, F) numbers or a baseline file; None for no rescaling."""
  if baseline is None:
    return None
  if isinstance(baseline, (str, os.PathLike)):
    values = read_baseline(baseline, num_layers)
  else:
    values = np.asarray(baseline, np.float32)
    if values.shape != (3,):
      raise ValueError(f"baseline must be 3 numbers (P, R, F) or a file path, got {baseline!r}")
  if not np.all(np.isfinite(values)) or np.any(values >= 1.0):
    raise ValueError(f"baseline values must be finite and below 1 (they rescale as "
                     f"(x - b) / (1 - b)), got {values.tolist()}")
  return values


def greedy_match(ref: Array, ref_mask: Array, ref_weight: Array, hyp: Array, hyp_mask: Array,
                 hyp_weight: Array) -> tuple[Array, Array, Array]:
  """BERTScore's greedy cosine matching (bert_score ``greedy_cos_idf``) for aligned pairs.

  Every real token of one side is matched to its most similar real token of the other side
  (special tokens included as candidates, as in bert_score); the per-token maxima are averaged with
  ``*_weight`` (bert_score's idf weights: with ``idf=False`` 1, and 0 for [CLS]/[SEP]).

  Args:
    ref: float[B, Tr, H] unit-norm reference token embeddings.
    ref_mask: [B, Tr], 1 for real tokens.
    ref_weight: float[B, Tr] token weights (0 on padding).
    hyp: float[B, Th, H] unit-norm candidate token embeddings.
    hyp_mask: [B, Th].
    hyp_weight: float[B, Th].

  Returns:
    ``(P, R, F)``, float32[B] each. A side whose weights sum to 0 (an empty text: only
    [CLS]/[SEP]) gives P = R = F = 0, as bert_score's empty-sentence rule does; F is
    2PR / (P + R), with NaN set to 0.
  """
  sim = jnp.einsum("bch,brh->bcr", hyp.astype(jnp.float32), ref.astype(jnp.float32))
  valid = (hyp_mask[:, :, None] > 0) & (ref_mask[:, None, :] > 0)
  sim = jnp.where(valid, sim, -jnp.inf)
  word_precision = jnp.max(sim, axis=2)  # [B, Th]
  word_recall = jnp.max(sim, axis=1)  # [B, Tr]

  def weighted_mean(scores, weight):
    weight = weight.astype(jnp.float32)
    total = jnp.sum(weight, axis=1)
    summed = jnp.sum(jnp.where(weight > 0, scores * weight, 0.0), axis=1)
    return jnp.where(total > 0, summed / jnp.where(total > 0, total, 1.0), jnp.nan), total > 0

  precision, hyp_ok = weighted_mean(word_precision, hyp_weight)
  recall, ref_ok = weighted_mean(word_recall, ref_weight)
  f1 = 2 * precision * recall / (precision + recall)
  f1 = jnp.where(jnp.isnan(f1), 0.0, f1)
  both = hyp_ok & ref_ok
  return jnp.where(both, precision, 0.0), jnp.where(both, recall, 0.0), f1


@functools.lru_cache(maxsize=8)
def _bertscore_fn(config: BertConfig) -> Callable[..., tuple[Array, Array, Array]]:
  """jit((params, ids, mask, weight) → (P, R, F) [B]); rows [0, B) are refs, [B, 2B) hyps."""
  model = BertModel(config)

  def score(params, ids, mask, weight):
    hidden = model.apply({"params": params}, ids, mask).astype(jnp.float32)  # [2B, T, H]
    unit = hidden / jnp.linalg.norm(hidden, axis=-1, keepdims=True)
    b = ids.shape[0] // 2
    return greedy_match(unit[:b], mask[:b], weight[:b], unit[b:], mask[b:], weight[b:])

  return jax.jit(score)


class BertScorer:
  """BERTScore (Zhang et al.) as ``bert_score.BERTScorer(model_type=<local dir>, num_layers=L,
  idf=False, rescale_with_baseline=…)``.

  Semantics (bert_score 0.3.13):
    * tokens: ``tokenizer.encode(text.strip(), add_special_tokens=True, truncation=True)`` with
      [CLS] … [SEP]; an empty text is [CLS] [SEP];
    * embeddings: the output of the first L layers (bert_score drops the later layers, so this is
      ``hidden_states[L]``), each token L2-normalised;
    * greedy matching (``greedy_match``): P averages, over the candidate's tokens, the best cosine
      with any reference token; R the reverse; F = 2PR / (P + R); with ``idf=False`` every token
      weighs 1 except [CLS] and [SEP] (weight 0; they still serve as match candidates);
    * rescaling: (score − b) / (1 − b) for each of P, R, F with its own baseline b.
  The tokenizer is the directory's (transformers ``AutoTokenizer``); bert_score asks for the slow
  one (``use_fast=False``), which gives the same WordPiece ids for BERT vocabularies.
  Each pair is matched over its own real tokens only, which is bert_score's result for a batch of
  one pair — the reference's use (``RadTextMetrics`` is called once per sample). In larger
  bert_score batches, padding adds zero-similarity candidates, which only matters when every real
  cosine of a token is negative.

  Args:
    model_dir: a local HF BERT or DistilBERT directory (config, weights, tokenizer files), e.g.
      ``distilbert-base-uncased``.
    num_layers: L, 1 ≤ L ≤ the model's layers (the reference: 5).
    baseline: (P, R, F) numbers, or the path of bert_score's baseline file for this model (the row
      of layer L is used); None leaves the scores unrescaled (``variant`` says so).
    batch_size: pairs per forward pass (each pass encodes 2·batch_size texts).
    max_length: word pieces kept per text before [CLS]/[SEP] are added (510 + 2 = bert_score's
      ``model_max_length`` 512), at most the model's ``max_position_embeddings`` − 2.

  Attributes:
    variant: a sentence saying which BERTScore this is (model, layer, idf, rescaling).
    baseline: float32[3] or None.
  """

  def __init__(self, model_dir: str, num_layers: int,
               baseline: Sequence[float] | str | None = None, batch_size: int = 64,
               max_length: int = 510):
    if batch_size < 1 or max_length < 1:
      raise ValueError(f"batch_size and max_length must be positive, got {batch_size}, "
                       f"{max_length}")
    config, params = hf_bert.load_bert(model_dir)
    self.tokenizer = hf_bert.load_tokenizer(model_dir, config)
    self.config, params = hf_bert.truncate_layers(config, params, num_layers)
    self.params = jax.device_put(nn.unbox(params))
    self.num_layers = num_layers
    self.batch_size = batch_size
    self.max_length = min(max_length, self.config.max_position_embeddings - 2)
    self._cls = _special_id(self.tokenizer, "cls")
    self._sep = _special_id(self.tokenizer, "sep")
    pad = self.tokenizer.pad_token_id
    self._pad = self.config.pad_token_id if pad is None else int(pad)
    self.baseline = _baseline_values(baseline, num_layers)
    model_type = hf_bert.read_model_type(model_dir)
    rescale = ("rescaled with baseline (P, R, F) = "
               f"({', '.join(f'{v:.6g}' for v in self.baseline)})" if self.baseline is not None
               else "NOT rescaled (raw cosine scores; the reference rescales with bert_score's "
                    "baseline)")
    self.variant = (f"BERTScore (bert_score semantics): {model_type} at {os.fspath(model_dir)}, "
                    f"layer {num_layers} of {config.num_hidden_layers}, idf=False, {rescale}")

  def encode(self, text: str) -> list[int]:
    """bert_score's ``sent_encode``: [CLS] word pieces [SEP], truncated to ``max_length`` pieces."""
    text = text.strip()
    if not text:
      return [self._cls, self._sep]
    return list(self.tokenizer.encode(text, add_special_tokens=True, truncation=True,
                                      max_length=self.max_length + 2))

  def _batch(self, refs: Sequence[str], hyps: Sequence[str]) -> np.ndarray:
    """float32[len(refs), 3] (P, R, F) for at most ``batch_size`` pairs, unrescaled."""
    seqs = [self.encode(t) for t in refs] + [[]] * (self.batch_size - len(refs))
    seqs += [self.encode(t) for t in hyps] + [[]] * (self.batch_size - len(hyps))
    length = _bucket_length(seqs, self.config.max_position_embeddings)
    ids, mask = _pad(seqs, 2 * self.batch_size, length, self._pad)
    weight = (mask > 0) & (ids != self._cls) & (ids != self._sep)
    with jax.default_matmul_precision(MATMUL_PRECISION):
      p, r, f = _bertscore_fn(self.config)(self.params, ids, mask, weight.astype(np.float32))
    return np.stack([np.asarray(x, np.float32) for x in (p, r, f)], axis=-1)[:len(refs)]

  def __call__(self, refs: Sequence[str], hyps: Sequence[str]) -> dict[str, np.ndarray]:
    """Scores aligned (reference, candidate) pairs.

    Args:
      refs: N reference texts.
      hyps: N candidate texts (the same order).

    Returns:
      ``precision``, ``recall``, ``f1``: float32[N] (rescaled when a baseline was given).

    Raises:
      TypeError: naming a non-string entry.
      ValueError: refs and hyps differ in length.
    """
    refs, hyps = _check_texts(refs, "refs"), _check_texts(hyps, "hyps")
    if len(refs) != len(hyps):
      raise ValueError(f"refs and hyps differ in length: {len(refs)} vs {len(hyps)}")
    chunks = [self._batch(refs[i:i + self.batch_size], hyps[i:i + self.batch_size])
              for i in range(0, len(refs), self.batch_size)]
    scores = np.concatenate(chunks) if chunks else np.zeros((0, 3), np.float32)
    if self.baseline is not None:
      scores = ((scores - self.baseline) / (1.0 - self.baseline)).astype(np.float32)
    return {"precision": scores[:, 0], "recall": scores[:, 1], "f1": scores[:, 2]}


# --- CheXbert -------------------------------------------------------------------------------------

# CheXbert's CONDITIONS (src/constants.py), in the order of its 14 linear heads.
CHEXBERT_LABELS: tuple[str, ...] = (
    "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices", "No Finding")
CHEXBERT_TOP5 = ("Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Pleural Effusion")
# CheXbert's CLASS_MAPPING: the class index each head's argmax gives ("No Finding": 0 or 1 only).
CHEXBERT_CLASSES = ("blank", "positive", "negative", "uncertain")
CHEXBERT_HEAD_CLASSES = (4,) * 13 + (2,)
CHEXBERT_MAX_TOKENS = 512  # CheXbert truncates to [CLS] + 510 pieces + [SEP]


class CheXbertLoadError(ValueError):
  """A CheXbert checkpoint is unreadable or does not match the BERT config."""


def read_chexbert_state(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The CheXbert state dict with ``module.`` removed from the keys (f1chexbert's renaming).

  Args:
    path: ``chexbert.pth`` (a ``torch.save`` of ``{'model_state_dict': {...}, …}``, read with
      ``torch.load(weights_only=True)``; needs torch) or a ``.safetensors`` file holding the same
      keys (``module.bert.…``, ``module.linear_heads.N.{weight,bias}``; ``module.`` optional).

  Returns:
    key → NumPy array (``bert.…`` and ``linear_heads.…``).

  Raises:
    FileNotFoundError: naming a missing file.
    CheXbertLoadError: naming the file when it cannot be read (e.g. torch is not installed) or
      holds no state dict.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such CheXbert checkpoint")
  try:
    raw = read_safetensors(path) if path.endswith(".safetensors") else read_torch_file(path)
  except ValueError as err:  # read_torch_file names the file (and says when torch is missing)
    raise CheXbertLoadError(str(err)) from err
  if isinstance(raw, Mapping) and "model_state_dict" in raw:
    raw = raw["model_state_dict"]
  if not isinstance(raw, Mapping) or not raw:
    raise CheXbertLoadError(f"{path}: expected a state dict (or {{'model_state_dict': …}}), got "
                            f"{type(raw).__name__}")
  return {str(k).replace("module.", ""): to_numpy(v) for k, v in raw.items()}


def chexbert_heads(state: Mapping[str, np.ndarray], hidden_size: int, source: str
                   ) -> dict[str, np.ndarray]:
  """The 14 linear heads, stacked: ``w4`` [13, H, 4], ``b4`` [13, 4], ``w2`` [H, 2], ``b2`` [2].

  Raises:
    CheXbertLoadError: naming ``source`` and a missing, unexpected or wrongly shaped head tensor.
  """
  expected = {}
  for i, classes in enumerate(CHEXBERT_HEAD_CLASSES):
    expected[f"linear_heads.{i}.weight"] = (classes, hidden_size)
    expected[f"linear_heads.{i}.bias"] = (classes,)
  present = {k for k in state if k.startswith("linear_heads.")}
  missing = sorted(set(expected) - present)
  unexpected = sorted(present - set(expected))
  if missing or unexpected:
    parts = [f"missing tensor(s): {', '.join(missing)}"] if missing else []
    parts += [f"unexpected tensor(s): {', '.join(unexpected)}"] if unexpected else []
    raise CheXbertLoadError(f"{source}: the CheXbert heads do not match: " + "; ".join(parts))
  for key, shape in expected.items():
    if tuple(np.shape(state[key])) != shape:
      raise CheXbertLoadError(f"{source}: {key} has shape {tuple(np.shape(state[key]))}, "
                              f"expected {shape}")
  weight = lambda i: np.asarray(state[f"linear_heads.{i}.weight"], np.float32).T  # noqa: E731
  bias = lambda i: np.asarray(state[f"linear_heads.{i}.bias"], np.float32)  # noqa: E731
  return {"w4": np.stack([weight(i) for i in range(13)]),
          "b4": np.stack([bias(i) for i in range(13)]), "w2": weight(13), "b2": bias(13)}


@functools.lru_cache(maxsize=4)
def _chexbert_fn(config: BertConfig) -> Callable[..., Array]:
  """jit((params, heads, ids, mask) → int32[B, 14] class indices)."""
  model = BertModel(config)

  def label(params, heads, ids, mask):
    cls = model.apply({"params": params}, ids, mask)[:, 0].astype(jnp.float32)  # [B, H]
    highest = jax.lax.Precision.HIGHEST
    logits4 = jnp.einsum("bh,khc->bkc", cls, heads["w4"], precision=highest) + heads["b4"]
    logits2 = jnp.dot(cls, heads["w2"], precision=highest) + heads["b2"]
    return jnp.concatenate([jnp.argmax(logits4, -1), jnp.argmax(logits2, -1)[:, None]],
                           axis=1).astype(jnp.int32)

  return jax.jit(label)


class CheXbert:
  """The CheXbert labeler (bert-base-uncased + 13 four-way heads + 1 two-way head on the [CLS]
  state), as stanfordmlgroup/CheXbert ``bert_labeler`` in eval mode.

  Text handling follows CheXbert's ``bert_tokenizer.tokenize``: whitespace runs (newlines
  included) become one space and the ends are stripped; word pieces are wrapped in [CLS] … [SEP]
  and cut to 512 tokens (``res[:511] + [SEP]``); an empty report is [CLS] [SEP]. No token types
  (zeros), padding masked. Each head's argmax is its class (``CHEXBERT_CLASSES``).

  Args:
    weights_path: ``chexbert.pth`` (StanfordAIMI/RRG_scorers; needs torch to read) or a
      ``.safetensors`` with the same keys (see ``read_chexbert_state``).
    bert_dir: ``config.json`` + tokenizer files of bert-base-uncased (no weights needed there).
    batch_size: reports per forward pass.

  Raises:
    FileNotFoundError: naming a missing checkpoint, directory, config or tokenizer.
    ValueError (``CheXbertLoadError`` / ``hf_bert.BertLoadError``): naming the file and the
      missing, unexpected or wrongly shaped tensor.
  """

  def __init__(self, weights_path: str, bert_dir: str, batch_size: int = 32):
    if batch_size < 1:
      raise ValueError(f"batch_size must be positive, got {batch_size}")
    weights_path = os.fspath(weights_path)
    state = read_chexbert_state(weights_path)
    if hf_bert.read_model_type(bert_dir) != "bert":
      raise ValueError(f"{bert_dir}: CheXbert needs a bert-base-uncased config (model_type bert)")
    self.config = hf_bert.read_config(bert_dir)
    self.tokenizer = hf_bert.load_tokenizer(bert_dir, self.config)
    self.params = jax.device_put(
        hf_bert.from_hf_state_dict(state, self.config, source=weights_path))
    self.heads = jax.device_put(chexbert_heads(state, self.config.hidden_size, weights_path))
    self.batch_size = batch_size
    self.max_tokens = min(CHEXBERT_MAX_TOKENS, self.config.max_position_embeddings)
    self._cls = _special_id(self.tokenizer, "cls")
    self._sep = _special_id(self.tokenizer, "sep")
    pad = self.tokenizer.pad_token_id
    self._pad = self.config.pad_token_id if pad is None else int(pad)

  def encode(self, text: str) -> list[int]:
    """CheXbert's token ids of one report: [CLS] pieces [SEP], at most ``max_tokens``."""
    pieces = self.tokenizer.tokenize(" ".join(text.split()))
    ids = self.tokenizer.convert_tokens_to_ids(pieces)[:self.max_tokens - 2]
    return [self._cls, *ids, self._sep]

  def label(self, texts: Sequence[str]) -> np.ndarray:
    """CheXbert labels of reports.

    Args:
      texts: N reports.

    Returns:
      int64[N, 14]: per ``CHEXBERT_LABELS`` condition 0 blank, 1 positive, 2 negative,
      3 uncertain ("No Finding": 0 or 1).
    """
    texts = _check_texts(texts, "texts")
    forward = _chexbert_fn(self.config)
    out = []
    for start in range(0, len(texts), self.batch_size):
      chunk = [self.encode(t) for t in texts[start:start + self.batch_size]]
      ids, mask = _pad(chunk, self.batch_size, _bucket_length(chunk, self.max_tokens), self._pad)
      with jax.default_matmul_precision(MATMUL_PRECISION):
        out.append(np.asarray(forward(self.params, self.heads, ids, mask))[:len(chunk)])
    return np.concatenate(out).astype(np.int64) if out else np.zeros((0, 14), np.int64)


# --- CheXbert F1 ----------------------------------------------------------------------------------

_TOP5_INDEX = tuple(CHEXBERT_LABELS.index(n) for n in CHEXBERT_TOP5)


def rrg_binarize(labels: np.ndarray) -> np.ndarray:
  """f1chexbert's "rrg" mode: positive (1) or uncertain (3) → 1; blank (0) or negative (2) → 0.

  Args:
    labels: int[N, 14] CheXbert classes (0/1 binary labels pass through unchanged).

  Returns:
    int64[N, 14] of 0/1.
  """
  labels = np.asarray(labels)
  return ((labels == 1) | (labels == 3)).astype(np.int64)


def _check_labels(labels: np.ndarray, name: str) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 2 or labels.shape[1] != len(CHEXBERT_LABELS) or labels.shape[0] == 0:
    raise ValueError(f"{name} must be [N ≥ 1, 14] CheXbert labels, got shape {labels.shape}")
  if not np.isin(labels, (0, 1, 2, 3)).all():
    raise ValueError(f"{name} holds values outside CheXbert's classes 0..3: "
                     f"{sorted(set(np.unique(labels).tolist()) - {0, 1, 2, 3})}")
  return labels


def _safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
  """num / den, and 0 where den is 0 (sklearn's zero_division=0)."""
  num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
  return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den > 0)


def _f1_averages(true: np.ndarray, pred: np.ndarray) -> dict[str, np.ndarray]:
  """micro / macro / weighted F1 of binary [..., S, L] (S samples pooled, L labels) → [...].

  sklearn's ``classification_report`` definitions with zero_division=0: per label F1 =
  2·TP / (|true| + |pred|); micro pools the counts over labels; macro is the plain mean of the
  per-label F1; weighted weights them by support (|true|), and is 0 when the support sums to 0.
  """
  tp = np.sum(true * pred, axis=-2)  # [..., L]
  n_true, n_pred = np.sum(true, axis=-2), np.sum(pred, axis=-2)
  per_label = _safe_ratio(2 * tp, n_true + n_pred)
  return {"micro": _safe_ratio(2 * tp.sum(-1), (n_true + n_pred).sum(-1)),
          "macro": per_label.mean(-1),
          "weighted": _safe_ratio((per_label * n_true).sum(-1), n_true.sum(-1))}


def _f1_dict(true: np.ndarray, pred: np.ndarray) -> dict[str, np.ndarray]:
  out = {}
  for group, index in (("all", slice(None)), ("5", list(_TOP5_INDEX))):
    for average, value in _f1_averages(true[..., index], pred[..., index]).items():
      out[f"chexbert-{group}_{average}_f1"] = value
  return out


def chexbert_f1_per_sample(true_labels: np.ndarray, pred_labels: np.ndarray
                           ) -> dict[str, np.ndarray]:
  """``chexbert_f1`` of each report on its own (the reference's one-report-at-a-time call).

  Args:
    true_labels: int[N, 14] CheXbert classes of the references.
    pred_labels: int[N, 14] of the candidates.

  Returns:
    The ``chexbert_f1`` keys → float64[N].
  """
  true = rrg_binarize(_check_labels(true_labels, "true_labels"))
  pred = rrg_binarize(_check_labels(pred_labels, "pred_labels"))
  if true.shape != pred.shape:
    raise ValueError(f"true_labels {true.shape} and pred_labels {pred.shape} differ in shape")
  return _f1_dict(true[:, None, :], pred[:, None, :])


def chexbert_f1(true_labels: np.ndarray, pred_labels: np.ndarray, per_sample: bool = False
                ) -> dict[str, float]:
  """CheXbert F1 as RadEval/f1chexbert in "rrg" mode (sklearn ``classification_report``, in NumPy).

  Labels are binarised with ``rrg_binarize``; "all" uses the 14 conditions, "5" the
  ``CHEXBERT_TOP5`` columns. Keys map onto RadEval's: ``chexbert-all_micro_f1`` =
  "chexbert-all_micro avg_f1-score", ``…_macro_f1`` = "… macro avg_f1-score", ``…_weighted_f1`` =
  "chexbert-all_weighted_f1" (the paper's "CheXbert-14-F1"; "-5" likewise).

  Args:
    true_labels: int[N, 14] CheXbert classes (``CheXbert.label``) of the references.
    pred_labels: int[N, 14] of the candidates.
    per_sample: False: one report over all N samples (the field's corpus F1). True: the mean over
      samples of each sample's own report — what the reference's per-row ``RadTextMetrics`` calls
      average to (``chexbert_f1_per_sample`` gives the per-sample values).

  Returns:
    ``chexbert-{all,5}_{micro,macro,weighted}_f1`` → float.

  Raises:
    ValueError: shapes other than [N ≥ 1, 14], different shapes, or values outside 0..3.
  """
  if per_sample:
    rows = chexbert_f1_per_sample(true_labels, pred_labels)
    return {k: float(np.mean(v)) for k, v in rows.items()}
  true = rrg_binarize(_check_labels(true_labels, "true_labels"))
  pred = rrg_binarize(_check_labels(pred_labels, "pred_labels"))
  if true.shape != pred.shape:
    raise ValueError(f"true_labels {true.shape} and pred_labels {pred.shape} differ in shape")
  return {k: float(v) for k, v in _f1_dict(true, pred).items()}


# --- RadGraph-F1 ----------------------------------------------------------------------------------

RADGRAPH_MODEL_TYPE = "radgraph-xl"
RADGRAPH_REWARD_LEVEL = "all"


class RadGraphUnavailable(RuntimeError):
  """RadGraph-F1 cannot run here (no radgraph package or no local model)."""


def _simple_f1(reward: Any) -> float:
  """The "simple" F1 of one ``F1RadGraph(reward_level="all")`` reward.

  radgraph ≥ 0.1 gives ((P, R, F) simple, partial, complete); older releases (F simple, partial,
  complete).
  """
  if isinstance(reward, (tuple, list)):
    first = reward[0]
    return float(first[2]) if isinstance(first, (tuple, list)) else float(first)
  return float(reward)


def _make_f1radgraph(module: Any, model_dir: str) -> Any:
  """``module.F1RadGraph(reward_level="all", model_type="radgraph-xl")`` reading ``model_dir``.

  Releases that take a cache-directory argument get it; otherwise the defining module's
  ``CACHE_DIR`` (where ``radgraph-xl.tar.gz`` / ``radgraph-xl/`` are looked up) is pointed at
  ``model_dir``.
  """
  cls = module.F1RadGraph
  kwargs: dict[str, Any] = {"reward_level": RADGRAPH_REWARD_LEVEL,
                            "model_type": RADGRAPH_MODEL_TYPE}
  accepted = inspect.signature(cls.__init__).parameters
  for name in ("model_cache_dir", "cache_dir"):
    if name in accepted:
      kwargs[name] = model_dir
      break
  else:
    defining = sys.modules.get(cls.__module__)
    if defining is not None and hasattr(defining, "CACHE_DIR"):
      defining.CACHE_DIR = model_dir
  return cls(**kwargs)


def radgraph_scorer(model_dir: str | None
                    ) -> tuple[Callable[[Sequence[str], Sequence[str]], np.ndarray] | None, str]:
  """RadGraph-F1 ("simple", the paper's "Radgraph" column) when its package and model are local.

  Returns ``(None, reason)`` unless the ``radgraph`` package imports and ``model_dir`` exists;
  then ``(score, description)`` with ``score(refs, hyps) → float32[N]`` per-sample simple F1 from
  ``radgraph.F1RadGraph(reward_level="all", model_type="radgraph-xl")``, built with
  ``HF_HUB_OFFLINE=1`` / ``TRANSFORMERS_OFFLINE=1`` (set process-wide) and ``model_dir`` as its
  model cache (holding ``radgraph-xl.tar.gz`` or the extracted ``radgraph-xl/``; its BERT encoder
  must be in the local HF cache). UNTESTED here: neither radgraph nor its model is installed in
  this project's environment; only a stand-in module exercises the wrapper.

  Args:
    model_dir: the radgraph model directory, or None.

  Returns:
    ``(callable or None, message)``.
  """
  reasons = []
  try:
    module = importlib.import_module("radgraph")
  except ImportError:
    module = None
    reasons.append("the radgraph package is not installed (pip install radgraph)")
  if not model_dir:
    reasons.append("no RadGraph model directory is configured")
  elif not os.path.isdir(model_dir):
    reasons.append(f"{model_dir}: no such RadGraph model directory")
  if reasons:
    return None, "RadGraph-F1 unavailable: " + "; ".join(reasons)
  os.environ["HF_HUB_OFFLINE"] = "1"
  os.environ["TRANSFORMERS_OFFLINE"] = "1"
  try:
    f1radgraph = _make_f1radgraph(module, model_dir)
  except Exception as err:  # noqa: BLE001 (a configured model that fails to load is an error)
    raise RadGraphUnavailable(f"{model_dir}: radgraph.F1RadGraph(model_type="
                              f"{RADGRAPH_MODEL_TYPE!r}) failed to load offline: {err}") from err

  def score(refs: Sequence[str], hyps: Sequence[str]) -> np.ndarray:
    refs, hyps = _check_texts(refs, "refs"), _check_texts(hyps, "hyps")
    if len(refs) != len(hyps):
      raise ValueError(f"refs and hyps differ in length: {len(refs)} vs {len(hyps)}")
    if not refs:
      return np.zeros((0,), np.float32)
    _, rewards, _, _ = f1radgraph(refs=refs, hyps=hyps)
    return np.asarray([_simple_f1(r) for r in rewards], np.float32)

  return score, (f"RadGraph-F1 simple: radgraph.F1RadGraph(reward_level={RADGRAPH_REWARD_LEVEL!r}, "
                 f"model_type={RADGRAPH_MODEL_TYPE!r}) from {model_dir}, offline")


def radgraph_f1(refs: Sequence[str], hyps: Sequence[str], model_dir: str | None) -> np.ndarray:
  """Per-sample RadGraph-F1 (simple), float32[N]; see ``radgraph_scorer`` (untested here).

  Raises:
    RadGraphUnavailable: with the reason when the package or the model is missing.
  """
  score, why = radgraph_scorer(model_dir)
  if score is None:
    raise RadGraphUnavailable(why)
  return score(refs, hyps)
