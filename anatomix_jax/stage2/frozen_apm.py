"""The frozen stage-1 APM and its RAG database, as stage 2 uses them (REFERENCE.md §1.4, §3).

The APM runs in eval mode on each (possibly augmented) image and gives, per image, the patch
memory and anatomy embeddings that the projection heads consume (they stay on device) and the
36 predicted boxes plus the top-1 retrieved sentence per anatomy that go into the prompt's
context (they go to the host, where the prompt is rendered).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from anatomix_jax.instruct import schema
from anatomix_jax.rag import database, retrieval
from anatomix_jax.core import checkpointing
from anatomix_jax.stage1 import task as loop


def cxcywh_to_xyxy_canvas(boxes: np.ndarray, canvas: int = schema.CANVAS) -> np.ndarray:
  """Normalised cxcywh ``[..., 4]`` → xyxy pixels on the ``canvas`` frame (the prompt's boxes)."""
  cx, cy, w, h = np.moveaxis(np.asarray(boxes, np.float32), -1, 0)
  return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * np.float32(canvas)


def stage1_config(apm_workdir: str, which: str = "latest") -> tuple[ml_collections.ConfigDict, int]:
  """The config a stage-1 workdir's checkpoint was trained with, and that checkpoint's step."""
  ckpt = checkpointing.Checkpointer(os.path.join(apm_workdir, "checkpoints"))
  try:
    step = {"latest": ckpt.latest_step(), "best": ckpt.best_step()}.get(which)
    if step is None:
      raise FileNotFoundError(f"no {which!r} stage-1 checkpoint in {apm_workdir}/checkpoints: "
                              "run the stage-1 demo/training first (config apm.workdir)")
    meta = ckpt.read_meta(step)
  finally:
    ckpt.close()
  return ml_collections.ConfigDict(meta["config"]), step


class FrozenAPM:
  """A trained APM (eval mode) + its RAG retriever.

  Attributes:
    image_size: the APM's input side S.
    num_patches: P, patch-memory tokens per image (= ``<image>`` tokens in the prompt).
    step: the stage-1 checkpoint step.
  """

  def __init__(self, apm_workdir: str, rag_dir: str = "", checkpoint: str = "latest"):
    config, _ = stage1_config(apm_workdir, checkpoint)
    with config.unlocked():
      config.eval.checkpoint = checkpoint
    self._run = loop.Stage1(config, apm_workdir)
    state, self.step = self._run.restore_for_eval()
    self._variables = {"params": state.params, "batch_stats": state.consts}
    self.image_size = int(config.data.image_size)
    stride = 32  # ResNet-50's output stride
    self.num_patches = (self.image_size // stride) ** 2
    self.retriever = retrieval.Retriever(database.load(rag_dir or os.path.join(apm_workdir, "rag")))
    model = self._run.model
    self.model_config = model.config

    @jax.jit
    def forward(variables, images):
      out = model.apply(variables, images, train=False)
      scores, ids = retrieval.top_k(out["anatomy_embeddings"], self.retriever.tables, k=1)
      del scores
      return out["memory"], out["anatomy_embeddings"], out["boxes"], ids[..., 0]

    self._forward = forward

  def __call__(self, images: Any) -> dict[str, Any]:
    """Runs the APM on a batch.

    Args:
      images: float32[B, S, S, 1] in [0, 1].

    Returns:
      ``memory`` float[B, P, 256] and ``objects`` float[B, 36, 16] (device arrays, for the LM
      step); ``boxes`` float32[B, 36, 4] xyxy on the 1024 canvas and ``sentences``
      list[B][36] of retrieved sentences (host values, for the prompt).
    """
    memory, objects, boxes, ids = self._forward(self._variables, jnp.asarray(images))
    if memory.shape[1] != self.num_patches:
      raise ValueError(f"APM memory has {memory.shape[1]} patches, expected {self.num_patches}")
    ids = np.asarray(loop.to_host(ids))
    sentences = [[s[0] for s in row] for row in self.retriever.sentences(ids[..., None])]
    return {"memory": memory, "objects": objects,
            "boxes": cxcywh_to_xyxy_canvas(loop.to_host(boxes)), "sentences": sentences}
