"""Shared pieces of the ``configs/*.py`` files.

Config files are loaded by path (``--config=configs/stage1.py:demo``), so what they share lives in the
package, which is always importable, rather than in a ``configs/common.py`` beside them.
"""

from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses a config-file argument like ``"demo"`` or ``"demo,steps=10"`` (big_vision style).

  A bare word sets a boolean default to True; ``key=value`` takes the type of the default. Unknown
  keys raise, so a typo in ``--config=...:variant`` fails before any work starts.

  Args:
    arg: the text after ``:`` in ``--config=path:arg`` (None or empty: all defaults).
    **defaults: the accepted keys and their default values.

  Returns:
    A locked ConfigDict with one field per default.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; accepted: {sorted(defaults)}")
    default = defaults[key]
    if not sep:
      if not isinstance(default, bool):
        raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
      out[key] = True
    elif isinstance(default, bool):
      out[key] = value.strip().lower() in ("1", "true", "yes")
    else:
      out[key] = type(default)(value.strip())
  out.lock()
  return out


def mesh_config(shape=(-1, 1, 1), axes=("data", "fsdp", "tensor")) -> ml_collections.ConfigDict:
  """Device-mesh layout: one ``-1`` in ``shape`` takes the remaining devices."""
  return ml_collections.ConfigDict({"shape": tuple(shape), "axes": tuple(axes)})


# ONE logical-axis rules table: logical names used by the models → mesh axes. Pure FSDP by default:
# parameters are split along their model dimension over `fsdp`, activations along the batch over
# `data` and `fsdp`; `tensor` splits attention heads and MLP hidden units where a mesh has it.
# A dimension that a mesh axis does not divide stays replicated (train/sharding.py).
# Activations are not split along `embed`: with `activation_embed -> tensor` on a mesh whose data,
# fsdp and tensor axes all exceed 1, XLA:CPU (jaxlib 0.10.2) miscompiles `x + x @ w` (wrong by
# O(1); found by the sharded APM parity test), and pure FSDP does not need that split.
DEFAULT_RULES = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("queries", None),
    ("labels", None),
    ("proj", None),
    ("box", None),
    ("vocab", "tensor"),
)


def train_config(**overrides) -> ml_collections.ConfigDict:
  """The ``train`` section every stage shares (read by ``core.loop``); ``overrides`` set the
  stage's values (and may add stage-specific fields).

  ``eval_every``: steps, -1 once per epoch; ``checkpoint_every``: steps, -1 with every evaluation
  (the last step always evaluates and checkpoints); ``best_metric`` (a validation metric, empty:
  none) with ``best_mode`` "max" or "min" names the best checkpoint kept besides the latest
  ``keep_checkpoints``.
  """
  c = ml_collections.ConfigDict(dict(
      batch_size=32,           # global
      epochs=1,
      num_steps=-1,            # -1: epochs × train examples / batch_size
      log_every=50,
      eval_every=-1,
      checkpoint_every=-1,
      keep_checkpoints=3,
      best_metric="",
      best_mode="max",
  ))
  c.update(overrides)
  return c
