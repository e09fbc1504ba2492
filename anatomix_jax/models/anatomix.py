"""AnatomiX stage 2: APM features → projection heads → placeholder tokens → Gemma3 (REFERENCE.md §1.4).

The frozen APM runs first (``memory`` [B, P, 256] patch features and ``anatomy_embeddings``
[B, 36, 16]); here they are projected to the LM width by two heads of the reference's shape

  Linear(in → 512) → GELU (exact) → LayerNorm(512, eps 1e-5) → Linear(512 → H)

and written into the input embeddings at the ``<image>`` positions (the p-th ``<image>`` token of a
row gets patch p) and the ``<obj_i>`` positions (anatomy i), after the text embeddings have been
scaled by √H (so, as in the reference, the projected vectors are not scaled). The placement is a
gather with static shapes: no data-dependent shapes under jit, and a prompt with any number of
placeholders (e.g. a decode step with none) is valid. Attention is causal like the reference;
``bidirectional_image`` lets the tokens of one image span see each other (Gemma3's
``token_type_ids`` behaviour).

Parameter tree: ``lm/…`` (``Gemma3``, LoRA leaves included when configured),
``image_projection/{fc_in,norm,fc_out}``, ``object_projection/{…}``.

Axis letters: B batch, T tokens, P image patches, O anatomies (36), H LM width, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from anatomix_jax.models import gemma3
from anatomix_jax.models.transformer import TOKEN_AXES

Array = jax.Array

PROJECTION_GROUPS = ("image_projection", "object_projection")


@dataclasses.dataclass(frozen=True)
class AnatomiXConfig:
  """Stage-2 model hyper-parameters.

  Attributes:
    lm: the Gemma3 decoder (with ``lora`` for step 2).
    image_token_id: id of ``<image>``.
    first_object_token_id: id of ``<obj_0>``; ``<obj_i>`` = this + i (the tokenizer adds them in
      order, and ``stage2.tokenizer`` checks it).
    num_objects: O, anatomies (36).
    image_dim: width of the APM's patch memory (256).
    object_dim: width of the APM's anatomy embeddings (16).
    projection_hidden: hidden width of both projection heads (512).
    bidirectional_image: image tokens of one span attend to each other both ways.
  """

  lm: gemma3.Gemma3Config
  image_token_id: int
  first_object_token_id: int
  num_objects: int = 36
  image_dim: int = 256
  object_dim: int = 16
  projection_hidden: int = 512
  bidirectional_image: bool = False

  def __post_init__(self):
    vocab = self.lm.vocab_size
    ids = {"image_token_id": self.image_token_id,
           "first_object_token_id": self.first_object_token_id}
    for name, value in ids.items():
      if not 0 <= value < vocab:
        raise ValueError(f"{name} {value} is outside the LM vocabulary (vocab_size {vocab}; "
                         "resize the embedding after adding the stage-2 tokens)")
    last = self.first_object_token_id + self.num_objects - 1
    if last >= vocab:
      raise ValueError(f"<obj_{self.num_objects - 1}> id {last} is outside the LM vocabulary "
                       f"(vocab_size {vocab})")
    if self.first_object_token_id <= self.image_token_id <= last:
      raise ValueError(f"image_token_id {self.image_token_id} lies among the object token ids")


def _torch_linear_init(fan_in: int):
  """torch ``nn.Linear``'s default init for weight and bias: U(±1/√fan_in)."""
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class ProjectionHead(nn.Module):
  """``[..., in] → [..., features]``: Linear → GELU → LayerNorm → Linear (the reference's head).

  Attributes:
    hidden: the hidden width (512).
    features: the output width (the LM's hidden size).
    dtype / param_dtype: compute and parameter dtypes.
  """

  hidden: int
  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    def dense(features, fan_in, axes, name):
      init = _torch_linear_init(fan_in)
      return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype,
                      kernel_init=nn.with_logical_partitioning(init, axes),
                      bias_init=nn.with_logical_partitioning(init, axes[1:]), name=name)

    x = dense(self.hidden, x.shape[-1], (None, "mlp"), "fc_in")(x)
    x = nn.gelu(x, approximate=False)
    x = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, param_dtype=self.param_dtype,
                     scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                             ("mlp",)),
                     bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                            ("mlp",)), name="norm")(x)
    return dense(self.features, self.hidden, ("mlp", "embed"), "fc_out")(x)


def image_groups(tokens: Array, image_token_id: int) -> Array:
  """int32[B, T]: 1 on ``<image>`` tokens (one span per prompt), 0 elsewhere."""
  return (tokens == image_token_id).astype(jnp.int32)


class AnatomiX(nn.Module):
  """The stage-2 model: projection heads + placeholder injection + the Gemma3 decoder.

  Attributes:
    config: the hyper-parameters.
  """

  config: AnatomiXConfig

  def setup(self):
    cfg = self.config
    head = lambda: ProjectionHead(cfg.projection_hidden, cfg.lm.hidden_size,  # noqa: E731
                                  cfg.lm.compute_dtype, cfg.lm.params_dtype)
    self.image_projection = head()
    self.object_projection = head()
    self.lm = gemma3.Gemma3(cfg.lm)

  def embed(self, tokens: Array, image_features: Array, object_features: Array) -> Array:
    """Input embeddings with the projected APM features at the placeholder tokens.

    Args:
      tokens: int[B, T] ids holding ``<image>`` (≤ P per row) and ``<obj_i>`` tokens.
      image_features: float[B, P, image_dim], the APM patch memory.
      object_features: float[B, O, object_dim], the APM anatomy embeddings.

    Returns:
      float[B, T, H]: text tokens as ``Gemma3.embed`` (scaled by √H); the p-th ``<image>`` token
      of a row = projected patch p; ``<obj_i>`` = projected anatomy i (both unscaled).
    """
    cfg = self.config
    b, t = tokens.shape
    p = image_features.shape[1]
    if image_features.shape[0] != b or object_features.shape[:2] != (b, cfg.num_objects):
      raise ValueError(f"features for batch {b} and {cfg.num_objects} anatomies expected, got "
                       f"image {image_features.shape} and objects {object_features.shape}")
    x = self.lm.embed(tokens)
    image = self.image_projection(image_features).astype(x.dtype)  # [B, P, H]
    objects = self.object_projection(object_features).astype(x.dtype)  # [B, O, H]
    is_image = tokens == cfg.image_token_id
    rank = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, p - 1)
    image_at = jnp.take_along_axis(image, rank[..., None], axis=1)  # [B, T, H]
    obj_index = tokens - cfg.first_object_token_id
    is_object = (obj_index >= 0) & (obj_index < cfg.num_objects)
    object_at = jnp.take_along_axis(
        objects, jnp.clip(obj_index, 0, cfg.num_objects - 1)[..., None], axis=1)
    x = jnp.where(is_image[..., None], image_at, jnp.where(is_object[..., None], object_at, x))
    return nn.with_logical_constraint(x, TOKEN_AXES)

  def logits(self, hidden: Array) -> Array:
    """Final-normed hidden states float[B, T, H] → float32[B, T, V] (the tied output layer)."""
    return self.lm.logits(hidden)

  def __call__(self, tokens: Array, image_features: Array, object_features: Array, *,
               positions: Array, attention_mask: Array, return_hidden: bool = False) -> tuple:
    """Full forward over a prompt (training / scoring).

    Args:
      tokens: int[B, T].
      image_features: float[B, P, image_dim].
      object_features: float[B, O, object_dim].
      positions: int32[B, T] (``gemma3.positions_from_mask`` for right padding).
      attention_mask: [B, T], nonzero for real tokens.
      return_hidden: also return the final-normed hidden states (for a chunked loss).

    Returns:
      ``(logits float32[B, T, V],)`` or ``(logits, hidden float[B, T, H])``.
    """
    embeddings = self.embed(tokens, image_features, object_features)
    groups = (image_groups(tokens, self.config.image_token_id)
              if self.config.bidirectional_image else None)
    out = self.lm(embeddings=embeddings, positions=positions, attention_mask=attention_mask,
                  token_groups=groups, return_hidden=return_hidden)
    return (out[0], out[2]) if return_hidden else (out[0],)


def cross_entropy(logits: Array, targets: Array, weights: Array) -> tuple[Array, Array]:
  """Summed token cross-entropy and the summed weight.

  Args:
    logits: float[B, T, V] (float32).
    targets: int[B, T], the token each position predicts.
    weights: [B, T], 1 where the position counts (0 for prompt, padding and placeholders).

  Returns:
    ``(Σ w·(−log p(target)), Σ w)`` as float32 scalars; the mean is their ratio.
  """
  logits = logits.astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  w = weights.astype(jnp.float32)
  return jnp.sum((logz - picked) * w), jnp.sum(w)


def split_trainable(params: Mapping[str, Any], trainable: Any) -> tuple[dict, dict]:
  """Splits a param tree into (trainable, frozen) subtrees by a predicate on '/'-joined paths.

  Args:
    params: nested dict of arrays.
    trainable: ``path -> bool``.

  Returns:
    Two nested dicts with disjoint leaves whose union is ``params`` (empty branches dropped).
  """
  def split(tree, prefix):
    yes, no = {}, {}
    for key, value in tree.items():
      path = f"{prefix}/{key}" if prefix else key
      if isinstance(value, Mapping):
        a, b = split(value, path)
        if a:
          yes[key] = a
        if b:
          no[key] = b
      elif trainable(path):
        yes[key] = value
      else:
        no[key] = value
    return yes, no

  return split(params, "")


def combine(*trees: Mapping[str, Any]) -> dict[str, Any]:
  """Union of nested dicts with disjoint leaves (the inverse of ``split_trainable``)."""
  out: dict[str, Any] = {}
  for tree in trees:
    for key, value in tree.items():
      if isinstance(value, Mapping):
        existing = out.get(key, {})
        if not isinstance(existing, Mapping):
          raise ValueError(f"{key!r} is a leaf in one tree and a branch in another")
        out[key] = combine(existing, value)
      elif key in out:
        raise ValueError(f"leaf {key!r} appears in more than one tree")
      else:
        out[key] = value
  return out


def _dummy_inputs(config: AnatomiXConfig) -> tuple[Array, ...]:
  one = jnp.zeros((1, 1), jnp.int32)
  return (one, jnp.zeros((1, 1, config.image_dim)),
          jnp.zeros((1, config.num_objects, config.object_dim)))


def abstract_variables(config: AnatomiXConfig) -> dict[str, Any]:
  """``AnatomiX(config).init`` evaluated abstractly (boxed ShapeDtypeStructs; nothing allocated)."""
  tokens, image, objects = _dummy_inputs(config)
  init = lambda r: AnatomiX(config).init(  # noqa: E731
      r, tokens, image, objects, positions=tokens, attention_mask=tokens)
  return jax.eval_shape(init, jax.random.key(0))


def init_params(config: AnatomiXConfig, rng: Array) -> dict[str, Any]:
  """Random params (unboxed) on the default device."""
  tokens, image, objects = _dummy_inputs(config)
  variables = AnatomiX(config).init(rng, tokens, image, objects, positions=tokens,
                                    attention_mask=tokens)
  return nn.unbox(variables["params"])


def init_subtree(config: AnatomiXConfig, rng: Array, keep: Any,
                 shardings: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Random init of only the leaves whose '/'-joined path satisfies ``keep`` (e.g. the projection
  heads and LoRA leaves), placed on their shardings. Under ``jax.jit`` the other initialisers are
  dead code, so the 4B base is never materialised.

  Args:
    config: the model.
    rng: init key.
    keep: ``path -> bool``.
    shardings: optional ``NamedSharding`` tree of the full params.
  """
  def init(key):
    return split_trainable(init_params(config, key), keep)[0]

  out = None if shardings is None else split_trainable(shardings, keep)[0]
  return jax.jit(init, out_shardings=out)(rng)
