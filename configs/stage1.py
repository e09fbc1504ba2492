"""Stage 1: the Anatomy Perception Module (APM).

``--config=configs/stage1.py`` is the paper setting (REFERENCE.md §1.2, §2): 1024² inputs, global batch
48, 45 epochs, ResNet-50, 4+4 layers, d=256, 4 heads, FFN 1024, 36 queries, projection 16.

``--config=configs/stage1.py:demo`` shrinks it for a 2-core CPU: a small ResNet and transformer at
128², trained on the embedded synthetic radiographs (generated on first use) for a few minutes.
Everything else is a ``--config.a.b=value`` override.
"""

import ml_collections

from anatomix_jax import config_lib


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
      dtype="float32", remat=False))

  # --- losses (REFERENCE.md §1.3) -------------------------------------------------------------
  c.loss = ml_collections.ConfigDict(dict(
      l1=5.0, giou=3.0, labels=2.0,
      # The contrastive KL term against the frozen text encoder (issue: text encoder + RAG).
      contrastive=0.0,
      aux=False,               # also supervise every decoder layer's boxes (reference: no)
      mask_absent=True,        # False: the reference's regression of absent anatomies to [0,0,0,0]
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
  c.train = ml_collections.ConfigDict(dict(
      batch_size=48,           # global
      epochs=45,
      num_steps=-1,            # -1: epochs × train examples / batch_size
      log_every=50,
      eval_every=-1,           # steps; -1: once per epoch
      checkpoint_every=-1,     # steps; -1: with every eval
      keep_checkpoints=3,
      best_metric="mean_iou",  # the kept best checkpoint maximises this val metric
  ))
  c.eval = ml_collections.ConfigDict(dict(
      batch_size=48, num_overlays=4,
      checkpoint="latest",     # --mode=eval scores the "latest" or the "best" checkpoint
  ))
  c.mesh = config_lib.mesh_config()
  c.sharding_rules = config_lib.DEFAULT_RULES

  if arg.demo:
    c.data.image_size = 128
    c.data.num_workers = 1
    c.model.update(dict(depths=(1, 1, 1, 1), width=16, hidden_dim=128, num_heads=4, enc_layers=2,
                        dec_layers=2, ffn_dim=256))
    c.optim.update(dict(lr=5e-4, backbone_lr=5e-4, warmup_steps=50, schedule="cosine"))
    c.train.update(dict(batch_size=16, epochs=0, num_steps=1200, log_every=50, eval_every=400))
    c.eval.batch_size = 50
  return c
