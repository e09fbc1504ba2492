"""Stage-2 config defaults shared by configs/stage2_align.py and configs/stage2_finetune.py
(REFERENCE.md §1.4, §2, §4). The config files pick the phase, its data mix and the demo."""

import ml_collections

from anatomix_jax.core import config as config_lib
from anatomix_jax.models import lora
from anatomix_jax.stage2 import prompt

# The reference's nine sources with equal weight per record (its loader concatenates them; a
# weight here is relative sampling probability per source, so record counts give the same mix).
PAPER_MIX = dict(mimic_report_gen=135_049, anatomy_grounding=237_938, mscxr=2_445,
                 vindr_instruct=38_122, padchest_gr=3_920, mimic_vqa=101_963, slake=1_175,
                 radialog_instruct=12_542, mimic_cxr_classification=182_425)
def base_config(phase: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = "stage2"
  c.phase = phase                     # "align" (projection heads) or "finetune" (+ LoRA, embedding)
  c.seed = 2025

  # --- the frozen APM and its RAG database (a stage-1 workdir) ---------------------------------
  c.apm = ml_collections.ConfigDict(dict(workdir="", rag_dir="", checkpoint="latest"))

  # --- language model ------------------------------------------------------------------------
  c.lm = ml_collections.ConfigDict(dict(
      # A local Hugging Face Gemma3 / MedGemma directory (config.json, safetensors, tokenizer);
      # the paper: google/medgemma-4b-it. Empty with demo.enabled: a tiny LM made locally.
      model_dir="",
      tokenizer_dir="",                # empty: model_dir
      # None: as the base's config.json (Gemma3/MedGemma tie the input and output tables); False:
      # a separate output table (what an imported original checkpoint trained, configs/original.py).
      tie_word_embeddings=None,
      # remat: MedGemma-4B's activations at 32 × 3,072 tokens need ~184 GiB per v5e device
      # without it (benchmarks/compile_check.py); the recomputation costs a third more FLOPs.
      dtype="bfloat16", param_dtype="float32", remat=True,
      scan_layers=False,               # one scanned layer body (flat compile time in depth)
      # Attention (models/attention.py): "auto" = splash (Pallas) on TPU, cuDNN flash attention on
      # GPU, XLA einsums on CPU; "xla" | "splash" | "cudnn" force one (generation is always XLA).
      attention="auto",
      projection_hidden=512,
      bidirectional_image=False,       # the reference: causal attention over image tokens too
      # The image as LM tokens: "patches" (the APM's P patch-memory tokens, the paper's model) or
      # "cls" (one token, the APM's CLS embedding: the reference's clsIT ablation).
      image_tokens="patches",
      lora=ml_collections.ConfigDict(dict(rank=16, alpha=16.0, dropout=0.05,
                                          targets=lora.ALL_LINEAR)),
      demo=ml_collections.ConfigDict(dict(
          enabled=False, vocab_size=2048, hidden_size=64, intermediate_size=192,
          num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
          sliding_window=512,
          # Every n-th layer attends to the whole sequence (Gemma3's pattern is 6: a 4-layer LM
          # would have only sliding layers, and its answers could not see context lines more
          # than sliding_window tokens back).
          full_attention_every=2,
          pretrain_steps=0, pretrain_lr=3e-3, pretrain_batch_size=16,
          # Then text-only stage-2 prompts with short contexts (demo/lm.py: context_rows).
          context_pretrain_steps=0, context_batch_size=16, context_examples=6000,
          context_lines=(2, 8),
          # > 0: context-pretraining positions get random gaps before lines, up to this position
          # (demo/lm.py: stretched_positions), so short prompts span a stage-2 prompt's distances.
          context_max_position=0)),
  ))
  c.init_from = ""                    # finetune: the align workdir whose heads start phase 2

  # --- data ------------------------------------------------------------------------------------
  c.data = ml_collections.ConfigDict(dict(
      dir="",                          # {source}/{split}.jsonl files (anatomix_jax.instruct)
      image_roots=ml_collections.ConfigDict(dict(default="")),
      weights=ml_collections.ConfigDict({k: float(v) for k, v in PAPER_MIX.items()}),
      tasks=(),                        # only these tasks (empty: all)
      train_split="train", eval_split="validate",
      intensity="minmax",              # as the stage-1 records
      skip_bad=True,                   # missing/corrupt images: counted skips
      augment=ml_collections.ConfigDict(dict(
          enabled=True, degrees=15.0, translate=0.1, scale_min=0.9, scale_max=1.1,
          hflip_prob=0.3, interpolation="nearest")),
      system_prompts=prompt.SYSTEM_PROMPTS,         # the reference's three, byte for byte
      eval_system_prompts=prompt.EVAL_SYSTEM_PROMPTS,  # "" (its benchmark scripts)
      context_drop_ratio=0.1,
      # The prompt's anatomy context (stage2.prompt): "full" (boxes + retrieved sentences, the
      # paper's model), "skip" (no anatomy lines), "only_emb" (emb:<emb><obj_i></emb> lines) or
      # "names" (the default context: boxes + anatomy names, no retrieval).
      context="full",
      # Name each line's anatomy before its box (prompt.finding_lines; not the reference's format):
      # a small LM then finds the asked anatomy's line by its name, which it learns far sooner than
      # the <obj_i> association (README "Does stage 2 learn?"). Off: the reference's lines.
      line_names=False,
      buckets=(2048, 2560, 3072),      # padded lengths (tokens); one compile per bucket
      truncation="error",              # or "drop" (counted)
  ))

  # --- optimisation (REFERENCE.md §2) ----------------------------------------------------------
  c.optim = ml_collections.ConfigDict(dict(
      lr=2e-4, warmup_ratio=0.03, clip_norm=0.3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0))
  c.train = config_lib.train_config(
      batch_size=32, epochs=3, log_every=50, checkpoint_every=8000, eval_every=8000,
      best_metric="loss", best_mode="min",   # the validation loss of the mixture's eval split
      eval_limit=2000,
      # Output logits in slices of this many tokens per row (0: all at once): MedGemma's
      # [B, T, 262k] float32 logits take 3 GiB per row of 3,072 tokens, their gradient as much
      # again; 256 is what lets the finetune step fit a v5e (benchmarks/compile_check.py).
      loss_chunk=256)
  c.eval = ml_collections.ConfigDict(dict(max_new_tokens=96))
  # FSDP over all devices: 4B frozen weights do not fit replicated on a 16 GiB chip.
  c.mesh = config_lib.mesh_config(shape=(1, -1, 1))
  c.sharding_rules = config_lib.DEFAULT_RULES
  return c


def apply_demo(c: ml_collections.ConfigDict) -> None:
  """CPU demo after the stage-1 demo: its workdir's APM/RAG, synthetic instructions, tiny LM.

  Prompts are ~1,400 tokens (1,024 → 16 image tokens, but 36 context lines remain), so attention
  dominates a step on CPU: 2 heads and batch 2 keep a step near 1 s on 2 cores.
  """
  c.lm.update(dict(dtype="float32", projection_hidden=64, remat=False))
  c.mesh.shape = (-1, 1, 1)
  # The base LM stands in for MedGemma, which arrives able to copy from its prompt: 500 steps of
  # 32 × 128 tokens of the demo's conversations give it induction (it copies the asked anatomy's
  # name into the answer: teacher-forced accuracy on those tokens 0.94 after 500 such steps, 0.58
  # after 250), then 350 steps on text-only prompts with 2-10 context lines start it copying the
  # asked line's box (README "Does stage 2 learn?": learned in part within the CPU budget; named
  # lines, data.line_names, and stretched positions, lm.demo.context_max_position, learn the
  # lookup in text-only runs but need more steps than the budget holds).
  c.lm.demo.update(dict(enabled=True, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                        pretrain_steps=500, pretrain_batch_size=32, context_pretrain_steps=350,
                        context_lines=(2, 10)))
  c.lm.lora.update(dict(rank=8, alpha=16.0, dropout=0.0))
  c.data.buckets = (1536, 1792)
  c.data.augment.enabled = False
  c.optim.update(dict(lr=2e-3))
  c.train.update(dict(batch_size=2, epochs=0, log_every=20, checkpoint_every=100, eval_every=-1,
                      eval_limit=48, loss_chunk=0))
  c.eval.max_new_tokens = 64
