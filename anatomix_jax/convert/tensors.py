"""Shared pieces of the declarative weight converters: tensor transforms, tree paths, file readers.

A converter is a NAME TABLE (one rule per foreign tensor: its key, our leaf path(s), a transform
kind) plus the per-kind ``TRANSFORMS`` below; ``convert/reference_apm.py`` (the original APM) and
``convert/hf_bert.py`` (Hugging Face BERT) are the two tables.
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import os
import pickle
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Transform:
  """How one torch tensor becomes one or more of our leaves, and back.

  Attributes:
    to_flax: (torch tensor, heads) → our arrays, in the order of ``Rule.paths``.
    to_torch: (our arrays, heads) → the torch tensor.
    torch_shape: (our shapes, heads) → the torch shape, without touching data.
  """

  to_flax: Callable[[np.ndarray, int], tuple[np.ndarray, ...]]
  to_torch: Callable[[Sequence[np.ndarray], int], np.ndarray]
  torch_shape: Callable[[Sequence[tuple[int, ...]], int], tuple[int, ...]]


@dataclasses.dataclass(frozen=True)
class HFRule:
  """One Hugging Face tensor ↔ one of our leaves (the BERT and Gemma3 name tables).

  Attributes:
    hf_key: the key without the checkpoint layout's prefix.
    path: our leaf path inside ``params``.
    kind: a ``TRANSFORMS`` key.
    heads: heads of the head-splitting transforms (ignored by the others).
  """

  hf_key: str
  path: Path
  kind: str
  heads: int


def split_heads(w: np.ndarray, heads: int) -> np.ndarray:
  """torch Linear weight [D_out, D_in] → kernel [D_in, heads, D_out / heads] (head-major)."""
  return w.T.reshape(w.shape[1], heads, w.shape[0] // heads)


TRANSFORMS: dict[str, Transform] = {
    "copy": Transform(
        to_flax=lambda t, h: (t,),
        to_torch=lambda a, h: a[0],
        torch_shape=lambda s, h: tuple(s[0])),
    "conv": Transform(
        to_flax=lambda t, h: (t.transpose(2, 3, 1, 0),),
        to_torch=lambda a, h: a[0].transpose(3, 2, 0, 1),
        torch_shape=lambda s, h: (s[0][3], s[0][2], s[0][0], s[0][1])),
    "linear": Transform(
        to_flax=lambda t, h: (t.T,),
        to_torch=lambda a, h: a[0].T,
        torch_shape=lambda s, h: (s[0][1], s[0][0])),
    "in_proj_weight": Transform(
        to_flax=lambda t, h: tuple(split_heads(w, h) for w in np.split(t, 3, axis=0)),
        to_torch=lambda a, h: np.concatenate([k.reshape(k.shape[0], -1).T for k in a], axis=0),
        torch_shape=lambda s, h: (sum(x[1] * x[2] for x in s), s[0][0])),
    "in_proj_bias": Transform(
        to_flax=lambda t, h: tuple(b.reshape(h, -1) for b in np.split(t, 3)),
        to_torch=lambda a, h: np.concatenate([b.reshape(-1) for b in a]),
        torch_shape=lambda s, h: (sum(x[0] * x[1] for x in s),)),
    # A separate q/k/v Linear weight [heads·d_head, D] → kernel [D, heads, d_head], and its bias.
    "heads_kernel": Transform(
        to_flax=lambda t, h: (split_heads(t, h),),
        to_torch=lambda a, h: a[0].reshape(a[0].shape[0], -1).T,
        torch_shape=lambda s, h: (s[0][1] * s[0][2], s[0][0])),
    "heads_bias": Transform(
        to_flax=lambda t, h: (t.reshape(h, -1),),
        to_torch=lambda a, h: a[0].reshape(-1),
        torch_shape=lambda s, h: (s[0][0] * s[0][1],)),
    "out_proj_weight": Transform(
        to_flax=lambda t, h: (t.T.reshape(h, t.shape[1] // h, t.shape[0]),),
        to_torch=lambda a, h: a[0].reshape(-1, a[0].shape[-1]).T,
        torch_shape=lambda s, h: (s[0][2], s[0][0] * s[0][1])),
}


def get_path(tree: Mapping[str, Any], path: Path) -> Any:
  for name in path:
    tree = tree[name]
  return tree


def set_path(tree: dict[str, Any], path: Path, value: Any) -> None:
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def leaf_paths(tree: Any) -> set[Path]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {tuple(str(getattr(k, "key", k)) for k in kp) for kp, _ in flat}


def key_list(keys: Sequence[str], limit: int = 8) -> str:
  keys = sorted(keys)
  more = f" … and {len(keys) - limit} more" if len(keys) > limit else ""
  return ", ".join(keys[:limit]) + more


# The non-tensor types the original AnatomiX's files hold besides builtins and OrderedDict (which
# torch's weights-only unpickler already allows): its training scripts save their nested argparse
# ``args`` (with pathlib paths) beside the weights. Nothing else is ever unpickled.
ORIGINAL_SAFE_GLOBALS = ("argparse.Namespace", "pathlib.PosixPath", "pathlib.PurePosixPath",
                         "pathlib.WindowsPath", "pathlib.PureWindowsPath", "pathlib.Path")
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


def _safe_globals() -> list[Any]:
  import argparse  # noqa: PLC0415
  import pathlib  # noqa: PLC0415
  modules = {"argparse": argparse, "pathlib": pathlib}
  return [getattr(modules[name.split(".")[0]], name.split(".")[1])
          for name in ORIGINAL_SAFE_GLOBALS]


def read_torch_file(path: str, allow_original_types: bool = False) -> Any:
  """A ``torch.save`` file through torch's weights-only unpickler (never plain pickle).

  Args:
    path: the file.
    allow_original_types: also allow ``ORIGINAL_SAFE_GLOBALS`` (the original's checkpoints store
      their ``argparse`` args, holding ``pathlib`` paths); any other class is still refused.

  Raises:
    ValueError: torch missing, a truncated/corrupt file, or a class outside the allow-list (named
      with the file).
  """
  try:
    import torch  # noqa: PLC0415 (optional dependency)
  except ImportError as err:
    raise ValueError(f"{path}: reading a PyTorch checkpoint needs torch; install it or convert the "
                     "file to safetensors") from err
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file")
  allowed = _safe_globals() if allow_original_types else []
  try:
    with torch.serialization.safe_globals(allowed):
      return torch.load(path, weights_only=True, map_location="cpu")
  except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, EOFError) as err:
    refused = _UNSUPPORTED_GLOBAL.search(str(err))
    if refused:
      allowed_names = ORIGINAL_SAFE_GLOBALS if allow_original_types else ()
      raise ValueError(
          f"{path}: holds a {refused.group(1)} object, which is not allowed (only tensors, "
          f"builtins, OrderedDict{''.join(', ' + n for n in allowed_names)}); it is not "
          "unpickled. If you trust the file, re-save only its weights, e.g. as safetensors"
      ) from err
    raise ValueError(f"{path}: not a readable torch.save file (truncated or corrupt?): "
                     f"{type(err).__name__}: {str(err)[:300]}") from err


def read_bf16_tensor(path: str, key: str) -> np.ndarray:
  """One BF16 tensor of a safetensors file through a memory map, as an ``ml_dtypes.bfloat16``
  array (the safetensors NumPy reader refuses BF16, NumPy having no such dtype)."""
  import ml_dtypes  # noqa: PLC0415 (a jax dependency)
  with open(path, "rb") as f:
    header_len = int.from_bytes(f.read(8), "little")
    info = json.loads(f.read(header_len))[key]
    start, end = info["data_offsets"]
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
      raw = mm[8 + header_len + start:8 + header_len + end]
  return np.frombuffer(raw, ml_dtypes.bfloat16).reshape(info["shape"])


def read_safetensors(path: str) -> dict[str, Any]:
  """All tensors of a safetensors file as NumPy arrays (BF16 via :func:`read_bf16_tensor`)."""
  from safetensors import safe_open  # noqa: PLC0415
  try:
    with safe_open(path, framework="numpy") as f:
      return {key: read_bf16_tensor(path, key) if f.get_slice(key).get_dtype() == "BF16"
              else f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
  except Exception as err:  # noqa: BLE001 (the library raises several kinds)
    numpy_error = err
  try:  # other dtypes NumPy cannot name: read them through torch when it is installed
    with safe_open(path, framework="pt") as f:
      return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
  except Exception:  # noqa: BLE001
    raise ValueError(f"{path}: not a readable safetensors file ({numpy_error})") from numpy_error


def to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor; NumPy has no bfloat16, so widen first
    value = value.detach().cpu()
    if not value.is_floating_point() or value.element_size() < 4:
      value = value.float()
    return value.numpy()
  return np.asarray(value)
