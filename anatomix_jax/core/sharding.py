"""Device mesh, logical-axis rules and shardings: the one place where placement is decided.

Models name their parameter and activation axes logically (``embed``, ``mlp``, ``activation_batch``…);
the config's rules table maps those names to mesh axes (``data``, ``fsdp``, ``tensor``). Meshes use
Auto axis types so logical constraints propagate (TOOLCHAIN.md: ``jax.make_mesh`` now defaults to
Explicit axes, which break Linen's logical constraints).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

Rules = Sequence[tuple[str, Any]]


class ShardingError(ValueError):
  """A mesh or batch layout that cannot work on the available devices."""


def mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Resolves one ``-1`` entry of ``shape`` so the product equals ``num_devices``."""
  shape = [int(s) for s in shape]
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ShardingError(f"mesh shape {tuple(shape)}: use positive sizes and at most one -1")
  known = math.prod(s for s in shape if s != -1)
  if num_devices % known:
    raise ShardingError(f"mesh shape {tuple(shape)} does not divide the {num_devices} devices")
  if -1 in shape:
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ShardingError(f"mesh shape {tuple(shape)} uses {math.prod(shape)} devices, but "
                        f"{num_devices} are available")
  return tuple(shape)


def make_mesh(mesh_cfg: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the named device mesh of ``mesh_cfg`` (``shape`` with optional -1, ``axes``)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg.shape, len(devices))
  if len(shape) != len(mesh_cfg.axes):
    raise ShardingError(f"mesh shape {shape} and axes {tuple(mesh_cfg.axes)} differ in length")
  if len(devices) == len(jax.devices()):
    return jax.make_mesh(shape, tuple(mesh_cfg.axes), axis_types=(AxisType.Auto,) * len(shape),
                         devices=devices)
  return Mesh(np.asarray(devices).reshape(shape), tuple(mesh_cfg.axes),
              axis_types=(AxisType.Auto,) * len(shape))


def fit_to_shape(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Drops mesh axes from dimensions they do not divide (those stay replicated).

  Args:
    spec: a mesh-axis PartitionSpec (entries: None, an axis name or a tuple of names), at most
      ``len(shape)`` entries (missing trailing entries count as None).
    shape: the array's shape.
    mesh: anything with a ``shape`` mapping of mesh axis name → size (a ``Mesh``).

  Returns:
    A PartitionSpec with one entry per dimension, keeping, in order, the axes whose cumulative
    product divides that dimension.
  """
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    kept = []
    for name in names:
      if dim % (math.prod(mesh.shape[a] for a in kept) * mesh.shape[name]) == 0:
        kept.append(name)
    fitted.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*fitted)


def unbox(tree: Any) -> Any:
  """``nn.unbox`` without sharding constraints (``nn.unbox`` constrains each value when called under
  a mesh and logical rules, which abstract ``ShapeDtypeStruct`` leaves do not support)."""
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if isinstance(
      x, nn.LogicallyPartitioned) else (x.unbox() if isinstance(x, nn.meta.AxisMetadata) else x),
                      tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """Maps a tree of (possibly ``nn.LogicallyPartitioned``) abstract arrays to NamedShardings.

  Leaves without logical names are replicated.
  """
  specs = nn.get_partition_spec(abstract_tree)
  unboxed = unbox(abstract_tree)

  def to_sharding(spec, leaf):
    if not hasattr(leaf, "shape"):  # empty pytree nodes such as optax.MaskedNode stay as they are
      return leaf
    mesh_spec = nn.logical_to_mesh_axes(spec, rules) if spec is not None else P()
    return NamedSharding(mesh, fit_to_shape(mesh_spec, leaf.shape, mesh))

  return jax.tree.map(to_sharding, specs, unboxed,
                      is_leaf=lambda x: isinstance(x, P) or x is None)


def data_axes(rules: Rules) -> tuple[str, ...]:
  """Mesh axes that split the batch (the rule for ``activation_batch``)."""
  axes = dict(rules).get("activation_batch")
  return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Sharding of a global batch: leading dimension over the data axes, the rest replicated."""
  return NamedSharding(mesh, P(data_axes(rules) or None))


def host_batch_size(global_batch: int, process_count: int,
                    data_parallel_size: int | None = None) -> int:
  """Checks that a global batch splits over hosts and data-parallel shards; returns the host batch.

  Args:
    global_batch: examples per training step across all hosts.
    process_count: number of JAX processes (hosts), each loading ``global_batch / process_count``.
    data_parallel_size: number of shards of the batch axis in the mesh (e.g. ``data × fsdp``);
      None skips the mesh checks.

  Returns:
    The per-host batch size.

  Raises:
    ShardingError: with the numbers involved when a division is not exact.
  """
  if global_batch <= 0 or process_count <= 0:
    raise ShardingError(f"global batch ({global_batch}) and process count ({process_count}) must be "
                     "positive")
  if global_batch % process_count:
    raise ShardingError(f"global batch {global_batch} is not divisible by the {process_count} "
                     f"processes; use a multiple of {process_count}")
  if data_parallel_size is not None:
    if data_parallel_size <= 0:
      raise ShardingError(f"data-parallel size must be positive, got {data_parallel_size}")
    if global_batch % data_parallel_size:
      raise ShardingError(f"global batch {global_batch} is not divisible by the data-parallel size "
                       f"{data_parallel_size} (mesh axes that split the batch); use a multiple "
                       f"of {data_parallel_size}")
    # Each host loads a distinct slice, so each must hold whole data-parallel shards.
    if data_parallel_size % process_count:
      raise ShardingError(f"data-parallel size {data_parallel_size} is not a multiple of the "
                       f"{process_count} processes: hosts would have to share batch shards, "
                       "which per-host loading does not support")
  return global_batch // process_count


def check_global_batch(global_batch: int, mesh: Mesh, rules: Rules,
                       process_count: int | None = None) -> int:
  """Validates the global batch against the mesh's data-parallel shards and the processes;
  returns the per-process (host-local) batch size (``host_batch_size``)."""
  process_count = jax.process_count() if process_count is None else process_count
  shards = math.prod(mesh.shape[a] for a in data_axes(rules))
  if global_batch % shards:
    raise ShardingError(f"global batch {global_batch} is not divisible by the {shards} data-parallel "
                        f"shards of mesh axes {data_axes(rules)} {dict(mesh.shape)}")
  return host_batch_size(global_batch, process_count, shards)


def host_to_global(local_batch: Any, sharding: NamedSharding) -> Any:
  """Assembles each process's slice of the batch into global ``jax.Array``s (leading axis split)."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local_batch)


def to_host(x: jax.Array) -> np.ndarray:
  """A global array as one NumPy array on every process (gathered across processes if needed)."""
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
