"""Published accelerator figures and TPU topologies for ahead-of-time compilation without TPUs.

Peak FLOP/s are dense bf16 matmul rates; HBM bandwidth and capacity per chip (vendor data sheets:
cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e}, NVIDIA H100/H200 SXM). A JAX device is a chip, except on
v4 without megacore, where the compiler's topology exposes each of a chip's two TensorCores as a
device; per-device figures divide the chip's by the devices per chip.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip.

  Attributes:
    name: short name ("v5e", "h100").
    device_kind: ``jax.Device.device_kind`` of its devices.
    peak_flops: dense bf16 FLOP/s per chip.
    hbm_bytes: memory per chip.
    hbm_bandwidth: memory bandwidth per chip, bytes/s.
  """
  name: str
  device_kind: str
  peak_flops: float
  hbm_bytes: int
  hbm_bandwidth: float


CHIPS = {c.name: c for c in (
    Chip("v4", "TPU v4", 275e12, 32 * GiB, 1228e9),
    Chip("v5e", "TPU v5 lite", 197e12, 16 * GiB, 819e9),
    Chip("v5p", "TPU v5", 459e12, 95 * GiB, 2765e9),
    Chip("v6e", "TPU v6 lite", 918e12, 32 * GiB, 1640e9),
    Chip("h100", "NVIDIA H100 80GB HBM3", 989e12, 80 * 10**9, 3.35e12),
    Chip("h200", "NVIDIA H200", 989e12, 141 * 10**9, 4.8e12),
)}


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
  """What one JAX device of a chip offers (a chip split over ``per_chip`` devices)."""
  chip: Chip
  per_chip: int = 1

  @property
  def peak_flops(self) -> float:
    return self.chip.peak_flops / self.per_chip

  @property
  def hbm_bytes(self) -> int:
    return self.chip.hbm_bytes // self.per_chip

  @property
  def hbm_bandwidth(self) -> float:
    return self.chip.hbm_bandwidth / self.per_chip


def chip_of(device_kind: str) -> Chip:
  """The chip whose devices report ``device_kind``."""
  for chip in CHIPS.values():
    if chip.device_kind == device_kind:
      return chip
  raise ValueError(f"no published figures for device kind {device_kind!r}; known: "
                   f"{sorted(c.device_kind for c in CHIPS.values())}")


def tpu_topology(name: str) -> tuple[list, DeviceSpec]:
  """Devices of a TPU topology such as ``"v5e:2x4"`` or ``"v5p:2x2x1"``, compiled for without TPUs.

  Needs libtpu (``pip install -e .[tpu]``); on a machine without TPUs libtpu logs warnings about
  ``TPU_ACCELERATOR_TYPE``/``TPU_WORKER_HOSTNAMES``, harmless for compilation.

  Returns:
    ``(devices, spec)``: the topology's devices (for a ``Mesh``) and one device's figures.
  """
  generation, _, shape = name.partition(":")
  if generation not in CHIPS or not shape or not all(p.isdigit() for p in shape.split("x")):
    raise ValueError(f"topology {name!r}: expected GENERATION:AxB[xC] with GENERATION one of "
                     f"{[k for k in CHIPS if k.startswith('v')]}, e.g. v5e:2x4 or v5p:2x2x1")
  if importlib.util.find_spec("libtpu") is None:
    raise RuntimeError(f"compiling for TPU topology {name} needs libtpu: pip install -e '.[tpu]' "
                       "(no TPU required)")
  # libtpu takes a machine-wide lock (/tmp/libtpu_lockfile) meant for real TPUs; compiling only,
  # several processes may share it.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  try:
    devices = list(topologies.get_topology_desc(topology_name=name, platform="tpu").devices)
  except Exception as err:  # libtpu's errors are plain RuntimeErrors/XlaRuntimeErrors
    raise ValueError(f"topology {name!r} is not one libtpu knows: {err}") from err
  chip = chip_of(devices[0].device_kind)
  chips = len({tuple(d.coords) for d in devices})
  return devices, DeviceSpec(chip, per_chip=len(devices) // chips)


def roofline(flops: float, bytes_accessed: float, device: DeviceSpec) -> dict[str, float]:
  """Lower bound on one device's step time: max(FLOPs / peak, bytes / bandwidth), in seconds.

  Collectives, kernel launch and pipeline bubbles are not in it, so it is optimistic.
  """
  compute, memory = flops / device.peak_flops, bytes_accessed / device.hbm_bandwidth
  return {"compute_s": compute, "memory_s": memory, "step_s": max(compute, memory),
          "bound": "compute" if compute >= memory else "memory"}

