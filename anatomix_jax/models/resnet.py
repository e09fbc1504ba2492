"""Bottleneck ResNet with frozen BatchNorm (torchvision v1.5 layout), returning the last stage (C5).

The APM backbone of the reference (REFERENCE.md §1.2) is torchvision's ``resnet50`` with a 1-channel
7×7/2 stem, DETR's ``FrozenBatchNorm2d`` (eps 1e-5, never updated) and only ``layer4`` returned. This
module reproduces that layout:

  stem: conv1 7×7/2 (pad 3, no bias) → bn1 → ReLU → max-pool 3×3/2 (pad 1)
  layer{1..4}: bottleneck blocks; v1.5 puts the stride on the 3×3 conv; the first block of every
    stage has a 1×1 projection shortcut (``downsample_conv`` + ``downsample_bn``).

``depths`` and the base ``width`` are configurable, so ResNet-50 is ``depths=(3, 4, 6, 3)``, ``width=64``
(C5 has ``32 · width`` = 2048 channels) and a tiny CPU variant is e.g. ``depths=(1, 1, 1, 1)``,
``width=8``.

The frozen BatchNorm constants live in the ``batch_stats`` collection (``scale``, ``bias``, ``mean``,
``var`` per BN), never in ``params``, so an optimizer never sees them. If a caller applies the model
without a ``batch_stats`` collection at all, every BN uses the reference's default buffers (1, 0, 0, 1):
exactly what a model trained from scratch has, since frozen statistics never change.

Axis letters: B batch, H/W spatial, C channels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

BN_EPS = 1e-5  # DETR's FrozenBatchNorm2d adds this before the rsqrt.
EXPANSION = 4  # bottleneck output channels = EXPANSION · planes.

# torchvision's ResNet init: kaiming_normal_(mode="fan_out", nonlinearity="relu") on every conv,
# including the replaced 1-channel stem of the reference.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

CONV_AXES = (None, None, "conv_in", "conv_out")
SPATIAL_ACTIVATION_AXES = ("activation_batch", None, None, None)

# The four frozen BatchNorm constants, with the reference's default buffer values.
BN_DEFAULTS = {"scale": 1.0, "bias": 0.0, "mean": 0.0, "var": 1.0}


class FrozenBatchNorm(nn.Module):
  """BatchNorm with fixed statistics: ``y = x · s + (bias − mean · s)``, ``s = scale / √(var + eps)``.

  Attributes:
    use_defaults: skip the ``batch_stats`` variables and use the default buffers (1, 0, 0, 1).
    dtype: compute dtype of the output.
  """

  use_defaults: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Normalizes ``x`` float[B, H, W, C] with the frozen constants; same shape out."""
    features = x.shape[-1]
    stats = {}
    for name, value in BN_DEFAULTS.items():
      if self.use_defaults:
        stats[name] = jnp.full((features,), value, jnp.float32)
      else:
        init = nn.with_logical_partitioning(
            lambda shape, v=value: jnp.full(shape, v, jnp.float32), ("conv_out",))
        stats[name] = self.variable("batch_stats", name, init, (features,)).value
    # Same operation order as the reference (scale first, then a folded bias) for bit-close parity.
    scale = stats["scale"] * jax.lax.rsqrt(stats["var"] + BN_EPS)
    shift = stats["bias"] - stats["mean"] * scale
    return x * scale.astype(self.dtype) + shift.astype(self.dtype)


def _conv(features: int, kernel: int, stride: int, name: str, dtype: Dtype) -> nn.Conv:
  """A bias-free conv with PyTorch's symmetric padding ``kernel // 2`` (not XLA's 'SAME')."""
  pad = kernel // 2
  return nn.Conv(
      features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
      use_bias=False, dtype=dtype, param_dtype=jnp.float32,
      kernel_init=nn.with_logical_partitioning(conv_kernel_init, CONV_AXES), name=name)


class Bottleneck(nn.Module):
  """torchvision v1.5 bottleneck: 1×1 → 3×3 (stride here) → 1×1 (×4), plus a shortcut.

  Attributes:
    planes: width of the 1×1/3×3 convs; the block outputs ``4 · planes`` channels.
    stride: stride of the 3×3 conv (and of the projection shortcut).
    project: whether the shortcut is a 1×1 conv + BN (first block of a stage).
    use_default_bn: see ``FrozenBatchNorm.use_defaults``.
    dtype: compute dtype.
  """

  planes: int
  stride: int = 1
  project: bool = False
  use_default_bn: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """float[B, H, W, C] → float[B, H / stride, W / stride, 4 · planes]."""
    bn = lambda name: FrozenBatchNorm(self.use_default_bn, self.dtype, name=name)  # noqa: E731
    y = nn.relu(bn("bn1")(_conv(self.planes, 1, 1, "conv1", self.dtype)(x)))
    y = nn.relu(bn("bn2")(_conv(self.planes, 3, self.stride, "conv2", self.dtype)(y)))
    y = bn("bn3")(_conv(self.planes * EXPANSION, 1, 1, "conv3", self.dtype)(y))
    shortcut = x
    if self.project:
      shortcut = _conv(self.planes * EXPANSION, 1, self.stride, "downsample_conv", self.dtype)(x)
      shortcut = bn("downsample_bn")(shortcut)
    out = nn.relu(y + shortcut)
    return nn.with_logical_constraint(out, SPATIAL_ACTIVATION_AXES)


class ResNet(nn.Module):
  """Bottleneck ResNet with a configurable number of input channels; returns the C5 feature map.

  Parameter paths: ``conv1/kernel``, ``layer{i}_{j}/conv{1,2,3}/kernel``,
  ``layer{i}_{j}/downsample_conv/kernel`` (i = 1..4 stage, j = block); BN constants under the same
  module paths in ``batch_stats`` (``bn1/scale``, ``layer1_0/bn2/mean``, …).

  Attributes:
    depths: blocks per stage; four stages (ResNet-50: (3, 4, 6, 3)).
    width: stem channels and planes of stage 1; stage i has ``width · 2^(i−1)`` planes.
    use_default_bn: see ``FrozenBatchNorm.use_defaults``.
    dtype: compute dtype (parameters are float32).
    remat: rematerialise each bottleneck in the backward pass (saves activation memory).
  """

  depths: Sequence[int] = (3, 4, 6, 3)
  width: int = 64
  use_default_bn: bool = False
  dtype: Dtype = jnp.float32
  remat: bool = False

  @property
  def out_channels(self) -> int:
    """Channels of the returned C5 map: ``width · 2³ · 4``."""
    return self.width * 2 ** (len(self.depths) - 1) * EXPANSION

  @nn.compact
  def __call__(self, images: Array) -> Array:
    """Runs the network.

    Args:
      images: float[B, H, W, C_in].

    Returns:
      float[B, H / 32, W / 32, 32 · width] (for four stages), the last stage's output.
    """
    x = images.astype(self.dtype)
    x = _conv(self.width, 7, 2, "conv1", self.dtype)(x)
    x = nn.relu(FrozenBatchNorm(self.use_default_bn, self.dtype, name="bn1")(x))
    # Max-pool pads with −inf, as torch's MaxPool2d(3, 2, padding=1) does.
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    x = nn.with_logical_constraint(x, SPATIAL_ACTIVATION_AXES)
    block_cls = nn.remat(Bottleneck) if self.remat else Bottleneck
    in_channels = self.width
    for stage, depth in enumerate(self.depths, start=1):
      planes = self.width * 2 ** (stage - 1)
      for block in range(depth):
        stride = 2 if stage > 1 and block == 0 else 1
        # torchvision adds a projection shortcut whenever the shape changes.
        project = block == 0 and (stride != 1 or in_channels != planes * EXPANSION)
        x = block_cls(planes, stride, project, self.use_default_bn, self.dtype,
                      name=f"layer{stage}_{block}")(x)
        in_channels = planes * EXPANSION
    return x
