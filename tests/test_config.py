"""configs/stage1.py: the paper setting, its parameter tree (abstractly), and config-error handling."""

import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from anatomix_jax.models import apm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import stage1  # noqa: E402


def test_paper_setting():
  c = stage1.get_config()
  assert (c.data.image_size, c.train.batch_size, c.train.epochs) == (1024, 48, 45)
  m = c.model
  assert (tuple(m.depths), m.width) == ((3, 4, 6, 3), 64)  # ResNet-50
  assert (m.enc_layers, m.dec_layers, m.hidden_dim, m.num_heads, m.ffn_dim) == (4, 4, 256, 4, 1024)
  assert (m.num_queries, m.proj_dim, m.num_labels, m.dropout) == (36, 16, 14, 0.1)
  assert (c.loss.l1, c.loss.giou, c.loss.labels) == (5.0, 3.0, 2.0)
  o = c.optim
  assert (o.lr, o.backbone_lr, o.weight_decay, o.clip_norm, o.schedule) == (1e-4, 1e-5, 1e-4, 0.1, "constant")
  assert (c.data.augment.degrees, c.data.augment.translate, c.data.augment.hflip_prob) == (15.0, 0.1, 0.3)
  assert c.seed == 2025


def test_paper_parameter_tree_abstractly():
  c = stage1.get_config()
  model = apm.APM(apm.APMConfig.from_config(c.model))
  size = c.data.image_size
  variables = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)},
                                                jnp.zeros((1, size, size, 1)), train=False))
  count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(tree)))  # noqa: E731
  # The original's counts (reference_apm_state_dict.txt): parameters and frozen-BN buffers.
  assert count(variables["params"]) == 31_759_714
  assert count(variables["batch_stats"]) == 106_240
  out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, size, size, 1))), variables)
  assert out["memory"].shape == (2, 1024, 256) and out["boxes"].shape == (2, 36, 4)


@pytest.mark.parametrize("override, message", [
    ("--config.train.bogus=1", "bogus"),
    ("--config.modle.width=8", "modle"),
])
def test_unknown_config_key_fails_before_any_work(tmp_path, override, message):
  workdir = tmp_path / "run"
  proc = subprocess.run([sys.executable, "-m", "anatomix_jax.main", "--config=configs/stage1.py:demo",
                         f"--workdir={workdir}", override], cwd=REPO, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode != 0
  assert message in proc.stderr
  assert not workdir.exists()  # nothing generated, nothing written


def test_unknown_config_argument_fails(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "anatomix_jax.main", "--config=configs/stage1.py:tiny",
                         f"--workdir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode != 0 and "unknown config argument 'tiny'" in proc.stderr


def test_paper_config_without_text_encoder_fails_before_any_work(tmp_path):
  # The paper setting trains with the contrastive term, which needs PubMedBERT from a local path.
  workdir = tmp_path / "run"
  proc = subprocess.run([sys.executable, "-m", "anatomix_jax.main", "--config=configs/stage1.py",
                         f"--workdir={workdir}"], cwd=REPO, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode != 0 and "config.text.encoder_dir is empty" in proc.stderr
  assert not (workdir / "data").exists()  # failed before generating or reading any data
