"""aot.op_bytes: bytes per executed HLO operation, against hand-counted HLO modules."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from anatomix_jax.aot import op_bytes

# Both operand dialects: bare names (XLA:CPU's text) and typed operands (TPU's); a fusion body,
# a reduction region and a while loop whose body holds a convolution.
HLO = """HloModule jit_step

%fused_computation (p0: f32[64,32], p1: f32[32,16]) -> f32[64,16] {
  %p0 = f32[64,32]{1,0} parameter(0)
  %p1 = f32[32,16]{1,0} parameter(1)
  ROOT %dot.9 = f32[64,16]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%region_add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %add.3 = f32[] add(%a, %b)
}

%body (state: (s32[], bf16[2,8,8,4], /*index=2*/f32[])) -> (s32[], bf16[2,8,8,4]) {
  %state = (s32[], bf16[2,8,8,4]{3,2,1,0}) parameter(0)
  %x = bf16[2,8,8,4]{3,2,1,0} get-tuple-element(%state), index=1
  %w = bf16[3,3,4,4]{3,2,1,0} constant({...})
  %conv.1 = bf16[2,8,8,4]{3,2,1,0:T(8,128)(2,1)} convolution(bf16[2,8,8,4]{3,2,1,0} %x, bf16[3,3,4,4]{3,2,1,0} %w), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, metadata={op_name="jit(step)/ResNet/conv2/conv_general_dilated"}
  %i = s32[] get-tuple-element(%state), index=0
  ROOT %t = (s32[], bf16[2,8,8,4]{3,2,1,0}) tuple(%i, %conv.1)
}

ENTRY %main (x: f32[64,32], w: f32[32,16]) -> f32[16] {
  %x = f32[64,32]{1,0} parameter(0)
  %w = f32[32,16]{1,0} parameter(1)
  %zero = f32[] constant(0)
  %fusion.2 = f32[64,16]{1,0} fusion(%x, %w), kind=kOutput, calls=%fused_computation, metadata={op_name="jit(step)/Dense/dot_general"}
  %reduce.4 = f32[16]{0} reduce(%fusion.2, %zero), dimensions={0}, to_apply=%region_add, metadata={op_name="jit(step)/reduce_sum"}
  ROOT %copy.5 = f32[16]{0} copy(%reduce.4)
}
"""


def test_kernel_ops_count_operands_and_results_by_hand():
  rows = {r["name"]: r for r in op_bytes.kernel_ops(HLO)}
  # Fusion bodies and reduction regions run inside their kernel: not listed.
  assert set(rows) == {"conv.1", "fusion.2", "reduce.4", "copy.5"}
  assert rows["fusion.2"]["bytes"] == 64 * 32 * 4 + 32 * 16 * 4 + 64 * 16 * 4
  assert rows["reduce.4"]["bytes"] == 64 * 16 * 4 + 4 + 16 * 4
  assert rows["copy.5"]["bytes"] == 16 * 4 * 2
  assert rows["conv.1"]["bytes"] == 2 * (2 * 8 * 8 * 4) * 2 + 3 * 3 * 4 * 4 * 2  # bf16, typed
  assert rows["conv.1"]["op_name"] == "jit(step)/ResNet/conv2/conv_general_dilated"


def test_largest_ops_and_sources_share_the_total():
  total = 14336 + 4164 + 128 + 2336
  rows = op_bytes.kernel_ops(HLO)
  top = op_bytes.largest_ops(rows, 2)
  assert [r["name"] for r in top] == ["fusion.2", "reduce.4"]
  assert top[0]["share"] == round(14336 / total, 4)
  sources = op_bytes.bytes_by_source(rows, depth=2)
  assert sources[0] == {"source": "Dense/dot_general", "bytes": 14336,
                        "share": round(14336 / total, 4)}
  assert {s["source"] for s in sources} == {"Dense/dot_general", "jit(step)/reduce_sum", "copy",
                                            "conv2/conv_general_dilated"}


def test_a_compiled_program_moves_at_least_its_arguments_and_results():
  def step(x, w):
    return jnp.tanh(x @ w).sum(0)
  x, w = jnp.ones((128, 64)), jnp.ones((64, 32))
  rows = op_bytes.kernel_ops(jax.jit(step).lower(x, w).compile().as_text())
  assert sum(r["bytes"] for r in rows) >= x.nbytes + w.nbytes + 32 * 4
  assert all(r["bytes"] > 0 for r in rows)
