"""Stage 2, phase 2 "finetune" (config.phase): LoRA (r 16, alpha 16, dropout 0.05, all linear
layers) + the embedding/output table + both projection heads, on the nine-source instruction mix,
starting from the align phase's heads (REFERENCE.md §1.4: 4 epochs, effective batch 32, lr 2e-4).

``--config.init_from`` = the align workdir. ``:demo`` follows the align demo.
"""

from anatomix_jax.core import config as config_lib
from anatomix_jax.stage2 import config as defaults


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, demo=False)
  c = defaults.base_config("finetune")
  c.train.epochs = 4
  if arg.demo:
    defaults.apply_demo(c)
    # Equal weight per source: the synthetic sources' sizes say nothing about the real ones, and
    # the paper's proportions would leave MS-CXR-style grounding at 0.3% of the demo's 800 samples.
    c.data.weights = {k: 1.0 for k in defaults.PAPER_MIX}
    c.train.num_steps = 400
  return c
