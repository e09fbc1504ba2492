"""Ahead-of-time compilation of the training steps for a device mesh, and what it tells about fit/speed.

``--mode=compile_check --topology=v5e:2x4`` builds the run's train step exactly as the trainer does
(same model, optimizer, shardings from the config's mesh and rules, donated state) from abstract
``ShapeDtypeStruct`` inputs, compiles it for the topology's devices (TPU: libtpu, no TPU needed), and
reports per device: parameter/optimizer/batch bytes from the shardings (``eval_shape``, nothing
allocated), XLA's memory analysis (arguments, outputs, temporaries — the activations), compiled
FLOPs and bytes accessed, and a roofline step time / MFU against the chip's published figures.
A step that does not fit gets an error naming the largest tensors.

Stage 1 compiles at the config's image size and global batch. Stage 2 compiles the align/finetune
step at the longest bucket with the paper's APM features (1024 patches of width 256, 36 anatomies
of width 16); the LM comes from ``lm.model_dir/config.json`` or, when that is empty, is MedGemma-4B's
text model (``gemma3_config.medgemma_4b``).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from anatomix_jax.aot import flops as flops_lib, hardware, op_bytes
from anatomix_jax.core import sharding as sharding_lib

PAPER_PATCHES, PAPER_IMAGE_DIM, PAPER_OBJECT_DIM = 1024, 256, 16  # the APM at 1024² (stride 32)


@dataclasses.dataclass
class Program:
  """A jitted step and abstract arguments to lower it with.

  Attributes:
    name: what it is ("stage1 train", "stage2 finetune").
    fn: the ``jax.jit``-wrapped step (explicit in/out shardings, donation).
    args: abstract arguments (``ShapeDtypeStruct`` leaves carrying their shardings).
    arg_names: one label per argument ("state", "frozen", "batch", "rng").
    model_flops: analytic FLOPs of one step for the whole batch (None: use XLA's count).
    hardware_flops: analytic FLOPs the hardware executes (recomputation, masked attention), for
      programs whose XLA count is wrong (scanned layers); None: XLA's count.
    context: called around lowering (the mesh and logical-axis rules).
    notes: caveats shown with the report.
  """
  name: str
  fn: Callable
  args: tuple
  arg_names: tuple[str, ...]
  model_flops: float | None
  context: Callable
  notes: list[str] = dataclasses.field(default_factory=list)
  hardware_flops: float | None = None


class DoesNotFitError(RuntimeError):
  """The step needs more memory per device than the chip has."""


def _abstract(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      sharding_lib.unbox(tree), shardings)


def _abstract_batch(shapes: dict[str, tuple[tuple[int, ...], Any]], sharding: NamedSharding
                    ) -> dict:
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
          for k, (shape, dtype) in shapes.items()}


def _abstract_rng(mesh: Mesh) -> jax.ShapeDtypeStruct:
  key = jax.eval_shape(lambda: jax.random.key(0))
  return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=NamedSharding(mesh, P()))


def _context(mesh: Mesh, rules: Any) -> Callable:
  def enter():
    import contextlib  # pylint: disable=import-outside-toplevel
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(rules))
    return stack
  return enter


def stage1_program(config: Any, mesh: Mesh) -> Program:
  """The stage-1 train step at ``data.image_size`` and global ``train.batch_size``.

  The contrastive branch (when on) gets text embeddings of PubMedBERT's width 768, or of the local
  ``text.encoder_dir``'s config when set.
  """
  # pylint: disable=import-outside-toplevel
  from anatomix_jax.models import apm
  from anatomix_jax.core import state as state_lib
  from anatomix_jax.stage1 import steps as steps_lib

  rules = tuple(tuple(r) for r in config.sharding_rules)
  batch = config.train.batch_size
  sharding_lib.check_global_batch(batch, mesh, rules, process_count=1)
  text_dim = _text_dim(config) if config.loss.contrastive else 0
  model = apm.APM(dataclasses.replace(apm.APMConfig.from_config(config.model), text_dim=text_dim))
  tx = state_lib.make_optimizer(config.optim, max(config.train.num_steps, 1))
  size = config.data.image_size
  init = lambda rng: model.init(  # noqa: E731
      {"params": rng, "dropout": rng}, jnp.zeros((1, size, size, 1), jnp.float32), train=False)
  abstract_state, state_shardings, _ = state_lib.train_state_factory(
      init, tx, jax.random.key(0), mesh, rules)
  batch_sharding = sharding_lib.batch_sharding(mesh, rules)
  n = model.config.num_queries
  shapes = {"image": ((batch, size, size, 1), jnp.float32), "boxes": ((batch, n, 4), jnp.float32),
            "box_mask": ((batch, n), jnp.float32),
            "labels": ((batch, model.config.num_labels), jnp.float32),
            "valid": ((batch,), jnp.float32), "index": ((batch,), jnp.int32)}
  if text_dim:
    shapes["text_pooled"] = ((batch, n, text_dim), jnp.float32)
  fn = steps_lib.jit_train_step(steps_lib.make_train_step(model, tx, config.loss, config.optim),
                                state_shardings, batch_sharding, mesh)
  return Program("stage1 train", fn,
                 (abstract_state, _abstract_batch(shapes, batch_sharding), _abstract_rng(mesh)),
                 ("state", "batch", "rng"), None, _context(mesh, rules))


def _text_dim(config: Any) -> int:
  if config.text.encoder_dir:
    from anatomix_jax.convert import hf_bert  # pylint: disable=import-outside-toplevel
    return int(hf_bert.read_config(config.text.encoder_dir).hidden_size)
  return 768  # PubMedBERT-base, the paper's frozen text encoder


def stage2_lm_config(config: Any):
  """The decoder config of a stage-2 run: ``lm.model_dir``'s, or MedGemma-4B's without one."""
  # pylint: disable=import-outside-toplevel
  from anatomix_jax.convert import hf_gemma3
  from anatomix_jax.models import gemma3_config, lora as lora_lib
  from anatomix_jax.stage2 import steps as stage2_steps

  c = config.lm
  groups = stage2_steps.PHASE_GROUPS[config.phase]
  spec = lora_lib.LoraSpec(**c.lora.to_dict()) if "lora" in groups else lora_lib.LoraSpec()
  fields = dict(dtype=c.dtype, param_dtype=c.param_dtype, remat=c.remat, lora=spec,
                scan_layers=c.scan_layers, attention=c.get("attention", "xla"))
  if c.model_dir:
    return hf_gemma3.read_config(c.model_dir, **fields)[0]
  logging.info("lm.model_dir is empty: compiling for MedGemma-4B's text model")
  return gemma3_config.medgemma_4b(**fields)


def stage2_program(config: Any, mesh: Mesh) -> Program:
  """The stage-2 align/finetune step: global ``train.batch_size`` × the longest bucket."""
  # pylint: disable=import-outside-toplevel
  from anatomix_jax.models import anatomix
  from anatomix_jax.stage2 import steps as stage2_steps

  rules = tuple(tuple(r) for r in config.sharding_rules)
  batch, seq = config.train.batch_size, max(config.data.buckets)
  sharding_lib.check_global_batch(batch, mesh, rules, process_count=1)
  lm = stage2_lm_config(config)
  model_config = anatomix.AnatomiXConfig(
      lm, image_token_id=lm.vocab_size - 1, first_object_token_id=lm.vocab_size - 1 - 36,
      image_dim=PAPER_IMAGE_DIM, object_dim=PAPER_OBJECT_DIM,
      projection_hidden=config.lm.projection_hidden,
      bidirectional_image=config.lm.bidirectional_image)
  model = anatomix.AnatomiX(model_config)
  groups = stage2_steps.PHASE_GROUPS[config.phase]
  tx = stage2_steps.make_optimizer(config.optim, max(config.train.num_steps, 1))
  boxed_train, boxed_frozen = stage2_steps.split(
      anatomix.abstract_variables(model_config)["params"], groups)
  shard = lambda tree: sharding_lib.logical_shardings(tree, mesh, rules)  # noqa: E731
  boxed_state = jax.eval_shape(lambda p: stage2_steps.init_state(p, tx), boxed_train)
  state_shardings, frozen_shardings = shard(boxed_state), shard(boxed_frozen)
  batch_sharding = sharding_lib.batch_sharding(mesh, rules)
  shapes = {"tokens": ((batch, seq), jnp.int32), "attention_mask": ((batch, seq), jnp.int32),
            "targets": ((batch, seq), jnp.int32), "weights": ((batch, seq), jnp.float32),
            "image_features": ((batch, PAPER_PATCHES, PAPER_IMAGE_DIM), jnp.float32),
            "object_features": ((batch, 36, PAPER_OBJECT_DIM), jnp.float32)}
  step = stage2_steps.make_train_step(model, tx, config.train.loss_chunk)
  fn = stage2_steps.jit_train_step(step, state_shardings, frozen_shardings, batch_sharding, mesh)
  model_flops = flops_lib.lm_step_flops(lm, batch, seq, trainable=groups)
  notes, hardware_flops = [], None
  if lm.scan_layers:
    # XLA's cost analysis counts a loop body once: the time estimate uses the analytic count of
    # what runs (dense masked attention, remat and chunked-loss recomputation; within 2% of XLA's
    # count of the unrolled MedGemma step) and leaves memory traffic out.
    hardware_flops = flops_lib.lm_step_flops(
        lm, batch, seq, trainable=groups, dense_attention=True, remat=lm.remat,
        recompute_logits=0 < config.train.loss_chunk < seq)
    notes.append("scanned layers: XLA counts the layer body once; the step time is the analytic "
                 "FLOPs over the peak (compute bound assumed), the bytes accessed cover one layer")
  return Program(f"stage2 {config.phase}", fn,
                 (_abstract(boxed_state, state_shardings), _abstract(boxed_frozen, frozen_shardings),
                  _abstract_batch(shapes, batch_sharding), _abstract_rng(mesh)),
                 ("state", "frozen", "batch", "rng"), model_flops, _context(mesh, rules), notes,
                 hardware_flops)


def per_device_bytes(tree: Any) -> int:
  """Bytes one device holds of a tree of sharded abstract arrays (the largest shard)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
  return total


def largest_arrays(program: Program, count: int = 5) -> list[dict]:
  """The arguments' largest per-device shards: path, global shape, dtype, sharding, bytes."""
  rows = []
  for name, arg in zip(program.arg_names, program.args):
    if name == "rng":
      continue
    for path, leaf in jax.tree_util.tree_flatten_with_path(arg)[0]:
      shard = leaf.sharding.shard_shape(leaf.shape)
      rows.append({"array": name + jax.tree_util.keystr(path), "shape": tuple(leaf.shape),
                   "dtype": str(jnp.dtype(leaf.dtype)), "spec": str(leaf.sharding.spec),
                   "bytes_per_device": math.prod(shard) * jnp.dtype(leaf.dtype).itemsize})
  return sorted(rows, key=lambda r: -r["bytes_per_device"])[:count]


def _argument_groups(program: Program) -> dict[str, int]:
  """Per-device bytes of the arguments by role: params, optimizer state, frozen params, batch."""
  out = {}
  for name, arg in zip(program.arg_names, program.args):
    if name == "state":
      out["params"] = per_device_bytes(arg.params)
      out["optimizer"] = per_device_bytes(arg.opt_state)
      if getattr(arg, "consts", None):  # stage 1's frozen BatchNorm statistics
        out["frozen"] = per_device_bytes(arg.consts)
    elif name != "rng":
      out[name] = per_device_bytes(arg)
  return out


_XLA_ALLOCATION = re.compile(r"^\s*\d+\. Size: .*$", re.MULTILINE)


def compile_program(program: Program, device: hardware.DeviceSpec | None = None) -> tuple[Any, float]:
  """Lowers and compiles; returns ``(compiled, seconds)``.

  Raises:
    DoesNotFitError: XLA reports the program exceeds the device memory (message: XLA's usage
      summary, its largest allocations, and the largest argument shards).
  """
  t0 = time.time()
  with program.context():
    lowered = program.fn.lower(*program.args)
  try:
    compiled = lowered.compile()
  except Exception as err:  # XLA raises XlaRuntimeError/JaxRuntimeError
    text = str(err)
    if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
      raise
    raise DoesNotFitError(_does_not_fit_message(program, text, device)) from err
  return compiled, time.time() - t0


def _does_not_fit_message(program: Program, xla_text: str, device: hardware.DeviceSpec | None
                          ) -> str:
  summary = next((line.strip() for line in xla_text.splitlines()
                  if "Used" in line and "of" in line and "hbm" in line.lower()),
                 xla_text.splitlines()[0][:300])
  allocations = _XLA_ALLOCATION.findall(xla_text)[:5]
  lines = [f"{program.name} does not fit"
           + (f" in {device.hbm_bytes / hardware.GiB:.1f} GiB per {device.chip.name} device"
              if device else "") + f": {summary}"]
  if allocations:
    lines.append("largest XLA allocations:")
    lines.extend("  " + a.strip() for a in allocations)
  lines.append("largest argument shards per device:")
  lines.extend(f"  {r['array']} {r['shape']} {r['dtype']} spec {r['spec']}: "
               f"{r['bytes_per_device'] / hardware.GiB:.2f} GiB" for r in largest_arrays(program))
  lines.append("shard more (a larger fsdp axis), enable remat (model.remat / lm.remat), or lower "
               "the global batch or sequence length")
  return "\n".join(lines)


def analyse(program: Program, compiled: Any, device: hardware.DeviceSpec, num_devices: int
            ) -> dict[str, Any]:
  """Memory, FLOPs and the roofline estimate of a compiled step (per device unless named global).

  ``total_gib`` = arguments + outputs − donated aliases + temporaries, as XLA allocates them.
  """
  memory = compiled.memory_analysis()
  kernels = op_bytes.kernel_ops(compiled.as_text())
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  total = (memory.argument_size_in_bytes + memory.output_size_in_bytes
           - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
  hw_flops, accessed = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
  model_flops = program.model_flops if program.model_flops is not None else hw_flops * num_devices
  executed = (program.hardware_flops / num_devices if program.hardware_flops is not None
              else hw_flops)
  estimate = hardware.roofline(executed, 0.0 if program.hardware_flops else accessed, device)
  gib = lambda b: round(b / hardware.GiB, 3)  # noqa: E731
  return {
      "program": program.name, "chip": device.chip.name, "devices": num_devices,
      "device_hbm_gib": gib(device.hbm_bytes),
      "by_role_bytes": _argument_groups(program),
      "arguments_gib": gib(memory.argument_size_in_bytes),
      "outputs_gib": gib(memory.output_size_in_bytes),
      "aliased_gib": gib(memory.alias_size_in_bytes),
      "temporaries_gib": gib(memory.temp_size_in_bytes),
      "total_gib": gib(total), "fits": bool(total <= device.hbm_bytes),
      "compiled_flops_per_device": hw_flops, "model_flops_per_step": model_flops,
      "executed_flops_per_device": executed,
      "bytes_accessed_gib_per_device": gib(accessed),
      "roofline_step_s": round(estimate["step_s"], 4), "bound": estimate["bound"],
      # What the bytes are: the largest kernels and the source ops that move the most data.
      "largest_ops": op_bytes.largest_ops(kernels, 8),
      "bytes_by_source": op_bytes.bytes_by_source(kernels),
      "mfu_estimate": round(model_flops / (num_devices * device.peak_flops * estimate["step_s"]), 3)
      if estimate["step_s"] else None,
      "notes": list(program.notes),
  }


def mesh_for(devices: Sequence[Any], mesh_cfg: Any) -> Mesh:
  """The config's mesh over compile-only devices (``-1`` resolved against their count)."""
  return sharding_lib.make_mesh(mesh_cfg, devices)


def check(config: Any, topology: str, *, require_fit: bool = True) -> dict[str, Any]:
  """Compiles the config's train step for ``topology`` and returns the report.

  Args:
    config: a stage-1 or stage-2 training config (its mesh, rules, batch, model options).
    topology: e.g. "v5e:2x4".
    require_fit: raise when the step exceeds a device's memory (else ``fits`` is False).

  Raises:
    ShardingError: the mesh does not divide the topology's devices, or the batch the data axes.
    DoesNotFitError: the step exceeds a device's memory.
  """
  devices, device = hardware.tpu_topology(topology)
  mesh = mesh_for(devices, config.mesh)
  build = {"stage1": stage1_program, "stage2": stage2_program}[config.stage]
  program = build(config, mesh)
  compiled, seconds = compile_program(program, device)
  report = {"topology": topology, "mesh": dict(mesh.shape),
            **analyse(program, compiled, device, len(devices)), "compile_s": round(seconds, 1)}
  if require_fit and not report["fits"]:
    raise DoesNotFitError(
        f"{program.name} needs {report['total_gib']} GiB per device on {topology}, the chip has "
        f"{report['device_hbm_gib']} GiB:\n" + "\n".join(
            f"  {r['array']} {r['shape']} {r['dtype']} spec {r['spec']}: "
            f"{r['bytes_per_device'] / hardware.GiB:.2f} GiB" for r in largest_arrays(program)))
  return report


def on_other_chip(report: dict[str, Any], chip: hardware.Chip) -> dict[str, Any]:
  """A report's per-device program on another chip with as many devices (e.g. 8×H100 from a v5e
  2x4 compile): the same memory and compiled costs, that chip's capacity, peak and bandwidth.

  An estimate: another backend lays out and fuses differently; TPU layouts pad minor dimensions
  to 128 lanes, so the memory is if anything an overestimate.
  """
  device = hardware.DeviceSpec(chip)
  n = report["devices"]
  scanned = report["executed_flops_per_device"] != report["compiled_flops_per_device"]
  estimate = hardware.roofline(
      report["executed_flops_per_device"],
      0.0 if scanned else report["bytes_accessed_gib_per_device"] * hardware.GiB, device)
  return {**report, "topology": f"{n}×{chip.name} (from {report['topology']})", "chip": chip.name,
          "device_hbm_gib": round(device.hbm_bytes / hardware.GiB, 3),
          "fits": report["total_gib"] * hardware.GiB <= device.hbm_bytes,
          "roofline_step_s": round(estimate["step_s"], 4), "bound": estimate["bound"],
          "mfu_estimate": round(report["model_flops_per_step"]
                                / (n * device.peak_flops * estimate["step_s"]), 3)}


def table(rows: Sequence[dict]) -> str:
  """Markdown table of reports (topology, mesh, options, GiB/device, TFLOPs, step time, MFU)."""
  head = ("| program | topology | mesh | options | GiB/device (of HBM) | model TFLOPs/step | "
          "roofline step s | bound | MFU est. |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    mesh = "×".join(f"{k}{v}" for k, v in r["mesh"].items() if v > 1) or "1"
    fit = "" if r.get("fits", True) else " **does not fit**"
    lines.append(f"| {r['program']} | {r['topology']} | {mesh} | {r.get('options', '')} | "
                 f"{r['total_gib']:.1f} ({r['device_hbm_gib']:.0f}){fit} | "
                 f"{r['model_flops_per_step'] / 1e12:.1f} | {r['roofline_step_s']:.3f} | {r['bound']} | "
                 f"{r['mfu_estimate']:.2f} |")
  return "\n".join(lines)

