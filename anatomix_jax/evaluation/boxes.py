"""Boxes in generated text, in this project's format and the peers' (FIELD.md §2, REFERENCE.md §5).

Every format is read into (and written from) xyxy float pixels of the 1024×1024 letterboxed canvas
(``instruct.schema.CANVAS``), so one scorer compares all systems, as the reference's
``benchmarking/get_results.py`` does with its per-model scales:

  =========  ====================================================  ===========  =================
  format     text                                                  grid         source
  =========  ====================================================  ===========  =================
  anatomix   ``<ref>p</ref><box>(x1,y1),(x2,y2)</box>``            canvas px    AnatomiX (ours)
  chexagent  ``<|ref|>p<|/ref|><|box|>(x1,y1),(x2,y2)<|/box|>``    0–100        CheXagent
  radvlm     ``p [x1, y1, x2, y2]``                                0–1 floats   RadVLM
  maira2     ``<obj>p</obj><box><xN><yN><xN><yN></box>`` or        100 bins /   MAIRA-2 tokens /
             ``p (x1, y1, x2, y2)``                                0–1 floats   its processor out
  medrega    ``<ref>p</ref><box>[[x1, y1, x2, y2], …]</box>``      0–999 ints   MedRegA
  paligemma  ``<locY1><locX1><locY2><locX2> p`` (``;`` between)   1024 bins    PaliGemma
  =========  ====================================================  ===========  =================

Labels follow the reference's ``extract_bounding_boxes_and_refs``: for tag formats, the last
``<ref>`` between the previous box and this one, else the visible text there (tags removed,
whitespace collapsed); for bracket formats, the text before the box on its line. Malformed boxes
(an unclosed tag, not four numbers) are skipped, never an error; corners are kept as written, so a
reversed box scores IoU 0. Bins are read at their centres ((b + 0.5) / bins) for MAIRA-2's
100 bins, and as b / 1024 for PaliGemma's ``<loc>`` tokens (its documented convention).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np

from anatomix_jax.instruct.schema import CANVAS

FORMATS = ("anatomix", "chexagent", "radvlm", "maira2", "medrega", "paligemma")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_TAGGED = {  # format → (box pattern, ref pattern, grid size)
    "anatomix": (re.compile(r"<box>\s*\((.*?)\)\s*</box>", re.DOTALL),
                 re.compile(r"<ref>(.*?)</ref>", re.DOTALL), None),
    "chexagent": (re.compile(r"<\|box\|>\s*\((.*?)\)\s*<\|/box\|>", re.DOTALL),
                  re.compile(r"<\|ref\|>(.*?)<\|/ref\|>", re.DOTALL), 100),
    "medrega": (re.compile(r"<box>\s*\[(\s*\[.*?\]\s*(?:,\s*\[.*?\]\s*)*)\]\s*</box>", re.DOTALL),
                re.compile(r"<ref>(.*?)</ref>", re.DOTALL), 999),
}
_RADVLM = re.compile(r"(.*?)(\[\s*[-\d.,\s]+\s*\])")
_MAIRA_TUPLE = re.compile(r"(.*?)(\(\s*[-\d.,\s]+\s*\))")
_MAIRA_TOKENS = re.compile(r"<box>\s*<x(\d+)>\s*<y(\d+)>\s*<x(\d+)>\s*<y(\d+)>\s*</box>")
_MAIRA_OBJ = re.compile(r"<obj>(.*?)</obj>", re.DOTALL)
_MAIRA_BINS = 100
_PALIGEMMA = re.compile(r"((?:<loc\d{4}>){4})([^;<]*)")
_PALIGEMMA_BINS = 1024
_TAG = re.compile(r"<.*?>", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class Grounding:
  """Boxes found in a text.

  Attributes:
    boxes: float32 [K, 4] xyxy canvas pixels (K may be 0).
    labels: K phrases ("" where the text gives none).
  """

  boxes: np.ndarray
  labels: tuple[str, ...]


def _grounding(boxes: list[list[float]], labels: list[str]) -> Grounding:
  return Grounding(np.asarray(boxes, np.float32).reshape(-1, 4), tuple(labels))


def _visible(text: str) -> str:
  return " ".join(_TAG.sub("", text).split())


def _parse_tagged(text: str, fmt: str, canvas: int) -> Grounding:
  box_re, ref_re, grid = _TAGGED[fmt]
  scale = 1.0 if grid is None else canvas / grid
  boxes, labels, last_end = [], [], 0
  for m in box_re.finditer(text):
    context = text[last_end:m.start()]
    last_end = m.end()
    groups = ([g for g in re.findall(r"\[([^\[\]]*)\]", m.group(1))] if fmt == "medrega"
              else [m.group(1)])
    refs = ref_re.findall(context)
    label = refs[-1].strip() if refs else _visible(context)
    for group in groups:
      nums = _NUMBER.findall(group)
      if len(nums) != 4:
        continue
      boxes.append([float(n) * scale for n in nums])
      labels.append(label)
  return _grounding(boxes, labels)


def _parse_bracketed(text: str, pattern: re.Pattern, scale: float) -> Grounding:
  boxes, labels = [], []
  for m in pattern.finditer(text):
    nums = _NUMBER.findall(m.group(2))
    if len(nums) != 4:
      continue
    boxes.append([float(n) * scale for n in nums])
    labels.append(" ".join(_TAG.sub("", m.group(1)).split()))
  return _grounding(boxes, labels)


def _parse_maira_tokens(text: str, canvas: int) -> Grounding:
  boxes, labels, last_end = [], [], 0
  for m in _MAIRA_TOKENS.finditer(text):
    context = text[last_end:m.start()]
    last_end = m.end()
    objs = _MAIRA_OBJ.findall(context)
    boxes.append([(int(b) + 0.5) / _MAIRA_BINS * canvas for b in m.groups()])
    labels.append(objs[-1].strip() if objs else _visible(context))
  return _grounding(boxes, labels)


def _parse_paligemma(text: str, canvas: int) -> Grounding:
  boxes, labels = [], []
  for m in _PALIGEMMA.finditer(text):
    y1, x1, y2, x2 = (int(v) for v in re.findall(r"<loc(\d{4})>", m.group(1)))
    boxes.append([v / _PALIGEMMA_BINS * canvas for v in (x1, y1, x2, y2)])
    labels.append(m.group(2).strip())
  return _grounding(boxes, labels)


def parse(text: str, fmt: str = "anatomix", canvas: int = CANVAS) -> Grounding:
  """The boxes of ``text`` written in format ``fmt`` (see the module docstring)."""
  if fmt not in FORMATS:
    raise ValueError(f"box format {fmt!r} is not one of {FORMATS}")
  text = text or ""
  if fmt in _TAGGED:
    return _parse_tagged(text, fmt, canvas)
  if fmt == "radvlm":
    return _parse_bracketed(text, _RADVLM, canvas)
  if fmt == "maira2":
    tokens = _parse_maira_tokens(text, canvas)
    return tokens if len(tokens.boxes) else _parse_bracketed(text, _MAIRA_TUPLE, canvas)
  return _parse_paligemma(text, canvas)


def render(labels: Sequence[str], boxes: np.ndarray, fmt: str = "anatomix",
           canvas: int = CANVAS) -> str:
  """Writes canvas boxes [K, 4] with their labels in format ``fmt`` (the inverse of ``parse``,
  up to the format's quantisation)."""
  if fmt not in FORMATS:
    raise ValueError(f"box format {fmt!r} is not one of {FORMATS}")
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  if len(labels) != len(boxes):
    raise ValueError(f"{len(labels)} labels for {len(boxes)} boxes")
  unit = boxes / canvas
  parts = []
  for label, box, u in zip(labels, boxes, unit):
    if fmt == "anatomix":
      x1, y1, x2, y2 = (int(v) for v in box)  # truncation, as the reference writes boxes
      parts.append(f"<ref>{label}</ref><box>({x1},{y1}),({x2},{y2})</box>")
    elif fmt == "chexagent":
      x1, y1, x2, y2 = (int(round(v * 100)) for v in u)
      parts.append(f"<|ref|>{label}<|/ref|><|box|>({x1},{y1}),({x2},{y2})<|/box|>")
    elif fmt == "radvlm":
      parts.append(f"{label} [{', '.join(f'{v:.2f}' for v in u)}]")
    elif fmt == "maira2":
      b = np.clip(np.floor(u * _MAIRA_BINS), 0, _MAIRA_BINS - 1).astype(int)
      parts.append(f"<obj>{label}</obj><box><x{b[0]}><y{b[1]}><x{b[2]}><y{b[3]}></box>")
    elif fmt == "medrega":
      x1, y1, x2, y2 = (int(round(v * 999)) for v in u)
      parts.append(f"<ref>{label}</ref><box>[[{x1}, {y1}, {x2}, {y2}]]</box>")
    else:  # paligemma
      b = np.clip(np.round(u * _PALIGEMMA_BINS), 0, _PALIGEMMA_BINS - 1).astype(int)
      parts.append(f"<loc{b[1]:04d}><loc{b[0]:04d}><loc{b[3]:04d}><loc{b[2]:04d}> {label}")
  return (" ; " if fmt == "paligemma" else "\n" if fmt == "radvlm" else " ").join(parts)
