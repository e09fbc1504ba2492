"""Stage-2 training: which parameters train, the optimizer, and the pure jitted step.

Phase 1 "align" trains the projection heads only; phase 2 "finetune" trains LoRA, the projection
heads and the (tied) embedding/output table — PEFT's ``modules_to_save=['lm_head','embed_tokens']``
is one table in Gemma3 (REFERENCE.md §1.4); an untied LM (``tie_word_embeddings=False``, e.g. an
import of the original's two trained copies) trains both tables in the "embedding" group. The param
tree is split once into a trainable and a frozen part: the train state (and so the optimizer state
and the checkpoints) holds only the trainable part; the frozen part (the base LM, hundreds of times
larger) is a separate, never donated jit argument that comes from the base weights.

``train_step(state, frozen, batch, rng) -> (state, metrics)``. Batch keys (global arrays):
``tokens`` int32[B, T], ``attention_mask`` int32[B, T] (right padding), ``targets`` int32[B, T]
(the token each position predicts), ``weights`` float32[B, T] (1 where that prediction is in the
loss), ``image_features`` float[B, P, 256], ``object_features`` float[B, 36, 16].
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from anatomix_jax.models import anatomix, gemma3
from anatomix_jax.models.lora import LORA_LEAVES
from anatomix_jax.stage1 import steps as train_steps

EMBEDDING_PATH = "lm/embedder/embedding"
LM_HEAD_PATH = "lm/embedder/lm_head"  # the output table of an untied LM
GROUPS: dict[str, Callable[[str], bool]] = {
    "projection": lambda path: path.split("/")[0] in anatomix.PROJECTION_GROUPS,
    "lora": lambda path: path.rsplit("/", 1)[-1] in LORA_LEAVES,
    "embedding": lambda path: path in (EMBEDDING_PATH, LM_HEAD_PATH),
}
# What each training phase trains (config.phase).
PHASE_GROUPS = {"align": ("projection",), "finetune": ("projection", "lora", "embedding")}


@flax.struct.dataclass
class Stage2State:
  """The trained part of stage 2.

  Attributes:
    step: scalar int32, updates applied.
    params: the trainable leaves only (a subtree of the AnatomiX params).
    opt_state: optimizer state of ``params``.
  """
  step: jax.Array
  params: Any
  opt_state: Any


def trainable_predicate(groups: Sequence[str]) -> Callable[[str], bool]:
  """'/'-joined param path → True if it belongs to one of ``groups`` (keys of ``GROUPS``)."""
  unknown = sorted(set(groups) - set(GROUPS))
  if unknown:
    raise ValueError(f"trainable groups {unknown} are unknown; choose from {sorted(GROUPS)}")
  tests = [GROUPS[g] for g in groups]
  return lambda path: any(t(path) for t in tests)


def split(params: Mapping[str, Any], groups: Sequence[str]) -> tuple[dict, dict]:
  """(trainable, frozen) parts of AnatomiX params for ``groups``."""
  return anatomix.split_trainable(params, trainable_predicate(groups))


def learning_rate(peak: float, num_steps: int, warmup_ratio: float) -> optax.Schedule:
  """HF's linear schedule: 0 → peak over ⌈ratio·steps⌉ warm-up steps, then linearly to 0."""
  warmup = int(-(-warmup_ratio * num_steps // 1))
  decay = optax.linear_schedule(peak, 0.0, max(num_steps - warmup, 1))
  if warmup <= 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def make_optimizer(optim_cfg: Any, num_steps: int) -> optax.GradientTransformation:
  """Global-norm clipping then AdamW (REFERENCE.md §2: lr 2e-4, linear, 3% warm-up, clip 0.3,
  weight decay 0)."""
  schedule = learning_rate(optim_cfg.lr, num_steps, optim_cfg.warmup_ratio)
  return optax.chain(
      optax.clip_by_global_norm(optim_cfg.clip_norm) if optim_cfg.clip_norm > 0
      else optax.identity(),
      optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                  weight_decay=optim_cfg.weight_decay))


def chunked_cross_entropy(logits_fn: Callable[[jax.Array], jax.Array], hidden: jax.Array,
                          targets: jax.Array, weights: jax.Array, chunk: int
                          ) -> tuple[jax.Array, jax.Array]:
  """``anatomix.cross_entropy`` without materialising all logits: the sequence in ``chunk``-token
  slices, each slice's float32 logits recomputed in the backward pass (``jax.checkpoint``), so the
  step holds [B, chunk, V] logits instead of [B, T, V] (MedGemma: V = 262,208).

  Args:
    logits_fn: float[B, c, H] → float32[B, c, V].
    hidden: float[B, T, H], final-normed hidden states.
    targets, weights: [B, T].
    chunk: tokens per slice (T is padded with weight 0 to a multiple).

  Returns:
    ``(Σ w·(−log p(target)), Σ w)``.
  """
  b, t = targets.shape
  n = -(-t // chunk)
  pad = n * chunk - t
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets, weights = jnp.pad(targets, ((0, 0), (0, pad))), jnp.pad(weights, ((0, 0), (0, pad)))
  slices = lambda x: jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)  # noqa: E731

  @jax.checkpoint
  def one(h, y, w):
    return anatomix.cross_entropy(logits_fn(h), y, w)

  def body(carry, xs):
    total, count = one(*xs)
    return (carry[0] + total, carry[1] + count), None

  zero = jnp.zeros((), jnp.float32)
  (total, count), _ = jax.lax.scan(body, (zero, zero),
                                   (slices(hidden), slices(targets), slices(weights)))
  return total, count


def loss_and_count(model: anatomix.AnatomiX, params: Any, batch: Mapping[str, jax.Array],
                   rngs: Mapping[str, jax.Array] | None = None, loss_chunk: int = 0
                   ) -> tuple[jax.Array, jax.Array]:
  """Mean next-token cross-entropy over the weighted positions of the whole batch, and their count.

  Args:
    model: the stage-2 model.
    params: all AnatomiX params.
    batch: see the module docstring.
    rngs: e.g. ``{"dropout": key}`` (LoRA dropout) or None.
    loss_chunk: > 0: logits in slices of this many tokens (``chunked_cross_entropy``); 0: at once.
  """
  mask = batch["attention_mask"]
  logits, hidden = model.apply({"params": params}, batch["tokens"], batch["image_features"],
                               batch["object_features"], positions=gemma3.positions_from_mask(mask),
                               attention_mask=mask, rngs=rngs, return_hidden=True)
  if 0 < loss_chunk < batch["tokens"].shape[1]:
    # The full logits above are then unused, and jit drops them.
    logits_fn = lambda h: model.apply({"params": params}, h, method="logits")  # noqa: E731
    total, count = chunked_cross_entropy(logits_fn, hidden, batch["targets"], batch["weights"],
                                         loss_chunk)
  else:
    total, count = anatomix.cross_entropy(logits, batch["targets"], batch["weights"])
  return total / jnp.maximum(count, 1.0), count


def make_train_step(model: anatomix.AnatomiX, tx: optax.GradientTransformation,
                    loss_chunk: int = 0) -> Callable[..., tuple[Stage2State, dict]]:
  """Builds ``train_step(state, frozen, batch, rng) -> (state, metrics)``; ``loss_chunk`` as in
  ``loss_and_count``.

  A step whose loss or gradient is not finite leaves params and optimizer state unchanged (the
  step counter still advances) and reports ``nonfinite = 1``, as in stage 1.
  """
  def train_step(state: Stage2State, frozen: Any, batch: Mapping[str, jax.Array],
                 rng: jax.Array) -> tuple[Stage2State, dict]:
    rngs = {"dropout": jax.random.fold_in(rng, state.step)}

    def loss_fn(trainable):
      return loss_and_count(model, anatomix.combine(frozen, trainable), batch, rngs, loss_chunk)

    (loss, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state, guard = train_steps.apply_if_finite(state, tx, loss, grads)
    return new_state, {"loss": loss, "tokens": count, **guard}

  return train_step


def make_eval_step(model: anatomix.AnatomiX, loss_chunk: int = 0) -> Callable[..., dict]:
  """``eval_step(state, frozen, batch) -> {"loss_sum", "tokens"}`` (summed, for a corpus mean)."""
  def eval_step(state: Stage2State, frozen: Any, batch: Mapping[str, jax.Array]) -> dict:
    loss, count = loss_and_count(model, anatomix.combine(frozen, state.params), batch,
                                 loss_chunk=loss_chunk)
    return {"loss_sum": loss * count, "tokens": count}

  return eval_step


def init_state(trainable: Any, tx: optax.GradientTransformation) -> Stage2State:
  """A fresh state around the trainable params."""
  return Stage2State(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=tx.init(trainable))


def jit_train_step(train_step: Callable, state_shardings: Any, frozen_shardings: Any,
                   batch_sharding: NamedSharding, mesh: Mesh) -> Callable:
  """pjit of the step: explicit shardings, the state donated, the frozen params not."""
  replicated = NamedSharding(mesh, P())
  return jax.jit(train_step,
                 in_shardings=(state_shardings, frozen_shardings, batch_sharding, replicated),
                 out_shardings=(state_shardings, replicated), donate_argnums=0)
