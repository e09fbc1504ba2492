"""Stage-2 input pipeline: weighted mixing, exact resume, augmentation only where allowed, errors."""

from __future__ import annotations

import collections
import json
import os

import cv2
import numpy as np
import pytest

from anatomix_jax.data import images
from anatomix_jax.instruct import schema
from anatomix_jax.stage2 import data
from anatomix_jax.synthetic import generator, instructions


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("s2data"))
  generator.generate(os.path.join(root, "synth"), 24, 6, 6, seed=3, workers=1)
  instructions.build(os.path.join(root, "synth"), os.path.join(root, "instr"), seed=1)
  return os.path.join(root, "instr"), {"default": generator.layout(
      os.path.join(root, "synth"))["mimic_dir"]}


def _train(out, roots, weights, **kw):
  args = dict(image_roots=roots, image_size=32, batch_size=8, train=True, seed=0)
  args.update(kw)
  return data.instruction_dataset(out, "train", weights, **args)


def test_mixture_follows_weights_and_resumes_exactly(dataset):
  out, roots = dataset
  ds = _train(out, roots, {"mimic_vqa": 3.0, "mscxr": 1.0, "slake": 0.0})
  it = iter(ds)
  sources = collections.Counter(r["source"] for _ in range(25) for r in next(it)["records"])
  assert set(sources) == {"mimic_vqa", "mscxr"}
  assert abs(sources["mimic_vqa"] / 200 - 0.75) < 0.05  # 3:1 mixing
  state = it.get_state()
  want = [next(it) for _ in range(2)]
  again = iter(ds)
  again.set_state(json.loads(json.dumps(state)) if isinstance(state, dict) else state)
  for w in want:
    g = next(again)
    assert [r["id"] for r in g["records"]] == [r["id"] for r in w["records"]]
    np.testing.assert_array_equal(g["image"], w["image"])


def test_no_augmentation_for_tasks_with_coordinates(dataset):
  out, roots = dataset
  aug = {"enabled": True, "degrees": 30.0, "hflip_prob": 0.5}
  batch = next(iter(_train(out, roots, {"vindr_instruct": 1.0, "mimic_vqa": 1.0}, augment=aug,
                           batch_size=16)))
  seen = set()
  for image, record in zip(batch["image"], batch["records"]):
    pixels = images.read_image(os.path.join(roots["default"], record["image"]))
    square, _ = images.letterbox(pixels, schema.CANVAS)
    plain = cv2.resize(images.minmax_stretch(square), (32, 32), interpolation=cv2.INTER_AREA)
    same = np.array_equal(np.round(image[..., 0] * 255).astype(np.uint8), plain)
    assert same == (record["task"] in schema.NO_AUG_TASKS), record["task"]
    seen.add(record["task"] in schema.NO_AUG_TASKS)
  assert seen == {True, False}


def test_eval_pass_pads_to_full_batches_and_skips_missing_images(dataset, tmp_path):
  out, roots = dataset
  n = sum(1 for _ in schema.read_jsonl(data.jsonl_path(out, "mscxr", "validate")))
  batches = list(data.instruction_dataset(out, "validate", {"mscxr": 1.0}, image_roots=roots,
                                          image_size=32, batch_size=5, train=False))
  assert len(batches) == -(-n // 5) and sum(b["valid"].sum() for b in batches) == n
  ids = [r["id"] for b in batches for r, v in zip(b["records"], b["valid"]) if v]
  assert len(set(ids)) == n
  # A record whose image is missing: a counted skip (valid 0), or an error naming the file.
  records = list(schema.read_jsonl(data.jsonl_path(out, "mscxr", "validate")))[:3]
  records[1]["image"] = "files/missing.jpg"
  schema.write_jsonl(data.jsonl_path(str(tmp_path), "mscxr", "validate"), records)
  (batch,) = list(data.instruction_dataset(str(tmp_path), "validate", {"mscxr": 1.0},
                                           image_roots=roots, image_size=32, batch_size=3,
                                           train=False))
  assert batch["valid"].tolist() == [1.0, 0.0, 1.0]
  with pytest.raises(images.ImageError, match="missing.jpg"):
    list(data.instruction_dataset(str(tmp_path), "validate", {"mscxr": 1.0}, image_roots=roots,
                                  image_size=32, batch_size=3, train=False, skip_bad=False))


def test_bad_configuration_and_files(dataset, tmp_path):
  out, roots = dataset
  with pytest.raises(data.InstructionDataError, match=r"unknown task name\(s\) \['Captioning'\]"):
    data.mixture(out, "train", {"mscxr": 1.0}, tasks=["Captioning"])
  with pytest.raises(data.InstructionDataError, match="unknown source 'mimic'"):
    data.mixture(out, "train", {"mimic": 1.0})
  with pytest.raises(data.InstructionDataError, match="slake/train.jsonl: no such"):
    data.mixture(out, "train", {"slake": 1.0})
  path = data.jsonl_path(str(tmp_path), "mscxr", "train")
  os.makedirs(os.path.dirname(path))
  with open(path, "w") as f:
    f.write(json.dumps({"id": "x", "source": "mscxr", "split": "train", "task": "Phrase Grounding",
                        "image": "a.jpg", "instructions": "not a list", "responses": ["r"]}) + "\n")
  with pytest.raises(schema.SchemaError, match=r"train.jsonl:1: field 'instructions'"):
    data.mixture(str(tmp_path), "train", {"mscxr": 1.0})
  with pytest.raises(data.InstructionDataError, match="no image root for source 'mscxr'"):
    next(iter(_train(out, {"slake": "/x"}, {"mscxr": 1.0})))
