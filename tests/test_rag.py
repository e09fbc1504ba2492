"""RAG: retrieval (rag/retrieval.py), the sentence database (rag/database.py), the records'
sentence index (data/sentences.py), sentence ids in the pipeline, and cached text embeddings
(data/text_embeddings.py)."""

import json
import os

import cv2
import grain
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import safetensors.numpy

from anatomix_jax import anatomy
from anatomix_jax.convert import hf_bert
from anatomix_jax.models import bert
from anatomix_jax.stage1 import data as pipeline
from anatomix_jax.data import records
from anatomix_jax.data import sentences as sentences_lib
from anatomix_jax.stage1 import text as text_embeddings
from anatomix_jax.rag import database
from anatomix_jax.rag import retrieval

A = anatomy.NUM_ANATOMIES


# --- retrieval: top_k / ranks / Retriever ---------------------------------------------------------

def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _random_tables(rng, sizes, d):
  return [_unit(rng.normal(size=(s, d))).astype(np.float32) for s in sizes]


def _brute_top_k(queries, tables, k):
  """NumPy: cosine, descending argsort, pad with -inf / -1."""
  q = _unit(np.asarray(queries, np.float64))
  b = q.shape[0]
  scores = np.full((b, len(tables), k), -np.inf)
  ids = np.full((b, len(tables), k), -1, np.int64)
  for a, t in enumerate(tables):
    s = q[:, a] @ np.asarray(t, np.float64).T
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    n = order.shape[1]
    ids[:, a, :n] = order
    scores[:, a, :n] = np.take_along_axis(s, order, axis=1)
  return scores, ids


def _brute_ranks(queries, tables, true_rows):
  q = _unit(np.asarray(queries, np.float64))
  out = np.zeros(true_rows.shape, np.int64)
  for a, t in enumerate(tables):
    s = q[:, a] @ np.asarray(t, np.float64).T
    order = np.argsort(-s, axis=1, kind="stable")
    for b in range(q.shape[0]):
      if true_rows[b, a] >= 0:
        out[b, a] = 1 + int(np.nonzero(order[b] == true_rows[b, a])[0][0])
  return out


SIZES = (1, 2, 7, 4, 12)  # a size-1 table and one smaller than K
K, D, B = 3, 8, 6


@pytest.fixture(scope="module")
def random_retrieval():
  rng = np.random.default_rng(0)
  tables = _random_tables(rng, SIZES, D)
  queries = (rng.normal(size=(B, len(SIZES), D)) * rng.uniform(0.1, 5, (B, len(SIZES), 1))
             ).astype(np.float32)  # any norm
  true_rows = np.stack([rng.integers(0, s, B) for s in SIZES], 1)
  true_rows[0, 2] = true_rows[3, 4] = true_rows[5, 0] = -1
  return queries, tables, true_rows


def test_top_k_matches_brute_force(random_retrieval):
  queries, tables, _ = random_retrieval
  scores, ids = retrieval.top_k(jnp.asarray(queries), tuple(map(jnp.asarray, tables)), K)
  want_scores, want_ids = _brute_top_k(queries, tables, K)
  assert scores.shape == ids.shape == (B, len(SIZES), K)
  np.testing.assert_array_equal(np.asarray(ids), want_ids)
  np.testing.assert_allclose(np.asarray(scores), want_scores, atol=1e-5)
  assert np.all(np.asarray(ids)[:, 0, 1:] == -1) and np.all(np.asarray(ids)[:, 1, 2] == -1)
  assert np.all(np.isneginf(np.asarray(scores)[:, 0, 1:]))


def test_ranks_match_brute_force(random_retrieval):
  queries, tables, true_rows = random_retrieval
  got = retrieval.ranks(jnp.asarray(queries), tuple(map(jnp.asarray, tables)),
                        jnp.asarray(true_rows))
  want = _brute_ranks(queries, tables, true_rows)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(got), want)
  assert want[0, 2] == want[3, 4] == want[5, 0] == 0 and np.all(want[true_rows >= 0] >= 1)
  assert np.all(want[:, 0][true_rows[:, 0] >= 0] == 1)  # size-1 table: always rank 1


def test_ranks_ties_count_in_favour():
  table = np.array([[1, 0], [0, 1], [1, 0]], np.float32)  # rows 0 and 2 tie for the query
  got = retrieval.ranks(jnp.asarray([[[2.0, 0.0]]]), (jnp.asarray(table),), jnp.asarray([[2]]))
  np.testing.assert_array_equal(np.asarray(got), [[1]])
  got = retrieval.ranks(jnp.asarray([[[2.0, 0.0]]]), (jnp.asarray(table),), jnp.asarray([[1]]))
  np.testing.assert_array_equal(np.asarray(got), [[3]])


def test_retriever(random_retrieval):
  queries, tables, true_rows = random_retrieval
  sents = tuple(tuple(f"s{a}_{i}" for i in range(s)) for a, s in enumerate(SIZES))
  db = database.RagDatabase(tuple(f"a{a}" for a in range(len(SIZES))), sents, tuple(tables), {})
  r = retrieval.Retriever(db, k=K)
  scores, ids = r(jnp.asarray(queries))
  want_scores, want_ids = _brute_top_k(queries, tables, K)
  np.testing.assert_array_equal(np.asarray(ids), want_ids)
  np.testing.assert_allclose(np.asarray(scores), want_scores, atol=1e-5)
  out = r.sentences(np.asarray(ids))
  assert len(out) == B and all(len(x) == len(SIZES) for x in out)
  for b in range(B):
    for a in range(len(SIZES)):
      assert out[b][a] == [f"s{a}_{i}" if i >= 0 else "" for i in want_ids[b, a]]
  assert out[0][0][1:] == ["", ""]
  rows = r.true_rows([["s0_0", "s1_1", "nope", "s3_3", "s4_0"], ["x", "s1_0", "s2_6", "", "s4_11"]])
  np.testing.assert_array_equal(rows, [[0, 1, -1, 3, 0], [-1, 0, 6, -1, 11]])
  assert rows.dtype == np.int32
  np.testing.assert_array_equal(r.ranks(jnp.asarray(queries), true_rows),
                                _brute_ranks(queries, tables, true_rows))


# --- retrieval_metrics ----------------------------------------------------------------------------

def test_retrieval_metrics_hand_computed():
  # Tables of sizes 1, 2, 3 (and a 4th anatomy that is masked out entirely).
  ranks = np.array([[1, 2, 0, 1],
                    [1, 1, 3, 2],
                    [0, 2, 1, 3],
                    [1, 1, 2, 4]])
  mask = np.array([[1, 1, 1, 0],
                   [1, 1, 1, 0],
                   [1, 1, 1, 0],
                   [1, 1, 0, 0]], bool)  # (3, 2) masked: it would be a hit otherwise
  # 11 counted queries; found (rank > 0): 3 of anatomy 0, 4 of anatomy 1, 2 of anatomy 2.
  # Random baseline: S=1: R@1=R@2=R@3=1, MRR=H(1)/1=1; S=2: R@1=1/2, R@2=R@3=1, MRR=(1+1/2)/2=3/4;
  # S=3: R@1=1/3, R@2=2/3, R@3=1, MRR=(1+1/2+1/3)/3=11/18.
  m = retrieval.retrieval_metrics(ranks, (1, 2, 3, 5), mask, ks=(1, 2, 3))
  want = {
      "r@1": 6 / 11, "r@2": 8 / 11, "r@3": 9 / 11,
      "mrr": (1 + 1 / 2 + 1 + 1 + 1 / 3 + 1 / 2 + 1 + 1 + 1) / 11,
      "random_r@1": (3 * 1 + 4 / 2 + 2 / 3) / 11,
      "random_r@2": (3 * 1 + 4 * 1 + 2 * 2 / 3) / 11,
      "random_r@3": 9 / 11,
      "random_mrr": (3 * 1 + 4 * 3 / 4 + 2 * 11 / 18) / 11,
      "r@1/0": 3 / 4, "random_r@1/0": 3 / 4,
      "r@1/1": 2 / 4, "random_r@1/1": 4 * (1 / 2) / 4,
      "r@1/2": 1 / 3, "random_r@1/2": 2 * (1 / 3) / 3,
      "coverage": 9 / 11,
  }
  assert set(m) == set(want)  # no per-anatomy keys for the fully masked anatomy 3
  for key, value in want.items():
    assert m[key] == pytest.approx(value, abs=1e-12), key


def test_retrieval_metrics_majority_baseline():
  ranks = np.array([[1, 2], [2, 1], [1, 0]])
  mask = np.array([[1, 1], [1, 1], [0, 1]], bool)
  hits = np.array([[True, False], [True, True], [True, False]])  # row 2, anatomy 0: masked
  m = retrieval.retrieval_metrics(ranks, (2, 3), mask, ks=(1,), majority_hits=hits)
  assert m["majority_r@1"] == pytest.approx(3 / 5)
  assert m["majority_r@1/0"] == pytest.approx(2 / 2) and m["majority_r@1/1"] == pytest.approx(1 / 3)
  assert "majority_r@1" not in retrieval.retrieval_metrics(ranks, (2, 3), mask, ks=(1,))


def test_retrieval_metrics_default_mask():
  m = retrieval.retrieval_metrics(np.array([[1], [2], [0]]), (2,), ks=(1,))
  want = {"r@1": 1 / 3, "mrr": 1.5 / 3, "random_r@1": 1 / 3, "random_mrr": 1.5 / 3,
          "r@1/0": 1 / 3, "random_r@1/0": 1 / 3, "coverage": 2 / 3}
  assert m == pytest.approx(want)


def test_random_baseline_matches_monte_carlo():
  sizes = (1, 2, 3, 7, 20)
  n = 50_000
  rng = np.random.default_rng(1)
  mc_r1, mc_mrr = [], []
  for s in sizes:  # rank of item 0 under uniformly random permutations
    perms = np.argsort(rng.random((n, s)), axis=1)
    rank = 1 + np.argmax(perms == 0, axis=1)
    mc_r1.append(np.mean(rank == 1))
    mc_mrr.append(np.mean(1.0 / rank))
  m = retrieval.retrieval_metrics(np.ones((4, len(sizes)), int), sizes, ks=(1,))
  for a in range(len(sizes)):
    assert abs(m[f"random_r@1/{a}"] - mc_r1[a]) < 0.01, a
  assert abs(m["random_r@1"] - np.mean(mc_r1)) < 0.01
  assert abs(m["random_mrr"] - np.mean(mc_mrr)) < 0.01


# --- database -------------------------------------------------------------------------------------

DB_SENTENCES = tuple(sorted(["A shows x.", "B is healthy.", "C shows y.", "Shared finding.",
                             "Z is healthy.", "effusion.", "lung clear.", "no change."]))
D_EMB = 5


def _db_index():
  n = len(DB_SENTENCES)
  train = [tuple(sorted({a % n, (3 * a) % n})) for a in range(A)]
  validate = [((a + 5) % n,) for a in range(A)]
  test = [(0, 1, 2) for _ in range(A)]
  train[34], validate[34] = (), ()  # empty in every used split
  train[35] = ()  # only in validate
  return sentences_lib.SentenceIndex(DB_SENTENCES, {"train": tuple(train),
                                                    "validate": tuple(validate),
                                                    "test": tuple(test)})


EMB = np.random.default_rng(2).normal(size=(len(DB_SENTENCES), D_EMB)).astype(np.float32)


def _embed(ids):
  ids = np.asarray(ids)
  assert np.issubdtype(ids.dtype, np.integer)
  return EMB[ids] * 3.0


@pytest.mark.parametrize("splits", [("train",), ("train", "validate")])
def test_database_build(splits):
  index = _db_index()
  db = database.build(index, splits, _embed, meta={"step": 7})
  n = len(DB_SENTENCES)
  assert db.anatomies == anatomy.ANATOMY_NAMES
  assert db.meta == {"step": 7, "splits": list(splits)}
  for a in range(A):
    ids = {a % n, (3 * a) % n} if a not in (34, 35) else set()
    if "validate" in splits and a != 34:
      ids.add((a + 5) % n)
    want = sorted(DB_SENTENCES[i] for i in ids)
    assert list(db.sentences[a]) == want, a
    want_emb = np.stack([_unit(EMB[DB_SENTENCES.index(s)]) for s in want]) if want else \
        np.zeros((0, D_EMB))
    assert db.embeddings[a].shape == (len(want), D_EMB)
    np.testing.assert_allclose(db.embeddings[a], want_emb, atol=1e-6)
  assert db.sizes[34] == 0 and db.sizes[35] == (1 if "validate" in splits else 0)
  assert db.sentences[1] == tuple(sorted({DB_SENTENCES[1], DB_SENTENCES[3]}
                                         | ({DB_SENTENCES[6]} if "validate" in splits else set())))


def test_database_build_unknown_split():
  with pytest.raises(database.DatabaseError, match="nope"):
    database.build(_db_index(), ("train", "nope"), _embed)


@pytest.fixture
def saved_db(tmp_path):
  db = database.build(_db_index(), ("train", "validate"), _embed, meta={"step": 3})
  d = str(tmp_path / "rag")
  database.save(db, d)
  return db, d


def test_database_save_load_round_trip(saved_db):
  db, d = saved_db
  assert sorted(os.listdir(d)) == ["rag.json", "rag.safetensors"]
  got = database.load(d)
  assert got.anatomies == db.anatomies and got.sentences == db.sentences and got.meta == db.meta
  assert len(got.embeddings) == A
  for x, y in zip(got.embeddings, db.embeddings):
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x, y)


def test_database_load_missing(tmp_path, saved_db):
  with pytest.raises(database.DatabaseError, match="rag.json"):
    database.load(str(tmp_path / "nowhere"))
  _, d = saved_db
  os.remove(os.path.join(d, "rag.safetensors"))
  with pytest.raises(database.DatabaseError, match="rag.safetensors"):
    database.load(d)


def _edit_json(d, fn):
  path = os.path.join(d, "rag.json")
  with open(path) as f:
    obj = json.load(f)
  fn(obj)
  with open(path, "w") as f:
    json.dump(obj, f)


@pytest.mark.parametrize("edit", ["swap", "short"])
def test_database_load_other_anatomy_list(saved_db, edit):
  _, d = saved_db

  def fn(obj):
    if edit == "swap":
      obj["anatomies"][3], obj["anatomies"][4] = obj["anatomies"][4], obj["anatomies"][3]
    else:
      obj["anatomies"] = obj["anatomies"][:-1]
      obj["sentences"] = obj["sentences"][:-1]

  _edit_json(d, fn)
  with pytest.raises(database.DatabaseError, match="anatomy list") as e:
    database.load(d)
  assert "rag.json" in str(e.value)


def test_database_load_wrong_row_count(saved_db):
  _, d = saved_db
  path = os.path.join(d, "rag.safetensors")
  tensors = safetensors.numpy.load_file(path)
  tensors["anatomy_07"] = np.concatenate([tensors["anatomy_07"], tensors["anatomy_07"][:1]])
  safetensors.numpy.save_file(tensors, path)
  with pytest.raises(database.DatabaseError, match="anatomy_07"):
    database.load(d)


# --- records: sentence index and pipeline sentence ids --------------------------------------------

IMG = 16


def _record_sentences(split, i):
  s = [f"A{a} is healthy." for a in range(A)]
  if split == "train":
    if i >= 1:
      s[0] = "A0 shows x."
    if i == 2:
      s[5] = s[6] = "Shared finding."  # shared across anatomies
  else:
    if i == 0:
      s[5] = "Shared finding."  # shared across splits
    if i == 1:
      s[7] = "Only in validate."
  return s


COUNTS = {"train": 3, "validate": 2}


def _example(split, i):
  img = np.full((IMG, IMG), 10 * i, np.uint8)
  return {"id": f"{split}{i}", "study_id": "s", "subject_id": "p", "view": "PA",
          "image_png": cv2.imencode(".png", img)[1].tobytes(),
          "boxes": np.zeros((A, 4), np.float32), "box_present": np.zeros(A, np.uint8),
          "sentences": _record_sentences(split, i),
          "labels": np.zeros(anatomy.NUM_LABELS, np.float32)}


@pytest.fixture
def records_dir(tmp_path):
  d = str(tmp_path / "records")
  for split, n in COUNTS.items():
    records.write_split(d, split, [records.encode(_example(split, i)) for i in range(n)],
                        num_shards=2)
  records.write_metadata(d, image_size=IMG, splits={k: {"count": v} for k, v in COUNTS.items()})
  return d


def _expected_index():
  sents = {s for split, n in COUNTS.items() for i in range(n) for s in _record_sentences(split, i)}
  sents = sorted(sents)
  by_split = {}
  for split, n in COUNTS.items():
    by_split[split] = [sorted({sents.index(_record_sentences(split, i)[a]) for i in range(n)})
                       for a in range(A)]
  return sents, by_split


def test_sentence_index_build(records_dir):
  index = sentences_lib.build(records_dir)
  sents, by_split = _expected_index()
  assert len(sents) == A + 3
  assert list(index.sentences) == sents
  assert sorted(index.by_split) == ["train", "validate"]
  for split in COUNTS:
    assert [list(x) for x in index.by_split[split]] == by_split[split], split
  ids = index.ids()
  assert index.by_split["train"][0] == tuple(sorted([ids["A0 is healthy."], ids["A0 shows x."]]))
  assert index.by_split["train"][5] == tuple(sorted([ids["A5 is healthy."], ids["Shared finding."]]))
  assert index.by_split["train"][7] == (ids["A7 is healthy."],)
  assert index.by_split["validate"][0] == (ids["A0 is healthy."],)
  assert index.by_split["validate"][7] == tuple(sorted([ids["A7 is healthy."],
                                                        ids["Only in validate."]]))
  assert ids == {s: i for i, s in enumerate(sents)}
  # Most frequent sentence per anatomy (train: "A0 shows x." in 2 of 3 records; ties → smaller id).
  assert index.majority["train"][0] == ids["A0 shows x."]
  assert index.majority["train"][5] == min(ids["A5 is healthy."], ids["Shared finding."])
  assert index.majority["validate"][7] == min(ids["A7 is healthy."], ids["Only in validate."])
  assert all(index.majority[split][a] == ids[f"A{a} is healthy."] for split in COUNTS
             for a in range(8, A))
  # Records per sentence, aligned with by_split.
  counts = {split: [dict(zip(index.by_split[split][a], index.counts[split][a])) for a in range(A)]
            for split in COUNTS}
  assert counts["train"][0] == {ids["A0 is healthy."]: 1, ids["A0 shows x."]: 2}
  assert counts["train"][5] == {ids["A5 is healthy."]: 2, ids["Shared finding."]: 1}
  assert counts["train"][9] == {ids["A9 is healthy."]: 3}
  assert counts["validate"][7] == {ids["A7 is healthy."]: 1, ids["Only in validate."]: 1}
  assert counts["validate"][5] == {ids["Shared finding."]: 1, ids["A5 is healthy."]: 1}


def test_sentence_index_with_counts(records_dir):
  """An index file written before counts were kept still loads (counts {}); with_counts rescans
  the records in memory and leaves the file alone."""
  path = os.path.join(records_dir, sentences_lib.INDEX_FILE)
  full = sentences_lib.build(records_dir)
  sentences_lib.save(full, path)
  with open(path) as f:
    obj = json.load(f)
  del obj["counts"]
  with open(path, "w") as f:
    json.dump(obj, f)
  before = os.path.getmtime(path)
  old = sentences_lib.load_or_build(records_dir)
  assert old.counts == {} and old.by_split == full.by_split
  assert sentences_lib.with_counts(old, records_dir) == full
  assert sentences_lib.with_counts(full, records_dir) is full
  assert os.path.getmtime(path) == before
  with open(path) as f:
    assert "counts" not in json.load(f)
  # Round trip with counts; malformed counts name the file.
  sentences_lib.save(full, path)
  assert sentences_lib.load(path) == full
  with open(path) as f:
    obj = json.load(f)
  obj["counts"]["train"][0] = obj["counts"]["train"][0][:-1]
  with open(path, "w") as f:
    json.dump(obj, f)
  with pytest.raises(records.RecordError, match="sentences.json.*counts"):
    sentences_lib.load(path)


def test_sentence_index_load_or_build_caches(records_dir, monkeypatch):
  path = os.path.join(records_dir, sentences_lib.INDEX_FILE)
  assert not os.path.exists(path)
  first = sentences_lib.load_or_build(records_dir)
  assert os.path.exists(path)

  def boom(_):
    raise AssertionError("rebuilt instead of read")

  monkeypatch.setattr(sentences_lib, "build", boom)
  second = sentences_lib.load_or_build(records_dir)
  assert second == first
  sents, by_split = _expected_index()
  assert list(second.sentences) == sents
  assert {k: [list(x) for x in v] for k, v in second.by_split.items()} == by_split


@pytest.mark.parametrize("edit", ["anatomies", "id_range", "short"])
def test_sentence_index_malformed(records_dir, edit):
  path = os.path.join(records_dir, sentences_lib.INDEX_FILE)
  sentences_lib.save(sentences_lib.build(records_dir), path)
  with open(path) as f:
    obj = json.load(f)
  if edit == "anatomies":
    obj["anatomies"] = obj["anatomies"][::-1]
  elif edit == "id_range":
    obj["by_split"]["validate"][3].append(len(obj["sentences"]))
  else:
    obj["by_split"]["train"] = obj["by_split"]["train"][:-1]
  with open(path, "w") as f:
    json.dump(obj, f)
  with pytest.raises(records.RecordError, match="sentences.json"):
    sentences_lib.load(path)
  with pytest.raises(records.RecordError, match="sentences.json"):
    sentences_lib.load_or_build(records_dir)  # fresh file: read, not rebuilt


def _batches(records_dir, split, **kw):
  return list(pipeline.stage1_dataset(records_dir, split, image_size=IMG, batch_size=2,
                                      train=False, num_workers=0, **kw))


def test_pipeline_sentence_ids(records_dir):
  sents, _ = _expected_index()
  mapping = {s: i for i, s in enumerate(sents)}
  for split, n in COUNTS.items():
    source = grain.sources.ArrayRecordDataSource(records.shard_paths(records_dir, split))
    batches = _batches(records_dir, split, sentence_ids=sentences_lib.build(records_dir).ids())
    seen = 0
    for b in batches:
      assert b["sentence_ids"].dtype == np.int32 and b["sentence_ids"].shape == (2, A)
      for row in range(2):
        k = int(b["index"][row])
        if k < 0:
          np.testing.assert_array_equal(b["sentence_ids"][row], -1)
          continue
        seen += 1
        want = [mapping[s] for s in records.decode(source[k])["sentences"]]
        np.testing.assert_array_equal(b["sentence_ids"][row], want)
    assert seen == n
    for b in _batches(records_dir, split):
      np.testing.assert_array_equal(b["sentence_ids"], -1)


def test_pipeline_unknown_sentence(records_dir):
  sents, _ = _expected_index()
  mapping = {s: i for i, s in enumerate(sents) if s != "A0 is healthy."}
  with pytest.raises(Exception, match="sentence index"):
    _batches(records_dir, "train", sentence_ids=mapping)


# --- text embeddings ------------------------------------------------------------------------------

TEXT = ["Left lung is healthy.", "Right lung shows opacity.", "Mediastinum shows widening, mild."]


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("enc"))
  text_embeddings.write_random_encoder(d, TEXT, seed=0)
  return d


def test_random_encoder_loads(encoder_dir):
  config, params = hf_bert.load_bert(encoder_dir)
  tok = hf_bert.load_tokenizer(encoder_dir, config)
  assert config.hidden_size == 64 and config.num_hidden_layers == 2
  assert params["embeddings"]["word_embeddings"]["embedding"].shape == (config.vocab_size, 64)
  enc = tok(TEXT[2])["input_ids"]
  assert tok.convert_ids_to_tokens(enc) == ["[CLS]", "mediastinum", "shows", "widening", ",",
                                            "mild", ".", "[SEP]"]
  assert tok.unk_token_id not in tok("Right lung shows opacity")["input_ids"]
  words = ["left", "lung", "is", "healthy", "right", "shows", "opacity", "mediastinum",
           "widening", "mild", ",", "."]
  ids = tok.convert_tokens_to_ids(words)
  assert tok.unk_token_id not in ids and len(set(ids)) == len(words)
  assert tok.convert_tokens_to_ids(["zebra"]) == [tok.unk_token_id]


def _torch_pooled(encoder_dir, sents):
  import torch
  import transformers
  model = transformers.BertModel.from_pretrained(encoder_dir).eval()
  tok = transformers.BertTokenizerFast.from_pretrained(encoder_dir)
  enc = tok(list(sents), padding=True, return_tensors="pt")
  with torch.no_grad():
    hidden = model(**enc).last_hidden_state.numpy().astype(np.float64)
  mask = enc["attention_mask"].numpy().astype(np.float64)[..., None]
  return (hidden * mask).sum(1) / mask.sum(1)


def test_pooled_embeddings_and_cache(encoder_dir, tmp_path, monkeypatch):
  cache = str(tmp_path / "cache")
  got = text_embeddings.pooled_embeddings(encoder_dir, TEXT, cache)
  assert got.shape == (len(TEXT), 64) and got.dtype == np.float32
  np.testing.assert_allclose(got, _torch_pooled(encoder_dir, TEXT), atol=1e-4)
  files = os.listdir(cache)
  assert len(files) == 1 and files[0].startswith("pooled-") and files[0].endswith(".safetensors")

  real_encode = bert.encode_sentences

  def boom(*args, **kw):
    raise AssertionError("encoded again instead of reading the cache")

  monkeypatch.setattr(bert, "encode_sentences", boom)
  np.testing.assert_array_equal(text_embeddings.pooled_embeddings(encoder_dir, TEXT, cache), got)
  assert os.listdir(cache) == files

  monkeypatch.setattr(bert, "encode_sentences", real_encode)
  other = TEXT[:2] + ["Left lung shows opacity."]
  got2 = text_embeddings.pooled_embeddings(encoder_dir, other, cache)
  assert len(os.listdir(cache)) == 2
  np.testing.assert_allclose(got2, _torch_pooled(encoder_dir, other), atol=1e-4)


def test_resolve_encoder_dir_without_fallback(tmp_path):
  cfg = ml_collections.ConfigDict(dict(encoder_dir="", allow_fallback=False))
  with pytest.raises(ValueError, match="encoder_dir"):
    text_embeddings.resolve_encoder_dir(cfg, str(tmp_path), TEXT)
  cfg = ml_collections.ConfigDict(dict(encoder_dir="/some/bert", allow_fallback=False))
  assert text_embeddings.resolve_encoder_dir(cfg, str(tmp_path), TEXT) == "/some/bert"
