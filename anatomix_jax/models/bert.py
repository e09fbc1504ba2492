"""A frozen BERT text encoder: exactly the math of Hugging Face ``transformers.BertModel``.

  embeddings = Drop(LN(word[ids] + position[0..T-1] + token_type[type_ids]))
  layer      = x ← LN(x + Drop(Dense(SelfAttn(x, mask))));  x ← LN(x + Drop(Dense(act(Dense(x)))))
  output     = the last layer's hidden states [B, T, H] (no pooler)

Self-attention is softmax(q·kᵀ/√d_head + bias) with the additive padding bias
``(1 - attention_mask) · finfo(dtype).min`` of HF's ``get_extended_attention_mask``; dropout acts on
the attention weights. ``convert.hf_bert`` loads HF checkpoints into this module;
``encode_sentences`` runs it over sentences (HF tokenizer, fixed padded shapes, mean pooling).

Parameter layout (logical axis names in parentheses):
  ``embeddings/word_embeddings/embedding`` [V, H] ('vocab', 'embed'),
  ``embeddings/{position,token_type}_embeddings/embedding`` [P or T_types, H] (None, 'embed'),
  ``embeddings/layer_norm/{scale,bias}`` ('embed');
  ``layer_{i}/attention/{query,key,value}/kernel`` [H, heads, d_head] ('embed', 'heads', 'kv'),
  ``…/bias`` [heads, d_head]; ``layer_{i}/attention/out/kernel`` [heads, d_head, H];
  ``layer_{i}/intermediate/kernel`` [H, F] ('embed', 'mlp'), ``layer_{i}/output/kernel`` [F, H]
  ('mlp', 'embed'); LayerNorms ``layer_{i}/{attention_norm,output_norm}/{scale,bias}`` ('embed').
Initialisers are HF's ``_init_weights``: N(0, initializer_range) matrices and embeddings (the
padding row of the word embeddings zeroed), zero biases, LayerNorm ones/zeros.

Axis letters: B batch, T tokens, H hidden size, F intermediate size, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from anatomix_jax.models.transformer import (
    DTYPES, TOKEN_AXES, HeadsMerge, HeadsProjection, dense)

Array = jax.Array

# HF ``hidden_act`` name → activation. "gelu" is the exact erf GELU; the others the tanh form.
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}
# Fields that a HF ``config.json`` must give (the others take HF's BertConfig defaults).
REQUIRED_HF_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                      "intermediate_size", "hidden_act", "max_position_embeddings",
                      "type_vocab_size", "layer_norm_eps", "pad_token_id")
_OPTIONAL_HF_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range")
SEQUENCE_MULTIPLE = 16  # encode_sentences pads lengths to a multiple of this (fewer recompiles)


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """BERT hyper-parameters (the fields of HF's ``BertConfig`` that the encoder uses).

  Attributes:
    vocab_size: V, rows of the word embeddings.
    hidden_size: H.
    num_hidden_layers: encoder layers.
    num_attention_heads: heads; H must divide evenly.
    intermediate_size: F, the FFN hidden size.
    hidden_act: an ``ACTIVATIONS`` key.
    max_position_embeddings: the longest sequence T the position table covers.
    type_vocab_size: token types (segments).
    layer_norm_eps: LayerNorm epsilon (HF's default 1e-12).
    pad_token_id: the padding token (its word-embedding row is zero at init).
    hidden_dropout_prob: dropout on the embeddings and the residual branches.
    attention_probs_dropout_prob: dropout on the attention weights.
    initializer_range: std of the normal init of matrices and embeddings.
    dtype: compute dtype name; parameters are always float32.
  """

  vocab_size: int
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  intermediate_size: int
  hidden_act: str = "gelu"
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  pad_token_id: int = 0
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  initializer_range: float = 0.02
  dtype: str = "float32"

  def __post_init__(self):
    problems = []
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "intermediate_size", "max_position_embeddings", "type_vocab_size"):
      if getattr(self, name) < 1:
        problems.append(f"{name} must be positive, got {getattr(self, name)}")
    if not problems and self.hidden_size % self.num_attention_heads:
      problems.append(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                      f"{self.num_attention_heads}")
    if self.hidden_act not in ACTIVATIONS:
      problems.append(f"hidden_act {self.hidden_act!r} is not supported; supported: "
                      f"{sorted(ACTIVATIONS)}")
    if not 0 <= self.pad_token_id < self.vocab_size:
      problems.append(f"pad_token_id {self.pad_token_id} is outside the vocabulary "
                      f"[0, {self.vocab_size})")
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
      if not 0.0 <= getattr(self, name) < 1.0:
        problems.append(f"{name} must be in [0, 1), got {getattr(self, name)}")
    if self.dtype not in DTYPES:
      problems.append(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
    if problems:
      raise ValueError("invalid BertConfig: " + "; ".join(problems))

  @property
  def compute_dtype(self) -> jnp.dtype:
    """The compute dtype as a NumPy dtype."""
    return jnp.dtype(self.dtype)

  @property
  def head_dim(self) -> int:
    """d_head = H / heads."""
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def from_hf_dict(cls, d: Mapping[str, Any], dtype: str = "float32") -> BertConfig:
    """Builds the config from a HF ``config.json`` dict.

    Args:
      d: the parsed ``config.json``.
      dtype: our compute dtype name (HF's ``torch_dtype``/``dtype`` entries are ignored).

    Returns:
      The config.

    Raises:
      ValueError: naming a missing ``REQUIRED_HF_FIELDS`` entry, a ``position_embedding_type``
        other than "absolute", a decoder config, or an unsupported ``hidden_act``.
    """
    missing = [name for name in REQUIRED_HF_FIELDS if d.get(name) is None]
    if missing:
      raise ValueError(f"config is missing required field(s) {', '.join(missing)}")
    position_type = d.get("position_embedding_type", "absolute") or "absolute"
    if position_type != "absolute":
      raise ValueError(f"position_embedding_type {position_type!r} is not supported (only "
                       "'absolute')")
    if d.get("is_decoder") or d.get("add_cross_attention"):
      raise ValueError("is_decoder / add_cross_attention configs are not supported (the encoder "
                       "is bidirectional)")
    act = d["hidden_act"]
    if not isinstance(act, str) or act not in ACTIVATIONS:
      raise ValueError(f"hidden_act {act!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    values = {name: d[name] for name in REQUIRED_HF_FIELDS}
    values.update({name: d[name] for name in _OPTIONAL_HF_FIELDS if d.get(name) is not None})
    return cls(**values, dtype=dtype)


# --- Building blocks ------------------------------------------------------------------------------

def _normal(config: BertConfig) -> nn.initializers.Initializer:
  return nn.initializers.normal(config.initializer_range)


def _layer_norm(config: BertConfig, name: str) -> nn.LayerNorm:
  """torch LayerNorm (two-pass variance) with the config's epsilon and logical axis names."""
  return nn.LayerNorm(
      epsilon=config.layer_norm_eps, use_fast_variance=False, dtype=config.compute_dtype,
      param_dtype=jnp.float32,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)), name=name)


def _dense(config: BertConfig, features: int, axes: tuple[str, str], name: str) -> nn.Dense:
  """Linear layer with HF's BERT init: N(0, initializer_range) kernel, zero bias."""
  return nn.Dense(
      features, dtype=config.compute_dtype, param_dtype=jnp.float32,
      kernel_init=nn.with_logical_partitioning(_normal(config), axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)), name=name)


def _embed(config: BertConfig, rows: int, axes: tuple[str | None, str], name: str,
           zero_row: int | None = None) -> nn.Embed:
  """Embedding table [rows, H] with a normal init (``zero_row``: HF's ``padding_idx`` row is 0)."""
  normal = _normal(config)

  def init(key, shape, dtype=jnp.float32):
    table = normal(key, shape, dtype)
    return table if zero_row is None else table.at[zero_row].set(0)

  return nn.Embed(rows, config.hidden_size, dtype=config.compute_dtype, param_dtype=jnp.float32,
                  embedding_init=nn.with_logical_partitioning(init, axes), name=name)


def attention_bias(attention_mask: Array, dtype: jnp.dtype) -> Array:
  """HF's additive mask: 0 where ``attention_mask`` [B, T] is 1, ``finfo(dtype).min`` where 0.

  Returns:
    float32[B, 1, 1, T], broadcastable against attention logits [B, heads, Tq, Tk].
  """
  keep = attention_mask.astype(jnp.float32)[:, None, None, :]
  return (1.0 - keep) * jnp.finfo(dtype).min


class BertEmbeddings(nn.Module):
  """word + position + token-type embeddings → LayerNorm → dropout."""

  config: BertConfig

  @nn.compact
  def __call__(self, input_ids: Array, token_type_ids: Array, deterministic: bool) -> Array:
    """int[B, T] ids and token types → float[B, T, H]."""
    cfg = self.config
    length = input_ids.shape[1]
    if length > cfg.max_position_embeddings:
      raise ValueError(f"sequence length {length} exceeds max_position_embeddings "
                       f"{cfg.max_position_embeddings}")
    words = _embed(cfg, cfg.vocab_size, ("vocab", "embed"), "word_embeddings",
                   zero_row=cfg.pad_token_id)(input_ids)
    positions = _embed(cfg, cfg.max_position_embeddings, (None, "embed"),
                       "position_embeddings")(jnp.arange(length)[None])
    types = _embed(cfg, cfg.type_vocab_size, (None, "embed"),
                   "token_type_embeddings")(token_type_ids)
    x = _layer_norm(cfg, "layer_norm")(words + types + positions)
    return nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)


class BertSelfAttention(nn.Module):
  """Masked multi-head self-attention followed by the output projection (HF ``BertAttention``
  without its residual and norm)."""

  config: BertConfig

  @nn.compact
  def __call__(self, x: Array, bias: Array, deterministic: bool) -> Array:
    """Attends over ``x`` float[B, T, H] with the additive ``bias`` [B, 1, 1, T] → [B, T, H]."""
    cfg = self.config
    project = lambda name: HeadsProjection(  # noqa: E731
        cfg.num_attention_heads, cfg.head_dim, _normal(cfg), cfg.compute_dtype, name=name)(x)
    q = project("query") * jnp.asarray(cfg.head_dim ** -0.5, cfg.compute_dtype)  # [B, T, h, d]
    k, v = project("key"), project("value")
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) + bias
    weights = jax.nn.softmax(logits, axis=-1).astype(cfg.compute_dtype)
    weights = nn.Dropout(cfg.attention_probs_dropout_prob)(weights, deterministic=deterministic)
    heads = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    return HeadsMerge(cfg.hidden_size, _normal(cfg), cfg.compute_dtype, name="out")(heads)


class BertLayer(nn.Module):
  """One post-LN encoder layer (HF ``BertLayer``)."""

  config: BertConfig

  @nn.compact
  def __call__(self, x: Array, bias: Array, deterministic: bool) -> Array:
    """float[B, T, H] with the additive mask ``bias`` [B, 1, 1, T] → float[B, T, H]."""
    cfg = self.config
    dropout = nn.Dropout(cfg.hidden_dropout_prob)
    drop = lambda y: dropout(y, deterministic=deterministic)  # noqa: E731
    attended = BertSelfAttention(cfg, name="attention")(x, bias, deterministic)
    x = _layer_norm(cfg, "attention_norm")(x + drop(attended))
    h = ACTIVATIONS[cfg.hidden_act](
        _dense(cfg, cfg.intermediate_size, ("embed", "mlp"), "intermediate")(x))
    h = _dense(cfg, cfg.hidden_size, ("mlp", "embed"), "output")(h)
    x = _layer_norm(cfg, "output_norm")(x + drop(h))
    return nn.with_logical_constraint(x, TOKEN_AXES)


class BertModel(nn.Module):
  """HF ``BertModel`` without the pooler: returns the last hidden state.

  Attributes:
    config: the hyper-parameters.
  """

  config: BertConfig

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Array, token_type_ids: Array | None = None,
               deterministic: bool = True) -> Array:
    """Encodes a batch of token sequences.

    Args:
      input_ids: int[B, T] token ids; T ≤ ``max_position_embeddings``.
      attention_mask: [B, T], 1 for real tokens and 0 for padding (any numeric or bool dtype).
      token_type_ids: int[B, T] segment ids; None means all zeros.
      deterministic: disables dropout (the encoder is frozen: keep the default).

    Returns:
      float[B, T, H] last hidden state (compute dtype), padded positions included.
    """
    cfg = self.config
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = BertEmbeddings(cfg, name="embeddings")(input_ids, token_type_ids, deterministic)
    x = nn.with_logical_constraint(x, TOKEN_AXES)
    bias = attention_bias(attention_mask, cfg.compute_dtype)
    for i in range(cfg.num_hidden_layers):
      x = BertLayer(cfg, name=f"layer_{i}")(x, bias, deterministic)
    return x


# --- Sentence embedding heads ---------------------------------------------------------------------

def mean_pool(hidden: Array, mask: Array) -> Array:
  """Masked mean over tokens (sentence-transformers' mean pooling; [CLS]/[SEP] included).

  Args:
    hidden: float[B, T, H] token states.
    mask: [B, T], 1 for tokens to average (the attention mask).

  Returns:
    float32[B, H] = Σ_t h·m / max(Σ_t m, 1e-9); a row with an all-zero mask gives zeros, not NaN.
  """
  m = mask.astype(jnp.float32)[..., None]  # [B, T, 1]
  summed = jnp.sum(hidden.astype(jnp.float32) * m, axis=1)
  return summed / jnp.maximum(jnp.sum(m, axis=1), 1e-9)


class TextProjection(nn.Module):
  """Linear(H → hidden_dim) → ReLU → Linear(hidden_dim → proj_dim); torch's default Linear init.

  Attributes:
    hidden_dim: the hidden width (512 in the reference).
    proj_dim: the output dim (16, the anatomy-embedding dim).
    dtype: compute dtype.
  """

  hidden_dim: int = 512
  proj_dim: int = 16
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """float[..., H] sentence embeddings → float[..., proj_dim]."""
    h = dense(self.hidden_dim, x.shape[-1], ("embed", "mlp"), "linear1", self.dtype)(x)
    return dense(self.proj_dim, self.hidden_dim, ("mlp", "proj"), "linear2", self.dtype)(nn.relu(h))


# --- Sentence encoding ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _pooled_forward(config: BertConfig) -> Callable[..., jax.Array]:
  """jit((params, ids, mask, types) → mean-pooled float32[B, H]), one per config."""
  model = BertModel(config)

  def forward(params, input_ids, attention_mask, token_type_ids):
    hidden = model.apply({"params": params}, input_ids, attention_mask, token_type_ids)
    return mean_pool(hidden, attention_mask)

  return jax.jit(forward)


def _check_sentences(sentences: Sequence[str]) -> None:
  for i, sentence in enumerate(sentences):
    if not isinstance(sentence, str):
      raise TypeError(f"sentences[{i}] is a {type(sentence).__name__}, not a str")
    if not sentence.strip():
      raise ValueError(f"sentences[{i}] is empty (or whitespace only): {sentence!r}")


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def tokenize_batch(tokenizer: Any, sentences: Sequence[str], config: BertConfig,
                   rows: int | None = None) -> dict[str, np.ndarray]:
  """Tokenises with special tokens and right-pads to a fixed shape.

  Args:
    tokenizer: a HF tokenizer.
    sentences: S ≤ rows sentences.
    config: the model's config (truncation at ``max_position_embeddings``, the pad id fallback).
    rows: the batch rows R (default S); rows past S are all padding (mask 0).

  Returns:
    ``input_ids``, ``attention_mask``, ``token_type_ids``: int32[R, T], T the longest sequence
    rounded up to a multiple of 16, capped at ``max_position_embeddings``.
  """
  rows = len(sentences) if rows is None else rows
  enc = tokenizer(list(sentences), add_special_tokens=True, truncation=True, padding=False,
                  max_length=config.max_position_embeddings, return_attention_mask=True,
                  return_token_type_ids=True)
  longest = max(len(ids) for ids in enc["input_ids"])
  length = min(_round_up(longest, SEQUENCE_MULTIPLE), config.max_position_embeddings)
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.pad_token_id
  out = {"input_ids": np.full((rows, length), pad_id, np.int32),
         "attention_mask": np.zeros((rows, length), np.int32),
         "token_type_ids": np.zeros((rows, length), np.int32)}
  for name, array in out.items():
    for i, values in enumerate(enc[name]):
      array[i, :len(values)] = values
  return out


def encode_sentences(config: BertConfig, params: Any, tokenizer: Any, sentences: Sequence[str],
                     batch_size: int = 64) -> np.ndarray:
  """Mean-pooled sentence embeddings (sentence-transformers' pooling, without normalisation).

  Every batch is padded to ``batch_size`` rows and to a length that is a multiple of 16, so a
  corpus compiles only a few shapes.

  Args:
    config: the model's config.
    params: ``BertModel`` params (e.g. from ``convert.hf_bert.load_bert``).
    tokenizer: its tokenizer (e.g. from ``convert.hf_bert.load_tokenizer``).
    sentences: S non-empty strings.
    batch_size: rows per forward pass.

  Returns:
    float32[S, H].

  Raises:
    ValueError: naming the index of an empty or whitespace-only sentence.
  """
  _check_sentences(sentences)
  if not sentences:
    return np.zeros((0, config.hidden_size), np.float32)
  forward = _pooled_forward(config)
  params = jax.device_put(nn.unbox(params))
  chunks = []
  for start in range(0, len(sentences), batch_size):
    chunk = sentences[start:start + batch_size]
    batch = tokenize_batch(tokenizer, chunk, config, rows=batch_size)
    pooled = forward(params, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    chunks.append(np.asarray(pooled, np.float32)[:len(chunk)])
  return np.concatenate(chunks)
