"""Stage-1 Grain input pipeline (anatomix_jax/data/pipeline.py) on a tiny records directory."""

import logging

import cv2
import grain
import numpy as np
import pytest

from anatomix_jax import anatomy
from anatomix_jax.stage1 import data as pipeline
from anatomix_jax.data import records

N = 13
SIZE = 64  # stored image side; the canvas is 1024, so canvas coordinates ÷ 16 are pixels
BACKGROUND = 40


def _box0(i):
  """Anatomy 0's canvas box of example i: multiples of 16, so exact at 64 px."""
  x1, y1 = 128 + 32 * (i % 5), 192 + 16 * (i % 3)
  return np.array([x1, y1, x1 + 320 + 32 * (i % 4), y1 + 384], np.float32)


def _example(i, png=None):
  boxes = np.zeros((anatomy.NUM_ANATOMIES, 4), np.float32)
  present = np.zeros(anatomy.NUM_ANATOMIES, np.uint8)
  boxes[0], present[0] = _box0(i), 1
  boxes[1], present[1] = [512, 64, 960, 320], 1
  boxes[2] = [100, 100, 200, 200]  # stored coordinates of an ABSENT anatomy: must come out as 0
  img = np.full((SIZE, SIZE), BACKGROUND, np.uint8)
  x1, y1, x2, y2 = (_box0(i) / 16).astype(int)
  img[y1:y2, x1:x2] = 255
  if png is None:
    png = cv2.imencode(".png", img)[1].tobytes()
  labels = np.array([(i >> k) & 1 for k in range(anatomy.NUM_LABELS)], np.float32)
  return {"id": f"img{i}", "study_id": "s", "subject_id": "p", "view": "PA", "image_png": png,
          "boxes": boxes, "box_present": present, "sentences": [""] * anatomy.NUM_ANATOMIES,
          "labels": labels}


@pytest.fixture(scope="module")
def records_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("records"))
  records.write_split(d, "train", [records.encode(_example(i)) for i in range(N)], num_shards=2)
  records.write_metadata(d, image_size=SIZE)
  return d


@pytest.fixture(scope="module")
def example_of_record(records_dir):
  """Record index within the split → example number (shards are written round-robin)."""
  source = grain.sources.ArrayRecordDataSource(records.shard_paths(records_dir, "train"))
  return [int(records.decode(source[k])["id"][3:]) for k in range(len(source))]


def _dataset(records_dir, **kw):
  args = dict(image_size=SIZE, batch_size=4, train=False, seed=5)
  args.update(kw)
  return pipeline.stage1_dataset(records_dir, "train", **args)


def _take(ds, n):
  it = iter(ds)
  try:
    return [next(it) for _ in range(n)]
  finally:
    it.close()


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_eval_batches_values_and_padding(records_dir, example_of_record):
  batches = list(_dataset(records_dir))
  assert len(batches) == pipeline.num_eval_batches(N, 4) == 4
  b0 = batches[0]
  shapes = {"image": ((4, SIZE, SIZE, 1), np.float32), "boxes": ((4, 36, 4), np.float32),
            "box_mask": ((4, 36), np.float32), "labels": ((4, 14), np.float32),
            "sentence_ids": ((4, 36), np.int32), "index": ((4,), np.int32),
            "valid": ((4,), np.float32)}
  assert {k: (v.shape, v.dtype) for k, v in b0.items()} == shapes
  index = np.concatenate([b["index"] for b in batches])
  valid = np.concatenate([b["valid"] for b in batches])
  np.testing.assert_array_equal(index, list(range(N)) + [-1] * 3)
  np.testing.assert_array_equal(valid, [1] * N + [0] * 3)
  for b in batches:
    for row in range(4):
      k = b["index"][row]
      if k < 0:  # padding rows are empty
        assert b["image"][row].max() == 0 and b["box_mask"][row].max() == 0
        continue
      i = example_of_record[k]
      x1, y1, x2, y2 = _box0(i)
      want0 = [(x1 + x2) / 2048, (y1 + y2) / 2048, (x2 - x1) / 1024, (y2 - y1) / 1024]
      np.testing.assert_allclose(b["boxes"][row, 0], want0, rtol=1e-6)
      np.testing.assert_allclose(b["boxes"][row, 1], [736 / 1024, 192 / 1024, 448 / 1024, 0.25])
      assert b["boxes"][row, 2:].max() == 0  # absent anatomies: zero targets
      np.testing.assert_array_equal(b["box_mask"][row], [1, 1] + [0] * 34)
      np.testing.assert_array_equal(b["labels"][row], [(i >> j) & 1 for j in range(14)])
      img = b["image"][row, ..., 0]
      assert set(np.unique(img).tolist()) == {np.float32(BACKGROUND / 255), 1.0}
      ys, xs = np.nonzero(img == 1.0)
      np.testing.assert_array_equal([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1],
                                    _box0(i) / 16)


def test_eval_resizes_to_image_size(records_dir):
  b = _take(_dataset(records_dir, image_size=32), 1)[0]
  assert b["image"].shape == (4, 32, 32, 1)
  full = _take(_dataset(records_dir), 1)[0]
  np.testing.assert_allclose(b["boxes"], full["boxes"], rtol=1e-6)  # normalized: size-free


def test_eval_multi_host_equal_counts_and_exact_cover(records_dir):
  per_host = [list(_dataset(records_dir, process_index=p, process_count=2)) for p in range(2)]
  assert [len(h) for h in per_host] == [2, 2] == [pipeline.num_eval_batches(N, 4, 2)] * 2
  # Global batch k = host batches k in host order = positions [8k, 8k + 8).
  order = np.concatenate([np.concatenate([h[k]["index"] for h in per_host]) for k in range(2)])
  np.testing.assert_array_equal(order, list(range(N)) + [-1] * 3)


def test_train_host_shards_are_disjoint_slices_of_one_stream(records_dir):
  aug = {"enabled": True}
  single = _take(_dataset(records_dir, train=True, batch_size=4, augment=aug), 3)
  hosts = [_take(_dataset(records_dir, train=True, batch_size=2, augment=aug, process_index=p,
                          process_count=2), 3) for p in range(2)]
  first = [np.concatenate([h[k]["index"] for k in range(3)]) for h in hosts]
  assert not set(first[0]) & set(first[1])  # 12 positions of the first epoch, all distinct
  assert len(set(first[0]) | set(first[1])) == 12
  # Step k's global batch (host 0's rows, then host 1's) is the single host's batch k, row order
  # and augmentation included.
  for k in range(3):
    for key in single[k]:
      np.testing.assert_array_equal(np.concatenate([hosts[0][k][key], hosts[1][k][key]]),
                                    single[k][key])


def test_train_determinism_and_per_epoch_reshuffle(records_dir):
  kw = dict(train=True, batch_size=N, num_epochs=2)
  a, b = list(_dataset(records_dir, **kw)), list(_dataset(records_dir, **kw))
  _assert_batches_equal(a, b)
  assert len(a) == 2  # one batch per epoch, then the stream ends
  e0, e1 = a[0]["index"], a[1]["index"]
  assert sorted(e0) == sorted(e1) == list(range(N))
  assert not np.array_equal(e0, e1)  # each epoch has its own permutation
  other = list(_dataset(records_dir, **{**kw, "seed": 6}))
  assert not np.array_equal(other[0]["index"], e0)


def test_train_finite_epochs_give_equal_host_counts(records_dir):
  # 2 epochs × 13 = 26 examples, global batch 2 × 4 = 8: 3 batches per host, the rest dropped.
  counts = [len(list(_dataset(records_dir, train=True, num_epochs=2, process_index=p,
                              process_count=2))) for p in range(2)]
  assert counts == [3, 3]


def test_checkpoint_restore_without_workers(records_dir):
  ds = _dataset(records_dir, train=True, num_epochs=1, batch_size=3, augment={"enabled": True})
  grain.experimental.assert_equal_output_after_checkpoint(ds)


def test_checkpoint_restore_with_two_workers(records_dir):
  kw = dict(train=True, augment={"enabled": True}, seed=11)
  reference = _take(_dataset(records_dir, **kw), 6)
  it = iter(_dataset(records_dir, num_workers=2, **kw))
  try:
    head = [next(it) for _ in range(2)]
    state = it.get_state()
    tail = [next(it) for _ in range(4)]
  finally:
    it.close()
  _assert_batches_equal(head + tail, reference)  # workers do not change the batches
  it = iter(_dataset(records_dir, num_workers=2, **kw))
  try:
    it.set_state(state)
    restored = [next(it) for _ in range(4)]
  finally:
    it.close()
  _assert_batches_equal(restored, tail)


def test_augmented_box_contains_drawn_box(records_dir):
  aug = {"enabled": True, "hflip_prob": 0.5}
  batches = _take(_dataset(records_dir, train=True, batch_size=8, augment=aug, seed=3), 3)
  left = right = 0
  for b in batches:
    for row in range(8):
      assert b["box_mask"][row, 0] == 1
      cx, cy, w, h = b["boxes"][row, 0] * SIZE
      box = np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
      ys, xs = np.nonzero(b["image"][row, ..., 0] > 0.5)
      bright = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
      assert np.all(bright[:2] >= box[:2] - 1) and np.all(bright[2:] <= box[2:] + 1), (bright, box)
      np.testing.assert_allclose(bright, box, atol=1.5)  # ... and is not much larger
      # The drawn box's centre is at x 18-29 px: beyond the affine's reach of ~7 px, x < 24 means
      # not flipped and x > 40 flipped. Both must occur with hflip_prob 0.5.
      left += cx < 24
      right += cx > 40
  assert left > 0 and right > 0


def _corrupt_dir(tmp_path):
  raw = [records.encode(_example(i)) for i in range(6)]
  raw[2] = records.encode(_example(2, png=b"not a png"))
  raw[4] = b"\xc1 not msgpack"
  d = str(tmp_path)
  records.write_split(d, "val", raw)
  records.write_metadata(d, image_size=SIZE)
  return d


def test_corrupt_records_raise_with_location(tmp_path):
  d = _corrupt_dir(tmp_path)
  with pytest.raises(records.RecordError, match=r"split 'val', record 2, id 'img2'.*PNG"):
    list(pipeline.stage1_dataset(d, "val", image_size=SIZE, batch_size=2, train=False))


def test_corrupt_records_skipped_and_counted(tmp_path, caplog):
  d = _corrupt_dir(tmp_path)
  before = pipeline.skipped_in_this_process()
  with caplog.at_level(logging.WARNING):
    batches = list(pipeline.stage1_dataset(d, "val", image_size=SIZE, batch_size=4, train=False,
                                           skip_bad=True))
  assert sum(pipeline.count_skipped(b) for b in batches) == 2
  assert pipeline.skipped_in_this_process() - before == 2
  index = np.concatenate([b["index"] for b in batches])
  valid = np.concatenate([b["valid"] for b in batches])
  np.testing.assert_array_equal(index, [0, 1, 2, 3, 4, 5, -1, -1])
  np.testing.assert_array_equal(valid, [1, 1, 0, 1, 0, 1, 0, 0])
  assert "record 4, id None" in caplog.text and "record 2, id 'img2'" in caplog.text


def test_invalid_augment_config_fails_early(records_dir):
  with pytest.raises(ValueError, match="invalid augmentation config"):
    _dataset(records_dir, train=True, augment={"enabled": True, "scale_min": 1.2})


