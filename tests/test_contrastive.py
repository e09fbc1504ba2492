"""Contrastive alignment loss vs independent numpy (float64) and torch references."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from scipy.special import logsumexp, softmax

from anatomix_jax.stage1.contrastive import contrastive_loss

B, A, D, E = 3, 36, 16, 24
N = B * A


def _inputs(seed: int, b: int = B, a: int = A, d: int = D, e: int = E, n_sentences: int = 7):
  """Random ``[b, a, d]`` objects and projections; ``[b, a, e]`` pooled sentences (duplicated)."""
  rng = np.random.default_rng(seed)
  obj = rng.normal(size=(b, a, d)).astype(np.float32)
  proj = rng.normal(size=(b, a, d)).astype(np.float32)
  # Few distinct sentences ("X is healthy.", ...): r has many identical rows. Mean-pooled BERT
  # embeddings are anisotropic (all pairwise cosines high): a shared direction plus small offsets.
  sentences = (rng.normal(size=(1, e)) + 0.3 * rng.normal(size=(n_sentences, e))).astype(np.float32)
  pooled = sentences[rng.integers(0, n_sentences, size=(b, a))]
  return obj, proj, pooled


# ---------------------------------------------------------------- independent references


def _np_normalize(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _np_kl_batchmean(target: np.ndarray, logits: np.ndarray) -> float:
  """torch ``kl_div(log_softmax(logits, 1), target, 'batchmean')`` from its definition."""
  n = logits.shape[0]
  log_q = logits - logsumexp(logits, axis=1, keepdims=True)
  total = 0.0
  for i in range(n):
    for j in range(n):
      if target[i, j] > 0:
        total += target[i, j] * (np.log(target[i, j]) - log_q[i, j])
  return total / n


def _np_ce(logits: np.ndarray) -> float:
  """Mean over rows of ``-log softmax(logits)[i, i]``."""
  log_q = logits - logsumexp(logits, axis=1, keepdims=True)
  return float(-np.mean(np.diag(log_q)))


def np_loss(obj, proj, pooled, *, kind="kl", temperature=0.01, target_temperature=None,
            bidirectional=True) -> float:
  """float64 reference on ``[N, ·]`` inputs (no mask)."""
  v = _np_normalize(np.asarray(obj, np.float64).reshape(-1, obj.shape[-1]))
  t = _np_normalize(np.asarray(proj, np.float64).reshape(-1, proj.shape[-1]))
  logits = v @ t.T / temperature
  if kind == "clip":
    fwd, bwd = _np_ce(logits), _np_ce(logits.T)
  else:
    r = _np_normalize(np.asarray(pooled, np.float64).reshape(-1, pooled.shape[-1]))
    tau_t = temperature if target_temperature is None else target_temperature
    p = softmax(r @ r.T / tau_t, axis=1)
    fwd, bwd = _np_kl_batchmean(p, logits), _np_kl_batchmean(p.T, logits.T)
  return 0.5 * (fwd + bwd) if bidirectional else fwd


def torch_loss(obj, proj, pooled, *, kind="kl", temperature=0.01, bidirectional=True) -> float:
  """The reference PyTorch code, in float64."""
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  v = F.normalize(torch.tensor(obj, dtype=torch.float64).reshape(-1, obj.shape[-1]), dim=-1)
  t = F.normalize(torch.tensor(proj, dtype=torch.float64).reshape(-1, proj.shape[-1]), dim=-1)
  logits = v @ t.T / temperature
  if kind == "clip":
    labels = torch.arange(logits.shape[0])
    fwd, bwd = F.cross_entropy(logits, labels), F.cross_entropy(logits.T, labels)
  else:
    r = F.normalize(torch.tensor(pooled, dtype=torch.float64).reshape(-1, pooled.shape[-1]), dim=-1)
    p = F.softmax(r @ r.T / temperature, dim=1)
    fwd = F.kl_div(F.log_softmax(logits, dim=1), p, reduction="batchmean")
    bwd = F.kl_div(F.log_softmax(logits.T, dim=1), p.T, reduction="batchmean")
  return float(0.5 * (fwd + bwd) if bidirectional else fwd)


def _rel(a: float, b: float) -> float:
  return abs(float(a) - float(b)) / max(abs(float(b)), 1e-30)


# ---------------------------------------------------------------- values


@functools.lru_cache(maxsize=None)
def _jitted(kind: str, bidirectional: bool, **kw):
  return jax.jit(functools.partial(contrastive_loss, kind=kind, bidirectional=bidirectional, **kw))


@pytest.mark.parametrize("kind", ["kl", "clip"])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_matches_numpy_and_torch(kind, bidirectional):
  obj, proj, pooled = _inputs(0)
  got = _jitted(kind, bidirectional)(obj, proj, pooled)
  assert got.dtype == jnp.float32 and got.shape == ()
  want = np_loss(obj, proj, pooled, kind=kind, bidirectional=bidirectional)
  assert _rel(got, want) <= 1e-6, (float(got), want)
  # The flattened [N, d] layout gives the same value.
  flat = contrastive_loss(obj.reshape(N, D), proj.reshape(N, D), pooled.reshape(N, E), kind=kind,
                          bidirectional=bidirectional)
  assert _rel(flat, want) <= 1e-6
  want_torch = torch_loss(obj, proj, pooled, kind=kind, bidirectional=bidirectional)
  assert _rel(want_torch, want) <= 1e-12  # The two references agree ...
  assert _rel(got, want_torch) <= 1e-6  # ... and so does the port.


def test_transposed_targets_are_not_stochastic():
  """The reverse term's targets are columns of P: they need not sum to 1 (reproduced as is)."""
  _, _, pooled = _inputs(0)
  r = _np_normalize(pooled.reshape(N, E).astype(np.float64))
  p = softmax(r @ r.T / 0.01, axis=1)
  assert np.allclose(p.sum(1), 1.0)
  assert not np.allclose(p.sum(0), 1.0)


def test_target_temperature_and_dtype():
  obj, proj, pooled = _inputs(1)
  got = contrastive_loss(obj, proj, pooled, target_temperature=0.05)
  assert _rel(got, np_loss(obj, proj, pooled, target_temperature=0.05)) <= 1e-6
  got_bf16 = contrastive_loss(jnp.asarray(obj, jnp.bfloat16), jnp.asarray(proj, jnp.bfloat16),
                              jnp.asarray(pooled, jnp.bfloat16))
  assert got_bf16.dtype == jnp.float32
  with pytest.raises(ValueError):
    contrastive_loss(obj, proj, pooled, kind="nce")


# ---------------------------------------------------------------- masking


def _padded_mask(seed: int) -> np.ndarray:
  """``[B, A]``: last batch row is padding (zero embeddings), plus a few excluded anatomies."""
  rng = np.random.default_rng(seed)
  mask = (rng.random((B, A)) > 0.15).astype(np.float32)
  mask[-1] = 0.0
  return mask


@pytest.mark.parametrize("kind", ["kl", "clip"])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_mask_equals_dropping_objects(kind, bidirectional):
  obj, proj, pooled = _inputs(2)
  mask = _padded_mask(2)
  obj[-1], proj[-1], pooled[-1] = 0.0, 0.0, 0.0  # padded example
  got = _jitted(kind, bidirectional)(obj, proj, pooled, mask)
  keep = mask.reshape(-1) > 0
  want = np_loss(obj.reshape(N, D)[keep], proj.reshape(N, D)[keep], pooled.reshape(N, E)[keep],
                 kind=kind, bidirectional=bidirectional)
  assert _rel(got, want) <= 1e-6, (float(got), want)
  g_obj, g_proj = jax.grad(_jitted(kind, bidirectional), argnums=(0, 1))(obj, proj, pooled, mask)
  assert np.isfinite(g_obj).all() and np.isfinite(g_proj).all()
  np.testing.assert_array_equal(np.asarray(g_obj).reshape(N, D)[~keep], 0.0)
  np.testing.assert_array_equal(np.asarray(g_proj).reshape(N, D)[~keep], 0.0)


@pytest.mark.parametrize("kind", ["kl", "clip"])
def test_groups_compare_each_anatomy_with_its_own_sentences(kind):
  # groups = the anatomy index: one independent problem per anatomy over the batch's real images
  # (numpy reference on each anatomy's B' × B' sub-problem), normalised by all real objects.
  obj, proj, pooled = _inputs(3, b=5, a=4)
  mask = np.ones((5, 4), np.float32)
  mask[-1] = 0.0
  mask[0, 2] = 0.0
  anatomy = np.broadcast_to(np.arange(4), (5, 4))
  got = _jitted(kind, True)(obj, proj, pooled, mask, groups=jnp.asarray(anatomy))
  want = 0.0
  for a in range(4):
    keep = mask[:, a] > 0
    want += keep.sum() * np_loss(obj[keep, a], proj[keep, a], pooled[keep, a], kind=kind)
  want /= mask.sum()
  assert _rel(got, want) <= 1e-6, (float(got), want)
  # Without groups the same inputs give another value: the other anatomies' sentences are negatives.
  assert _rel(_jitted(kind, True)(obj, proj, pooled, mask), want) > 1e-3


@pytest.mark.parametrize("kind", ["kl", "clip"])
def test_all_masked_is_zero_with_finite_grad(kind):
  obj, proj, pooled = _inputs(3)
  obj[0, 0] = 0.0  # a zero embedding must not give NaN gradients through the normalisation
  mask = np.zeros((B, A), np.float32)
  fn = _jitted(kind, True)
  assert float(fn(obj, proj, pooled, mask)) == 0.0
  grads = jax.grad(fn, argnums=(0, 1))(obj, proj, pooled, mask)
  for g in grads:
    np.testing.assert_array_equal(np.asarray(g), 0.0)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("kind", ["kl", "clip"])
def test_grad_matches_finite_differences(kind):
  obj, proj, pooled = (x.astype(np.float64) for x in _inputs(4, b=2, a=5, d=4, e=6, n_sentences=3))
  mask = np.ones((2, 5), np.float64)
  mask[1, 3] = 0.0
  rng = np.random.default_rng(4)
  with jax.enable_x64(True):
    fn = functools.partial(contrastive_loss, kind=kind)
    loss = jax.jit(fn)
    assert loss(obj, proj, pooled, mask).dtype == jnp.float64
    grads = jax.jit(jax.grad(fn, argnums=(0, 1, 2)))(obj, proj, pooled, mask)
    np.testing.assert_array_equal(np.asarray(grads[2]), 0.0)  # frozen sentence embeddings
    eps = 1e-6
    for argnum in (0, 1):
      args = [obj, proj, pooled, mask]
      g = np.asarray(grads[argnum])
      for _ in range(6):
        idx = tuple(rng.integers(0, s) for s in args[argnum].shape)
        if idx[:2] == (1, 3):
          continue
        plus, minus = args[argnum].copy(), args[argnum].copy()
        plus[idx] += eps
        minus[idx] -= eps
        up = float(loss(*(plus if k == argnum else a for k, a in enumerate(args))))
        down = float(loss(*(minus if k == argnum else a for k, a in enumerate(args))))
        fd = (up - down) / (2 * eps)
        assert abs(fd - g[idx]) <= 1e-5 * max(abs(fd), 1e-3), (argnum, idx, fd, g[idx])


# ---------------------------------------------------------------- sharding


def test_sharded_matches_single_device():
  assert jax.device_count() == 8
  obj, proj, pooled = _inputs(5, b=8)
  rng = np.random.default_rng(5)
  mask = (rng.random((8, A)) > 0.1).astype(np.float32)
  fn = _jitted("kl", True)
  grad_fn = jax.jit(jax.grad(contrastive_loss, argnums=(0, 1)))
  want = fn(obj, proj, pooled, mask)
  want_g = grad_fn(obj, proj, pooled, mask)

  mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
  sharding = NamedSharding(mesh, P(("data", "fsdp")))
  args = [jax.device_put(x, sharding) for x in (obj, proj, pooled, mask)]
  assert len(args[0].sharding.device_set) == 8
  with jax.set_mesh(mesh):
    got = jax.jit(contrastive_loss)(*args)
    got_g = jax.jit(jax.grad(contrastive_loss, argnums=(0, 1)))(*args)
  assert _rel(got, want) <= 1e-6, (float(got), float(want))
  # Elementwise float32 noise of the gradient is ~2e-6 of its largest entry even single-device
  # (measured against float64); the sharded reduction order only changes that noise.
  for g, w in zip(got_g, want_g):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5,
                               atol=1e-5 * float(np.abs(w).max()))
