"""Synthetic chest radiographs in the real MIMIC-CXR-JPG / Chest ImaGenome on-disk formats.

``generate(root, num_train, num_val, num_test, seed=0)`` writes a deterministic dataset that the real
readers (``anatomix_jax.data.preprocess``) consume unchanged; see :mod:`.generator`.
"""

from anatomix_jax.synthetic.generator import DONE_MARKER, generate, layout
from anatomix_jax.synthetic.phantom import Findings

__all__ = ["DONE_MARKER", "Findings", "generate", "layout"]
