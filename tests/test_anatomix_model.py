"""The stage-2 composition against a torch re-enactment of the reference's ``LMModel.forward``."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from anatomix_jax.convert import hf_gemma3
from anatomix_jax.models import anatomix, gemma3

S, F = "sliding_attention", "full_attention"
LM = gemma3.Gemma3Config(
    vocab_size=97, hidden_size=20, intermediate_size=29, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, head_dim=6, sliding_window=4,
    layer_types=(S, F, S), query_pre_attn_scalar=7, rope_local_theta=100.0,
    rope_global_theta=1000.0)
IMAGE, OBJ0, O, P = 90, 60, 5, 4
CONFIG = anatomix.AnatomiXConfig(LM, image_token_id=IMAGE, first_object_token_id=OBJ0,
                                 num_objects=O, image_dim=7, object_dim=3, projection_hidden=11)


def _batch():
  """Two right-padded prompts: text, an image span of P tokens, object tokens in odd order."""
  # Every prompt holds each <obj_i> once, as the reference's context does (its batch-wide
  # masked_scatter relies on that).
  rows = [[5, 6, IMAGE, IMAGE, IMAGE, IMAGE, 7, OBJ0 + 2, 8, OBJ0, 9, OBJ0 + 4, OBJ0 + 1,
           OBJ0 + 3, 10, 11],
          [12, IMAGE, IMAGE, IMAGE, IMAGE, OBJ0 + 1, 13, OBJ0 + 3, OBJ0, OBJ0 + 2, OBJ0 + 4, 14,
           0, 0, 0, 0]]
  ids = np.array(rows, np.int32)
  mask = np.array([[1] * 16, [1] * 12 + [0] * 4], np.int32)
  rng = np.random.default_rng(0)
  image = rng.normal(size=(2, P, 7)).astype(np.float32)
  objects = rng.normal(size=(2, O, 3)).astype(np.float32)
  return ids, mask, image, objects


@pytest.fixture(scope="module")
def params():
  ids, mask, image, objects = _batch()
  variables = anatomix.AnatomiX(CONFIG).init(
      jax.random.key(0), jnp.asarray(ids), jnp.asarray(image), jnp.asarray(objects),
      positions=gemma3.positions_from_mask(mask), attention_mask=jnp.asarray(mask))
  params = jax.tree.map(np.asarray, nn.unbox(variables["params"]))
  params = dict(params, lm=jax.tree.map(lambda x: x * 4.0, params["lm"]))
  # Non-trivial LayerNorm affine parameters, so that their mapping is tested.
  for head in anatomix.PROJECTION_GROUPS:
    norm = params[head]["norm"]
    norm["scale"] = norm["scale"] + np.linspace(-0.5, 0.5, 11, dtype=np.float32)
    norm["bias"] = norm["bias"] + np.linspace(0.3, -0.2, 11, dtype=np.float32)
  return params


def _torch_head(p) -> torch.nn.Sequential:
  head = torch.nn.Sequential(torch.nn.Linear(p["fc_in"]["kernel"].shape[0], 11), torch.nn.GELU(),
                             torch.nn.LayerNorm(11), torch.nn.Linear(11, 20))
  with torch.no_grad():
    head[0].weight.copy_(torch.tensor(p["fc_in"]["kernel"].T))
    head[0].bias.copy_(torch.tensor(p["fc_in"]["bias"]))
    head[2].weight.copy_(torch.tensor(p["norm"]["scale"]))
    head[2].bias.copy_(torch.tensor(p["norm"]["bias"]))
    head[3].weight.copy_(torch.tensor(p["fc_out"]["kernel"].T))
    head[3].bias.copy_(torch.tensor(p["fc_out"]["bias"]))
  return head


def test_forward_matches_reference_masked_scatter(params, tmp_path):
  """Reference (src/models/LM.py::forward): inputs_embeds = embed_tokens(ids) (√H-scaled), then
  masked_scatter of the projected image features into the <image> slots and of anatomy i into
  the <obj_i> slots, then the HF decoder on inputs_embeds."""
  ids, mask, image, objects = _batch()
  hf_gemma3.export_gemma3(params["lm"], LM, tmp_path)
  model = transformers.Gemma3ForCausalLM.from_pretrained(tmp_path,
                                                         attn_implementation="eager").eval()
  image_head, object_head = (_torch_head(params[k]) for k in anatomix.PROJECTION_GROUPS)
  t_ids = torch.tensor(ids, dtype=torch.long)
  with torch.no_grad():
    embeds = model.get_input_embeddings()(t_ids)
    image_emb = image_head(torch.tensor(image))
    object_emb = object_head(torch.tensor(objects))
    image_mask = (t_ids == IMAGE).unsqueeze(-1).expand_as(embeds)
    embeds = embeds.masked_scatter(image_mask, image_emb)
    for i in range(O):
      obj_mask = (t_ids == OBJ0 + i).unsqueeze(-1).expand_as(embeds)
      embeds = embeds.masked_scatter(obj_mask, object_emb[:, i].unsqueeze(1))
    ref = model(inputs_embeds=embeds, attention_mask=torch.tensor(mask, dtype=torch.long)).logits
  module = anatomix.AnatomiX(CONFIG)
  (logits,) = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(image),
                           jnp.asarray(objects), positions=gemma3.positions_from_mask(mask),
                           attention_mask=jnp.asarray(mask))
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(logits)[real], ref.numpy()[real], atol=1e-4, rtol=0)
  # The features matter: other image features change the logits after the image span.
  (other,) = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(image[::-1].copy()),
                          jnp.asarray(objects), positions=gemma3.positions_from_mask(mask),
                          attention_mask=jnp.asarray(mask))
  assert np.abs(np.asarray(other)[real] - np.asarray(logits)[real]).max() > 1e-2
  # Bidirectional image attention: tokens before the span are unchanged, the span itself is not.
  (bidir,) = anatomix.AnatomiX(dataclasses.replace(CONFIG, bidirectional_image=True)).apply(
      {"params": params}, jnp.asarray(ids), jnp.asarray(image), jnp.asarray(objects),
      positions=gemma3.positions_from_mask(mask), attention_mask=jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(bidir)[0, :2], np.asarray(logits)[0, :2], atol=1e-6)
  assert np.abs(np.asarray(bidir)[0, 2] - np.asarray(logits)[0, 2]).max() > 1e-2
  embedded = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(image),
                          jnp.asarray(objects), method=anatomix.AnatomiX.embed)
  np.testing.assert_allclose(np.asarray(embedded), embeds.numpy(), atol=1e-5, rtol=0)


def test_bidirectional_image_span_mask():
  """Image tokens see the whole span (both ways, even past the sliding window); text stays causal."""
  ids, mask, _, _ = _batch()
  groups = anatomix.image_groups(jnp.asarray(ids), IMAGE)
  positions = gemma3.positions_from_mask(mask)
  masks = gemma3.attention_masks(jnp.asarray(mask), positions, positions, 0, window=2,
                                 groups=groups, key_groups=groups)
  t = ids.shape[1]
  for b in range(2):
    for kind, window in ((F, t), (S, 2)):
      want = np.zeros((t, t), bool)
      for q in range(t):
        for k in range(t):
          both_image = ids[b, q] == IMAGE and ids[b, k] == IMAGE
          want[q, k] = mask[b, k] and ((k <= q and q - k < window) or both_image)
      real = mask[b].astype(bool)  # padded query rows are never read
      np.testing.assert_array_equal(np.asarray(masks[kind][b])[real], want[real],
                                    err_msg=f"{kind} row {b}")


def test_cross_entropy_matches_torch():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 5, 11)).astype(np.float32) * 3
  targets = rng.integers(0, 11, (2, 5))
  weights = (rng.random((2, 5)) > 0.4).astype(np.float32)
  total, count = anatomix.cross_entropy(jnp.asarray(logits), jnp.asarray(targets),
                                        jnp.asarray(weights))
  labels = np.where(weights > 0, targets, -100)
  ref = torch.nn.functional.cross_entropy(torch.tensor(logits).reshape(-1, 11),
                                          torch.tensor(labels).reshape(-1), ignore_index=-100)
  assert float(count) == weights.sum()
  np.testing.assert_allclose(float(total / count), ref.item(), rtol=1e-6)


def test_split_and_combine():
  tree = {"a": {"x": 1, "lora_a": 2}, "b": {"c": {"lora_b": 3}}, "d": 4}
  yes, no = anatomix.split_trainable(tree, lambda p: "lora" in p or p == "d")
  assert yes == {"a": {"lora_a": 2}, "b": {"c": {"lora_b": 3}}, "d": 4}
  assert no == {"a": {"x": 1}}
  assert anatomix.combine(no, yes) == tree
  with pytest.raises(ValueError, match="more than one tree"):
    anatomix.combine(tree, {"d": 5})


def test_config_rejects_ids_outside_vocab():
  with pytest.raises(ValueError, match="image_token_id 200 is outside the LM vocabulary"):
    anatomix.AnatomiXConfig(LM, image_token_id=200, first_object_token_id=OBJ0)
  with pytest.raises(ValueError, match=r"<obj_35> id 130 is outside"):
    anatomix.AnatomiXConfig(LM, image_token_id=IMAGE, first_object_token_id=95)
