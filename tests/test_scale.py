"""Scale-out tooling: the analytic FLOPs against XLA's count, the roofline, the compile-check report
(memory by role against the shardings computed here), and ahead-of-time TPU compiles (libtpu)."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from anatomix_jax.models import gemma3, lora as lora_lib
from anatomix_jax.aot import compile_check, flops, hardware
from anatomix_jax.core import sharding as sharding_lib
from configs import stage1, stage2_finetune

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu not installed (pip install -e .[tpu])")

# 7 layers (5 sliding + 1 full + 1 sliding), a window shorter than the sequence, GQA.
LM = gemma3.Gemma3Config(vocab_size=1031, hidden_size=256, intermediate_size=768,
                         num_hidden_layers=7, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=64, sliding_window=61)


def _xla_flops(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def test_attended_keys_by_hand():
  # 4 queries, window 2: they see 1, 2, 2, 2 keys; causal without window 1, 2, 3, 4; dense 4 each.
  assert flops.attended_keys(4, 2, dense=False) == pytest.approx(7 / 4)
  assert flops.attended_keys(4, None, dense=False) == pytest.approx(10 / 4)
  assert flops.attended_keys(4, 2, dense=True) == 4.0
  assert flops.attended_keys(3, 8, dense=False) == pytest.approx(6 / 3)  # window > sequence


@pytest.mark.parametrize("rank", [0, 8])
def test_forward_flops_match_xla(rank):
  """Forward FLOPs by formula (dense attention: what the masked kernel computes) vs XLA's count of
  the compiled forward; XLA also counts norms/softmax/GELU, a percent or two at this width."""
  config = gemma3.Gemma3Config(**{**LM.__dict__, "lora": lora_lib.LoraSpec(rank=rank)})
  b, t = 2, 256

  def forward(params, tokens):
    mask = jnp.ones_like(tokens)
    return gemma3.Gemma3(config).apply({"params": params}, tokens, attention_mask=mask,
                                       positions=gemma3.positions_from_mask(mask))[0]

  xla = _xla_flops(forward, gemma3.abstract_params(config), jax.ShapeDtypeStruct((b, t), jnp.int32))
  formula = flops.lm_step_flops(config, b, t, train=False, dense_attention=True)
  assert formula == pytest.approx(xla, rel=0.03)
  # Hand count of one term: the logits matmul alone is 2·H·V per token.
  assert flops.lm_step_flops(config, b, t, train=False) - flops.lm_step_flops(
      gemma3.Gemma3Config(**{**config.__dict__, "vocab_size": 1}), b, t, train=False) == (
          2 * 256 * 1030 * b * t)


@pytest.mark.parametrize("remat", [False, True])
def test_train_flops_match_xla(remat):
  """LoRA + embedding training (the finetune step's gradient pattern): formula vs XLA's count,
  with and without the layers' recomputation."""
  config = gemma3.Gemma3Config(**{**LM.__dict__, "lora": lora_lib.LoraSpec(rank=8),
                                  "remat": remat})
  b, t = 2, 256
  params = gemma3.abstract_params(config)
  is_trainable = lambda path: (path[-1].key in lora_lib.LORA_LEAVES  # noqa: E731
                               or path[-1].key == "embedding")
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  trainable = {jax.tree_util.keystr(p): x for p, x in flat if is_trainable(p)}
  frozen = {jax.tree_util.keystr(p): x for p, x in flat if not is_trainable(p)}
  treedef = jax.tree.structure(params)

  def loss(trainable, frozen, tokens):
    merged = jax.tree.unflatten(treedef, [
        {**trainable, **frozen}[jax.tree_util.keystr(p)] for p, _ in flat])
    mask = jnp.ones_like(tokens)
    logits = gemma3.Gemma3(config).apply({"params": merged}, tokens, attention_mask=mask,
                                         positions=gemma3.positions_from_mask(mask))[0]
    return jnp.mean(jax.nn.logsumexp(logits, -1))

  xla = _xla_flops(jax.grad(loss), trainable, frozen, jax.ShapeDtypeStruct((b, t), jnp.int32))
  formula = flops.lm_step_flops(config, b, t, trainable=("lora", "embedding"),
                                dense_attention=True, remat=remat)
  assert formula == pytest.approx(xla, rel=0.04)
  if remat:  # the extra work is exactly one forward of the layers (the logits are not recomputed)
    layers_forward = (flops.lm_step_flops(config, b, t, train=False, dense_attention=True)
                      - 2 * LM.hidden_size * LM.vocab_size * b * t)
    assert formula - flops.lm_step_flops(config, b, t, dense_attention=True) == pytest.approx(
        layers_forward)
  full = flops.lm_step_flops(config, b, t, trainable=("base", "lora", "embedding"),
                             dense_attention=True, remat=remat)
  assert full > formula  # weight gradients of the frozen base are extra work


def test_roofline_by_hand():
  device = hardware.DeviceSpec(hardware.CHIPS["v5e"])
  out = hardware.roofline(197e12, 819e9 / 2, device)
  assert out["compute_s"] == pytest.approx(1.0) and out["memory_s"] == pytest.approx(0.5)
  assert out["step_s"] == pytest.approx(1.0) and out["bound"] == "compute"
  half = hardware.DeviceSpec(hardware.CHIPS["v4"], per_chip=2)  # v4 TensorCores as devices
  assert half.peak_flops == 137.5e12 and half.hbm_bytes == 16 * hardware.GiB


def test_topology_errors():
  with pytest.raises(ValueError, match="GENERATION:AxB"):
    hardware.tpu_topology("v9z:2x4")
  with pytest.raises(ValueError, match="GENERATION:AxB"):
    hardware.tpu_topology("v5e-8")
  with pytest.raises(ValueError, match="no published figures"):
    hardware.chip_of("TPU v99")


def test_topology_without_libtpu(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "libtpu" else real(name, *a))
  with pytest.raises(RuntimeError, match=r"needs libtpu: pip install -e '\.\[tpu\]'"):
    hardware.tpu_topology("v5e:2x4")


def _demo_stage1(mesh_shape=(-1, 1, 1), batch=16):
  c = stage1.get_config("demo")
  c.mesh.shape, c.train.batch_size = mesh_shape, batch
  return c


def test_report_on_cpu_devices():
  """The report's per-role bytes equal the shards computed here from the param shapes and the
  mesh (FSDP over 8 devices: dimensions 8 divides are split, the rest replicated)."""
  config = _demo_stage1((1, -1, 1))
  mesh = compile_check.mesh_for(jax.devices(), config.mesh)
  program = compile_check.stage1_program(config, mesh)
  compiled, _ = compile_check.compile_program(program)
  device = hardware.DeviceSpec(hardware.CHIPS["v5e"])
  report = compile_check.analyse(program, compiled, device, len(jax.devices()))
  state = program.args[0]
  expected_params = 0
  for leaf in jax.tree.leaves(state.params):
    spec = leaf.sharding.spec
    shard = [d // (math.prod(mesh.shape[a] for a in ((s,) if isinstance(s, str) else s))
                   if s else 1) for d, s in zip(leaf.shape, tuple(spec) + (None,) * leaf.ndim)]
    expected_params += math.prod(shard) * 4
  assert report["by_role_bytes"]["params"] == expected_params
  n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))
  assert expected_params < n_params * 4  # something is sharded
  # The batch is split over the 8 devices: 2 images of 128² float32 each, plus the small arrays.
  assert report["by_role_bytes"]["batch"] >= 2 * 128 * 128 * 4
  assert report["fits"] and report["total_gib"] > report["temporaries_gib"] > 0
  assert "| stage1 train |" in compile_check.table([{**report, "topology": "cpu:8",
                                                     "mesh": dict(mesh.shape)}])


def test_bad_layouts_fail_before_compiling():
  with pytest.raises(sharding_lib.ShardingError, match="does not divide"):
    compile_check.mesh_for(jax.devices(), _demo_stage1((3, 1, 1)).mesh)
  mesh = compile_check.mesh_for(jax.devices(), _demo_stage1().mesh)
  with pytest.raises(sharding_lib.ShardingError, match="not divisible"):
    compile_check.stage1_program(_demo_stage1(batch=12), mesh)


def _tiny_stage2(tmp_path, vocab_size=LM.vocab_size, num_layers=LM.num_hidden_layers, **lm):
  """The finetune config around a tiny LM (``LM``'s first ``num_layers`` layers)."""
  model_dir = tmp_path / "lm"
  model_dir.mkdir(parents=True)
  hf = {**LM.to_hf_dict(), "vocab_size": vocab_size, "num_hidden_layers": num_layers,
        "layer_types": list(LM.layer_types[:num_layers])}
  (model_dir / "config.json").write_text(json.dumps(hf))
  c = stage2_finetune.get_config()
  c.lm.model_dir = str(model_dir)
  c.lm.update(lm)
  c.data.buckets, c.train.batch_size = (1031, 1291), 8
  return c


@needs_libtpu
@pytest.mark.parametrize("scan", [False, True])
def test_tpu_compile_stage2(tmp_path, scan):
  """Real ahead-of-time compiles of a tiny stage-2 finetune step (remat, fsdp over a v5e 2x4
  slice): unrolled layers take XLA's FLOP count, scanned ones the formula (and say so)."""
  devices, device = hardware.tpu_topology("v5e:2x4")
  assert len(devices) == 8 and device.chip.name == "v5e"
  # Unrolled compiles grow with depth (~1 minute for 2 layers here), so that case keeps 2.
  config = _tiny_stage2(tmp_path, num_layers=7 if scan else 2, scan_layers=scan)
  report = compile_check.check(config, "v5e:2x4")
  assert report["program"] == "stage2 finetune" and report["fits"]
  assert report["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}  # the paper config's default
  lm = compile_check.stage2_lm_config(config)
  assert lm.remat and lm.num_hidden_layers == (7 if scan else 2)
  assert report["model_flops_per_step"] == pytest.approx(flops.lm_step_flops(lm, 8, 1291),
                                                         rel=1e-3)
  assert bool(report["notes"]) == scan


@needs_libtpu
def test_tpu_does_not_fit_names_the_largest_tensors(tmp_path):
  """Full float32 logits of a 262k vocabulary for 16 rows × 1,291 tokens per device: 21.7 GB alone,
  more than a v5e's 16 GiB; the error names the largest shards. (At 8 rows XLA fuses enough of the
  softmax to fit in 12.6 GiB.)"""
  config = _tiny_stage2(tmp_path, vocab_size=262_208, remat=False)
  config.train.update(dict(batch_size=128, loss_chunk=0))
  with pytest.raises(compile_check.DoesNotFitError) as err:
    compile_check.check(config, "v5e:2x4")
  text = str(err.value)
  assert "does not fit" in text or "needs" in text
  assert "state.params['lm']['embedder']['embedding'] (262208, 256) float32" in text


@needs_libtpu
def test_main_compile_check(tmp_path):
  """The command line: the demo APM's train step compiled for a v5e 2x4 slice (data over 8)."""
  out = subprocess.run(
      [sys.executable, "-m", "anatomix_jax.main", "--config=configs/stage1.py:demo",
       f"--workdir={tmp_path}", "--mode=compile_check", "--topology=v5e:2x4"],
      cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads((tmp_path / "compile_check.json").read_text())
  assert report["topology"] == "v5e:2x4" and report["devices"] == 8 and report["fits"]
  assert report["device_hbm_gib"] == 16.0 and report["mesh"]["data"] == 8
  assert "| stage1 train | v5e:2x4 |" in out.stdout


def test_main_compile_check_needs_topology(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "anatomix_jax.main", "--config=configs/stage1.py:demo",
       f"--workdir={tmp_path}", "--mode=compile_check"],
      cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert out.returncode != 0 and "needs --topology" in out.stderr
