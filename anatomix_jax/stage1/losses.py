"""Stage-1 (APM) losses: box L1 + GIoU with fixed one-to-one assignment, image-label BCE, extra terms.

Axis letters: B batch, N anatomy queries (36), C image labels (14), L decoder layers.

Query ``i`` is anatomy ``i`` (no Hungarian matching, REFERENCE.md §1.2). The reference normalises both
box losses by ``num_boxes = B·N`` and regresses anatomies missing from a scene graph to
``[0, 0, 0, 0]``; by default this project masks them out and normalises by the number of present
boxes instead (``mask_absent=False`` restores the reference).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from anatomix_jax.stage1 import contrastive
from anatomix_jax.ops import boxes as box_ops

Array = jax.Array
# loss.contrastive_pairs: which object/sentence pairs the contrastive term compares.
CONTRASTIVE_PAIRS = ("all", "same_anatomy", "both")

# An extra loss term: (model outputs, batch) -> scalar, e.g. the contrastive term.
LossTerm = Callable[[Mapping[str, Array], Mapping[str, Array]], Array]


def box_losses(pred: Array, target: Array, weight: Array, num_boxes: Array) -> tuple[Array, Array]:
  """Summed L1 and (1 − GIoU) box losses divided by ``num_boxes``.

  Args:
    pred: ``[..., 4]`` predicted boxes, normalized cxcywh.
    target: ``[..., 4]`` target boxes, normalized cxcywh.
    weight: ``[...]`` per-box weight (0 excludes a box).
    num_boxes: scalar normaliser (clamped to ≥ 1).

  Returns:
    ``(l1, giou)`` scalars.
  """
  num_boxes = jnp.maximum(num_boxes, 1.0)
  l1 = jnp.sum(jnp.abs(pred - target).sum(-1) * weight) / num_boxes
  giou = box_ops.giou(box_ops.cxcywh_to_xyxy(pred), box_ops.cxcywh_to_xyxy(target))
  return l1, jnp.sum((1.0 - giou) * weight) / num_boxes


def label_loss(logits: Array, labels: Array, valid: Array) -> Array:
  """Mean binary cross-entropy with logits over valid rows: ``[B, C]``, ``[B, C]``, ``[B]`` → scalar."""
  bce = optax.sigmoid_binary_cross_entropy(logits, labels)
  denom = jnp.maximum(valid.sum() * logits.shape[-1], 1.0)
  return jnp.sum(bce * valid[:, None]) / denom


def configured_terms(cfg: Any) -> dict[str, tuple[float, LossTerm]]:
  """The extra terms the ``loss`` config switches on: ``contrastive`` when its weight is > 0.

  The contrastive term (REFERENCE.md §1.3) pairs every anatomy of every real image in the global
  batch (absent anatomies included, with their "… is healthy." sentence, as in the reference):
  outputs ``anatomy_embeddings`` and ``text_projection`` ``[B, N, d]``, batch ``text_pooled``
  ``[B, N, D_text]`` (the frozen encoder's embeddings) and ``valid [B]``. ``contrastive_pairs``:
  "all" (the reference: every object against every sentence of the batch), "same_anatomy" (each
  anatomy against its own sentences in the batch's images; ``contrastive.contrastive_loss``
  ``groups``) or "both" (the mean of the two).
  """
  if not cfg.contrastive:
    return {}
  if cfg.contrastive_pairs not in CONTRASTIVE_PAIRS:
    raise ValueError(f"loss.contrastive_pairs must be one of {CONTRASTIVE_PAIRS}, "
                     f"got {cfg.contrastive_pairs!r}")
  groupings = {"all": (False,), "same_anatomy": (True,), "both": (False, True)}[
      cfg.contrastive_pairs]

  def contrastive_term(outputs: Mapping[str, Array], batch: Mapping[str, Array]) -> Array:
    emb = outputs["anatomy_embeddings"]
    valid = batch.get("valid", jnp.ones(emb.shape[:1], jnp.float32))
    anatomy = jnp.broadcast_to(jnp.arange(emb.shape[1]), emb.shape[:2])
    terms = [contrastive.contrastive_loss(
        emb, outputs["text_projection"], batch["text_pooled"],
        jnp.broadcast_to(valid[:, None], emb.shape[:2]), kind=cfg.contrastive_kind,
        temperature=cfg.contrastive_temperature, groups=anatomy if within else None)
             for within in groupings]
    return sum(terms) / len(terms)

  return {"contrastive": (float(cfg.contrastive), contrastive_term)}


def stage1_losses(outputs: Mapping[str, Array], batch: Mapping[str, Array], cfg: Any,
                  extra_terms: Mapping[str, tuple[float, LossTerm]] | None = None
                  ) -> tuple[Array, dict[str, Array]]:
  """Total weighted APM loss and its parts.

  Args:
    outputs: APM outputs: ``boxes [B, N, 4]``, ``aux_boxes [L, B, N, 4]``, ``image_logits [B, C]``.
    batch: ``boxes [B, N, 4]`` (normalized cxcywh), ``box_mask [B, N]``, ``labels [B, C]`` and
      optionally ``valid [B]`` (0 for padding rows).
    cfg: the ``loss`` config: weights ``l1``, ``giou``, ``labels``; ``aux``; ``mask_absent``.
    extra_terms: name → (weight, term) added to the total, e.g. the contrastive loss.

  Returns:
    ``(total, parts)`` where ``parts`` holds every unweighted term and ``loss`` (the total).
  """
  valid = batch.get("valid", jnp.ones(batch["labels"].shape[:1], jnp.float32))
  if cfg.mask_absent:
    weight = batch["box_mask"] * valid[:, None]
    target = batch["boxes"]
  else:  # reference: absent anatomies are regressed to the all-zero box and counted
    weight = jnp.broadcast_to(valid[:, None], batch["box_mask"].shape)
    target = batch["boxes"] * batch["box_mask"][..., None]
  num_boxes = weight.sum()

  l1, giou = box_losses(outputs["boxes"], target, weight, num_boxes)
  parts = {"l1": l1, "giou": giou,
           "labels": label_loss(outputs["image_logits"], batch["labels"], valid)}
  total = cfg.l1 * l1 + cfg.giou * giou + cfg.labels * parts["labels"]
  if cfg.aux:  # DETR auxiliary decoding losses on every decoder layer but the last
    aux_l1, aux_giou = jax.vmap(box_losses, in_axes=(0, None, None, None))(
        outputs["aux_boxes"][:-1], target, weight, num_boxes)
    parts["aux_l1"], parts["aux_giou"] = aux_l1.sum(), aux_giou.sum()
    total += cfg.l1 * parts["aux_l1"] + cfg.giou * parts["aux_giou"]
  for name, (term_weight, term) in (extra_terms or {}).items():
    parts[name] = term(outputs, batch)
    total += term_weight * parts[name]
  parts["loss"] = total
  return total, parts
