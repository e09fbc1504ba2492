"""The left/right flip test of ``--mode=eval`` (``evaluate.flip``): every test record mirrored.

A mirrored test record is what the same study would be if the patient were mirrored, labelled as
radiologists label it — left and right follow the anatomy as it now appears:

* image: the model input (letterboxed to the canvas, stretched, resized) flipped left–right with
  the training augmentation's :func:`anatomix_jax.data.augment.hflip`. The letterbox pads both
  sides equally, so this is also the letterbox of the mirrored original image;
* boxes (the record's ``boxes`` and every ``<box>(x1,y1),(x2,y2)</box>`` in its texts), xyxy on the
  1024 canvas: ``x1' = CANVAS − x2``, ``x2' = CANVAS − x1``, y unchanged
  (:func:`anatomix_jax.data.augment.hflip_boxes`); an all-zero box (an absent anatomy) stays zero;
* texts (instructions and responses): the words "left" and "right" swap, case kept ("Left pleural
  effusion" → "Right pleural effusion"; "bright", "upright" untouched; "left-sided" →
  "right-sided"), and an anatomy name whose partner is not its word swap becomes the partner's
  name ("Right border of heart viewed radiologically" ↔ "Structure of left margin of heart");
* anatomies (``meta.anatomy`` / ``meta.anatomy_index``): a sided anatomy becomes its partner
  (:data:`MIRROR_INDEX`: left lung ↔ right lung, left ↔ right cardiac silhouette, ...), a
  midline one stays (trachea, mediastinum, spine, ...). The right atrium has no partner among
  the 36 (there is no "left atrium" query): its records are left out of the flip test.

So on a mirrored image the truth for "left lung" is the mirrored box of the original RIGHT lung.
NB: this is not what the reference's training augmentation does — its flip keeps each box's
anatomy label (``augment.hflip``: "right lung" is supervised at the mirrored position), and text
tasks are not flipped at all (coordinate tasks are not augmented, ``schema.NO_AUG_TASKS``). The
evaluation therefore also reports the APM's IoU against the label-kept truth
(``apm_anatomy_iou_unswapped``, ``evaluation.scoring``).

Each mirrored record keeps its id and is pinned to the instruction and response variant that its
original sample drew (:func:`pin_variant`), so original and mirrored samples ask the same question.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from anatomix_jax import anatomy
from anatomix_jax.data import augment as augment_lib
from anatomix_jax.instruct import schema
from anatomix_jax.stage2 import prompt

SAMPLES = "samples_mirrored.jsonl"
_SIDES = {"left": "right", "right": "left"}
_BOX = re.compile(r"<box>\s*\(\s*(-?\d+)\s*,\s*(-?\d+)\s*\)\s*,\s*\(\s*(-?\d+)\s*,\s*(-?\d+)\s*\)"
                  r"\s*</box>")


def _swap_word(word: str) -> str:
  other = _SIDES[word.lower()]
  if word.isupper():
    return other.upper()
  if word[0].isupper():
    return other.capitalize()
  return other


def swap_side_words(text: str) -> str:
  """``left`` ↔ ``right`` as whole words, case kept; nothing else changes."""
  return re.sub(r"(?i)\b(left|right)\b", lambda m: _swap_word(m.group(0)), text)


def _mirror_indices() -> tuple[int | None, ...]:
  out: list[int | None] = []
  for a in anatomy.ANATOMIES:
    swapped = swap_side_words(a.bbox_name)
    if swapped == a.bbox_name:
      out.append(a.index)  # midline: no side word
    else:
      out.append(anatomy.BBOX_NAME_TO_INDEX.get(swapped))  # None: no partner (right atrium)
  return tuple(out)


# Anatomy i of an image is anatomy MIRROR_INDEX[i] of the mirrored image (None: no partner).
MIRROR_INDEX: tuple[int | None, ...] = _mirror_indices()
assert all(j is None or MIRROR_INDEX[j] == i for i, j in enumerate(MIRROR_INDEX))


def mirror_anatomy(index: int) -> int | None:
  """The anatomy index on the mirrored image (itself for midline anatomies; None: no partner)."""
  return MIRROR_INDEX[index]


def _name_pairs() -> dict[str, str]:
  """Anatomy names whose partner's name is not their side-word swap (exact and lower case)."""
  pairs = {}
  for i, j in enumerate(MIRROR_INDEX):
    if j is None or j == i:
      continue
    for field in ("name", "display", "bbox_name"):
      mine, theirs = getattr(anatomy.ANATOMIES[i], field), getattr(anatomy.ANATOMIES[j], field)
      if swap_side_words(mine) != theirs:
        pairs[mine] = theirs
        pairs[mine.lower()] = theirs.lower()
  return pairs


_NAME_PAIRS = _name_pairs()
_TEXT = re.compile("|".join(
    [f"(?P<box>{_BOX.pattern})"]
    + ([f"(?P<name>{'|'.join(re.escape(n) for n in sorted(_NAME_PAIRS, key=len, reverse=True))})"]
       if _NAME_PAIRS else [])
    + [r"(?P<side>\b(?i:left|right)\b)"]))


def mirror_boxes(boxes: Any, width: float = schema.CANVAS) -> np.ndarray:
  """float64 ``[N, 4]`` xyxy boxes mirrored (``augment.hflip_boxes``); all-zero rows stay zero."""
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  out = augment_lib.hflip_boxes(boxes, width, dtype=np.float64)
  absent = ~boxes.any(axis=1)
  out[absent] = 0.0
  return out


def mirror_text(text: str, width: float = schema.CANVAS) -> str:
  """A text as the mirrored image's: boxes mirrored, side words and anatomy names swapped."""
  def one(m: re.Match) -> str:
    if m.group("box") is not None:
      box = [float(v) for v in m.groups()[1:5]]
      return schema.boxed(mirror_boxes(box, width)[0])
    if m.lastgroup == "name":
      return _NAME_PAIRS[m.group(0)]
    return _swap_word(m.group(0))

  return _TEXT.sub(one, text)


def _anatomy_of(meta: Mapping[str, Any]) -> int | None:
  if "anatomy_index" in meta:
    return int(meta["anatomy_index"])
  value = meta.get("anatomy")
  if value is None:
    return None
  if isinstance(value, (int, np.integer)):
    return int(value)
  try:
    return anatomy.lookup(str(value))
  except KeyError:  # not one of the 36: the record's texts are mirrored, its meta kept
    return None


def mirror_record(record: Mapping[str, Any], width: float = schema.CANVAS
                  ) -> dict[str, Any] | None:
  """The record of the mirrored image (module docstring); None when its anatomy has no partner.

  ``meta`` gains ``mirrored: True`` and, for an anatomy record, ``mirror_of_anatomy_index`` (the
  original anatomy, whose label the reference's augmentation would have kept).
  """
  meta = dict(record.get("meta") or {})
  index = _anatomy_of(meta)
  if index is not None:
    partner = mirror_anatomy(index)
    if partner is None:
      return None
    if "anatomy_index" in meta:
      meta["anatomy_index"] = partner
    if "anatomy" in meta:
      meta["anatomy"] = (partner if isinstance(meta["anatomy"], (int, np.integer))
                         else anatomy.ANATOMY_NAMES[partner])
    meta["mirror_of_anatomy_index"] = index
  meta["mirrored"] = True
  out = dict(record, meta=meta,
             instructions=[mirror_text(t, width) for t in record["instructions"]],
             responses=[mirror_text(t, width) for t in record["responses"]])
  if record.get("boxes") is not None:
    out["boxes"] = mirror_boxes(record["boxes"], width).tolist()
  return out


def pin_variant(record: Mapping[str, Any], sample: Mapping[str, Any] | None) -> dict[str, Any]:
  """The record with only the instruction and response variant its evaluated ``sample`` drew
  (``sample["instruction"]``, ``sample["reference"]`` with placeholders filled); variants not
  found (or no sample) keep the record's lists."""
  out = dict(record)
  if not sample:
    return out
  if sample.get("instruction") in record["instructions"]:
    out["instructions"] = [sample["instruction"]]
  for response in record["responses"]:
    try:
      filled = prompt.fill_placeholders(response, record.get("boxes"), str(record.get("id")))
    except ValueError:
      continue
    if filled == sample.get("reference"):
      out["responses"] = [response]
      break
  return out


def mirror_records(records: Sequence[Mapping[str, Any]],
                   samples: Mapping[tuple[str, str], Mapping[str, Any]] | None = None
                   ) -> tuple[list[dict[str, Any]], int]:
  """Mirrored records, each pinned to its original sample's variants (keyed (source, id)).

  Returns:
    ``(mirrored, left_out)``: the records in order, and how many had no mirror partner.
  """
  out, left_out = [], 0
  for r in records:
    pinned = pin_variant(r, (samples or {}).get((r["source"], r["id"])))
    m = mirror_record(pinned)
    if m is None:
      left_out += 1
    else:
      out.append(m)
  return out, left_out


def mirror_images(images: np.ndarray) -> np.ndarray:
  """A batch ``[B, H, W(, C)]`` with every image flipped left–right (``augment.hflip``)."""
  if not len(images):
    return np.asarray(images)
  no_boxes = np.zeros((0, 4), np.float32)
  return np.stack([augment_lib.hflip(im, no_boxes)[0] for im in images])
