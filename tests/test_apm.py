"""APM tests: paper-config shapes/counts, the reference name map, torch parity, sharding, bad input.

The PyTorch reference below is an independent re-statement of the original's semantics
(``src/models/{vision_model,transformer,backbone,position_encoding}.py`` at e33cfc1), with its module
names, so its ``state_dict()`` has the original's keys. torchvision is not used (not installable
beside the CPU torch): the bottleneck ResNet is written out.

Axis letters: B batch, H/W spatial, L tokens, N queries, D model dim.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import math
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jax.sharding import PartitionSpec as P
from safetensors.numpy import save_file
from torch import nn as tnn

from anatomix_jax.convert import reference_apm as convert
from anatomix_jax.models import apm, resnet, transformer

REFERENCE_FILE = pathlib.Path(__file__).parent / "data" / "reference_apm_state_dict.txt"
PAPER = apm.APMConfig()
# Prime-ish tiny config: no two of batch 3, heads 4 (d_head 5), object heads 2 (d_head 10), D 20,
# F 28, 2+3 layers, 6 ResNet planes, 2×3 feature map coincide. Sharded dims divide a 2-way axis.
TINY = apm.APMConfig(depths=(1, 1, 1, 1), width=6, hidden_dim=20, num_heads=4, enc_layers=2,
                     dec_layers=3, ffn_dim=28, dropout=0.1, num_queries=36, num_labels=14,
                     proj_dim=16, obj_heads=2)
IMAGE_HW = (64, 96)
# FSDP + tensor rules. 'activation_embed' stays unmapped: with it on 'tensor', XLA:CPU (jaxlib 0.10.2)
# miscomputes on a 2×2×2 mesh — minimal case: x [8, 24] on P(('data', 'fsdp'), 'tensor'),
# w [24, 24] on P('tensor', 'fsdp'), jit(lambda x, w: x + x @ w) is wrong by O(1); it is right on
# every mesh with one axis of size 1.
RULES = (("activation_batch", ("data", "fsdp")), ("activation_length", None),
         ("activation_embed", None), ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"),
         ("kv", None), ("conv_in", None), ("conv_out", "fsdp"), ("queries", None), ("labels", None),
         ("proj", None), ("box", None))
OUTPUT_KEYS = ("boxes", "aux_boxes", "image_logits", "anatomy_embeddings", "memory", "cls")
TOL = 1e-5


# --- independent PyTorch reference ----------------------------------------------------------------

class TorchFrozenBN(tnn.Module):
  def __init__(self, n):
    super().__init__()
    for name, value in (("weight", 1), ("bias", 0), ("running_mean", 0), ("running_var", 1)):
      self.register_buffer(name, torch.full((n,), float(value)))

  def forward(self, x):
    w, b, rm, rv = (t.reshape(1, -1, 1, 1) for t in (self.weight, self.bias, self.running_mean,
                                                     self.running_var))
    scale = w * (rv + 1e-5).rsqrt()
    return x * scale + (b - rm * scale)


class TorchBottleneck(tnn.Module):
  def __init__(self, inplanes, planes, stride):
    super().__init__()
    self.conv1, self.bn1 = tnn.Conv2d(inplanes, planes, 1, bias=False), TorchFrozenBN(planes)
    self.conv2 = tnn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # v1.5: stride on the 3×3
    self.bn2 = TorchFrozenBN(planes)
    self.conv3, self.bn3 = tnn.Conv2d(planes, planes * 4, 1, bias=False), TorchFrozenBN(planes * 4)
    self.downsample = None
    if stride != 1 or inplanes != planes * 4:
      self.downsample = tnn.Sequential(tnn.Conv2d(inplanes, planes * 4, 1, stride, bias=False),
                                       TorchFrozenBN(planes * 4))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class TorchResNetBody(tnn.Module):
  def __init__(self, depths, width):
    super().__init__()
    self.conv1, self.bn1 = tnn.Conv2d(1, width, 7, 2, 3, bias=False), TorchFrozenBN(width)
    self.maxpool = tnn.MaxPool2d(3, 2, 1)
    inplanes = width
    for i, depth in enumerate(depths, start=1):
      planes = width * 2 ** (i - 1)
      blocks = []
      for j in range(depth):
        blocks.append(TorchBottleneck(inplanes, planes, 2 if i > 1 and j == 0 else 1))
        inplanes = planes * 4
      setattr(self, f"layer{i}", tnn.Sequential(*blocks))
    for m in self.modules():
      if isinstance(m, tnn.Conv2d):
        tnn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

  def forward(self, x):
    x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
    return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class TorchBackbone(tnn.Module):
  def __init__(self, depths, width):
    super().__init__()
    self.body = TorchResNetBody(depths, width)


class TorchSinePosition(tnn.Module):
  def __init__(self, num_pos_feats):
    super().__init__()
    self.num_pos_feats = num_pos_feats

  def forward(self, x, mask):  # mask [B, H, W], True = padding → [B, 2F, H, W]
    not_mask = ~mask
    y_embed = not_mask.cumsum(1, dtype=torch.float32)
    x_embed = not_mask.cumsum(2, dtype=torch.float32)
    y_embed = y_embed / (y_embed[:, -1:, :] + 1e-6) * 2 * math.pi
    x_embed = x_embed / (x_embed[:, :, -1:] + 1e-6) * 2 * math.pi
    dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32)
    dim_t = 10000 ** (2 * (dim_t // 2) / self.num_pos_feats)
    pos_x, pos_y = x_embed[..., None] / dim_t, y_embed[..., None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class TorchEncoderLayer(tnn.Module):
  def __init__(self, d, h, ffn, dropout):
    super().__init__()
    self.self_attn = tnn.MultiheadAttention(d, h, dropout=dropout)
    self.linear1, self.linear2 = tnn.Linear(d, ffn), tnn.Linear(ffn, d)
    self.norm1, self.norm2 = tnn.LayerNorm(d), tnn.LayerNorm(d)
    self.dropout = tnn.Dropout(dropout)

  def forward(self, src, key_padding_mask=None, pos=None):  # seq-first [L, B, D]
    q = k = src + pos
    src = self.norm1(src + self.dropout(self.self_attn(q, k, src,
                                                       key_padding_mask=key_padding_mask)[0]))
    return self.norm2(src + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(src))))))


class TorchDecoderLayer(tnn.Module):
  def __init__(self, d, h, ffn, dropout):
    super().__init__()
    self.self_attn = tnn.MultiheadAttention(d, h, dropout=dropout)
    self.multihead_attn = tnn.MultiheadAttention(d, h, dropout=dropout)
    self.linear1, self.linear2 = tnn.Linear(d, ffn), tnn.Linear(ffn, d)
    self.norm1, self.norm2, self.norm3 = tnn.LayerNorm(d), tnn.LayerNorm(d), tnn.LayerNorm(d)
    self.dropout = tnn.Dropout(dropout)

  def forward(self, tgt, memory, memory_key_padding_mask=None, pos=None, query_pos=None):
    q = k = tgt + query_pos
    tgt = self.norm1(tgt + self.dropout(self.self_attn(q, k, tgt)[0]))
    attended = self.multihead_attn(tgt + query_pos, memory + pos, memory,
                                   key_padding_mask=memory_key_padding_mask)[0]
    tgt = self.norm2(tgt + self.dropout(attended))
    return self.norm3(tgt + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(tgt))))))


class TorchStack(tnn.Module):
  def __init__(self, layers, norm=None):
    super().__init__()
    self.layers = tnn.ModuleList(layers)
    self.norm = norm


class TorchTransformerWithCLS(tnn.Module):
  def __init__(self, c: apm.APMConfig):
    super().__init__()
    d = c.hidden_dim
    self.encoder = TorchStack([TorchEncoderLayer(d, c.num_heads, c.ffn_dim, c.dropout)
                               for _ in range(c.enc_layers)])
    self.decoder = TorchStack([TorchDecoderLayer(d, c.num_heads, c.ffn_dim, c.dropout)
                               for _ in range(c.dec_layers)], tnn.LayerNorm(d))
    self.cls_token = tnn.Parameter(torch.randn(1, 1, d))
    self.cls_pos = tnn.Parameter(torch.randn(1, 1, d))
    for p in self.parameters():
      if p.dim() > 1:
        tnn.init.xavier_uniform_(p)

  def forward(self, src, mask, query_embed, pos_embed):  # src/pos [B, D, h, w]
    bs = src.shape[0]
    src = torch.cat([self.cls_token.expand(-1, bs, -1), src.flatten(2).permute(2, 0, 1)])
    pos = torch.cat([self.cls_pos.expand(-1, bs, -1), pos_embed.flatten(2).permute(2, 0, 1)])
    mask = torch.cat([torch.zeros((bs, 1), dtype=torch.bool), mask.flatten(1)], dim=1)
    memory = src
    for layer in self.encoder.layers:
      memory = layer(memory, key_padding_mask=mask, pos=pos)
    cls, memory, pos, mask = memory[0], memory[1:], pos[1:], mask[:, 1:]
    query_pos = query_embed.unsqueeze(1).repeat(1, bs, 1)
    tgt, hs = torch.zeros_like(query_pos), []
    for layer in self.decoder.layers:
      tgt = layer(tgt, memory, memory_key_padding_mask=mask, pos=pos, query_pos=query_pos)
      hs.append(self.decoder.norm(tgt))
    return torch.stack(hs).transpose(1, 2), memory.transpose(0, 1), cls


class TorchMHAWithLinear(tnn.Module):
  def __init__(self, d, heads, out_dim):
    super().__init__()
    self.mha = tnn.MultiheadAttention(d, heads, batch_first=True, dropout=0.0)
    self.linear = tnn.Linear(d, out_dim)

  def forward(self, query, key, value):
    return self.linear(self.mha(query=query, key=key, value=value)[0])


class TorchVisionModel(tnn.Module):
  def __init__(self, c: apm.APMConfig):
    super().__init__()
    d = c.hidden_dim
    self.transformer = TorchTransformerWithCLS(c)
    self.image_class_embed = tnn.Linear(d, c.num_labels)
    self.anat_obj_embs = TorchMHAWithLinear(d, c.obj_heads, c.proj_dim)
    self.bbox_embed = TorchStack([tnn.Linear(d, d), tnn.Linear(d, d), tnn.Linear(d, 4)])
    self.query_embed = tnn.Embedding(c.num_queries, d)
    self.input_proj = tnn.Conv2d(c.width * 32, d, 1)
    self.backbone = tnn.Sequential(TorchBackbone(c.depths, c.width), TorchSinePosition(d // 2))

  def forward(self, images):  # [B, 1, H, W]
    features = self.backbone[0].body(images)
    mask = torch.zeros(features.shape[0], *features.shape[2:], dtype=torch.bool)
    pos = self.backbone[1](features, mask)
    hs, memory, cls = self.transformer(self.input_proj(features), mask, self.query_embed.weight,
                                       pos)
    x = hs
    for i, layer in enumerate(self.bbox_embed.layers):
      x = F.relu(layer(x)) if i < 2 else layer(x)
    aux_boxes = x.sigmoid()
    return {"boxes": aux_boxes[-1], "aux_boxes": aux_boxes,
            "image_logits": self.image_class_embed(cls),
            "anatomy_embeddings": self.anat_obj_embs(hs[-1], memory, memory), "memory": memory,
            "cls": cls}


# --- helpers --------------------------------------------------------------------------------------

def _reference_file() -> dict[str, tuple[tuple[int, ...], str]]:
  out = {}
  for line in REFERENCE_FILE.read_text().splitlines():
    if line and not line.startswith("#"):
      key, shape, kind = line.split("\t")
      out[key] = (tuple(int(s) for s in shape.strip("[]").split(",") if s.strip()), kind)
  return out


def _state_numpy(model: tnn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _max_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.fixture(scope="module")
def tiny():
  """A tiny torch reference with non-trivial biases/LayerNorms, its conversion and test images."""
  torch.manual_seed(0)
  model = TorchVisionModel(TINY).eval()
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for p in model.parameters():
      if p.dim() == 1:  # zero/one-initialised vectors: perturb them so a mis-mapping shows
        p.add_(torch.rand(p.shape, generator=gen) * 0.2 - 0.1)
  images = np.random.default_rng(2).uniform(size=(3, 1, *IMAGE_HW)).astype(np.float32)
  state = _state_numpy(model)
  params, batch_stats = convert.from_torch_state_dict(state, TINY)
  return {"model": model, "images": images, "state": state, "params": params,
          "batch_stats": batch_stats, "apply": jax.jit(apm.APM(TINY).apply)}


# --- (1), (2): paper config, abstract only --------------------------------------------------------

def test_paper_config_counts_without_allocation():
  images = jax.ShapeDtypeStruct((1, 1024, 1024, 1), jnp.float32)
  variables = nn.unbox(jax.eval_shape(apm.APM(PAPER).init, jax.random.key(0), images))
  leaves = jax.tree.leaves(variables)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))  # noqa: E731
  assert count(variables["params"]) == 31_759_714
  assert count(variables["batch_stats"]) == 106_240
  mask = convert.reference_trainable_mask(variables["params"])
  trainable = sum(math.prod(x.shape) for x, m in zip(jax.tree.leaves(variables["params"]),
                                                     jax.tree.leaves(mask)) if m)
  assert trainable == 31_546_722
  out = jax.eval_shape(apm.APM(PAPER).apply, variables, images)
  assert {k: v.shape for k, v in out.items()} == {
      "boxes": (1, 36, 4), "aux_boxes": (4, 1, 36, 4), "image_logits": (1, 14),
      "anatomy_embeddings": (1, 36, 16), "memory": (1, 1024, 256), "cls": (1, 256)}
  # Every parameter and BN constant carries logical axis names.
  boxed = jax.eval_shape(apm.APM(PAPER).init, jax.random.key(0), images)
  is_boxed = lambda x: isinstance(x, nn.LogicallyPartitioned)  # noqa: E731
  assert all(is_boxed(x) for x in jax.tree.leaves(boxed, is_leaf=is_boxed))


def test_paper_name_map_matches_reference_file():
  reference = _reference_file()
  variables = convert.abstract_variables(PAPER)
  mapped = convert.to_torch_state_dict(variables["params"], variables["batch_stats"], PAPER)
  assert list(mapped) == list(reference)  # same keys, in the reference's order
  assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: s for k, (s, _) in reference.items()}
  assert {r.torch_key: r.reference_kind for r in convert.name_table(PAPER)} == {
      k: kind for k, (_, kind) in reference.items()}


def test_torch_reference_has_the_original_keys():
  """Validates the test's own torch re-statement against the original's state dict."""
  with torch.device("meta"):
    model = TorchVisionModel(PAPER)
  reference = _reference_file()
  assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {
      k: s for k, (s, _) in reference.items()}
  assert set(dict(model.named_buffers())) == {k for k, (_, kind) in reference.items()
                                              if kind == "buffer"}


# --- (3): parity ----------------------------------------------------------------------------------

@pytest.mark.parametrize("hw_dim", [(2, 3, 20), (32, 32, 256)])
def test_sine_position_encoding(hw_dim):
  h, w, d = hw_dim
  expected = TorchSinePosition(d // 2)(None, torch.zeros(1, h, w, dtype=torch.bool))
  expected = expected[0].permute(1, 2, 0).reshape(h * w, d).numpy()
  assert _max_diff(transformer.sine_position_encoding(h, w, d), expected) <= 1e-6


def test_layer_parity(tiny):
  model, params = tiny["model"], tiny["params"]["transformer"]
  rng = np.random.default_rng(3)
  b, length, n, d = 3, 7, 5, TINY.hidden_dim
  x, pos = rng.normal(size=(b, length, d)), rng.normal(size=(length, d))
  tgt, qpos = rng.normal(size=(b, n, d)), rng.normal(size=(n, d))
  t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
  with torch.no_grad():
    enc = model.transformer.encoder.layers[0](t(x).transpose(0, 1), pos=t(pos)[:, None])
    dec = model.transformer.decoder.layers[1](t(tgt).transpose(0, 1), t(x).transpose(0, 1),
                                              pos=t(pos)[:, None], query_pos=t(qpos)[:, None])
    head = model.anat_obj_embs(t(tgt), t(x), t(x))
  f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
  layer = transformer.EncoderLayer(TINY.num_heads, TINY.ffn_dim, TINY.dropout)
  ours = layer.apply({"params": params["encoder_layer_0"]}, f32(x), f32(pos)[None], True)
  assert _max_diff(ours, enc.transpose(0, 1)) <= TOL
  layer = transformer.DecoderLayer(TINY.num_heads, TINY.ffn_dim, TINY.dropout)
  ours = layer.apply({"params": params["decoder_layer_1"]}, f32(tgt), f32(x), f32(pos)[None],
                     f32(qpos)[None], True)
  assert _max_diff(ours, dec.transpose(0, 1)) <= TOL
  ours = apm.AnatomyEmbeddingHead(TINY.obj_heads, TINY.proj_dim).apply(
      {"params": tiny["params"]["anat_obj_embs"]}, f32(tgt), f32(x))
  assert _max_diff(ours, head) <= TOL


def test_resnet_parity(tiny):
  body = tiny["model"].backbone[0].body
  with torch.no_grad():
    expected = body(torch.from_numpy(tiny["images"])).permute(0, 2, 3, 1).numpy()
  ours = jax.jit(resnet.ResNet(TINY.depths, TINY.width).apply)(
      {"params": tiny["params"]["backbone"], "batch_stats": tiny["batch_stats"]["backbone"]},
      tiny["images"].transpose(0, 2, 3, 1))
  assert ours.shape == (3, 2, 3, 32 * TINY.width)
  scale = max(1.0, float(np.abs(expected).max()))
  assert _max_diff(ours, expected) <= TOL * scale
  # use_default_bn: the reference's default buffers without a batch_stats collection.
  defaults = jax.jit(resnet.ResNet(TINY.depths, TINY.width, use_default_bn=True).apply)(
      {"params": tiny["params"]["backbone"]}, tiny["images"].transpose(0, 2, 3, 1))
  assert _max_diff(defaults, expected) <= TOL * scale


def _compare_model(tiny, state, params, batch_stats) -> dict[str, float]:
  model = tiny["model"]
  model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
  with torch.no_grad():
    expected = model(torch.from_numpy(tiny["images"]))
  ours = tiny["apply"]({"params": params, "batch_stats": batch_stats},
                       tiny["images"].transpose(0, 2, 3, 1))
  assert set(ours) == set(OUTPUT_KEYS)
  diffs = {}
  for key in OUTPUT_KEYS:
    assert ours[key].shape == tuple(expected[key].shape), key
    assert ours[key].dtype == jnp.float32, key
    diffs[key] = _max_diff(ours[key], expected[key].numpy())
  assert max(diffs.values()) <= TOL, diffs
  return diffs


def test_apm_parity_default_buffers(tiny):
  diffs = _compare_model(tiny, tiny["state"], tiny["params"], tiny["batch_stats"])
  print("APM parity (default BN):", diffs)
  # Without a batch_stats collection the APM falls back to the default buffers (see test_resnet_parity).
  jax.eval_shape(apm.APM(TINY).apply, {"params": tiny["params"]},
                 jax.ShapeDtypeStruct((3, *IMAGE_HW, 1), jnp.float32))


def test_apm_parity_random_buffers(tiny):
  rng = np.random.default_rng(4)
  state = dict(tiny["state"])
  for key, value in state.items():
    if key.endswith(("running_var", "bn1.weight", "bn2.weight", "bn3.weight",
                     "downsample.1.weight")):
      state[key] = rng.uniform(0.5, 1.5, value.shape).astype(np.float32)
    elif key.endswith(("running_mean", "bn1.bias", "bn2.bias", "bn3.bias", "downsample.1.bias")):
      state[key] = rng.uniform(-0.2, 0.2, value.shape).astype(np.float32)
  buffers = [r.torch_key for r in convert.name_table(TINY) if r.collection == "batch_stats"]
  assert {k for k in state if not np.array_equal(state[k], tiny["state"][k])} == set(buffers)
  params, batch_stats = convert.from_torch_state_dict(state, TINY)
  diffs = _compare_model(tiny, state, params, batch_stats)
  print("APM parity (random BN):", diffs)


# --- (4): round trip ------------------------------------------------------------------------------

def test_round_trip_is_exact(tiny):
  back = convert.to_torch_state_dict(*convert.from_torch_state_dict(tiny["state"], TINY), TINY)
  assert list(back) == list(tiny["state"])
  for key, value in tiny["state"].items():
    assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key
  # The vis_model. prefix of an APMModel checkpoint is stripped, its text model ignored.
  prefixed = {f"vis_model.{k}": v for k, v in tiny["state"].items()}
  prefixed["text_model.projection.0.weight"] = np.zeros((2, 2), np.float32)
  params, _ = convert.from_torch_state_dict(prefixed, TINY)
  assert np.array_equal(params["query_embed"], tiny["params"]["query_embed"])


def test_text_projection_head_converts_with_torch_parity(tiny):
  # The reference's text_model.project_head: Sequential(Linear(768→512), ReLU, Linear(512→16)),
  # here at a tiny size, as it sits in an APMModel checkpoint beside the vision model.
  text_dim, hidden = 13, 7
  config = dataclasses.replace(TINY, text_dim=text_dim, text_hidden=hidden)
  torch.manual_seed(3)
  head = tnn.Sequential(tnn.Linear(text_dim, hidden), tnn.ReLU(), tnn.Linear(hidden, TINY.proj_dim))
  state = {f"vis_model.{k}": v for k, v in tiny["state"].items()}
  state.update({f"text_model.project_head.proj.{k}": v.detach().numpy()
                for k, v in head.state_dict().items()})
  state["text_model.model.embeddings.word_embeddings.weight"] = np.zeros((5, text_dim), np.float32)
  params, batch_stats = convert.from_torch_state_dict(state, config)
  x = np.random.default_rng(0).normal(size=(2, 36, text_dim)).astype(np.float32)
  images = np.zeros((2, *IMAGE_HW, 1), np.float32)
  out = apm.APM(config).apply({"params": params, "batch_stats": batch_stats}, images,
                              text_pooled=x)
  with torch.no_grad():
    want = head(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(out["text_projection"], want, atol=1e-5)
  # Without a text branch in the config, the head is not expected, and text input is refused.
  assert "text_projection" not in convert.from_torch_state_dict(state, TINY)[0]
  with pytest.raises(ValueError, match="text_dim"):
    apm.APM(TINY).apply({"params": tiny["params"], "batch_stats": tiny["batch_stats"]}, images,
                        text_pooled=x)


def test_load_reference_checkpoint_files(tiny, tmp_path):
  st_path = tmp_path / "apm.safetensors"
  save_file(tiny["state"], str(st_path))
  params, batch_stats = convert.load_reference_checkpoint(st_path, TINY)
  assert jax.tree.all(jax.tree.map(np.array_equal, params, tiny["params"]))
  pt_path = tmp_path / "checkpoint.pth"
  torch.save({"model": {f"vis_model.{k}": torch.from_numpy(v) for k, v in tiny["state"].items()},
              "epoch": 3}, pt_path)
  params, batch_stats = convert.load_reference_checkpoint(pt_path, TINY)
  assert jax.tree.all(jax.tree.map(np.array_equal, batch_stats, tiny["batch_stats"]))
  # The original's training checkpoint (its argparse args hold pathlib paths) is read; any other
  # class is refused (weights-only unpickler), naming the file and the class.
  train_path = tmp_path / "training.pth"
  args = argparse.Namespace(output_dir=pathlib.PosixPath("/runs/apm"),
                            training=argparse.Namespace(lr=1e-4))
  torch.save({"model": {f"vis_model.{k}": torch.from_numpy(v) for k, v in tiny["state"].items()},
              "epoch": 3, "args": args, "best_loss": 0.5}, train_path)
  params, _ = convert.load_reference_checkpoint(train_path, TINY)
  assert jax.tree.all(jax.tree.map(np.array_equal, params, tiny["params"]))
  bad_path = tmp_path / "other.pth"
  torch.save({"model": {}, "args": argparse.Namespace(when=datetime.date(2024, 1, 1))}, bad_path)
  with pytest.raises(ValueError, match=f"{bad_path}: holds a datetime.date object"):
    convert.load_reference_checkpoint(bad_path, TINY)
  missing = dict(tiny["state"])
  del missing["input_proj.bias"]
  save_file(missing, str(st_path))
  with pytest.raises(ValueError, match=f"{st_path}.*missing keys: input_proj.bias"):
    convert.load_reference_checkpoint(st_path, TINY)


def test_trainable_mask_freezes_layer1_convs(tiny):
  mask = convert.reference_trainable_mask(tiny["params"])
  frozen = {"/".join(p.key for p in path) for path, m in
            jax.tree_util.tree_flatten_with_path(mask)[0] if not m}
  assert frozen == {f"backbone/layer1_0/{c}/kernel" for c in
                    ("conv1", "conv2", "conv3", "downsample_conv")}


# --- (5): bad input -------------------------------------------------------------------------------

def test_bad_state_dicts(tiny):
  state = dict(tiny["state"])
  del state["transformer.decoder.norm.weight"]
  with pytest.raises(ValueError, match=r"missing keys: transformer\.decoder\.norm\.weight"):
    convert.from_torch_state_dict(state, TINY, source="ckpt.pt")
  state = dict(tiny["state"], **{"transformer.extra.weight": np.zeros(3, np.float32)})
  with pytest.raises(ValueError, match=r"unexpected keys: transformer\.extra\.weight"):
    convert.from_torch_state_dict(state, TINY)
  state = dict(tiny["state"])
  state["anat_obj_embs.linear.weight"] = np.zeros((16, 21), np.float32)
  with pytest.raises(ValueError, match=r"anat_obj_embs\.linear\.weight has shape \(16, 21\), "
                                       r"expected \(16, 20\)"):
    convert.from_torch_state_dict(state, TINY)
  params = dict(tiny["params"])
  del params["query_embed"]
  with pytest.raises(ValueError, match="missing query_embed"):
    convert.to_torch_state_dict(params, tiny["batch_stats"], TINY)


@pytest.mark.parametrize("shape, message", [
    ((2, 64, 80, 1), "multiples of 32"),
    ((2, 64, 64, 3), r"grayscale images \[B, H, W, 1\]"),
    ((64, 64, 1), r"grayscale images \[B, H, W, 1\]"),
])
def test_bad_images(tiny, shape, message):
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(apm.APM(TINY).apply, {"params": tiny["params"]},
                   jax.ShapeDtypeStruct(shape, jnp.float32))


def test_bad_config():
  with pytest.raises(ValueError, match="not divisible by num_heads"):
    apm.APMConfig(hidden_dim=20, num_heads=3)
  with pytest.raises(ValueError, match="unknown APM config fields"):
    apm.APMConfig.from_config({"hidden": 3})


def test_from_config_accepts_config_dict():
  import ml_collections  # noqa: PLC0415
  cfg = ml_collections.ConfigDict(dict(depths=[1, 1, 1, 1], width=6, hidden_dim=20, num_heads=4,
                                       enc_layers=2, dec_layers=3, ffn_dim=28, dropout=0.1,
                                       num_queries=36, num_labels=14, proj_dim=16, obj_heads=2,
                                       dtype="float32", remat=False))
  assert apm.APMConfig.from_config(cfg) == TINY


# --- modes: dropout, remat, bf16 (tracing only where possible) -----------------------------------

def test_dropout_only_in_training_with_rng(tiny):
  variables = {"params": tiny["params"], "batch_stats": tiny["batch_stats"]}
  images = jax.ShapeDtypeStruct((3, *IMAGE_HW, 1), jnp.float32)
  model = apm.APM(TINY)
  trace = lambda *args, **kw: str(jax.make_jaxpr(  # noqa: E731
      lambda v, x, *key: model.apply(v, x, rngs={"dropout": key[0]} if key else None, **kw))(
          variables, images, *args))
  eval_trace = trace()
  assert trace(train=True) == eval_trace  # no 'dropout' rng: deterministic
  assert "random_bits" not in eval_trace
  assert "random_bits" in trace(jax.random.key(0), train=True)
  assert "random_bits" not in trace(jax.random.key(0))  # an rng alone does not turn dropout on
  # Values: a layer in training mode drops (and the test's torch twin agrees in eval mode above).
  layer = transformer.EncoderLayer(TINY.num_heads, TINY.ffn_dim, TINY.dropout)
  x = jnp.ones((2, 5, TINY.hidden_dim)) * jnp.arange(TINY.hidden_dim) / TINY.hidden_dim
  layer_vars = {"params": tiny["params"]["transformer"]["encoder_layer_0"]}
  kept, dropped = jax.jit(lambda v, x, key: (
      layer.apply(v, x, x[:1], True),
      layer.apply(v, x, x[:1], False, rngs={"dropout": key})))(layer_vars, x, jax.random.key(0))
  assert _max_diff(kept, dropped) > 1e-3


def test_remat_and_bfloat16_trace():
  images = jax.ShapeDtypeStruct((2, 64, 64, 1), jnp.float32)
  model = apm.APM(dataclasses.replace(TINY, remat=True))
  variables = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), images))

  def loss(params, batch_stats, x):
    out = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                      rngs={"dropout": jax.random.key(1)})
    return sum(jnp.sum(v) for v in out.values())

  grads = jax.eval_shape(jax.grad(loss), variables["params"], variables["batch_stats"], images)
  assert jax.tree.structure(grads) == jax.tree.structure(variables["params"])
  # bfloat16 compute: parameters stay float32, outputs come back float32.
  model = apm.APM(dataclasses.replace(TINY, dtype="bfloat16"))
  variables = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), images))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  out = jax.eval_shape(model.apply, variables, images)
  assert all(v.dtype == jnp.float32 for v in out.values())


def test_bfloat16_activations_stay_close_to_float32(tiny):
  """The paper config's bf16 activations (f32 parameters, outputs and loss) against the f32 path,
  on the torch-converted tiny model: the stated tolerance (bf16 has 8 mantissa bits, ~0.4 %)."""
  variables = {"params": tiny["params"], "batch_stats": tiny["batch_stats"]}
  images = jnp.asarray(tiny["images"].transpose(0, 2, 3, 1))
  f32 = tiny["apply"](variables, images)
  bf16 = jax.jit(apm.APM(dataclasses.replace(TINY, dtype="bfloat16")).apply)(variables, images)
  for name in ("boxes", "image_logits", "anatomy_embeddings"):
    assert bf16[name].dtype == jnp.float32
    scale = float(jnp.max(jnp.abs(f32[name])))
    assert _max_diff(bf16[name], f32[name]) <= 0.02 * scale, name
  # and the boxes are not simply equal (the bf16 path really runs in bf16)
  assert _max_diff(bf16["boxes"], f32["boxes"]) > 0


# --- (6): sharded forward -------------------------------------------------------------------------

def _mesh() -> jax.sharding.Mesh:
  return jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))


def _logical_shardings(model: apm.APM, images, mesh) -> object:
  init = lambda key: model.init(key, images)  # noqa: E731
  abstract = jax.eval_shape(init, jax.random.key(0))
  return init, nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, RULES)


def test_sharded_init_lowers_at_paper_config():
  """``jit(init, out_shardings=…)`` at the real config: every sharded dim divides its mesh axis.

  Only lowered: compiling the ~250 random initialisers takes 15-30 s on these CPUs.
  """
  mesh = _mesh()
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    init, shardings = _logical_shardings(apm.APM(PAPER), jnp.zeros((4, 64, 64, 1)), mesh)
    jax.jit(init, out_shardings=shardings).lower(jax.random.key(0))
  spec = lambda *path: functools.reduce(lambda t, k: t[k], path, shardings).spec  # noqa: E731
  assert spec("params", "backbone", "layer3_0", "conv2", "kernel") == P(None, None, None, "fsdp")
  assert spec("params", "transformer", "decoder_layer_0", "ffn", "linear1", "kernel") == P(
      "fsdp", "tensor")
  assert spec("batch_stats", "backbone", "bn1", "var") == P("fsdp")


def test_sharded_forward_matches_single_device(tiny):
  mesh = _mesh()
  model = apm.APM(TINY)
  images = np.random.default_rng(5).uniform(size=(4, *IMAGE_HW, 1)).astype(np.float32)
  variables = {"params": tiny["params"], "batch_stats": tiny["batch_stats"]}
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    _, shardings = _logical_shardings(model, images, mesh)
    # The torch-converted parameters, placed with the shardings their logical names give.
    placed = jax.device_put(variables, shardings)
    kernel = placed["params"]["transformer"]["encoder_layer_0"]["self_attn"]["query"]["kernel"]
    assert kernel.sharding.spec == P("fsdp", "tensor", None)
    batch = jax.device_put(images, jax.sharding.NamedSharding(mesh, P(("data", "fsdp"))))
    sharded = jax.jit(model.apply)(placed, batch)
    assert sharded["memory"].sharding.spec[0] == ("data", "fsdp")
  single = tiny["apply"](variables, images)
  diffs = {key: _max_diff(sharded[key], single[key]) for key in OUTPUT_KEYS}
  print("sharded vs single device:", diffs)
  assert max(diffs.values()) <= TOL, diffs
