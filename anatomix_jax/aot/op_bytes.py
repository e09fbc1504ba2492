"""Where a compiled step's memory traffic goes: its largest operations by bytes, from the HLO.

XLA's cost analysis gives one "bytes accessed" total per program; to say *why* a step is memory-
bound, ``kernel_ops`` reads the optimized HLO text (``compiled.as_text()``) and, for every
operation the device executes as one kernel (a fusion, convolution, dot, custom call such as a
Pallas kernel, copy, collective — the instructions of the entry computation and of loop bodies,
not those inside a fusion), adds the bytes of its operands and results as the HLO types state
them. A kernel reads each operand and writes each result at least once, so this is a lower bound
per operation (tiled-layout padding not counted); an instruction inside a loop body is counted
once, like XLA's own analysis of scanned layers. Each row names the framework op it came from
(the ``op_name`` metadata: the JAX function and module path).
"""

from __future__ import annotations

import math
import re
from typing import Any

DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
               "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8,
               "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b(" + "|".join(sorted(DTYPE_BYTES, key=len, reverse=True))
                    + r")\[([0-9,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")
# A computation's header starts at column 0 (its instructions are indented); its parameter list
# may hold ``/*index=5*/`` comments, so an "=" does not tell a header from an instruction.
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_CALLS = re.compile(r"(?:calls|to_apply)=%?([\w.\-]+)")
_OPERAND = re.compile(r"%([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# Bookkeeping that moves no data (or whose data the consuming kernel already counts).
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
         "partition-id", "replica-id", "iota", "while", "conditional", "call", "opt-barrier",
         "copy-done", "all-gather-done", "all-reduce-done", "collective-permute-done",
         "async-done", "send-done", "recv-done"}


def shape_bytes(text: str) -> int:
  """Bytes of every array type in ``text`` (e.g. ``(f32[2,3]{1,0}, bf16[4])`` → 32)."""
  return int(sum(DTYPE_BYTES[d] * math.prod(int(x) for x in dims.split(",") if x)
                 for d, dims in _SHAPE.findall(text)))


def _operand_text(rest: str) -> str:
  """The operand list of ``op(operands), attributes``: up to the matching parenthesis."""
  depth = 1
  for i, ch in enumerate(rest):
    depth += {"(": 1, ")": -1}.get(ch, 0)
    if depth == 0:
      return rest[:i]
  return rest


def kernel_ops(hlo_text: str) -> list[dict[str, Any]]:
  """Every executed operation of an optimized HLO module with its bytes.

  Returns:
    dicts with ``name``, ``opcode``, ``result`` (the result type text), ``bytes`` (operands +
    results), ``op_name`` (the source op, may be "").
  """
  lines = hlo_text.splitlines()
  fused, results = set(), {}  # computations run inside a kernel; every instruction's result bytes
  for line in lines:
    fused.update(_CALLS.findall(line))
    match = _INSTRUCTION.match(line)
    if match:
      results[match.group(1)] = shape_bytes(match.group(2))
  rows, inside = [], None
  for line in lines:
    head = _COMPUTATION.match(line)
    if head:
      inside = head.group(2)
      continue
    if inside is None or inside in fused:
      continue
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, result, opcode, rest = match.groups()
    if opcode in _FREE:
      continue
    operands = _operand_text(rest)
    # Operands are typed in some HLO dialects (``f32[2] %x``), bare names in others (``%x``).
    read = shape_bytes(operands) or sum(results.get(n, 0) for n in _OPERAND.findall(operands))
    op_name = _OP_NAME.search(rest)
    rows.append({"name": name, "opcode": opcode, "result": result.strip(),
                 "bytes": shape_bytes(result) + read,
                 "op_name": op_name.group(1) if op_name else ""})
  return rows


def largest_ops(rows: list[dict[str, Any]], count: int = 8) -> list[dict[str, Any]]:
  """The ``count`` operations of ``rows`` (``kernel_ops``) with the most bytes, each with its
  share of all operations'."""
  total = sum(r["bytes"] for r in rows) or 1
  top = sorted(rows, key=lambda r: -r["bytes"])[:count]
  return [{**r, "share": round(r["bytes"] / total, 4)} for r in top]


def bytes_by_source(rows: list[dict[str, Any]], depth: int = 3, count: int = 8
                    ) -> list[dict[str, Any]]:
  """Bytes of ``rows`` (``kernel_ops``) summed by source op (the last ``depth`` parts of
  ``op_name``, e.g. the module path and primitive), largest first: which layers and primitives
  move the data."""
  sums: dict[str, int] = {}
  for r in rows:
    key = "/".join(r["op_name"].split("/")[-depth:]) or r["opcode"]
    sums[key] = sums.get(key, 0) + r["bytes"]
  total = sum(sums.values()) or 1
  return [{"source": k, "bytes": v, "share": round(v / total, 4)}
          for k, v in sorted(sums.items(), key=lambda kv: -kv[1])[:count]]
