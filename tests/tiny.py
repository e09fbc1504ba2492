"""Tiny stage-1 settings shared by the end-to-end tests (prime-ish sizes so nothing matches by chance)."""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import stage1  # noqa: E402

# field → value, applied both in-process and as --config.x=y flags.
OVERRIDES = {
    "data.image_size": 64,
    "data.num_workers": 0,
    "model.depths": (1, 1, 1, 1),
    "model.width": 4,
    "model.hidden_dim": 12,
    "model.num_heads": 2,
    "model.enc_layers": 1,
    "model.dec_layers": 2,
    "model.ffn_dim": 20,
    "model.text_hidden": 13,
    "model.dropout": 0.1,
    "train.batch_size": 8,
    "eval.batch_size": 8,
    "eval.num_overlays": 1,
    "optim.warmup_steps": 2,
}


def config(records_dir: str, **extra):
  """configs/stage1.py:demo shrunk to the tiny model, reading ``records_dir``."""
  c = stage1.get_config("demo")
  for key, value in {**OVERRIDES, "data.records_dir": records_dir, **extra}.items():
    section, field = key.split(".")
    c[section][field] = value
  return c


def flags(records_dir: str, **extra) -> list[str]:
  """The same as command-line overrides for ``python -m anatomix_jax.main``."""
  items = {**OVERRIDES, "data.records_dir": records_dir, **extra}
  return [f"--config.{k}={v}" for k, v in items.items()]
