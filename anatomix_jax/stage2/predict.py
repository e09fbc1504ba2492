"""``--mode=predict``: a trained stage-2 model on radiograph files (PNG, JPEG, DICOM) or a folder.

    python -m anatomix_jax.main --config=configs/predict.py --workdir=<stage-2 workdir> \\
        --mode=predict --config.predict.inputs=path/to/image_or_folder \\
        [--config.predict.task=phrase_grounding --config.predict.query="left pleural effusion"]

Per image: decode (``images.read_radiograph``: 8/16-bit PNG, JPEG, DICOM with its modality and VOI
LUTs and MONOCHROME1 inversion), the stage-1 letterbox to the 1024 canvas and intensity stretch,
the frozen APM (36 anatomy boxes + embeddings), retrieval of one finding sentence per anatomy,
and — unless ``predict.generate`` is off — greedy generation for the chosen task. A folder is
searched recursively. Writes ``{output_dir}/{name}.json`` (``name``: the image's path below the
input folder without its suffix; anatomy boxes with names on the canvas and in original-image
pixels (clipped to the image), retrieved findings, the instruction, the generated text and the
boxes parsed from it) and ``{name}.png`` (the letterboxed image with APM boxes thin and answer
boxes thick). A folder's unreadable files are listed in ``summary.json`` and skipped; a single
unreadable file is an error.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging

from anatomix_jax import anatomy
from anatomix_jax.data import images
from anatomix_jax.evaluation import boxes as box_formats
from anatomix_jax.instruct import mimic, mscxr, schema
from anatomix_jax.stage2 import data, inference
from anatomix_jax.evaluation import overlays

SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
# task → (record task, instruction; "{}" takes predict.query), the training templates' first form.
TASKS = {
    "report": ("Report Generation", mimic.REPORT_TEMPLATES[0]),
    "anatomy_grounding": ("Anatomy Grounding", mimic.QUESTION_TEMPLATES[0]),
    "phrase_grounding": ("Phrase Grounding", mscxr.PHRASE_GROUNDING[0].replace("{phrase}", "{}")),
    "grounded_captioning": ("Grounded Captioning",
                            mscxr.GROUNDED_CAPTIONING[0].replace("{boxes}", "{}")),
    "grounded_diagnosis": ("Grounded Diagnosis",
                           mscxr.GROUNDED_DIAGNOSIS[0].replace("{boxes}", "{}")),
    "abnormality_detection": ("Abnormality Detection", "Detect abnormalities in the given image."),
    "question": ("Open-Ended VQA", "{}"),
}


def list_inputs(inputs: str) -> list[str]:
  """A file, or the image files (by suffix, sorted) anywhere below a folder — datasets such as
  MIMIC-CXR-JPG keep each study's images in its own subfolder.

  Raises:
    FileNotFoundError: the path does not exist, or the folder holds no image files.
  """
  if not inputs:
    raise ValueError("predict.inputs is empty: give an image file or a folder")
  if os.path.isfile(inputs):
    return [inputs]
  if not os.path.isdir(inputs):
    raise FileNotFoundError(f"predict.inputs: {inputs} does not exist")
  files = sorted(os.path.join(root, f) for root, _, names in os.walk(inputs) for f in names
                 if f.lower().endswith(SUFFIXES))
  if not files:
    raise FileNotFoundError(f"predict.inputs: {inputs} holds no image files ({', '.join(SUFFIXES)})")
  return files


def output_name(path: str, inputs: str) -> str:
  """The results' name for ``path``: its path below the ``inputs`` folder without the suffix (so
  same-named images of different subfolders do not overwrite each other), or a file's stem."""
  root = inputs if os.path.isdir(inputs) else os.path.dirname(path)
  return os.path.splitext(os.path.relpath(path, root))[0]


def instruction(task: str, query: str) -> tuple[str, str]:
  """``(record task, instruction text)`` for a ``predict.task`` and its query."""
  if task not in TASKS:
    raise ValueError(f"predict.task {task!r} is not one of {sorted(TASKS)}")
  record_task, template = TASKS[task]
  if "{}" in template:
    if not query:
      raise ValueError(f"predict.task {task!r} needs predict.query (e.g. an anatomy name, a "
                       "phrase, a region '<box>(x1,y1),(x2,y2)</box>' or a question)")
    return record_task, template.format(query)
  return record_task, template


def load_model_input(path: str, image_size: int, intensity: str
                     ) -> tuple[np.ndarray, np.ndarray, images.LetterboxTransform]:
  """A file → (APM input float32 [S, S, 1] in [0, 1], the canvas image float32 [1024, 1024]
  for the overlay, the letterbox transform of the original pixels)."""
  pixels = images.read_radiograph(path)
  transform = images.letterbox_transform(pixels.shape[0], pixels.shape[1], schema.CANVAS)
  square = data.model_input(pixels, image_size, intensity)
  canvas = data.model_input(pixels, schema.CANVAS, intensity)
  to_unit = lambda a: (a.astype(np.float32) / 255 if a.dtype == np.uint8  # noqa: E731
                       else a.astype(np.float32))
  return to_unit(square)[..., None], to_unit(canvas), transform


def _boxes_json(boxes: np.ndarray, names: Sequence[str], transform: images.LetterboxTransform,
                extra: Sequence[dict] | None = None) -> list[dict[str, Any]]:
  original = transform.inverse_boxes(np.asarray(boxes, np.float32).reshape(-1, 4), schema.CANVAS)
  # Parts of a box on the letterbox padding lie outside the radiograph: clip to its pixels.
  original = np.clip(original, 0, np.float32([transform.width, transform.height] * 2))
  out = []
  for i, (name, box, orig) in enumerate(zip(names, boxes, original)):
    item = {"name": name, "box_canvas": np.round(box, 1).tolist(),
            "box_image": np.round(orig, 1).tolist()}
    out.append({**item, **(extra[i] if extra else {})})
  return out


def predict(config: Any, workdir: str) -> dict[str, Any]:
  """Runs the prediction described in the module docstring; returns a summary."""
  p = config.predict
  record_task, text = instruction(p.task, p.query)
  files = list_inputs(p.inputs)
  trained = inference.load(config, workdir, step=p.checkpoint)
  run = trained.run
  out_dir = p.output_dir or os.path.join(workdir, "predict")
  os.makedirs(out_dir, exist_ok=True)
  failures, timings, done = [], [], 0
  for start in range(0, len(files), p.batch_size):
    batch_files, batch, canvases, transforms = [], [], [], []
    for path in files[start:start + p.batch_size]:
      try:
        square, canvas, transform = load_model_input(path, run.apm.image_size,
                                                     run.config.data.intensity)
      except images.ImageError as err:
        if len(files) == 1:
          raise
        failures.append({"file": path, "error": str(err)})
        logging.warning("predict: skipping %s", err)
        continue
      batch_files.append(path)
      batch.append(square)
      canvases.append(canvas)
      transforms.append(transform)
    if not batch:
      continue
    t0 = time.perf_counter()
    stacked = np.stack(batch)
    records = [{"id": os.path.basename(f), "source": "predict", "task": record_task,
                "instructions": [text], "responses": ["-"]} for f in batch_files]
    if p.generate:
      features, _, answers = trained.answer(stacked, records, p.max_new_tokens)
    else:
      features, answers = run.apm(stacked), [None] * len(batch)
    timings.append((time.perf_counter() - t0, len(batch)))
    for i, path in enumerate(batch_files):
      _write_one(out_dir, output_name(path, p.inputs), path, features["boxes"][i],
                 features["sentences"][i], answers[i], transforms[i], canvases[i], p, text)
    done += len(batch)
  seconds = sum(t for t, _ in timings)
  summary = {"images": done, "failures": failures, "seconds": seconds,
             "images_per_s": done / seconds if seconds else None, "output_dir": out_dir,
             "checkpoint_step": trained.step, "generate": bool(p.generate)}
  with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=1)
  if len(files) > 1:
    # Timing excludes the first batch's compilation only when there is more than one batch.
    steady = timings[1:] or timings
    rate = sum(n for _, n in steady) / max(sum(t for t, _ in steady), 1e-9)
    print(f"predict: {done} images ({len(failures)} unreadable) at {rate:.2f} images/s "
          f"({'APM + generation' if p.generate else 'APM only'}); results in {out_dir}")
  return summary


def _write_one(out_dir: str, name: str, path: str, apm_boxes: np.ndarray,
               sentences: Sequence[str], answer: str | None,
               transform: images.LetterboxTransform, canvas: np.ndarray, p: Any,
               text: str) -> None:
  os.makedirs(os.path.dirname(os.path.join(out_dir, name)), exist_ok=True)
  parsed = box_formats.parse(answer or "", "anatomix")
  result = {
      "file": os.path.abspath(path),
      "image_size": [transform.height, transform.width],
      "canvas": schema.CANVAS,
      "anatomy": _boxes_json(apm_boxes, anatomy.DISPLAY_NAMES, transform,
                             [{"finding": s} for s in sentences]),
      "task": p.task, "instruction": text, "answer": answer,
      "answer_boxes": _boxes_json(parsed.boxes, parsed.labels, transform),
  }
  with open(os.path.join(out_dir, f"{name}.json"), "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1, ensure_ascii=False)
  if p.overlay:
    overlays.draw_grounding(canvas, apm_boxes, anatomy.DISPLAY_NAMES, parsed.boxes,
                            list(parsed.labels)).save(os.path.join(out_dir, f"{name}.png"))
