"""RAG retrieval with the sentence prior (rag/retrieval.py, rag/database.py): the fused score
cos/τ + w·log p(s | anatomy), the prior weight's choice on training images, the non-majority-pair
metrics, and the database's sentence counts (save/load, old databases without them)."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from anatomix_jax import anatomy
from anatomix_jax.data import sentences as sentences_lib
from anatomix_jax.rag import database
from anatomix_jax.rag import retrieval
from anatomix_jax.stage1 import rag as stage1_rag
from test_rag import _edit_json  # rag.json rewritten in place

TAU = 0.1
E1, E2, E3 = np.eye(3, dtype=np.float32)

# Two anatomies. Anatomy 0: three sentences, counts 8/1/1 (row 0 the majority); anatomy 1: two,
# counts 1/3 (row 1 the majority).
TABLES = (np.stack([E1, E2, [0.6, 0.8, 0.0]]).astype(np.float32),
          np.stack([E3, [0.8, 0.0, 0.6]]).astype(np.float32))
COUNTS = (np.array([8, 1, 1]), np.array([1, 3]))
LOG_P = (np.log([0.8, 0.1, 0.1]), np.log([0.25, 0.75]))
# One image: anatomy 0's query (not unit norm) has cosines [0, 1, 0.8], anatomy 1's [1, 0.6].
QUERY = np.array([[2 * E2, E3]], np.float32)  # [1, 2, 3]
COS = (np.array([0.0, 1.0, 0.8]), np.array([1.0, 0.6]))


def _db(counts=COUNTS, meta=None):
  sents = (("A0 is healthy.", "A0 shows x.", "A0 shows y."), ("A1 shows z.", "A1 is healthy."))
  return database.RagDatabase(("a0", "a1"), sents, TABLES, meta or {}, counts)


# --- the fused score ------------------------------------------------------------------------------

def test_log_prior_hand_computed():
  lp = database.log_prior(_db())
  for got, want in zip(lp, LOG_P):
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6)
  # A count of 0 (only possible when counts and sentences come from different splits) counts as
  # half an occurrence: finite.
  lp = database.log_prior(_db(counts=(np.array([3, 0, 1]), np.array([1, 1]))))
  np.testing.assert_allclose(lp[0], np.log(np.array([3, 0.5, 1]) / 4.5), rtol=1e-6)


def _fused(w):
  """Hand-computed fused scores in cosine units: cos + τ·w·log p."""
  return [c + TAU * w * lp for c, lp in zip(COS, LOG_P)]


@pytest.mark.parametrize("w, want_top", [
    (0.0, [1, 0]),     # pure cosine: the image decides
    (3.0, [1, 0]),     # anatomy 1 flips at w = 4 / log 3 ≈ 3.64, anatomy 0 at 10 / log 8 ≈ 4.81
    (4.0, [1, 1]),
    (5.0, [0, 1]),     # both majority sentences
    (100.0, [0, 1]),   # large w: the majority sentence, whatever the image
])
def test_top_k_with_prior_hand_computed(w, want_top):
  biases = retrieval.prior_biases(LOG_P, w, TAU)
  for b, lp in zip(biases, LOG_P):
    np.testing.assert_allclose(b, TAU * w * lp, rtol=1e-6, atol=0)
  scores, ids = retrieval.top_k(jnp.asarray(QUERY), tuple(map(jnp.asarray, TABLES)), k=2,
                                biases=tuple(map(jnp.asarray, biases)))
  np.testing.assert_array_equal(np.asarray(ids)[0, :, 0], want_top)
  fused = _fused(w)
  for a in range(2):
    order = np.argsort(-fused[a], kind="stable")[:2]
    np.testing.assert_array_equal(np.asarray(ids)[0, a], order)
    np.testing.assert_allclose(np.asarray(scores)[0, a], fused[a][order], rtol=1e-5, atol=1e-6)


def test_zero_weight_is_pure_cosine():
  tables = tuple(map(jnp.asarray, TABLES))
  zeros = tuple(map(jnp.asarray, retrieval.prior_biases(LOG_P, 0.0, TAU)))
  assert all(not np.any(np.asarray(z)) for z in zeros)
  with_prior = retrieval.top_k(jnp.asarray(QUERY), tables, k=2, biases=zeros)
  without = retrieval.top_k(jnp.asarray(QUERY), tables, k=2)
  for x, y in zip(with_prior, without):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_ranks_with_prior_hand_computed():
  # w = 4: anatomy 0 scores [−0.089, 0.079, −0.121] (row 2 ranks 3rd); anatomy 1 [0.445, 0.485]
  # (row 0 ranks 2nd, while by cosine alone it ranks 1st).
  tables = tuple(map(jnp.asarray, TABLES))
  true_rows = jnp.asarray([[2, 0]])
  biases = tuple(map(jnp.asarray, retrieval.prior_biases(LOG_P, 4.0, TAU)))
  np.testing.assert_array_equal(np.asarray(retrieval.ranks(jnp.asarray(QUERY), tables, true_rows,
                                                           biases)), [[3, 2]])
  np.testing.assert_array_equal(np.asarray(retrieval.ranks(jnp.asarray(QUERY), tables, true_rows)),
                                [[2, 1]])


def test_retriever_uses_the_databases_prior():
  db = _db(meta={"prior": {"weight": 4.0, "temperature": TAU}})
  r = retrieval.Retriever(db)
  assert (r.prior_weight, r.temperature) == (4.0, TAU)
  _, ids = r(jnp.asarray(QUERY))
  np.testing.assert_array_equal(np.asarray(ids)[0, :, 0], [1, 1])
  np.testing.assert_array_equal(r.ranks(jnp.asarray(QUERY), np.array([[2, 0]])), [[3, 2]])
  # An explicit weight overrides the database's; 0 is the reference's pure cosine.
  _, ids = retrieval.Retriever(db, prior_weight=0.0)(jnp.asarray(QUERY))
  np.testing.assert_array_equal(np.asarray(ids)[0, :, 0], [1, 0])
  _, ids = retrieval.Retriever(db, prior_weight=100.0)(jnp.asarray(QUERY))
  np.testing.assert_array_equal(np.asarray(ids)[0, :, 0], [0, 1])
  # No prior recorded (a database built before priors): pure cosine.
  r = retrieval.Retriever(_db())
  assert r.prior_weight == 0.0
  _, ids = r(jnp.asarray(QUERY))
  np.testing.assert_array_equal(np.asarray(ids)[0, :, 0], [1, 0])


def test_retriever_prior_without_counts_or_temperature_is_an_error():
  with pytest.raises(database.DatabaseError, match="no sentence counts.*--mode=build_rag"):
    retrieval.Retriever(_db(counts=None), prior_weight=0.5, temperature=TAU)
  with pytest.raises(database.DatabaseError, match="no sentence counts"):
    retrieval.Retriever(_db(counts=None, meta={"prior": {"weight": 0.5, "temperature": TAU}}))
  with pytest.raises(database.DatabaseError, match="temperature"):
    retrieval.Retriever(_db(), prior_weight=0.5)
  # Weight 0 needs neither.
  assert retrieval.Retriever(_db(counts=None), prior_weight=0.0).prior_weight == 0.0
  with pytest.raises(ValueError, match="≥ 0"):
    retrieval.prior_biases(LOG_P, -1.0, TAU)


# --- choosing the prior weight --------------------------------------------------------------------

def _margin_query(m):
  """A unit query whose cosines with E1 (healthy) and E2 (finding) differ by ``m``."""
  if m <= -1:
    return E1
  x = {0.12: (0.36, 0.48), 0.2: (0.6, 0.8), 0.4: (0.2, 0.6), 0.6: (0.2, 0.8),
       0.68: (0.28, 0.96), 1.0: (0.0, 1.0)}[m]
  return np.array([x[0], x[1], np.sqrt(max(1 - x[0] ** 2 - x[1] ** 2, 0.0))], np.float32)


# One anatomy, healthy row 0 (count 3) and finding row 1 (count 1): τ = 1, so the finding is
# retrieved iff cos_f − cos_h > w·log 3, i.e. margin > 0, 0.275, 0.549, 0.824 for the grid below.
HEALTHY_MARGINS = [-1] * 14 + [0.12, 0.2, 0.4, 0.4, 0.6, 0.6]   # 20 pairs, truth row 0
FINDING_MARGINS = [0.4, 0.68, 1.0, 1.0, 1.0, 1.0]              # 6 pairs, truth row 1
GRID = (0.0, 0.25, 0.5, 0.75, 10.0)
# Per w, by hand: healthy pairs right, finding pairs right.
#   w=0:    14, 6  → R@1 20/26, balanced (14/20 + 6/6)/2 = 0.85
#   w=0.25: 16, 6  → R@1 22/26, balanced 0.9
#   w=0.5:  18, 5  → R@1 23/26, balanced (0.9 + 5/6)/2
#   w=0.75: 20, 4  → R@1 24/26, balanced (1 + 4/6)/2
#   w=10:   20, 0  → R@1 20/26 (the majority sentence everywhere), balanced 0.5
WANT_R1 = [20 / 26, 22 / 26, 23 / 26, 24 / 26, 20 / 26]
WANT_NONMAJORITY = [1, 1, 5 / 6, 4 / 6, 0]
WANT_BALANCED = [0.85, 0.9, (0.9 + 5 / 6) / 2, (1 + 4 / 6) / 2, 0.5]


def _choice_inputs():
  queries = np.stack([_margin_query(m) for m in HEALTHY_MARGINS + FINDING_MARGINS])[:, None, :]
  true_rows = np.array([0] * len(HEALTHY_MARGINS) + [1] * len(FINDING_MARGINS))[:, None]
  table = np.stack([E1, E2])
  return queries, true_rows, (table,), (np.log([0.75, 0.25]),)


@pytest.mark.parametrize("keep, want", [
    (0.0, 0.25),  # the balanced-best weight that beats the majority sentence (w=0 only ties it)
    (0.6, 0.5),   # R@1 ≥ 20/26 + 0.6·4/26 = 22.4/26: w ∈ {0.5, 0.75}, balanced-best 0.5
    (1.0, 0.75),  # the R@1-best weight
])
def test_choose_prior_weight_hand_computed(keep, want):
  queries, true_rows, tables, log_priors = _choice_inputs()
  choice = retrieval.choose_prior_weight(queries, true_rows, tables, log_priors, 1.0,
                                         grid=GRID[::-1], keep=keep, chunk=7)
  assert choice.grid == GRID  # sorted
  np.testing.assert_allclose(choice.table["r@1"], WANT_R1, rtol=1e-12)
  np.testing.assert_allclose(choice.table["nonmajority_r@1"], WANT_NONMAJORITY, rtol=1e-12)
  np.testing.assert_allclose(choice.table["balanced_r@1"], WANT_BALANCED, rtol=1e-12)
  assert choice.majority_r1 == pytest.approx(20 / 26) and choice.num_pairs == 26
  assert choice.weight == want and choice.keep == keep
  meta = choice.meta()
  assert meta["keep"] == keep and meta["train_r@1"] == choice.table["r@1"]
  json.dumps(meta)  # stored in rag.json


def test_choose_prior_weight_mask_and_fallback():
  queries, true_rows, tables, log_priors = _choice_inputs()
  # Masking out every finding pair: nothing beats the majority sentence (R@1 1 from w = 0.75 on,
  # equal to it); the R@1-best weights tie on balanced R@1 too → the smallest of them.
  mask = true_rows[:, 0] == 0
  choice = retrieval.choose_prior_weight(queries, true_rows, tables, log_priors, 1.0, mask=mask,
                                         grid=GRID)
  assert choice.num_pairs == 20 and choice.majority_r1 == 1.0 and choice.weight == 0.75
  with pytest.raises(ValueError, match="keep"):
    retrieval.choose_prior_weight(queries, true_rows, tables, log_priors, 1.0, keep=2.0)
  with pytest.raises(ValueError, match="grid"):
    retrieval.choose_prior_weight(queries, true_rows, tables, log_priors, 1.0, grid=(-1.0,))


# --- non-majority-pair metrics --------------------------------------------------------------------

def test_nonmajority_metrics_hand_computed():
  ranks = np.array([[1, 2], [1, 1], [3, 1]])
  hits = np.array([[True, False], [False, True], [False, False]])  # true = majority sentence
  m = retrieval.retrieval_metrics(ranks, (3, 2), ks=(1,), majority_hits=hits)
  # Non-majority pairs (0,1) (1,0) (2,0) (2,1): R@1 hits 0, 1, 0, 1; random R@1 1/2, 1/3, 1/3, 1/2.
  assert m["nonmajority_r@1"] == pytest.approx(2 / 4)
  assert m["nonmajority_random_r@1"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 3 + 1 / 2) / 4)
  assert m["nonmajority_fraction"] == pytest.approx(4 / 6)
  assert m["majority_pairs_r@1"] == pytest.approx(1.0)  # (0,0) and (1,1): both hits
  assert m["balanced_r@1"] == pytest.approx((0.5 + 1.0) / 2)
  assert m["majority_r@1"] == pytest.approx(2 / 6)
  assert m["nonmajority_r@1/0"] == pytest.approx(1 / 2)
  assert m["nonmajority_random_r@1/0"] == pytest.approx(1 / 3)
  assert m["nonmajority_r@1/1"] == pytest.approx(1 / 2)
  assert m["nonmajority_random_r@1/1"] == pytest.approx(1 / 2)
  # Masked: (2,1) drops out.
  mask = np.array([[1, 1], [1, 1], [1, 0]], bool)
  m = retrieval.retrieval_metrics(ranks, (3, 2), mask, ks=(1,), majority_hits=hits)
  assert m["nonmajority_r@1"] == pytest.approx(1 / 3)
  assert m["nonmajority_random_r@1"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 3) / 3)
  assert m["nonmajority_fraction"] == pytest.approx(3 / 5)
  assert m["balanced_r@1"] == pytest.approx((1 / 3 + 1) / 2)
  assert m["nonmajority_r@1/1"] == 0.0 and m["nonmajority_random_r@1/1"] == pytest.approx(0.5)
  # Without majority hits: none of these keys.
  assert not any(k.startswith(("nonmajority", "balanced", "majority"))
                 for k in retrieval.retrieval_metrics(ranks, (3, 2), ks=(1,)))


def test_build_rag_evaluate_hand_computed():
  # stage1/rag.py's scoring of an evaluation split: with the database's prior (w = 4) and without.
  db = _db(meta={"prior": {"weight": 4.0, "temperature": TAU}})
  split = stage1_rag._Split(np.concatenate([QUERY, QUERY]), np.array([[1, 0], [0, 1]], np.int32),
                            np.array([True, True]))
  out = stage1_rag.evaluate(db, split)
  # w=4 retrieves [1, 1] for both images; cosine [1, 0]. Truths: image 0 [1, 0], image 1 [0, 1];
  # majority rows [0, 1] → non-majority pairs (0,0) (0,1).
  assert out["prior_weight"] == 4.0 and out["prior_temperature"] == TAU
  assert out["r@1"] == pytest.approx(2 / 4) and out["cosine/r@1"] == pytest.approx(2 / 4)
  assert out["majority_r@1"] == pytest.approx(2 / 4)
  assert out["nonmajority_r@1"] == pytest.approx(1 / 2)          # (0,0) hit, (0,1) miss
  assert out["cosine/nonmajority_r@1"] == pytest.approx(2 / 2)
  assert out["nonmajority_random_r@1"] == pytest.approx((1 / 3 + 1 / 2) / 2)
  assert out["majority_pairs_r@1"] == pytest.approx(1 / 2)       # (1,1) hit, (1,0) miss
  assert out["cosine/majority_pairs_r@1"] == pytest.approx(0.0)


@pytest.mark.parametrize("value, want", [("auto", None), (" Auto ", None), ("0.3", 0.3), (0.3, 0.3),
                                         (0, 0.0)])
def test_prior_weight_setting(value, want):
  assert stage1_rag.prior_weight_setting(value) == want


@pytest.mark.parametrize("value", ["-1", "nope", None, float("nan")])
def test_prior_weight_setting_invalid(value):
  with pytest.raises(ValueError, match="rag.prior_weight"):
    stage1_rag.prior_weight_setting(value)


# --- counts in the database -----------------------------------------------------------------------

SENTS = ("A is healthy.", "A shows x.", "B is healthy.", "B shows y.")


def _index(with_counts=True):
  a = anatomy.NUM_ANATOMIES
  train = tuple((0, 1) if i % 2 == 0 else (2,) for i in range(a))
  validate = tuple((1, 3) if i % 2 == 0 else (2, 3) for i in range(a))
  counts = {"train": tuple((5, 2) if i % 2 == 0 else (7,) for i in range(a)),
            "validate": tuple((1, 1) if i % 2 == 0 else (3, 4) for i in range(a))}
  return sentences_lib.SentenceIndex(SENTS, {"train": train, "validate": validate},
                                     counts=counts if with_counts else {})


def _embed(ids):
  return np.eye(4, dtype=np.float32)[np.asarray(ids)] + 0.1


def test_database_counts_build_save_load(tmp_path):
  db = database.build(_index(), ("train",), _embed, meta={"step": 1})
  assert [list(c) for c in db.counts[:2]] == [[5, 2], [7]]
  db = database.build(_index(), ("train", "validate"), _embed, meta={"step": 1})
  # Summed over splits: even anatomies A0/A1/B1 = 5/2+1/1 → [5, 3, 1]; odd B0/B1 = [7+3, 4].
  assert db.sentences[0] == ("A is healthy.", "A shows x.", "B shows y.")
  assert [list(c) for c in db.counts[:2]] == [[5, 3, 1], [10, 4]]
  d = str(tmp_path / "rag")
  database.save(db, d)
  with open(os.path.join(d, "rag.json")) as f:
    obj = json.load(f)
  assert obj["version"] == 2 and obj["counts"][0] == [5, 3, 1]
  got = database.load(d)
  assert got.counts is not None and len(got.counts) == anatomy.NUM_ANATOMIES
  for x, y in zip(got.counts, db.counts):
    assert x.dtype == np.int64
    np.testing.assert_array_equal(x, y)
  # An index without counts for one of the splits: a database without counts.
  assert database.build(_index(with_counts=False), ("train",), _embed).counts is None


def test_old_database_without_counts(tmp_path):
  d = str(tmp_path / "rag")
  database.save(database.build(_index(), ("train",), _embed), d)

  def to_version_1(obj):
    obj["version"] = 1
    del obj["counts"]

  _edit_json(d, to_version_1)
  db = database.load(d)
  assert db.counts is None
  r = retrieval.Retriever(db)  # documented fallback: no prior recorded → pure cosine
  assert r.prior_weight == 0.0
  with pytest.raises(database.DatabaseError, match="no sentence counts.*rebuild"):
    retrieval.Retriever(db, prior_weight=0.3, temperature=0.01)
  with pytest.raises(database.DatabaseError, match="no sentence counts"):
    database.log_prior(db)


@pytest.mark.parametrize("edit", ["short", "negative", "float"])
def test_database_malformed_counts(tmp_path, edit):
  d = str(tmp_path / "rag")
  database.save(database.build(_index(), ("train",), _embed), d)

  def fn(obj):
    if edit == "short":
      obj["counts"][3] = obj["counts"][3][:-1]
    elif edit == "negative":
      obj["counts"][0][0] = -1
    else:
      obj["counts"][0][0] = 1.5

  _edit_json(d, fn)
  with pytest.raises(database.DatabaseError, match="rag.json.*counts"):
    database.load(d)


def test_database_unknown_version(tmp_path):
  d = str(tmp_path / "rag")
  database.save(database.build(_index(), ("train",), _embed), d)
  _edit_json(d, lambda obj: obj.update(version=3))
  with pytest.raises(database.DatabaseError, match="version 3"):
    database.load(d)
