"""Stage-2 wiring diagnosis: can the LM copy the asked anatomy's box out of its prompt's context?

    python -m anatomix_jax.stage2.diagnose --apm_workdir=<stage-1 demo workdir> \\
        [--stage2_workdir=<stage-2 workdir>] [--limit=N]

Prints one JSON object.

``frame`` (no LM): the validation Anatomy Grounding records of the demo instruction data, the frozen
APM run on their images, each prompt rendered as training renders it (``HostBatcher.examples``,
train=True: a random system prompt, context dropout, a random answer variant). From the rendered
text: the context line of the asked anatomy (the line holding ``<obj_i>``, i = the record's
``meta.anatomy``) and its box, the reference answer and its box. Reported:

  ``context_answer_iou``     mean IoU of the context line's box with the answer's box: the APM's own
                             IoU on these records if context and answer share one frame;
  ``apm_iou``                the APM's float box vs the truth (what ``grounding.score_grounding``
                             reports), for comparison;
  ``oracle``                 the same prompts with the asked anatomy's APM box replaced by the true
                             box: ``verbatim_in_line`` (the answer's ``<box>…</box>`` string
                             appears in the matching context line) must be 1.0, IoU 1.0;
  ``names``                  whether the answer's ``<ref>`` name is the asked one, appears in the
                             question and in the matching context line's sentence (case-sensitive
                             and not), and in how many other context lines it appears (a name
                             that is a substring of other anatomies' names is ambiguous);
  ``line_structure``         the asked anatomy's ``<obj_i>`` occurs in exactly one line, line k
                             holds ``<obj_k>``.

``prior_baseline``: the IoU of answers that ignore image and context: per anatomy the mean train
box (an LM that learned the answers' coordinates per anatomy), or one mean box for all (an LM
that ignores even the asked anatomy).

``lm`` (with ``--stage2_workdir``; the model, tokenizer and APM its checkpoint names; the same
records rendered with the evaluation prompt, the gold answer in the text): teacher-forced argmax
at each position that predicts a coordinate token of the answer's box (the tokens strictly between
the answer's ``<box>`` and ``</box>``), compared with the gold token and with the token at the
same place in the context line's box; and the attention those predicting positions pay, per layer
(mean over heads, queries and records), to the tokens of the matching context line vs the other
context lines (their total and their mean per line).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from anatomix_jax import anatomy
from anatomix_jax.ops import boxes as box_ops
from anatomix_jax.stage2 import grounding, prompt

TASK = "Anatomy Grounding"
SOURCE = "anatomy_grounding"
_REF = re.compile(r"<ref>(.*?)</ref>")
_BOX_SPAN = re.compile(r"<box>.*?</box>")


# --- text-level checks (no model) -----------------------------------------------------------------


def context_lines(text: str) -> dict[int, list[str]]:
  """Anatomy index → the rendered text's context lines holding ``<obj_i>`` (should be one)."""
  out: dict[int, list[str]] = {}
  for line in text.split("\n"):
    for m in re.finditer(r"<emb><obj_(\d+)></emb>", line):
      out.setdefault(int(m.group(1)), []).append(line)
  return out


def assistant_text(text: str) -> str:
  """The assistant turn of a rendered training text (between ``<start_of_turn>model`` and the
  next ``<end_of_turn>``)."""
  start = text.rindex(prompt.GENERATION_PROMPT) + len(prompt.GENERATION_PROMPT)
  end = text.find("<end_of_turn>", start)
  return text[start:] if end < 0 else text[start:end]


def line_sentence(line: str) -> str:
  """The text after the box of a context line (the retrieved sentence)."""
  return line.split("</box>", 1)[1].strip() if "</box>" in line else ""


def frame_row(record: Mapping[str, Any], example: prompt.Example) -> dict[str, Any] | None:
  """Context line vs answer for one rendered Anatomy Grounding example (None: not one).

  Returns:
    ``id anatomy question answer context_line context_box answer_box iou verbatim_in_line
    verbatim_in_context ref ref_is_asked ref_in_question ref_in_line ref_in_line_ci
    other_lines_with_ref lines_with_obj obj_line_order`` (boxes as written, lists of ints).
  """
  index = grounding.asked_anatomy(record)
  if index is None:
    return None
  text = example.text()
  lines = context_lines(text)
  matching = lines.get(index, [])
  line = matching[0] if matching else ""
  answer = assistant_text(text)
  context_box = grounding.parse_boxes(line)
  answer_box = grounding.parse_boxes(answer)
  iou = (float(box_ops.iou_matrix(context_box[:1], answer_box[:1], dtype=None)[0, 0])
         if len(context_box) and len(answer_box) else 0.0)
  answer_span = _BOX_SPAN.search(answer)
  refs = _REF.findall(answer)
  ref = refs[0] if refs else ""
  sentences = {k: line_sentence(v[0]) for k, v in lines.items()}
  others = sum(1 for k, s in sentences.items()
               if k != index and ref and ref.lower() in s.lower())
  return {
      "id": record["id"], "anatomy": anatomy.ANATOMY_NAMES[index], "question": example.instruction,
      "answer": answer, "context_line": line,
      "context_box": context_box.astype(int)[:1].tolist(),
      "answer_box": answer_box.astype(int)[:1].tolist(), "iou": iou,
      "verbatim_in_line": bool(answer_span) and answer_span.group(0) in line,
      "verbatim_in_context": bool(answer_span) and answer_span.group(0) in example.context(),
      "ref": ref, "ref_is_asked": ref == anatomy.DISPLAY_NAMES[index],
      "ref_in_question": bool(ref) and ref in example.instruction,
      "ref_in_line": bool(ref) and ref in line_sentence(line),
      "ref_in_line_ci": bool(ref) and ref.lower() in line_sentence(line).lower(),
      "other_lines_with_ref": others, "lines_with_obj": len(matching),
      "obj_line_order": [k for k in lines] == sorted(lines)}


def summarize_frame(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Means over the rows of ``frame_row`` (plus up to 5 examples of each failure)."""
  rows = [r for r in rows if r is not None]
  if not rows:
    return {"records": 0}
  mean = lambda key: float(np.mean([float(r[key]) for r in rows]))  # noqa: E731
  out = {"records": len(rows), "context_answer_iou": mean("iou"),
         "verbatim_in_line": mean("verbatim_in_line"),
         "verbatim_in_context": mean("verbatim_in_context"),
         "names": {k: mean(k) for k in ("ref_is_asked", "ref_in_question", "ref_in_line",
                                        "ref_in_line_ci")},
         "line_structure": {"one_line_per_asked_obj": float(np.mean(
             [r["lines_with_obj"] == 1 for r in rows])), "obj_line_order": mean("obj_line_order")}}
  out["names"]["ambiguous"] = float(np.mean([r["other_lines_with_ref"] > 0 for r in rows]))
  mismatch: dict[str, str] = {}
  for r in rows:
    if not r["ref_in_line"] and r["ref"] not in mismatch:
      mismatch[r["ref"]] = line_sentence(r["context_line"])
  out["names"]["ref_not_in_line"] = [{"asked": k, "context_sentence": v}
                                     for k, v in sorted(mismatch.items())]
  ambiguous: dict[str, int] = {}
  for r in rows:
    if r["other_lines_with_ref"]:
      ambiguous[r["ref"]] = max(ambiguous.get(r["ref"], 0), r["other_lines_with_ref"])
  out["names"]["ambiguous_names"] = ambiguous
  out["examples"] = [{k: r[k] for k in ("id", "question", "context_line", "answer", "iou")}
                     for r in rows[:2]]
  return out


def prior_baseline(train: Sequence[Mapping[str, Any]], records: Sequence[Mapping[str, Any]]
                   ) -> dict[str, float]:
  """IoU of answers that ignore the image and the context: per anatomy, the mean true box of the
  train records (``per_anatomy_mean_box``), or one mean box over all anatomies (``global``)."""
  by_index: dict[int, list[np.ndarray]] = {}
  for r in train:
    index = grounding.asked_anatomy(r)
    if index is not None and r.get("boxes"):
      by_index.setdefault(index, []).append(np.asarray(r["boxes"][0], np.float64))
  if not by_index:
    return {}
  means = {k: np.mean(v, axis=0) for k, v in by_index.items()}
  overall = np.mean([b for v in by_index.values() for b in v], axis=0)
  per, glob = [], []
  for r in records:
    index, truth = grounding.asked_anatomy(r), grounding.true_boxes(r)
    if index is None or not len(truth):
      continue
    # as an answer would write them: truncated to integers
    mean = means.get(index, overall).astype(int)
    per.append(float(box_ops.iou_matrix(mean, truth[:1])[0, 0]))
    glob.append(float(box_ops.iou_matrix(overall.astype(int), truth[:1])[0, 0]))
  return {"per_anatomy_mean_box_iou": float(np.mean(per)) if per else None,
          "global_mean_box_iou": float(np.mean(glob)) if glob else None}


# --- the demo's validation records and the APM ----------------------------------------------------


def demo_records(apm_workdir: str, split: str, seed: int, data_dir: str = "",
                 limit: int = 0) -> tuple[list[dict[str, Any]], str]:
  """The demo's Anatomy Grounding records of ``split`` and the image root.

  ``data_dir`` (or the demo's ``{root}/instructions`` if the stage-2 demo built it) is read; else
  the records are built in a temporary directory by ``instruct.mimic.build_anatomy_grounding``
  with ``seed``, as ``stage2.demo.data.prepare`` builds them (nothing is written to the workdir).
  """
  from anatomix_jax.instruct import mimic  # noqa: PLC0415
  from anatomix_jax.stage2 import data  # noqa: PLC0415
  from anatomix_jax.stage2.demo import data as demo_data  # noqa: PLC0415
  from anatomix_jax.synthetic import generator  # noqa: PLC0415

  raw = demo_data.synthetic_root(apm_workdir)
  paths = generator.layout(raw)
  built = os.path.join(os.path.dirname(raw), demo_data.DIR_NAME)
  data_dir = data_dir or (built if os.path.isdir(built) else "")
  if data_dir:
    records = data.load_records(data_dir, SOURCE, split, [TASK])
  else:
    with tempfile.TemporaryDirectory() as tmp:
      inputs = {k: paths[k] for k in mimic.INPUT_KEYS}
      mimic.build_anatomy_grounding(inputs, tmp, seed=seed)
      records = data.load_records(tmp, SOURCE, split, [TASK])
  return (records[:limit] if limit else records), paths["mimic_dir"]


def apm_batches(apm: Any, records: Sequence[dict[str, Any]], image_root: str, batch_size: int,
                intensity: str) -> Iterable[tuple[list[dict[str, Any]], dict[str, Any]]]:
  """(valid records, APM features of their rows) per batch, images loaded as stage 2 loads them."""
  import grain  # noqa: PLC0415

  from anatomix_jax.stage2 import data  # noqa: PLC0415

  ds = data.batches(grain.MapDataset.source(list(records)), image_roots={"default": image_root},
                    image_size=apm.image_size, batch_size=batch_size, train=False,
                    intensity=intensity)
  for local in ds:
    keep = np.nonzero(np.asarray(local["valid"]) > 0)[0]
    if not len(keep):
      continue
    features = apm(local["image"])
    yield ([local["records"][i] for i in keep],
           {"boxes": np.asarray(features["boxes"])[keep],
            "sentences": [features["sentences"][i] for i in keep],
            "memory": features["memory"][keep], "objects": features["objects"][keep]})


def frame_check(apm: Any, batcher: Any, records: Sequence[dict[str, Any]], image_root: str,
                batch_size: int, intensity: str) -> dict[str, Any]:
  """Part (a): the module docstring's ``frame`` numbers for ``records``."""
  rows, oracle_rows, apm_ious = [], [], []
  for i, (recs, features) in enumerate(apm_batches(apm, records, image_root, batch_size,
                                                   intensity)):
    for b, r in enumerate(recs):
      index = grounding.asked_anatomy(r)
      truth = grounding.true_boxes(r)
      if index is not None and len(truth):
        apm_ious.append(float(box_ops.iou_matrix(features["boxes"][b, index][None], truth[:1],
                                                 dtype=None)[0, 0]))
    examples = batcher.examples(recs, features, i, train=True)
    rows += [frame_row(r, e) for r, e in zip(recs, examples)]
    oracle = {**features, "boxes": grounding.with_true_boxes(recs, features["boxes"])}
    oracle_ex = batcher.examples(recs, oracle, i, train=True)
    oracle_rows += [frame_row(r, e) for r, e in zip(recs, oracle_ex)]
  out = summarize_frame(rows)
  out["apm_iou"] = float(np.mean(apm_ious)) if apm_ious else None
  o = summarize_frame(oracle_rows)
  out["oracle"] = {k: o.get(k) for k in ("records", "context_answer_iou", "verbatim_in_line",
                                         "verbatim_in_context")}
  return out


# --- teacher-forced LM checks ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Spans:
  """Token positions of one encoded Anatomy Grounding example (indices into ``input_ids``).

  Attributes:
    answer: the coordinate tokens of the answer's first box (between ``<box>`` and ``</box>``).
    context: the coordinate tokens of the matching context line's box.
    lines: per context line k (anatomy k), ``(start, end)`` token range of the line.
    index: the asked anatomy.
  """

  answer: np.ndarray
  context: np.ndarray
  lines: dict[int, tuple[int, int]]
  index: int


def _between(ids: np.ndarray, start: int, open_id: int, close_id: int) -> np.ndarray:
  """Positions strictly inside the first ``open_id``…``close_id`` pair from ``start`` on."""
  opens = np.nonzero(ids[start:] == open_id)[0]
  if not len(opens):
    return np.zeros((0,), np.int64)
  a = start + int(opens[0])
  closes = np.nonzero(ids[a:] == close_id)[0]
  if not len(closes):
    return np.zeros((0,), np.int64)
  return np.arange(a + 1, a + int(closes[0]), dtype=np.int64)


def token_spans(tok: Any, example: prompt.Example, enc: prompt.Encoded,
                index: int) -> Spans | None:
  """Where the answer's box, the asked anatomy's context box and every context line are.

  Line ranges come from the tokenizer's character offsets of the rendered text, checked against
  ``enc.input_ids``. None when the asked anatomy's line was truncated away or a box is missing.
  """
  ids = np.asarray(enc.input_ids)
  turn = prompt.find_tokens(ids, tok.model_turn_ids)
  if turn < 0:
    return None
  answer = _between(ids, turn, tok.box_id, tok.box_end_id)
  obj_at = np.nonzero(ids == tok.obj_ids[index])[0]
  if not len(obj_at) or not len(answer):
    return None
  context = _between(ids, int(obj_at[0]), tok.box_id, tok.box_end_id)
  text = example.text(enc.num_findings, bos_token=tok.tokenizer.bos_token)
  out = tok.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
  shift = len(ids) - len(out["input_ids"])  # the extra leading <bos> (double_bos)
  if shift < 0 or list(ids[shift:]) != list(out["input_ids"]):
    raise ValueError(f"example {example.id!r}: the offsets' tokens differ from the encoding")
  starts = np.asarray([s for s, _ in out["offset_mapping"]])
  lines, at = {}, 0
  for k, line in enumerate(example.findings[:enc.num_findings]):
    c0 = text.index(line, at)
    c1 = at = c0 + len(line)
    inside = np.nonzero((starts >= c0) & (starts < c1))[0]
    lines[k] = (int(inside[0]) + shift, int(inside[-1]) + 1 + shift)
  return Spans(answer=answer, context=context, lines=lines, index=index)


def score_teacher_forced(ids: np.ndarray, logits: np.ndarray, attention: Sequence[np.ndarray],
                         spans: Spans) -> dict[str, Any]:
  """Box-token accuracies and attention masses of one example.

  Args:
    ids: int[T] the example's tokens.
    logits: float[T, V] (position t predicts ``ids[t + 1]``).
    attention: per layer float[T, S] (heads averaged), query t → key s.
    spans: from ``token_spans``.

  Returns:
    ``positions`` (coordinate tokens), ``gold`` / ``context`` / ``context_is_gold`` (per position:
    argmax == gold token; argmax == the context box's token at the same place — positions past the
    context box's length never match; context token == gold token), ``same_length`` (the two boxes
    have as many tokens), and per layer ``match_mass`` (attention to the matching line),
    ``other_mass`` (to all other lines) and ``other_per_line``.
  """
  answer = spans.answer
  pred = np.argmax(logits[answer - 1], axis=-1)
  gold = ids[answer]
  ctx = np.full(len(answer), -1, np.int64)
  n = min(len(answer), len(spans.context))
  ctx[:n] = ids[spans.context[:n]]
  out = {"positions": int(len(answer)), "gold": (pred == gold).tolist(),
         "context": (pred == ctx).tolist(), "context_is_gold": (ctx == gold).tolist(),
         "same_length": len(answer) == len(spans.context)}
  queries = answer - 1
  match = np.zeros(0, np.int64)
  others = []
  for k, (a, b) in spans.lines.items():
    if k == spans.index:
      match = np.arange(a, b)
    else:
      others.append(np.arange(a, b))
  other = np.concatenate(others) if others else np.zeros(0, np.int64)
  out["match_mass"] = [float(w[queries][:, match].sum(-1).mean()) for w in attention]
  out["other_mass"] = [float(w[queries][:, other].sum(-1).mean()) for w in attention]
  out["other_per_line"] = [m / max(len(others), 1) for m in out["other_mass"]]
  return out


def summarize_lm(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Means over positions (accuracies) and over records (attention, per layer)."""
  rows = [r for r in rows if r is not None]
  if not rows:
    return {"records": 0}
  cat = lambda key: np.concatenate([np.asarray(r[key], bool) for r in rows])  # noqa: E731
  gold, ctx, same = cat("gold"), cat("context"), cat("context_is_gold")
  out = {"records": len(rows), "box_tokens": int(len(gold)),
         "acc_gold": float(gold.mean()), "acc_context": float(ctx.mean()),
         "context_equals_gold": float(same.mean()),
         "same_length": float(np.mean([r["same_length"] for r in rows]))}
  differ = ~same
  if differ.any():  # where copying and the truth disagree: which one does the model follow?
    out["where_context_differs"] = {"positions": int(differ.sum()),
                                    "acc_gold": float(gold[differ].mean()),
                                    "acc_context": float(ctx[differ].mean())}
  for key in ("match_mass", "other_mass", "other_per_line"):
    out[key] = np.mean([r[key] for r in rows], axis=0).tolist()
  out["match_over_other_per_line"] = [m / max(o, 1e-12) for m, o in
                                      zip(out["match_mass"], out["other_per_line"])]
  return out


def forward_with_attention(model: Any, params: Any, tokens: np.ndarray, mask: np.ndarray,
                           memory: Any, objects: Any) -> tuple[np.ndarray, list[np.ndarray]]:
  """Teacher-forced logits [B, T, V] and per-layer attention [B, T, S] (mean over heads)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from anatomix_jax.models import gemma3  # noqa: PLC0415

  def run(p, t, m, me, ob):
    (logits,), state = model.apply({"params": p}, t, me, ob,
                                   positions=gemma3.positions_from_mask(m), attention_mask=m,
                                   mutable=["intermediates"])
    layers = state["intermediates"]["lm"]
    weights = [layers[name]["attn"]["attention_weights"][0] for name in
               sorted((k for k in layers if k.startswith("layers_")),
                      key=lambda k: int(k.split("_")[1]))]
    return logits, [w.astype(jnp.float32).mean(axis=(1, 2)) for w in weights]

  fn = _FORWARD.setdefault(id(model), jax.jit(run))
  logits, attn = fn(params, jnp.asarray(tokens), jnp.asarray(mask), memory, objects)
  return np.asarray(logits), [np.asarray(a) for a in attn]


_FORWARD: dict = {}


def lm_rows(model: Any, params: Any, tok: Any, records: Sequence[Mapping[str, Any]],
            examples: Sequence[prompt.Example], features: Mapping[str, Any]
            ) -> list[dict[str, Any] | None]:
  """``score_teacher_forced`` for a batch (examples rendered with the answer in the text)."""
  encoded = [prompt.encode(tok, e) for e in examples]
  spans = [token_spans(tok, e, enc, grounding.asked_anatomy(r)) if grounding.asked_anatomy(r) is not None else None
           for r, e, enc in zip(records, examples, encoded)]
  length = max(len(e) for e in encoded)
  tokens = np.full((len(encoded), length), tok.pad_id, np.int32)
  mask = np.zeros((len(encoded), length), np.int32)
  for b, e in enumerate(encoded):
    tokens[b, :len(e)] = e.input_ids
    mask[b, :len(e)] = 1
  logits, attention = forward_with_attention(model, params, tokens, mask, features["memory"],
                                             features["objects"])
  return [None if s is None else
          score_teacher_forced(tokens[b], logits[b], [a[b] for a in attention], s)
          for b, s in enumerate(spans)]


def lm_check(stage2_workdir: str, records: Sequence[dict[str, Any]], image_root: str,
             batch_size: int) -> dict[str, Any]:
  """Part (b) on a trained stage-2 workdir (its config's model, tokenizer and APM)."""
  import flax.linen as nn  # noqa: PLC0415
  import jax  # noqa: PLC0415

  from anatomix_jax.stage2 import inference  # noqa: PLC0415
  from configs import eval as eval_config  # noqa: PLC0415

  trained = inference.load(eval_config.get_config("demo"), stage2_workdir)
  run = trained.run
  if run.model_config.lm.scan_layers:
    raise ValueError("the attention diagnosis needs scan_layers=False")
  rows = []
  with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
    for recs, features in apm_batches(run.apm, records, image_root, batch_size,
                                      run.config.data.intensity):
      examples = run.batcher.examples(recs, features, 0, train=False, answer=True)
      rows += lm_rows(run.model, trained.params, run.tok, recs, examples, features)
  return {"step": trained.step, **summarize_lm(rows)}


def main(argv: Sequence[str]) -> None:
  from absl import flags  # noqa: PLC0415

  from anatomix_jax.stage2 import batching, frozen_apm  # noqa: PLC0415
  from configs import stage2_finetune  # noqa: PLC0415

  f = flags.FLAGS
  del argv
  config = stage2_finetune.get_config("demo")
  records, image_root = demo_records(f.apm_workdir, f.split, config.seed, f.data_dir, f.limit)
  apm = frozen_apm.FrozenAPM(f.apm_workdir)
  batcher = batching.HostBatcher(None, config.data, apm.num_patches, seed=config.seed)
  train, _ = demo_records(f.apm_workdir, "train", config.seed, f.data_dir)
  out = {"apm_workdir": f.apm_workdir, "split": f.split,
         "frame": frame_check(apm, batcher, records, image_root, f.batch_size,
                              config.data.intensity),
         "prior_baseline": prior_baseline(train, records)}
  if f.stage2_workdir:
    out["lm"] = lm_check(f.stage2_workdir, records, image_root, f.batch_size)
  json.dump(out, sys.stdout, indent=1)
  sys.stdout.write("\n")


def _define_flags() -> None:
  from absl import flags  # noqa: PLC0415

  flags.DEFINE_string("apm_workdir", None, "A trained stage-1 demo workdir (APM, RAG, data/).")
  flags.DEFINE_string("stage2_workdir", "", "A trained stage-2 workdir: also the LM checks.")
  flags.DEFINE_string("data_dir", "", "Instruction data (default: the demo's, or built in a "
                      "temporary directory).")
  flags.DEFINE_string("split", "validate", "Records' split.")
  flags.DEFINE_integer("limit", 0, "At most this many records (0: all).")
  flags.DEFINE_integer("batch_size", 8, "APM / LM batch.")
  flags.mark_flag_as_required("apm_workdir")


if __name__ == "__main__":
  from absl import app  # noqa: PLC0415

  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
  _define_flags()
  app.run(main)
