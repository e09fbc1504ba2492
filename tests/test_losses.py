"""Box ops and stage-1 losses against hand-computed values."""

import math

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from anatomix_jax.stage1 import losses
from anatomix_jax.ops import boxes


@pytest.mark.parametrize("xp", [np, jnp])
def test_giou_hand_values(xp):
  a = xp.asarray([[0., 0., 2., 2.], [0., 0., 1., 1.], [1., 1., 4., 3.]])
  b = xp.asarray([[1., 1., 3., 3.], [2., 0., 3., 1.], [1., 1., 4., 3.]])
  # overlap 1 of union 7 in a 3x3 hull; disjoint unit squares in a 3x1 hull; identical boxes
  np.testing.assert_allclose(np.asarray(boxes.giou(a, b)), [1 / 7 - 2 / 9, -1 / 3, 1.0], atol=1e-6)
  np.testing.assert_allclose(np.asarray(boxes.iou(a, b)), [1 / 7, 0.0, 1.0], atol=1e-6)


def test_box_conversions_round_trip():
  xyxy = np.array([[10., 20., 30., 60.]])
  np.testing.assert_allclose(boxes.xyxy_to_cxcywh(xyxy), [[20., 40., 20., 40.]])
  np.testing.assert_allclose(boxes.cxcywh_to_xyxy(boxes.xyxy_to_cxcywh(xyxy)), xyxy)
  np.testing.assert_allclose(boxes.pairwise_iou(xyxy, np.array([[10., 20., 30., 60.], [0, 0, 1, 1]])),
                             [[1.0, 0.0]])


def _loss_cfg(**kw):
  return ml_collections.ConfigDict(dict(l1=5.0, giou=3.0, labels=2.0, aux=False, mask_absent=True) | kw)


def _bce(logit, y):
  p = 1 / (1 + math.exp(-logit))
  return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def _case():
  pred = np.array([[[0.5, 0.5, 0.2, 0.2], [0.3, 0.4, 0.2, 0.4]]], np.float32)   # B=1, N=2
  true = np.array([[[0.5, 0.5, 0.4, 0.2], [0.6, 0.6, 0.2, 0.2]]], np.float32)
  outputs = {"boxes": jnp.asarray(pred), "image_logits": jnp.asarray([[0.3, -1.2]]),
             "aux_boxes": jnp.asarray(np.stack([true, pred]))}
  batch = {"boxes": jnp.asarray(true), "box_mask": jnp.asarray([[1.0, 0.0]]),
           "labels": jnp.asarray([[1.0, 0.0]])}
  return outputs, batch


def test_stage1_losses_mask_absent_hand_computed():
  outputs, batch = _case()
  total, parts = losses.stage1_losses(outputs, batch, _loss_cfg())
  # Only anatomy 0 counts: |Δw| = 0.2; boxes [0.4,0.4,0.6,0.6] vs [0.3,0.4,0.7,0.6]:
  # IoU = 0.04/0.08 = 0.5 and the hull is the union, so GIoU = 0.5.
  l1, giou = 0.2, 1 - 0.5
  lab = (_bce(0.3, 1) + _bce(-1.2, 0)) / 2
  np.testing.assert_allclose(float(parts["l1"]), l1, rtol=1e-6)
  np.testing.assert_allclose(float(parts["giou"]), giou, rtol=1e-5)
  np.testing.assert_allclose(float(parts["labels"]), lab, rtol=1e-6)
  np.testing.assert_allclose(float(total), 5 * l1 + 3 * giou + 2 * lab, rtol=1e-5)


def test_stage1_losses_reference_regresses_absent_to_zero_box():
  outputs, batch = _case()
  _, parts = losses.stage1_losses(outputs, batch, _loss_cfg(mask_absent=False))
  # Anatomy 1 is regressed to [0,0,0,0]: L1 = 0.3+0.4+0.2+0.4 = 1.3; its xyxy box
  # [0.2,0.2,0.4,0.6] vs the degenerate zero box: IoU 0, hull [0,0,0.4,0.6] = 0.24, union 0.08.
  np.testing.assert_allclose(float(parts["l1"]), (0.2 + 1.3) / 2, rtol=1e-6)
  giou1 = 0 - (0.24 - 0.08) / 0.24
  np.testing.assert_allclose(float(parts["giou"]), ((1 - 0.5) + (1 - giou1)) / 2, rtol=1e-5)


def test_stage1_losses_aux_and_padding_rows():
  outputs, batch = _case()
  _, parts = losses.stage1_losses(outputs, batch, _loss_cfg(aux=True))
  # aux_boxes[0] equals the target: zero aux loss from the single intermediate layer.
  assert float(parts["aux_l1"]) == pytest.approx(0.0, abs=1e-7)
  assert float(parts["aux_giou"]) == pytest.approx(0.0, abs=1e-5)
  # A padding row (valid 0) changes nothing.
  pad = lambda x, v: jnp.concatenate([x, jnp.full_like(x, v)], 0)  # noqa: E731
  outputs2 = {"boxes": pad(outputs["boxes"], 0.9), "image_logits": pad(outputs["image_logits"], 5.0)}
  batch2 = {k: pad(v, 1.0) for k, v in batch.items()} | {"valid": jnp.asarray([1.0, 0.0])}
  _, parts2 = losses.stage1_losses(outputs2, batch2, _loss_cfg())
  _, parts1 = losses.stage1_losses(outputs, batch, _loss_cfg())
  for k in ("l1", "giou", "labels", "loss"):
    np.testing.assert_allclose(float(parts2[k]), float(parts1[k]), rtol=1e-6)


def test_extra_term_slot():
  outputs, batch = _case()
  base, _ = losses.stage1_losses(outputs, batch, _loss_cfg())
  total, parts = losses.stage1_losses(outputs, batch, _loss_cfg(),
                                      {"contrastive": (0.5, lambda o, b: jnp.asarray(2.0))})
  assert float(parts["contrastive"]) == 2.0
  np.testing.assert_allclose(float(total), float(base) + 1.0, rtol=1e-6)


def test_contrastive_pairs_config():
  # "same_anatomy" passes the anatomy index as groups; "both" is the mean of the two terms; the
  # values of the grouped loss itself are checked against numpy in test_contrastive.py.
  from anatomix_jax.stage1 import contrastive
  rng = np.random.default_rng(0)
  outputs = {"anatomy_embeddings": jnp.asarray(rng.normal(size=(3, 5, 4)), jnp.float32),
             "text_projection": jnp.asarray(rng.normal(size=(3, 5, 4)), jnp.float32)}
  batch = {"text_pooled": jnp.asarray(rng.normal(size=(3, 5, 6)), jnp.float32),
           "valid": jnp.asarray([1.0, 1.0, 0.0])}
  mask = jnp.asarray([[1.0] * 5, [1.0] * 5, [0.0] * 5])

  def term(pairs):
    cfg = _loss_cfg(contrastive=1.0, contrastive_kind="kl", contrastive_temperature=0.1,
                    contrastive_pairs=pairs)
    return float(losses.configured_terms(cfg)["contrastive"][1](outputs, batch))

  args = (outputs["anatomy_embeddings"], outputs["text_projection"], batch["text_pooled"], mask)
  everything = float(contrastive.contrastive_loss(*args, temperature=0.1))
  within = float(contrastive.contrastive_loss(
      *args, temperature=0.1, groups=jnp.broadcast_to(jnp.arange(5), (3, 5))))
  assert abs(within - everything) > 1e-3
  np.testing.assert_allclose(term("all"), everything, rtol=1e-6)
  np.testing.assert_allclose(term("same_anatomy"), within, rtol=1e-6)
  np.testing.assert_allclose(term("both"), (everything + within) / 2, rtol=1e-6)
  with pytest.raises(ValueError, match="contrastive_pairs"):
    losses.configured_terms(_loss_cfg(contrastive=1.0, contrastive_pairs="rows"))
