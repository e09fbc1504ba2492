"""Stage 2, phase 1 "align" (config.phase): only the two projection heads train, on report
generation (REFERENCE.md §1.4: 3 epochs, effective batch 32, lr 2e-4).

``--config=configs/stage2_align.py`` needs ``--config.apm.workdir`` (a trained stage-1 workdir with
its RAG database), ``--config.lm.model_dir`` (local MedGemma-4B) and ``--config.data.dir``.
``:demo`` runs on CPU after the stage-1 demo (``--config.apm.workdir`` = that demo's workdir).
"""

from anatomix_jax.core import config as config_lib
from anatomix_jax.stage2 import config as defaults


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, demo=False)
  c = defaults.base_config("align")
  c.data.weights = {k: (1.0 if k == "mimic_report_gen" else 0.0) for k in defaults.PAPER_MIX}
  c.train.epochs = 3
  if arg.demo:
    defaults.apply_demo(c)
    # Anatomy grounding joins the demo's align mix: the heads must learn to put each anatomy's
    # embedding where the tiny LM's lookup (learned on <obj_i> token embeddings in its text-only
    # pretraining) finds it; MedGemma's general reading of embeddings needs no such help.
    c.data.weights.anatomy_grounding = 1.0
    c.train.num_steps = 150
  return c
