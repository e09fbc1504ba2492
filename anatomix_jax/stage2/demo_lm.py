"""The stage-2 demo's base LM: a tiny Gemma3 and a tokenizer trained on the synthetic corpus.

The paper starts from MedGemma-4B; a CPU demo cannot. The align demo instead makes a small
Gemma3 (``lm.demo`` sizes) with a tokenizer trained on the demo's own text (instruction and answer
variants, the RAG sentences, the prompt template), and writes both as a Hugging Face directory —
the same format MedGemma arrives in — so everything downstream (loading, LoRA, export) runs the
real code path. Its weights are random (seeded); the demo's finetune step trains LoRA and the
embedding table on top of them.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import jax

from anatomix_jax.convert import hf_gemma3
from anatomix_jax.instruct import schema
from anatomix_jax.models import gemma3
from anatomix_jax.stage2 import data, prompt, tokenizer


def corpus(config: Any, sentences: list[list[str]]) -> list[str]:
  """Every text the demo's prompts and answers are made of."""
  texts = list(config.data.system_prompts) + [prompt.default_context()]
  for source in schema.SOURCES:
    path = data.jsonl_path(config.data.dir, source, config.data.train_split)
    if os.path.isfile(path):
      for record in schema.read_jsonl(path):
        texts += record["instructions"] + record["responses"]
  texts += [s for per_anatomy in sentences for s in per_anatomy]
  # Box coordinates appear in every prompt; make sure every number 0..1024 is seen.
  texts.append(" ".join(schema.box_text((i, i, i, i)) for i in range(schema.CANVAS + 1)))
  return texts


def make_base(out_dir: str, config: Any, apm: Any) -> str:
  """Writes the demo base LM directory (tokenizer + config.json + model.safetensors) atomically.

  Args:
    out_dir: the directory to create.
    config: the stage-2 config (``lm.demo`` sizes, ``data.dir``, ``seed``).
    apm: the frozen APM (its RAG database's sentences join the corpus).

  Returns:
    ``out_dir``.
  """
  demo = config.lm.demo
  tmp = out_dir + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  tokenizer.train_demo_tokenizer(corpus(config, apm.retriever.db.sentences), tmp,
                                 demo.vocab_size)
  tok = tokenizer.load_tokenizer(tmp)
  vocab = -(-tok.vocab_size // 64) * 64  # a multiple of 64, as model vocabularies usually are
  lm = gemma3.Gemma3Config(
      vocab_size=vocab, hidden_size=demo.hidden_size, intermediate_size=demo.intermediate_size,
      num_hidden_layers=demo.num_hidden_layers, num_attention_heads=demo.num_attention_heads,
      num_key_value_heads=demo.num_key_value_heads, head_dim=demo.head_dim,
      sliding_window=demo.sliding_window, query_pre_attn_scalar=float(demo.head_dim),
      pad_token_id=tok.pad_id, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
  params = gemma3.init_params(lm, jax.random.key(config.seed))
  hf_gemma3.export_gemma3(params, lm, tmp)
  os.replace(tmp, out_dir)
  return out_dir
