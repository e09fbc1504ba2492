"""Batched KV-cache decoding (``models.generate``) against transformers' ``generate`` and NumPy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from test_gemma3 import TINY, _randomize  # the tiny config: 7 layers, both kinds, window 5, GQA

from anatomix_jax.convert import hf_gemma3
from anatomix_jax.models import gemma3
from anatomix_jax.models import generate as gen

LENGTHS = (11, 4, 8)  # prompt lengths; all but one longer than the sliding window (5)
NEW = 32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(torch model, config, params): a random tiny Gemma3ForCausalLM (final soft-cap 5) and its
  load through ``load_gemma3``; the torch model never stops on eos."""
  path = str(tmp_path_factory.mktemp("gemma3_generate"))
  torch.manual_seed(0)
  model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
      **TINY, final_logit_softcapping=5.0, attn_implementation="eager")).eval()
  _randomize(model)
  model.save_pretrained(path)
  model.generation_config.eos_token_id = None
  config, params = hf_gemma3.load_gemma3(path)
  return model, config, jax.device_put(params)


@pytest.fixture(scope="module")
def prompts():
  rng = np.random.default_rng(7)
  return [rng.integers(1, TINY["vocab_size"], n).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def greedy(tiny, prompts):
  """Greedy ids int32[3, NEW] of the batched, left-padded prompts (no stop tokens)."""
  _, config, params = tiny
  tokens, mask = gen.left_pad(prompts)
  out = gen.generate(config, params, tokens=tokens, attention_mask=mask, max_new_tokens=NEW)
  np.testing.assert_array_equal(out["lengths"], NEW)
  assert not np.asarray(out["stopped"]).any()
  np.testing.assert_array_equal(out["prompt_lengths"], LENGTHS)
  return np.asarray(out["tokens"])


def test_left_pad():
  tokens, mask = gen.left_pad([[5, 6, 7], [8]], pad_id=3, length=4)
  np.testing.assert_array_equal(tokens, [[3, 5, 6, 7], [3, 3, 3, 8]])
  np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1]])
  assert tokens.dtype == mask.dtype == np.int32
  with pytest.raises(ValueError, match="does not fit length 2"):
    gen.left_pad([[1, 2, 3]], length=2)
  with pytest.raises(ValueError, match="sequence 1 is empty"):
    gen.left_pad([[1], []])


def test_greedy_matches_torch_generate(tiny, prompts, greedy):
  """The batched left-padded call gives, row by row, torch's greedy ids for the prompt alone."""
  model = tiny[0]
  for i, prompt in enumerate(prompts):
    with torch.no_grad():
      out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(
          1, len(prompt), dtype=torch.long), do_sample=False, max_new_tokens=NEW, pad_token_id=0)
    ref = out[0, len(prompt):].numpy()
    assert ref.shape == (NEW,)
    np.testing.assert_array_equal(greedy[i], ref, err_msg=f"prompt {i}")
  assert len({tuple(r) for r in greedy}) == 3  # the rows really differ


def _truncate(ids: np.ndarray, stops, pad: int) -> tuple[np.ndarray, np.ndarray]:
  """Expected (tokens, lengths): each row cut after its first stop token and padded."""
  out, lengths = np.full_like(ids, pad), []
  for i, row in enumerate(ids):
    hits = np.flatnonzero(np.isin(row, stops))
    n = hits[0] + 1 if hits.size else len(row)
    out[i, :n] = row[:n]
    lengths.append(n)
  return out, np.asarray(lengths)


def test_stop_tokens(tiny, prompts, greedy):
  _, config, params = tiny
  tokens, mask = gen.left_pad(prompts)
  # The token prompt 1 produces at step k (a step where it is new to that row) as stop token.
  k = next(j for j in range(5, NEW) if greedy[1, j] not in greedy[1, :j])
  stop = int(greedy[1, k])
  # Three stop tokens (as below: one compilation), the other two never produced.
  unused = sorted(set(range(TINY["vocab_size"])) - set(greedy.ravel().tolist()))[:2]
  out = gen.generate(config, params, tokens=tokens, attention_mask=mask, max_new_tokens=NEW,
                     stop_tokens=(unused[0], stop, unused[1]), pad_token_id=TINY["vocab_size"] + 5)
  want, lengths = _truncate(greedy, [stop], TINY["vocab_size"] + 5)
  assert lengths[1] == k + 1
  np.testing.assert_array_equal(out["tokens"], want)
  np.testing.assert_array_equal(out["lengths"], lengths)
  np.testing.assert_array_equal(out["stopped"], lengths < NEW)
  # Every row stops by step 3: the loop ends early and the remaining slots stay padding.
  stops = [int(greedy[i, 3]) for i in range(3)]
  out = gen.generate(config, params, tokens=tokens, attention_mask=mask, max_new_tokens=NEW,
                     stop_tokens=stops)
  want, lengths = _truncate(greedy, stops, 0)
  assert lengths.max() <= 4
  np.testing.assert_array_equal(out["tokens"], want)
  np.testing.assert_array_equal(out["lengths"], lengths)
  assert np.asarray(out["stopped"]).all()


def test_embeddings_input(tiny, prompts, greedy):
  _, config, params = tiny
  tokens, mask = gen.left_pad(prompts)
  model = gemma3.Gemma3(config)
  embeddings = model.apply({"params": params}, tokens, method=gemma3.Gemma3.embed)
  out = gen.generate(model, params, embeddings=embeddings, attention_mask=mask,
                     max_new_tokens=NEW)
  np.testing.assert_array_equal(out["tokens"], greedy)


def test_sampling(tiny, prompts, greedy):
  _, config, params = tiny
  tokens, mask = gen.left_pad(prompts)
  run = lambda **kw: np.asarray(gen.generate(  # noqa: E731
      config, params, tokens=tokens, attention_mask=mask, max_new_tokens=NEW, **kw)["tokens"])
  kw = dict(top_k=40, top_p=0.95)  # one compilation: temperature is traced
  # temperature → 0: the sample is the argmax.
  np.testing.assert_array_equal(run(temperature=1e-6, rng=jax.random.key(3), **kw), greedy)
  kw["temperature"] = 1.5
  a, b = run(rng=jax.random.key(1), **kw), run(rng=jax.random.key(1), **kw)
  np.testing.assert_array_equal(a, b)
  c = run(rng=jax.random.key(2), **kw)
  assert (a != c).any() and (a != greedy).any()
  assert ((a >= 0) & (a < TINY["vocab_size"])).all()


# --- Filtering against NumPy ------------------------------------------------------------------

def _np_filtered(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
  """The sampling distribution, one row at a time: softmax(x / T) restricted to the top k,
  renormalised, then to the fewest most probable tokens reaching mass top_p, renormalised."""
  out = np.zeros(logits.shape, np.float64)
  for r, row in enumerate(logits.astype(np.float64) / temperature):
    order = np.argsort(-row, kind="stable")
    allowed = order[:top_k] if 0 < top_k < len(row) else order
    p = np.exp(row[allowed] - row[allowed].max())
    p /= p.sum()
    total, n = 0.0, 0
    while n < len(p):  # p is in descending order
      total += p[n]
      n += 1
      if total >= top_p:
        break
    out[r, allowed[:n]] = p[:n] / p[:n].sum()
  return out


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.5, 8, 0.6), (1.0, 1, 1.0), (2.0, 0, 1e-4),
    (1.0, 30, 0.9), (1.0, 100, 0.5)])
def test_filter_matches_numpy(temperature, top_k, top_p):
  logits = np.random.default_rng(top_k).normal(0, 2, (4, 30)).astype(np.float32)
  want = _np_filtered(logits, temperature, top_k, top_p)
  filtered = gen.filter_logits(jnp.asarray(logits), temperature=temperature, top_k=top_k,
                               top_p=top_p)
  got = np.asarray(jax.nn.softmax(filtered, axis=-1))
  np.testing.assert_array_equal(got > 0, want > 0)
  np.testing.assert_allclose(got, want, atol=1e-6)
  if top_p == 1.0:
    return
  # top_p traced (as inside ``generate``): the same filter.
  traced = jax.jit(lambda x, p: gen.filter_logits(x, temperature=temperature, top_k=top_k,
                                                  top_p=p))(jnp.asarray(logits), top_p)
  np.testing.assert_array_equal(np.isfinite(traced), np.isfinite(filtered))


def test_sample_frequencies_match_numpy():
  logits = np.random.default_rng(0).normal(0, 1.5, (1, 12)).astype(np.float32)
  want = _np_filtered(logits, 0.8, 6, 0.85)[0]
  draws = np.asarray(gen.sample_next(jnp.tile(jnp.asarray(logits), (20_000, 1)),
                                     jax.random.key(0), greedy=False, temperature=0.8, top_k=6,
                                     top_p=0.85))
  freq = np.bincount(draws, minlength=12) / draws.size
  assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(want))
  np.testing.assert_allclose(freq, want, atol=0.02)
  greedy = gen.sample_next(jnp.asarray(logits), None, greedy=True)
  assert int(greedy[0]) == int(np.argmax(logits))


# --- Errors -----------------------------------------------------------------------------------

def test_errors(tiny, prompts):
  _, config, params = tiny
  tokens, mask = gen.left_pad(prompts)
  call = lambda **kw: gen.generate(config, params, **{  # noqa: E731
      "tokens": tokens, "attention_mask": mask, "max_new_tokens": 4, **kw})
  with pytest.raises(ValueError, match=r"prompt length 11 \+ max_new_tokens 60 = 71 exceeds "
                                       r"max_position_embeddings 64"):
    call(max_new_tokens=60)
  long = np.ones((1, 70), np.int32)
  with pytest.raises(ValueError, match="max_position_embeddings 64"):
    call(tokens=long, attention_mask=long)
  with pytest.raises(ValueError, match=r"11 \+ max_new_tokens 4 = 15 does not fit the KV cache "
                                       "of cache_len 10"):
    call(cache_len=10)
  with pytest.raises(ValueError, match="row 1 is not left-padded"):
    call(attention_mask=mask[:, ::-1])
  with pytest.raises(ValueError, match="row 0 has no real token"):
    call(attention_mask=np.zeros_like(mask))
  with pytest.raises(ValueError, match="exactly one of tokens and embeddings"):
    call(embeddings=np.zeros((3, 11, config.hidden_size), np.float32))
  with pytest.raises(ValueError, match="top_p must be in"):
    call(temperature=1.0, top_p=0.0)
  with pytest.raises(ValueError, match="temperature must be"):
    call(temperature=-1.0)
  with pytest.raises(ValueError, match="max_new_tokens must be"):
    call(max_new_tokens=0)
