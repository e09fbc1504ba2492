"""Batched autoregressive decoding for ``models.gemma3.Gemma3``: one prefill, then a jitted loop.

Prompts are LEFT-padded ``[B, T]`` token ids (``left_pad``), or prompt embeddings ``[B, T, H]``
(what ``Gemma3.embed`` returns, with stage 2's image/anatomy embeddings spliced in), with a
``[B, T]`` mask that is 0 on the padding. ``generate``:

  1. prefill: the whole prompt in one call, into a KV cache of ``S = T + max_new_tokens`` slots
     (or ``cache_len``); the last prompt slot's logits give the first new token;
  2. decode: a ``jax.lax.while_loop`` feeding one token per step at slot ``T + i`` and position
     ``prompt_length + i`` (each row's own length, from the mask, so a left-padded row decodes
     exactly as the same prompt alone would), until every row has produced a stop token or
     ``max_new_tokens`` tokens exist.

Next-token choice (``sample_next``): greedy (argmax) when ``temperature == 0``; otherwise the
logits are divided by the temperature, filtered by top-k and then top-p (``filter_logits``) and
sampled with ``jax.random.categorical`` under ``fold_in(rng, step)``.

Compilation: both phases run in ONE jitted program, compiled once per distinct

  (config, B, T, max_new_tokens, cache_len, cache dtype, tokens vs embeddings, greedy vs sampled,
   top_k, top_p < 1 or not, number of stop tokens)

(the static arguments of ``_generate``, plus the shapes/dtypes of the traced ones). The
temperature and top-p VALUES, the rng, the stop-token ids, the pad id, the prompts and the params
are traced, so changing them reuses the program. Pad prompts to a few fixed lengths
(``left_pad(..., length=)``) to bound the number of programs.

Axis letters: B rows, T prompt slots, N = max_new_tokens, S cache slots, H hidden, V vocabulary.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from anatomix_jax.models import gemma3

Array = jax.Array


# --- Prompts ----------------------------------------------------------------------------------

def left_pad(sequences: Sequence[Sequence[int]], pad_id: int = 0,
             length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads token lists into a batch.

  Args:
    sequences: B non-empty lists of token ids.
    pad_id: the padding token.
    length: T; None: the longest sequence.

  Returns:
    ``(tokens int32[B, T], mask int32[B, T])``, the mask 1 on real tokens (at the right end).

  Raises:
    ValueError: an empty batch or sequence, or one longer than ``length``.
  """
  if not sequences:
    raise ValueError("left_pad needs at least one sequence")
  lengths = [len(s) for s in sequences]
  if min(lengths) == 0:
    raise ValueError(f"sequence {lengths.index(0)} is empty (every prompt needs a token)")
  t = max(lengths) if length is None else length
  if max(lengths) > t:
    raise ValueError(f"a sequence of {max(lengths)} tokens does not fit length {t}")
  tokens = np.full((len(sequences), t), pad_id, np.int32)
  mask = np.zeros((len(sequences), t), np.int32)
  for i, seq in enumerate(sequences):
    tokens[i, t - len(seq):] = np.asarray(seq, np.int32)
    mask[i, t - len(seq):] = 1
  return tokens, mask


# --- Sampling -----------------------------------------------------------------------------------

def _is_traced(x: Any) -> bool:
  return isinstance(x, jax.core.Tracer)


def filter_logits(logits: Array, *, temperature: float | Array = 1.0, top_k: int = 0,
                  top_p: float | Array = 1.0) -> Array:
  """Temperature, then top-k, then top-p (nucleus) filtering of next-token logits.

  Args:
    logits: float[..., V].
    temperature: > 0; the logits are divided by it (may be traced).
    top_k: keep the ``top_k`` largest logits (and exact ties with the k-th); 0 or ≥ V: off.
      Static (a Python int).
    top_p: then keep the smallest set of most probable tokens (under the softmax of what top-k
      kept) whose probabilities sum to ≥ ``top_p``, always at least the most probable one (and
      exact ties with the least probable kept one). A Python number ≥ 1: off (no sort); a traced
      value always sorts.

  Returns:
    float32[..., V]: the scaled logits with -inf where filtered out; their softmax is the
    sampling distribution.
  """
  x = logits.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
  ranked = None  # the kept logits, descending
  if 0 < top_k < x.shape[-1]:
    ranked = jax.lax.top_k(x, top_k)[0]
    x = jnp.where(x < ranked[..., -1:], -jnp.inf, x)
  if _is_traced(top_p) or top_p < 1.0:
    if ranked is None:
      ranked = jnp.flip(jnp.sort(x, axis=-1), axis=-1)
    probs = jax.nn.softmax(ranked, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more probable tokens
    kept = jnp.maximum(jnp.sum(before < top_p, axis=-1, keepdims=True), 1)
    cutoff = jnp.take_along_axis(ranked, kept - 1, axis=-1)
    x = jnp.where(x < cutoff, -jnp.inf, x)
  return x


def sample_next(logits: Array, rng: Array | None, *, greedy: bool,
                temperature: float | Array = 1.0, top_k: int = 0,
                top_p: float | Array = 1.0) -> Array:
  """float[B, V] logits → int32[B] next tokens: argmax if ``greedy``, else a filtered sample.

  Args:
    logits: float[B, V].
    rng: a PRNG key (unused when greedy).
    greedy: static; argmax (ties: the lowest id, as torch).
    temperature: see ``filter_logits``.
    top_k: see ``filter_logits``.
    top_p: see ``filter_logits``.
  """
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  filtered = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
  return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)


# --- Decoding -----------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=(
    "config", "max_new_tokens", "cache_len", "greedy", "top_k", "use_top_p", "cache_dtype"))
def _generate(params: Any, tokens: Array | None, embeddings: Array | None, attention_mask: Array,
              rng: Array, temperature: Array, top_p: Array, stop_tokens: Array,
              pad_token_id: Array, *, config: gemma3.Gemma3Config, max_new_tokens: int,
              cache_len: int, greedy: bool, top_k: int, use_top_p: bool,
              cache_dtype: str | None) -> dict[str, Array]:
  """The compiled prefill + decode loop of ``generate`` (arguments already checked)."""
  model = gemma3.Gemma3(config)
  variables = {"params": params}
  mask = attention_mask.astype(jnp.int32)
  b, t = mask.shape
  prompt_lengths = jnp.sum(mask, axis=-1)  # [B]
  cache_mask = jnp.concatenate([mask, jnp.ones((b, cache_len - t), jnp.int32)], axis=1)  # [B, S]
  cache = gemma3.init_cache(config, b, cache_len, cache_dtype)

  def pick(logits, step):
    return sample_next(logits, jax.random.fold_in(rng, step), greedy=greedy,
                       temperature=temperature, top_k=top_k,
                       top_p=top_p if use_top_p else 1.0)

  def is_stop(token):  # int32[B] → bool[B]
    return jnp.any(token[:, None] == stop_tokens[None, :], axis=-1)

  _, cache, hidden = model.apply(
      variables, tokens, embeddings=embeddings, positions=gemma3.positions_from_mask(mask),
      attention_mask=cache_mask, cache=cache, cache_index=0, return_hidden=True)
  logits = model.apply(variables, hidden[:, -1:], method=gemma3.Gemma3.logits)  # [B, 1, V]
  first = pick(logits[:, 0], 0)
  out = jnp.full((b, max_new_tokens), pad_token_id, jnp.int32).at[:, 0].set(first)
  state = (jnp.int32(1), cache, first, out, is_stop(first), jnp.ones((b,), jnp.int32))

  def cond(state):
    step, _, _, _, done, _ = state
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(state):
    step, cache, prev, out, done, lengths = state
    logits, cache = model.apply(
        variables, prev[:, None], positions=(prompt_lengths + step - 1)[:, None],
        attention_mask=cache_mask, cache=cache, cache_index=t + step - 1)
    sampled = pick(logits[:, 0], step)  # finished rows keep decoding (valid ids), unrecorded
    token = jnp.where(done, pad_token_id, sampled)
    out = jax.lax.dynamic_update_slice(out, token[:, None], (0, step))
    lengths = lengths + (~done).astype(jnp.int32)
    return step + 1, cache, sampled, out, done | is_stop(token), lengths

  _, _, _, out, done, lengths = jax.lax.while_loop(cond, body, state)
  return {"tokens": out, "lengths": lengths, "stopped": done, "prompt_lengths": prompt_lengths}


def _check_mask(mask: Any) -> None:
  """Every row left-padded (its ones at the right end) with at least one real token."""
  if _is_traced(mask):
    return
  m = np.asarray(mask) != 0
  empty = np.flatnonzero(~m.any(axis=1))
  if empty.size:
    raise ValueError(f"attention_mask row {int(empty[0])} has no real token (every prompt "
                     "needs at least one)")
  bad = np.flatnonzero((m[:, :-1] & ~m[:, 1:]).any(axis=1))
  if bad.size:
    raise ValueError(f"attention_mask row {int(bad[0])} is not left-padded (generate needs the "
                     "real tokens at the right end; see left_pad)")


def generate(model_or_config: gemma3.Gemma3 | gemma3.Gemma3Config, params: Any, *,
             tokens: Any = None, embeddings: Any = None, attention_mask: Any,
             max_new_tokens: int, rng: Array | None = None, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, stop_tokens: Sequence[int] = (),
             pad_token_id: int = 0, cache_dtype: Any = None,
             cache_len: int | None = None) -> dict[str, Array]:
  """Generates up to ``max_new_tokens`` tokens per row after left-padded prompts.

  Args:
    model_or_config: a ``Gemma3`` module or its config.
    params: its params (device arrays avoid a host→device copy per call).
    tokens: int[B, T] left-padded prompt ids (``left_pad``), or None when ``embeddings`` are given.
    embeddings: float[B, T, H] left-padded prompt embeddings, already scaled (``Gemma3.embed``).
    attention_mask: [B, T], nonzero on real prompt tokens, which must sit at the right end.
    max_new_tokens: N ≥ 1.
    rng: a PRNG key for sampling; None: ``jax.random.key(0)``. Step i samples with
      ``fold_in(rng, i)``.
    temperature: 0: greedy; > 0: sample from softmax(logits / temperature) after filtering.
    top_k: keep the k most likely tokens; 0: off.
    top_p: nucleus filtering after top-k; 1.0: off.
    stop_tokens: ids that end a row (the stop token is kept; later slots get ``pad_token_id``).
    pad_token_id: fills the slots after a row's stop token.
    cache_dtype: the KV cache's dtype; None: the model's compute dtype.
    cache_len: S, the KV cache slots; None: T + N.

  Returns:
    ``{"tokens": int32[B, N]`` (``pad_token_id`` after a row's stop token),
    ``"lengths": int32[B]`` (tokens generated, the stop token included),
    ``"stopped": bool[B]`` (the row produced a stop token),
    ``"prompt_lengths": int32[B]}`` (real prompt tokens).

  Raises:
    ValueError: naming the setting: both or neither of tokens/embeddings, shapes that disagree,
      ``T + max_new_tokens`` beyond ``cache_len`` or the config's ``max_position_embeddings``,
      a mask row that is empty or not left-padded, or bad sampling parameters.
  """
  config = (model_or_config.config if isinstance(model_or_config, gemma3.Gemma3)
            else model_or_config)
  if (tokens is None) == (embeddings is None):
    raise ValueError("pass exactly one of tokens and embeddings")
  prompt = tokens if tokens is not None else embeddings
  if tokens is not None and np.ndim(tokens) != 2:
    raise ValueError(f"tokens must be [B, T], got shape {np.shape(tokens)}")
  if embeddings is not None and (np.ndim(embeddings) != 3
                                 or np.shape(embeddings)[2] != config.hidden_size):
    raise ValueError(f"embeddings must be [B, T, {config.hidden_size}] (hidden_size), got shape "
                     f"{np.shape(embeddings)}")
  b, t = np.shape(prompt)[:2]
  if np.shape(attention_mask) != (b, t):
    raise ValueError(f"attention_mask has shape {np.shape(attention_mask)}, expected {(b, t)}")
  if int(max_new_tokens) < 1:
    raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
  total = t + max_new_tokens
  if total > config.max_position_embeddings:
    raise ValueError(f"prompt length {t} + max_new_tokens {max_new_tokens} = {total} exceeds "
                     f"max_position_embeddings {config.max_position_embeddings} of the model "
                     "config")
  cache_len = total if cache_len is None else int(cache_len)
  if total > cache_len:
    raise ValueError(f"prompt length {t} + max_new_tokens {max_new_tokens} = {total} does not "
                     f"fit the KV cache of cache_len {cache_len} slots")
  if not temperature >= 0:
    raise ValueError(f"temperature must be ≥ 0, got {temperature}")
  if int(top_k) < 0:
    raise ValueError(f"top_k must be ≥ 0 (0: off), got {top_k}")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")
  _check_mask(attention_mask)
  greedy = temperature == 0
  return _generate(
      params,
      None if tokens is None else jnp.asarray(tokens, jnp.int32),
      None if embeddings is None else jnp.asarray(embeddings),
      jnp.asarray(attention_mask, jnp.int32),
      jax.random.key(0) if rng is None else rng,
      jnp.float32(1.0 if greedy else temperature), jnp.float32(top_p),
      jnp.asarray(np.asarray(stop_tokens, np.int32).reshape(-1)), jnp.int32(pad_token_id),
      config=config, max_new_tokens=int(max_new_tokens), cache_len=cache_len, greedy=greedy,
      top_k=int(top_k), use_top_p=top_p < 1.0,
      cache_dtype=None if cache_dtype is None else jnp.dtype(cache_dtype).name)
