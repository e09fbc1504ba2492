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
import numpy as np

from anatomix_jax.instruct import schema
from anatomix_jax.ops import boxes as box_ops
from anatomix_jax.rag import database, retrieval
from anatomix_jax.core import sharding as sharding_lib
from anatomix_jax.stage1 import load as stage1_load


# lm.image_tokens: what the image is to the LM — the P patch-memory tokens (the paper's
# "patchIT") or one token, the encoder's CLS embedding (its "clsIT" ablation).
IMAGE_TOKENS = ("patches", "cls")


def lm_image_features(memory: Any, cls: Any, image_tokens: str = "patches") -> Any:
  """The image tokens the LM gets: ``memory`` [B, P, D], or ``cls`` [B, D] as [B, 1, D]."""
  if image_tokens not in IMAGE_TOKENS:
    raise ValueError(f"lm.image_tokens must be one of {IMAGE_TOKENS}, got {image_tokens!r}")
  return memory if image_tokens == "patches" else cls[:, None, :]


class FrozenAPM:
  """A trained APM (eval mode) + its RAG retriever.

  Attributes:
    image_size: the APM's input side S.
    num_patches: P, patch-memory tokens per image.
    image_tokens: ``IMAGE_TOKENS``, what ``memory`` holds for the LM.
    num_image_tokens: N, ``<image>`` tokens in the prompt: P, or 1 for ``"cls"``.
    step: the stage-1 checkpoint step.
  """

  def __init__(self, apm_workdir: str, rag_dir: str = "", checkpoint: str = "latest",
               image_tokens: str = "patches"):
    """Reads only the stage-1 workdir's checkpoint and its ``rag/`` (or ``rag_dir``): no records,
    no text-embedding cache."""
    if image_tokens not in IMAGE_TOKENS:  # before the checkpoint is read
      raise ValueError(f"lm.image_tokens must be one of {IMAGE_TOKENS}, got {image_tokens!r}")
    self.image_tokens = image_tokens
    loaded = stage1_load.load(apm_workdir, checkpoint)
    self.step, self._variables = loaded.step, loaded.variables
    self.image_size = int(loaded.config.data.image_size)
    stride = 32  # ResNet-50's output stride
    self.num_patches = (self.image_size // stride) ** 2
    self.num_image_tokens = 1 if image_tokens == "cls" else self.num_patches
    self.retriever = retrieval.Retriever(database.load(rag_dir or os.path.join(apm_workdir, "rag")))
    model = loaded.model
    self.model_config = model.config

    @jax.jit
    def forward(variables, images):
      out = model.apply(variables, images, train=False)
      scores, ids = retrieval.top_k(out["anatomy_embeddings"], self.retriever.tables, k=1,
                                    biases=self.retriever.biases)  # + the database's prior
      del scores
      return out["memory"], out["cls"], out["anatomy_embeddings"], out["boxes"], ids[..., 0]

    self._forward = forward

  def __call__(self, images: Any) -> dict[str, Any]:
    """Runs the APM on a batch.

    Args:
      images: float32[B, S, S, 1] in [0, 1].

    Returns:
      ``memory`` float[B, N, 256], the LM's image tokens (``lm_image_features``: the patch memory,
      N = P, or the CLS embedding, N = 1), ``cls`` float[B, 256] and ``objects`` float[B, 36, 16]
      (device arrays, for the LM step); ``boxes`` float32[B, 36, 4] xyxy on the 1024 canvas and
      ``sentences`` list[B][36] of retrieved sentences (host values, for the prompt).
    """
    memory, cls, objects, boxes, ids = self._forward(self._variables, jnp.asarray(images))
    if memory.shape[1] != self.num_patches:
      raise ValueError(f"APM memory has {memory.shape[1]} patches, expected {self.num_patches}")
    ids = np.asarray(sharding_lib.to_host(ids))
    sentences = [[s[0] for s in row] for row in self.retriever.sentences(ids[..., None])]
    return {"memory": lm_image_features(memory, cls, self.image_tokens), "cls": cls,
            "objects": objects,
            "boxes": _canvas_xyxy(sharding_lib.to_host(boxes)), "sentences": sentences}


def _canvas_xyxy(boxes: np.ndarray) -> np.ndarray:
  """The APM's normalised cxcywh ``[..., 4]`` → xyxy pixels on the prompt's canvas frame."""
  return box_ops.cxcywh_to_xyxy(np.asarray(boxes, np.float32)) * np.float32(schema.CANVAS)
