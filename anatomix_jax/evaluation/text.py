"""Lexical and answer-level metrics that need no model weights (REFERENCE.md §5, FIELD.md §7).

ROUGE through ``rouge-score``, BLEU through ``sacrebleu``, METEOR through NLTK, exactly as the
reference calls them, plus closed/open VQA accuracy and classification F1. Per-sample scores are
averaged by the caller (the reference's convention); ``corpus_bleu`` and ``classification_f1`` are
corpus-level (the field's). ``CONVENTIONS`` says which is which.

METEOR: the reference runs ``nltk.download("wordnet")``; nothing is downloaded here. When NLTK's
WordNet data is absent, METEOR runs with a WordNet stand-in that has no synonyms, i.e. exact and
Porter-stem matches only (its synonym stage matches nothing) — ``METEOR_VARIANT`` says which ran.
"""

from __future__ import annotations

import functools
import re
import string
from collections.abc import Sequence

import numpy as np
import sacrebleu
from absl import logging
from nltk.translate import meteor_score as nltk_meteor
from rouge_score import rouge_scorer

EMPTY_REFERENCE = "No findings or impressions."  # RadTextMetrics.__call__'s replacements
EMPTY_ANSWER = "No findings."


def postprocess(text: str) -> str:
  """The reference's ``postprocess_llm_output``: strip, drop repeated lines (first kept), strip
  each line, drop empty ones."""
  lines = list(dict.fromkeys(text.strip().splitlines()))
  return re.sub(r"\n\s*\n", "\n", "\n".join(line.strip() for line in lines if line.strip()))


def prepare(ref: str, hyp: str) -> tuple[str, str]:
  """Empty reference/answer → the reference's fallback texts."""
  return ref or EMPTY_REFERENCE, hyp or EMPTY_ANSWER


@functools.lru_cache(maxsize=1)
def _rouge() -> rouge_scorer.RougeScorer:
  return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


def rouge(ref: str, hyp: str) -> dict[str, float]:
  """ROUGE-1/2/L F-measures (``RougeScorer(..., use_stemmer=True)``)."""
  scores = _rouge().score(ref, hyp)
  return {k: float(v.fmeasure) for k, v in scores.items()}


def sentence_bleu(ref: str, hyp: str) -> float:
  """sacrebleu ``sentence_bleu`` (13a tokenizer, exp smoothing, its defaults) / 100."""
  return float(sacrebleu.sentence_bleu(hyp, [ref]).score) / 100.0


def corpus_bleu(refs: Sequence[str], hyps: Sequence[str]) -> float:
  """sacrebleu ``corpus_bleu`` (13a tokenizer, no smoothing, its defaults) / 100."""
  return float(sacrebleu.corpus_bleu(list(hyps), [list(refs)]).score) / 100.0


class _NoSynonyms:
  """A WordNet stand-in for METEOR without WordNet data: no synsets, so no synonym matches."""

  def synsets(self, *args, **kwargs):  # noqa: ARG002
    return []


@functools.lru_cache(maxsize=1)
def _wordnet():
  from nltk.corpus import wordnet  # noqa: PLC0415
  try:
    wordnet.ensure_loaded()
    return wordnet, "nltk METEOR with WordNet synonyms"
  except LookupError:
    logging.warning("NLTK WordNet data not found: METEOR uses exact and Porter-stem matches only "
                    "(no synonyms); install it with nltk.download('wordnet') for the full metric")
    return _NoSynonyms(), ("nltk METEOR, exact + Porter-stem matches only (WordNet data absent)")


def meteor_variant() -> str:
  """Which METEOR runs here (see the module docstring)."""
  return _wordnet()[1]


def meteor(ref: str, hyp: str) -> float:
  """``meteor_score([ref.split()], hyp.split())`` as the reference's ``get_meteor``."""
  return float(nltk_meteor.meteor_score([ref.split()], hyp.split(), wordnet=_wordnet()[0]))


def nlg_scores(ref: str, hyp: str) -> dict[str, float]:
  """Per-sample rouge1, rouge2, rougeL, bleu (sentence), meteor after ``prepare``."""
  ref, hyp = prepare(ref, hyp)
  return {**rouge(ref, hyp), "bleu": sentence_bleu(ref, hyp), "meteor": meteor(ref, hyp)}


_ARTICLES = {"a", "an", "the"}
_OPTION = re.compile(r"^\s*\(?([a-z]|\d{1,2})[).:]\s+(.*)$", re.IGNORECASE | re.DOTALL)


def _tokens(text: str) -> list[str]:
  text = text.lower().translate(str.maketrans({c: " " for c in string.punctuation}))
  return [t for t in text.split() if t not in _ARTICLES]


def _answer_forms(text: str) -> set[str]:
  """An answer's normalised forms: the whole text, and for an option ``"(B) Yes"`` also its
  letter and its content (the processors write closed answers both ways)."""
  forms = {" ".join(_tokens(text))}
  m = _OPTION.match(text.strip())
  if m:
    forms |= {m.group(1).lower(), " ".join(_tokens(m.group(2)))}
  return forms - {""}


def vqa_closed(ref: str, hyp: str) -> float:
  """1.0 when the answer matches the reference after normalisation (case, punctuation, articles,
  an option letter written with or without its text), else 0.0."""
  ref_forms, hyp_forms = _answer_forms(ref), _answer_forms(hyp)
  ref_whole = " ".join(_tokens(ref))
  return float(ref_whole in hyp_forms or " ".join(_tokens(hyp)) in ref_forms)


def vqa_open(ref: str, hyp: str) -> dict[str, float]:
  """Open answers: ``recall`` (share of reference tokens in the answer, LLaVA-Med's), token
  ``f1``, ``exact`` (normalised match)."""
  ref_t, hyp_t = _tokens(ref), _tokens(hyp)
  exact = float(ref_t == hyp_t)
  if not ref_t or not hyp_t:
    return {"recall": exact, "f1": exact, "exact": exact}
  hyp_set = set(hyp_t)
  recall = sum(t in hyp_set for t in ref_t) / len(ref_t)
  common = sum(min(ref_t.count(t), hyp_t.count(t)) for t in set(ref_t))
  f1 = 0.0 if common == 0 else 2 * common / (len(ref_t) + len(hyp_t))
  return {"recall": float(recall), "f1": float(f1), "exact": exact}


def reference_accuracy(ref: str, hyp: str) -> float:
  """The reference's ``get_accuracy`` for one pair: shared findings of "… with a and b" / "…
  shows a and b" sentences over the reference's ("healthy" alone otherwise)."""
  def split(v: str) -> list[str]:
    v = v.lower()
    if "healthy" in v:
      return ["healthy"]
    word = "with" if "with" in v else "shows"
    if word not in v:
      return [v.strip().rstrip(".,")]
    return [p.strip().rstrip(".,") for p in v.split(word)[1].split("and")]

  r, h = set(split(ref)), set(split(hyp))
  return len(r & h) / len(r)


def parse_labels(text: str, labels: Sequence[str]) -> set[str]:
  """The label names an answer mentions (case-insensitive, whole words), e.g. the classification
  processor's ``"(A) Edema, (C) Pneumonia"`` or ``"edema, pneumonia"``."""
  low = " " + " ".join(_tokens(text)) + " "
  return {lab for lab in labels if f" {' '.join(_tokens(lab))} " in low}


def classification_f1(true_sets: Sequence[set[str]], pred_sets: Sequence[set[str]],
                      labels: Sequence[str]) -> dict[str, float]:
  """Multi-label F1 with sklearn's definitions (zero_division=0): micro (pooled counts), macro
  (mean over labels), weighted (by support)."""
  t = np.asarray([[lab in s for lab in labels] for s in true_sets], bool).reshape(-1, len(labels))
  p = np.asarray([[lab in s for lab in labels] for s in pred_sets], bool).reshape(-1, len(labels))
  tp, n_true, n_pred = (t & p).sum(0), t.sum(0), p.sum(0)
  per_label = np.where(n_true + n_pred > 0, 2 * tp / np.maximum(n_true + n_pred, 1), 0.0)
  micro = 2 * tp.sum() / max(n_true.sum() + n_pred.sum(), 1)
  weighted = float((per_label * n_true).sum() / n_true.sum()) if n_true.sum() else 0.0
  return {"micro": float(micro), "macro": float(per_label.mean()), "weighted": weighted}


CONVENTIONS = {
    "rouge1": "mean of per-sample", "rouge2": "mean of per-sample", "rougeL": "mean of per-sample",
    "bleu": "mean of per-sample (sacrebleu sentence_bleu)",
    "bleu_corpus": "corpus (sacrebleu corpus_bleu)",
    "meteor": "mean of per-sample",
    "vqa_closed_accuracy": "mean of per-sample", "vqa_open_recall": "mean of per-sample",
    "vqa_open_f1": "mean of per-sample", "vqa_open_exact": "mean of per-sample",
}
