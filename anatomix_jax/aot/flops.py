"""Analytic FLOPs of the stage-2 language-model step (the "model FLOPs" of MFU).

XLA's own count (``compiled.cost_analysis()``) is what the hardware executes: it includes
recomputation under remat, the masked half of causal attention, and it counts a scanned layer
body once instead of L times. The model FLOPs here are the arithmetic the step needs: matmuls at
2·m·n·k, attention over the keys each query may see, and for training the backward pass: the
activation gradient of every matmul the loss flows back through (1× its forward) plus the weight
gradient of trainable matmuls (another 1×). Norms, activations and softmax are not counted
(< 1% at these widths).
"""

from __future__ import annotations

from typing import Sequence

from anatomix_jax.models.gemma3_config import Gemma3Config


def attended_keys(seq_len: int, window: int | None, dense: bool) -> float:
  """Mean number of keys a query attends to: causal (within ``window`` if set), or all when
  ``dense`` (what a masked dense kernel computes)."""
  if dense:
    return float(seq_len)
  w = seq_len if window is None else min(window, seq_len)
  # query i sees min(i + 1, w) keys
  return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def lm_step_flops(config: Gemma3Config, rows: int, seq_len: int, *, train: bool = True,
                  trainable: Sequence[str] = ("lora", "embedding"), dense_attention: bool = False,
                  remat: bool = False, recompute_logits: bool = False) -> float:
  """FLOPs of one forward (``train=False``) or forward + backward pass of the Gemma3 decoder.

  Args:
    config: the decoder (its ``lora`` rank decides whether adapters exist).
    rows, seq_len: the batch is ``rows × seq_len`` tokens, all of them in the loss.
    train: include the backward pass (gradients reach every layer: something below them trains).
    trainable: which weights get gradients: "lora", "embedding" (the tied input/output table),
      "base" (every decoder matmul, i.e. full fine-tuning).
    dense_attention: count all ``seq_len`` keys per query (a masked dense kernel) instead of the
      causal/sliding ones.
    remat: add the decoder layers' forward once more (recomputed in the backward pass); with
      ``dense_attention`` this is what the hardware executes, not model FLOPs.
    recompute_logits: add the output layer's forward once more (a chunked loss recomputes it).

  Returns:
    FLOPs for the whole batch.
  """
  h, n, kv, d, f = (config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                    config.head_dim, config.intermediate_size)
  shapes = {"q_proj": (h, n * d), "k_proj": (h, kv * d), "v_proj": (h, kv * d),
            "o_proj": (n * d, h), "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)}
  base = sum(2 * i * o for i, o in shapes.values())
  lora = sum(2 * config.lora.rank * (i + o) for name, (i, o) in shapes.items()
             if config.lora.applies_to(name))
  # Weight gradients: 1× forward for trainable matmuls; activation gradients: 1× for all of them.
  wgrad = lambda group, fwd: fwd if train and group in trainable else 0.0  # noqa: E731
  back = 1.0 if train else 0.0
  forward_again = 1.0 if train and remat else 0.0
  per_token = 0.0
  for kind in config.layer_types:
    window = config.sliding_window if kind == "sliding_attention" else None
    attention = 4 * n * d * attended_keys(seq_len, window, dense_attention)
    forward = base + lora + attention
    per_token += (forward * (1 + forward_again) + (base + lora) * back + wgrad("base", base)
                  + wgrad("lora", lora) + attention * 2 * back)  # dQ, dK, dV, dP: 2× forward
  logits = 2 * h * config.vocab_size
  logits_again = 1.0 if train and recompute_logits else 0.0
  per_token += logits * (1 + logits_again + back) + wgrad("embedding", logits)
  return per_token * rows * seq_len
