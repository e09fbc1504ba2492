"""The original AnatomiX's files in and out (``--mode=import`` / ``--mode=export_original``).

    # its APM checkpoint (+ emb_db.pt) → a stage-1 workdir; + its model.pt → a stage-2 workdir
    python -m anatomix_jax.main --config=configs/original.py --mode=import --workdir=OUT \
        --config.apm_checkpoint=apm_best.pth --config.emb_db=emb_db.pt \
        --config.lm_checkpoint=model.pt --config.lm_model_dir=/models/medgemma-4b-it
    # workdirs trained here → the same three file kinds, for the original code
    python -m anatomix_jax.main --config=configs/original.py --mode=export_original --workdir=OUT \
        --config.stage1_workdir=RUN1 --config.stage2_workdir=RUN2

Import writes ``{workdir}/stage1`` (Orbax checkpoint + ``rag/`` when ``emb_db`` is given) and
``{workdir}/stage2`` (a finetune-phase workdir, when ``lm_checkpoint`` is given); any subset of the
inputs works, as long as a stage-2 import has an APM (imported, or ``stage1_workdir``). Export
writes ``{workdir}/apm_checkpoint.pth``, ``emb_db.pt`` and ``model.pt`` for what is given.
Files are read with torch's weights-only unpickler; the only non-tensor types allowed are those
the original's files hold (argparse.Namespace, pathlib paths, builtins, OrderedDict).
"""

import ml_collections


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.stage = "original"
  # --- import: the original's files ----------------------------------------------------------
  c.apm_checkpoint = ""     # train_apm.py's checkpoint ({"model", "args", "epoch", ...})
  c.emb_db = ""             # src/rag/create_rag_db.py's emb_db.pt
  c.lm_checkpoint = ""      # src/models/anatomix.py's model.pt, or a checkpoint-N/ directory
  c.lm_model_dir = ""       # the local MedGemma / Gemma3 HF directory it was trained from
  # The original's PEFT model trains separate copies of the input table (embed_tokens) and the
  # output table (lm_head). "untied": keep both (the imported LM gets its own output table,
  # lm.tie_word_embeddings = False, trained with the embedding if finetuned further): the
  # original's model exactly. "tied": one table, only if the two agree (error naming the largest
  # difference otherwise); "embed_tokens" / "lm_head": keep that copy (the imported model then
  # differs from the original where the other copy was trained).
  c.lm_table = "untied"
  # --- export: workdirs trained here (import: stage1_workdir stands in for apm_checkpoint) ----
  c.stage1_workdir = ""
  c.stage2_workdir = ""
  return c
