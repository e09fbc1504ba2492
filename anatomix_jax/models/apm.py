"""The Anatomy Perception Module (APM): ResNet → DETR encoder with CLS → 36 anatomy queries.

A Flax Linen re-statement of the reference's ``VisionModel`` (REFERENCE.md §1.2):

  images [B, H, W, 1] ─ResNet (frozen BN)→ C5 [B, H/32, W/32, 32·width] ─1×1 conv→ [B, HW, D]
  + sine positions ─TransformerWithCLS→ hs [L_dec, B, N, D], memory [B, HW, D], cls [B, D]
  boxes       = sigmoid(MLP(D, D, 4; 3 layers)(hs))               (last layer; all layers as aux)
  image logits = Linear(D → 14)(cls)
  anatomy embeddings = Linear(D → 16)(MHA(2 heads)(q = hs[-1], k = v = memory))  (no residual, no
                       norm; the memory excludes the CLS token)

Parameter tree (``params``; the BN constants mirror it in ``batch_stats``):
  ``backbone/conv1``, ``backbone/layer{1-4}_{j}/{conv1,conv2,conv3,downsample_conv}/kernel``,
  ``input_proj/{kernel,bias}``, ``query_embed`` [N, D],
  ``transformer/{cls_token,cls_pos}``, ``transformer/encoder_layer_{i}/…``,
  ``transformer/decoder_layer_{i}/…``, ``transformer/decoder_norm/…``,
  ``image_class_embed/…``, ``bbox_embed/layers_{0,1,2}/…``, ``anat_obj_embs/{mha,linear}/…``.
Every parameter carries logical axis names (``nn.with_logical_partitioning``); the reference's frozen
parameters (layer1 convolutions) are ``backbone/layer1_*`` (see ``convert.reference_apm``).

Axis letters: B batch, H/W image size, N queries (36), L_dec decoder layers, D model dim.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from anatomix_jax.models import bert, resnet, transformer
from anatomix_jax.models.transformer import DTYPES, TOKEN_AXES, dense, torch_linear_init

Array = jax.Array

STRIDE = 32  # total backbone stride (stem 4 × three strided stages)


@dataclasses.dataclass(frozen=True)
class APMConfig:
  """APM hyper-parameters; the defaults are the paper configuration (31,759,714 parameters).

  Attributes:
    depths: ResNet bottleneck blocks per stage (four stages).
    width: ResNet base width (64 → C5 has 2048 channels).
    hidden_dim: transformer model dim D.
    num_heads: transformer attention heads.
    enc_layers: encoder layers.
    dec_layers: decoder layers.
    ffn_dim: transformer FFN hidden dim.
    dropout: transformer dropout rate.
    num_queries: anatomy queries N (one per anatomy, fixed assignment).
    num_labels: image-level labels.
    proj_dim: anatomy embedding dim.
    obj_heads: heads of the anatomy-embedding attention.
    text_dim: width of the frozen text encoder's sentence embeddings (768 for PubMedBERT); 0: no
      text branch. With it, the trainable projection head (REFERENCE.md §1.2 text encoder) lives
      here, under ``text_projection``, so one parameter tree holds everything stage 1 trains.
    text_hidden: hidden width of that head (512).
    dtype: compute dtype name; parameters are always float32.
    remat: rematerialise bottlenecks and transformer layers in the backward pass.
  """

  depths: tuple[int, ...] = (3, 4, 6, 3)
  width: int = 64
  hidden_dim: int = 256
  num_heads: int = 4
  enc_layers: int = 4
  dec_layers: int = 4
  ffn_dim: int = 1024
  dropout: float = 0.1
  num_queries: int = 36
  num_labels: int = 14
  proj_dim: int = 16
  obj_heads: int = 2
  text_dim: int = 0
  text_hidden: int = 512
  dtype: str = "float32"
  remat: bool = False

  def __post_init__(self):
    object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
    problems = []
    if len(self.depths) != 4 or min(self.depths) < 1:
      problems.append(f"depths must be four positive block counts, got {self.depths}")
    for name in ("width", "hidden_dim", "num_heads", "enc_layers", "dec_layers", "ffn_dim",
                 "num_queries", "num_labels", "proj_dim", "obj_heads", "text_hidden"):
      if getattr(self, name) < 1:
        problems.append(f"{name} must be positive, got {getattr(self, name)}")
    if not problems:
      for heads in ("num_heads", "obj_heads"):
        if self.hidden_dim % getattr(self, heads):
          problems.append(f"hidden_dim {self.hidden_dim} is not divisible by {heads} "
                          f"{getattr(self, heads)}")
      if self.hidden_dim % 4:
        problems.append(f"hidden_dim {self.hidden_dim} must be divisible by 4 (sine positions)")
    if self.text_dim < 0:
      problems.append(f"text_dim must be ≥ 0, got {self.text_dim}")
    if not 0.0 <= self.dropout < 1.0:
      problems.append(f"dropout must be in [0, 1), got {self.dropout}")
    if self.dtype not in DTYPES:
      problems.append(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
    if problems:
      raise ValueError("invalid APMConfig: " + "; ".join(problems))

  @property
  def compute_dtype(self) -> jnp.dtype:
    """The compute dtype as a NumPy dtype."""
    return jnp.dtype(self.dtype)

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any] | Any) -> APMConfig:
    """Builds the config from an ``ml_collections.ConfigDict`` (or mapping) with the same fields.

    Missing fields take the paper defaults; an unknown field raises, so a typo cannot pass silently.
    """
    values = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"unknown APM config fields {unknown}; accepted: {sorted(known)}")
    return cls(**values)


class BoxHead(nn.Module):
  """The reference's ``MLP(D, D, 4, 3)``: Linear → ReLU → Linear → ReLU → Linear, then sigmoid."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """float[..., D] → float[..., 4] normalized (cx, cy, w, h)."""
    d_model = x.shape[-1]
    x = nn.relu(dense(d_model, d_model, ("embed", "mlp"), "layers_0", self.dtype)(x))
    x = nn.relu(dense(d_model, d_model, ("mlp", "embed"), "layers_1", self.dtype)(x))
    x = dense(4, d_model, ("embed", "box"), "layers_2", self.dtype)(x)
    return jax.nn.sigmoid(x.astype(jnp.float32))


class AnatomyEmbeddingHead(nn.Module):
  """The reference's ``MHAWithLinear`` (one layer): MHA(q = queries, k = v = memory) → Linear.

  No residual connection and no norm; attention dropout 0; torch's MHA default init.
  """

  num_heads: int = 2
  proj_dim: int = 16
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, queries: Array, memory: Array) -> Array:
    """``queries`` float[B, N, D] attend over ``memory`` float[B, HW, D] → float[B, N, proj_dim]."""
    d_model = queries.shape[-1]
    attended = transformer.MultiHeadAttention(
        self.num_heads, 0.0, torch_linear_init(d_model), self.dtype, name="mha")(
            queries, memory, memory)
    return dense(self.proj_dim, d_model, ("embed", "proj"), "linear", self.dtype)(attended)


def check_images(images: Array) -> None:
  """Raises a ValueError/TypeError unless ``images`` is float[B, H, W, 1] with H, W multiples of 32."""
  shape = tuple(images.shape)
  if len(shape) != 4 or shape[-1] != 1:
    raise ValueError(f"APM expects grayscale images [B, H, W, 1], got shape {shape}")
  if shape[1] % STRIDE or shape[2] % STRIDE or shape[1] == 0 or shape[2] == 0:
    raise ValueError(f"APM image height and width must be positive multiples of {STRIDE}, "
                     f"got {shape[1]}×{shape[2]}")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise TypeError(f"APM expects float images in [0, 1], got dtype {images.dtype}")


class APM(nn.Module):
  """Anatomy Perception Module.

  Apply with ``{"params": p, "batch_stats": s}`` (the frozen BN constants; if the ``batch_stats``
  collection is absent, the reference's default buffers are used, which is what a model trained from
  scratch has). ``train=True`` enables dropout when a ``'dropout'`` rng is supplied; the frozen BN
  never updates.

  Attributes:
    config: the hyper-parameters.
  """

  config: APMConfig

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False, text_pooled: Array | None = None
               ) -> dict[str, Array]:
    """Runs the APM.

    Args:
      images: float[B, H, W, 1] in [0, 1], H and W multiples of 32 (no mean/std normalisation).
      train: training mode (dropout on when a ``'dropout'`` rng is given).
      text_pooled: float[B, N, text_dim] frozen-encoder sentence embeddings (needs ``text_dim``);
        adds ``text_projection`` [B, N, proj_dim] to the outputs.

    Returns:
      A dict of float32 arrays: ``boxes`` [B, N, 4] (sigmoid cxcywh, last decoder layer),
      ``aux_boxes`` [L_dec, B, N, 4] (every decoder layer), ``image_logits`` [B, num_labels],
      ``anatomy_embeddings`` [B, N, proj_dim], ``memory`` [B, (H/32)·(W/32), D] (encoder output
      without CLS, one token per 32×32 patch, row-major), ``cls`` [B, D].
    """
    if text_pooled is not None and not self.config.text_dim:
      raise ValueError("text_pooled given to an APM without a text branch (config.text_dim = 0)")
    cfg = self.config
    check_images(images)
    dtype = cfg.compute_dtype
    deterministic = not (train and self.has_rng("dropout"))
    use_default_bn = not self.is_initializing() and "batch_stats" not in self.variables
    images = nn.with_logical_constraint(images, resnet.SPATIAL_ACTIVATION_AXES)

    backbone = resnet.ResNet(cfg.depths, cfg.width, use_default_bn, dtype, cfg.remat,
                             name="backbone")
    features = backbone(images)  # [B, h, w, C5]
    fan_in = backbone.out_channels
    src = nn.Conv(
        cfg.hidden_dim, (1, 1), dtype=dtype, param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(torch_linear_init(fan_in), resnet.CONV_AXES),
        bias_init=nn.with_logical_partitioning(torch_linear_init(fan_in), ("conv_out",)),
        name="input_proj")(features)
    batch, height, width, _ = src.shape
    src = nn.with_logical_constraint(src.reshape(batch, height * width, cfg.hidden_dim), TOKEN_AXES)
    pos = transformer.sine_position_encoding(height, width, cfg.hidden_dim)

    # nn.Embedding's default init in torch is N(0, 1); the reference keeps it (query_embed lives
    # outside the transformer, so its xavier re-init does not reach it).
    query_embed = self.param(
        "query_embed",
        nn.with_logical_partitioning(nn.initializers.normal(1.0), ("queries", "embed")),
        (cfg.num_queries, cfg.hidden_dim), jnp.float32)

    hs, memory, cls = transformer.TransformerWithCLS(
        cfg.num_heads, cfg.enc_layers, cfg.dec_layers, cfg.ffn_dim, cfg.dropout, dtype, cfg.remat,
        name="transformer")(src, pos, query_embed, deterministic)

    image_logits = dense(cfg.num_labels, cfg.hidden_dim, ("embed", "labels"), "image_class_embed",
                         dtype)(cls)
    aux_boxes = BoxHead(dtype, name="bbox_embed")(hs)
    anatomy = AnatomyEmbeddingHead(cfg.obj_heads, cfg.proj_dim, dtype, name="anat_obj_embs")(
        hs[-1], memory)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    text = {}
    if cfg.text_dim and (text_pooled is not None or self.is_initializing()):
      if text_pooled is None:
        text_pooled = jnp.zeros((1, cfg.num_queries, cfg.text_dim), jnp.float32)
      text["text_projection"] = f32(bert.TextProjection(cfg.text_hidden, cfg.proj_dim, dtype,
                                                        name="text_projection")(text_pooled))
    return {
        **text,
        "boxes": aux_boxes[-1],
        "aux_boxes": aux_boxes,
        "image_logits": f32(image_logits),
        "anatomy_embeddings": f32(anatomy),
        "memory": f32(memory),
        "cls": f32(cls),
    }
