"""Stage-2 prompts: the reference's chat text, its tokens and loss mask, and length buckets.

What the reference does for one sample (``InstructionData.process_messages``,
``AnatomiX.collate_fn``, ``LMTokenizer.__call__``; REFERENCE.md §1.4), reproduced byte for byte:

1. messages: system = a random system prompt (``""`` at test time); user =
   ``"{context}\\nTask: {instruction}"`` with a random instruction variant; assistant = a random
   response variant whose ``__BOX{i}__`` placeholders hold the record's (augmented) boxes.
   The context is stripped; with probability ``context_drop_ratio`` the default context is used
   instead, which is NOT stripped, so the only trace of the dropout is a blank line before
   ``Task:`` (its boxes and sentences are overwritten like the per-sample context's).
2. text = Gemma3's chat template (``render_chat``) ``.strip()`` — for generation, without the
   assistant turn and with ``"\\n<start_of_turn>model\\n"`` appended.
3. on every context line ``__BOX{i}__`` becomes the APM's box ``(x1,y1),(x2,y2)`` (xyxy pixels of
   the 1024 canvas, truncated like ``tensor.to(torch.int)``) and the text after ``</box>`` the
   retrieved sentence of anatomy ``i``.
4. ``<image_start>`` → ``"\\n\\n<image_start>" + "<image>" × N + "<image_end>\\n\\n"``.
5. tokens: the tokenizer with its special tokens, i.e. ``<bos>`` before the template's own ``<bos>``
   (``double_bos``).
6. labels: from the token after ``<start_of_turn>model`` through the first ``<end_of_turn>``, minus
   ``<image> <image_start> <image_end> <emb> </emb> <obj_i>`` and pad, shifted left by one.

Context ablations (``data.context``, REFERENCE.md §6.2 "Ablations in the code"): ``"full"`` is the
above; the others replace the context by a fixed text rendered like the reference's
``get_default_context`` (header lines, one line per anatomy, a trailing newline) and inserted as
that function's output is, i.e. not stripped (a blank line before ``Task:``), with the APM's boxes
filled in and no retrieved sentence:

- ``"names"``: ``get_default_context()`` — ``emb:<emb><obj_i></emb> box:<box>(x1,y1),(x2,y2)</box>
  {anatomy name}`` (the benchmark's ``_default_context_only`` vs ``_retrieve_sentences``);
- ``"only_emb"``: ``get_default_context(only_embeddings=True)`` — ``Image: <image_start>`` then
  ``emb:<emb><obj_i></emb>`` lines, no ``Likely findings:`` (``only_emb_context``);
- ``"skip"``: ``Image: <image_start>`` alone (``skip_context``). The reference's implementation of
  this flag (``LLMData``) is not in its release; the image line has to stay (it carries the image
  tokens), and ``Likely findings:`` goes, as in ``get_default_context(only_embeddings=True)``.

Context dropout only applies to ``"full"`` (the others are already a fixed context); its draw is
still made, so the other draws stay the same.

Loss convention here: ``targets[t] = input_ids[t + 1]`` and ``loss_mask[t]`` says whether that
prediction is in the loss (the reference's shifted labels ≠ −100). So a causal-LM loss over
``logits[:, :-1]`` vs ``input_ids[:, 1:]`` weights pair ``t`` by ``loss_mask[:, t]``; the last
position never counts. ``stage2.steps`` takes ``targets`` and ``weights`` (= ``loss_mask``) as
they are.

Axes: T tokens of one example, B batch rows, L padded length (a bucket), K context anatomies,
N image tokens (the APM's patches: 1024 for the paper, fewer in the CPU demo; 1, its CLS
embedding, with ``lm.image_tokens = "cls"``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from anatomix_jax import anatomy
from anatomix_jax.instruct import schema
from anatomix_jax.stage2 import tokenizer as tokenizer_lib

# configs/anatomix_config.yaml lm.data.system_prompts, verbatim (the 2nd and 3rd have two spaces
# before "You are given").
SYSTEM_PROMPTS = (
    "You are a specialized AI radiology assistant trained to interpret chest X-ray images. You are "
    "given some possible findings about this chest X-ray image. Some of these findings might not "
    "be correct. Use the given findings to complete the task",
    "You are a professional radiology consultant with deep knowledge of thoracic imaging.  You are "
    "given some possible findings about this chest X-ray image. Some of these findings might not "
    "be correct. Use the given findings to complete the task",
    "You are a radiology assistant with strong reasoning skills for thoracic imaging.  You are "
    "given some possible findings about this chest X-ray image. Some of these findings might not "
    "be correct. Use the given findings to complete the task",
)
EVAL_SYSTEM_PROMPTS = ("",)  # the reference's benchmark scripts

CONTEXT_HEADER = ("Image: <image_start>", "Likely findings:")
# data.context: what the user turn's context holds (module docstring).
CONTEXTS = ("full", "skip", "only_emb", "names")
GENERATION_PROMPT = "<start_of_turn>model\n"
TRUNCATION = ("error", "left_context", "drop")
_PLACEHOLDER = re.compile(r"__BOX(\d+)__")


class PromptTooLongError(ValueError):
  """An example longer than the allowed length (names the example and the lengths)."""


def default_context(num_anatomies: int = anatomy.NUM_ANATOMIES) -> str:
  """The reference's ``get_default_context()``: placeholders, anatomy names, a trailing newline."""
  lines = [f"emb:<emb><obj_{i}></emb> box:<box>__BOX{i}__</box> {anatomy.ANATOMY_NAMES[i]}"
           for i in range(num_anatomies)]
  return "\n".join(CONTEXT_HEADER) + "\n" + "\n".join(lines) + "\n"


def check_context(context: str) -> str:
  """``context`` if it is one of ``CONTEXTS``, else ValueError."""
  if context not in CONTEXTS:
    raise ValueError(f"data.context must be one of {CONTEXTS}, got {context!r}")
  return context


def context_header(context: str = "full") -> tuple[str, ...]:
  """The lines before the findings: ``Likely findings:`` only where findings have text."""
  return CONTEXT_HEADER if check_context(context) in ("full", "names") else CONTEXT_HEADER[:1]


def finding_lines(boxes: Any, sentences: Sequence[str], context: str = "full",
                  named: bool = False) -> tuple[str, ...]:
  """One context line per anatomy: ``emb:<emb><obj_i></emb> box:<box>(x1,y1),(x2,y2)</box> {s_i}``.

  Args:
    boxes: float[K, 4] xyxy pixels of the 1024 canvas (K ≤ 36), anatomy order.
    sentences: K retrieved sentences, anatomy order.
    context: ``"full"`` (the above); ``"names"``: the anatomy name instead of ``s_i``;
      ``"only_emb"``: ``emb:<emb><obj_i></emb>`` alone; ``"skip"``: no lines.
    named: put the anatomy's name before its box (``…</emb> Right lung box:<box>…``;
      ``data.line_names``, not the reference's format): the line of the anatomy a question
      names is then found by matching text, which a small LM learns within a CPU demo's budget,
      instead of by the ``<obj_i>`` embedding alone (the reference's MedGemma learns that).

  Raises:
    ValueError: shapes disagree, K > 36, a non-finite box or a non-string sentence, an unknown
      ``context``.
  """
  check_context(context)
  boxes = np.asarray(boxes, dtype=np.float64)
  if boxes.ndim != 2 or boxes.shape[1] != 4:
    raise ValueError(f"boxes must be [K, 4] xyxy, got shape {boxes.shape}")
  if boxes.shape[0] > tokenizer_lib.NUM_OBJECTS:
    raise ValueError(f"{boxes.shape[0]} boxes, but only {tokenizer_lib.NUM_OBJECTS} <obj_i> tokens")
  if len(sentences) != boxes.shape[0]:
    raise ValueError(f"{boxes.shape[0]} boxes but {len(sentences)} sentences")
  lines = []
  for i, (box, sentence) in enumerate(zip(boxes, sentences)):
    if not isinstance(sentence, str):
      raise ValueError(f"sentence {i} must be a string, got {type(sentence).__name__}")
    name = f" {anatomy.DISPLAY_NAMES[i]}" if named else ""
    if context == "only_emb":
      lines.append(f"emb:<emb><obj_{i}></emb>{name}")
    else:
      text = anatomy.ANATOMY_NAMES[i] if context == "names" else sentence
      lines.append(f"emb:<emb><obj_{i}></emb>{name} box:{schema.boxed(box)} {text}")
  return () if context == "skip" else tuple(lines)


def render_context(boxes: Any, sentences: Sequence[str]) -> str:
  """The context after the reference's substitutions (stripped, no trailing newline).

  Args:
    boxes: float[K, 4] xyxy pixels of the 1024 canvas; coordinates are truncated toward zero.
    sentences: K retrieved sentences.
  """
  return "\n".join(CONTEXT_HEADER + finding_lines(boxes, sentences))


def render_chat(system: str | None, user: str, assistant: str | None = None, *,
                add_generation_prompt: bool = False, bos_token: str = "<bos>") -> str:
  """Gemma3's chat template (``tokenizer.GEMMA3_CHAT_TEMPLATE``) for one exchange.

  The system prompt (``None``: no system message) is put, untrimmed and followed by a blank line,
  at the start of the user turn; user and assistant contents are trimmed (Jinja ``trim`` is
  ``str.strip``). ``""`` as system still adds the blank line, as the reference's test prompts do.
  """
  prefix = "" if system is None else system + "\n\n"
  text = f"{bos_token}<start_of_turn>user\n{prefix}{user.strip()}<end_of_turn>\n"
  if assistant is not None:
    text += f"<start_of_turn>model\n{assistant.strip()}<end_of_turn>\n"
  return text + (GENERATION_PROMPT if add_generation_prompt else "")


def expand_image(text: str, num_image_tokens: int) -> str:
  """``<image_start>`` → ``\\n\\n<image_start>`` + ``<image>`` × N + ``<image_end>\\n\\n``."""
  span = "\n\n<image_start>" + "<image>" * num_image_tokens + "<image_end>\n\n"
  return text.replace("<image_start>", span)


def first_response(record: Mapping[str, Any]) -> str:
  """A record's first answer variant with its ``__BOX{i}__`` placeholders filled (its gold text)."""
  return fill_placeholders(record["responses"][0], record.get("boxes"), str(record["id"]))


def fill_placeholders(text: str, boxes: Sequence[Sequence[float]] | None, where: str) -> str:
  """Replaces ``__BOX{i}__`` by ``(x1,y1),(x2,y2)`` of ``boxes[i]``.

  Raises:
    ValueError: a placeholder without a box (names ``where``).
  """
  def box_of(match: re.Match) -> str:
    i = int(match.group(1))
    if boxes is None or i >= len(boxes):
      n = 0 if boxes is None else len(boxes)
      raise ValueError(f"{where}: placeholder __BOX{i}__ but the record has {n} boxes")
    return schema.box_text(boxes[i])

  return _PLACEHOLDER.sub(box_of, text)


@dataclasses.dataclass(frozen=True)
class Example:
  """One conversation, drawn and filled (the message texts before the chat template).

  Attributes:
    id: the record id.
    system: the system prompt (``None``: no system message).
    findings: the K filled context lines (``finding_lines``).
    context_dropped: the default context was drawn (a blank line before ``Task:``).
    instruction: the drawn instruction.
    response: the drawn response, placeholders filled (kept for evaluation when not in the prompt).
    with_answer: the assistant turn is in the text (training); else the generation prompt is.
    num_image_tokens: N.
    context_mode: ``data.context`` (``CONTEXTS``); ``findings`` are already rendered for it.
  """

  id: str
  system: str | None
  findings: tuple[str, ...]
  context_dropped: bool
  instruction: str
  response: str
  with_answer: bool
  num_image_tokens: int
  context_mode: str = "full"

  def context(self, num_findings: int | None = None) -> str:
    """The context with the first ``num_findings`` lines (all by default)."""
    lines = self.findings if num_findings is None else self.findings[:num_findings]
    fixed = self.context_dropped or self.context_mode != "full"  # not stripped: a blank line
    return "\n".join(context_header(self.context_mode) + lines) + ("\n" if fixed else "")

  def user(self, num_findings: int | None = None) -> str:
    return f"{self.context(num_findings)}\nTask: {self.instruction}"

  def text(self, num_findings: int | None = None, bos_token: str = "<bos>") -> str:
    """The model's input text (steps 2–4 of the module docstring)."""
    user = self.user(num_findings)
    if self.with_answer:
      chat = render_chat(self.system, user, self.response, bos_token=bos_token).strip()
    else:
      chat = render_chat(self.system, user, bos_token=bos_token).strip() + "\n" + GENERATION_PROMPT
    return expand_image(chat, self.num_image_tokens)


def build_example(record: Mapping[str, Any], boxes: Any, sentences: Sequence[str],
                  rng: np.random.Generator, *, system_prompts: Sequence[str],
                  context_drop_ratio: float, num_image_tokens: int, answer: bool = True,
                  response_boxes: Sequence[Sequence[float]] | None = None,
                  context: str = "full", named_lines: bool = False) -> Example:
  """Draws and fills one conversation for a record (the reference's random draws, in its order).

  Args:
    record: an instruction record (``instruct.schema``).
    boxes: float[K, 4] the APM's boxes, xyxy pixels of the 1024 canvas (K = 36).
    sentences: K retrieved sentences.
    rng: draws system prompt, context dropout, instruction, response (in that order).
    system_prompts: the choices (``SYSTEM_PROMPTS`` to train, ``EVAL_SYSTEM_PROMPTS`` to test).
    context_drop_ratio: probability of the default context (0.1 in the reference).
    num_image_tokens: N, the APM's patches.
    answer: put the response in the text (training/scoring) or the generation prompt.
    response_boxes: boxes for the response's ``__BOX{i}__`` (default ``record["boxes"]``; pass the
      augmented boxes when the image was transformed).
    context: ``data.context`` (``CONTEXTS``, module docstring); dropout applies to "full" only.
    named_lines: ``data.line_names`` (``finding_lines``' ``named``).

  Raises:
    ValueError: no system prompts, N < 1, a placeholder without a box, bad boxes/sentences, an
      unknown context.
  """
  where = f"record {record.get('id', '?')!r}"
  if not system_prompts:
    raise ValueError(f"{where}: system_prompts is empty (use ('',) for no system prompt)")
  if num_image_tokens < 1:
    raise ValueError(f"num_image_tokens must be ≥ 1, got {num_image_tokens}")
  findings = finding_lines(boxes, sentences, context, named_lines)
  system = system_prompts[int(rng.integers(len(system_prompts)))]
  dropped = not rng.random() > context_drop_ratio and context == "full"
  instruction = record["instructions"][int(rng.integers(len(record["instructions"])))]
  response = record["responses"][int(rng.integers(len(record["responses"])))]
  response = fill_placeholders(
      response, record.get("boxes") if response_boxes is None else response_boxes, where)
  return Example(id=str(record["id"]), system=system, findings=findings, context_dropped=dropped,
                 instruction=instruction, response=response, with_answer=answer,
                 num_image_tokens=num_image_tokens, context_mode=context)


@dataclasses.dataclass(frozen=True)
class Encoded:
  """One tokenized example.

  Attributes:
    id: the record id.
    input_ids: int32[T].
    targets: int32[T], ``input_ids`` shifted left (the last = pad).
    loss_mask: bool[T], ``targets[t]`` is in the loss.
    image_positions: int32[N], where the ``<image>`` tokens are.
    object_positions: int32[K'], where ``<obj_i>`` tokens are; ``object_index``: their i.
    num_findings: K', context lines kept (< K after ``left_context`` truncation).
  """

  id: str
  input_ids: np.ndarray
  targets: np.ndarray
  loss_mask: np.ndarray
  image_positions: np.ndarray
  object_positions: np.ndarray
  object_index: np.ndarray
  num_findings: int

  def __len__(self) -> int:
    return int(self.input_ids.shape[0])


def find_tokens(ids: np.ndarray, pattern: Sequence[int]) -> int:
  """First index where ``pattern`` starts in ``ids``, or −1."""
  n = len(pattern)
  hits = np.nonzero(ids[:len(ids) - n + 1] == pattern[0])[0]
  for i in hits:
    if tuple(ids[i:i + n]) == tuple(pattern):
      return int(i)
  return -1


def _encode_once(tok: tokenizer_lib.TokenizerInfo, example: Example, num_findings: int,
                 double_bos: bool) -> Encoded:
  text = example.text(num_findings, bos_token=tok.tokenizer.bos_token)
  ids = tok.tokenizer.encode(text, add_special_tokens=False)
  ids = np.asarray(([tok.bos_id] if double_bos else []) + ids, dtype=np.int32)
  image_positions = np.nonzero(ids == tok.image_id)[0].astype(np.int32)
  if len(image_positions) != example.num_image_tokens:
    raise ValueError(f"example {example.id!r}: {len(image_positions)} <image> tokens, expected "
                     f"{example.num_image_tokens} (one <image_start> per prompt)")
  labelled = np.zeros(ids.shape, bool)
  if example.with_answer:
    turn = find_tokens(ids, tok.model_turn_ids)
    if turn < 0:
      raise ValueError(f"example {example.id!r}: no '<start_of_turn>model' in the tokens")
    start = turn + len(tok.model_turn_ids)
    ends = np.nonzero(ids[start:] == tok.end_of_turn_id)[0]
    if not len(ends):
      raise ValueError(f"example {example.id!r}: no <end_of_turn> after the assistant turn")
    labelled[start:start + int(ends[0]) + 1] = True
    labelled &= ~np.isin(ids, np.fromiter(tok.never_target_ids, np.int32))
  targets = np.full(ids.shape, tok.pad_id, np.int32)
  targets[:-1] = ids[1:]
  loss_mask = np.zeros(ids.shape, bool)
  loss_mask[:-1] = labelled[1:]
  obj = ids - tok.first_obj_id
  object_positions = np.nonzero((obj >= 0) & (obj < len(tok.obj_ids)))[0].astype(np.int32)
  return Encoded(id=example.id, input_ids=ids, targets=targets, loss_mask=loss_mask,
                 image_positions=image_positions, object_positions=object_positions,
                 object_index=obj[object_positions].astype(np.int32), num_findings=num_findings)


def encode(tok: tokenizer_lib.TokenizerInfo, example: Example, *, max_len: int | None = None,
           truncation: str = "error", double_bos: bool = True) -> Encoded | None:
  """Tokenizes an example and builds its targets and loss mask (module docstring).

  Args:
    tok: the tokenizer.
    example: from ``build_example``.
    max_len: the most tokens allowed (None: no limit), e.g. the largest bucket.
    truncation: what a longer example gets. ``"error"``: ``PromptTooLongError``; ``"drop"``:
      ``None`` (the caller counts it); ``"left_context"``: keep the left part of the context,
      dropping whole finding lines from the right (anatomy K−1, K−2, …) until it fits — the image,
      the task and the answer are never cut (error if it does not fit even without findings).
    double_bos: ``<bos>`` before the template's ``<bos>``, as the reference (its tokenizer call adds
      special tokens to a text that already starts with ``<bos>``); False for a single one.

  Returns:
    The ``Encoded`` example, or None when dropped.

  Raises:
    PromptTooLongError: too long under ``"error"`` (or ``"left_context"`` without findings).
    ValueError: unknown policy; the tokens disagree with the prompt (e.g. ``<image>`` count ≠ N,
      no assistant turn).
  """
  if truncation not in TRUNCATION:
    raise ValueError(f"truncation must be one of {TRUNCATION}, got {truncation!r}")
  full = len(example.findings)
  enc = _encode_once(tok, example, full, double_bos)
  if max_len is None or len(enc) <= max_len:
    return enc
  too_long = f"example {example.id!r}: {len(enc)} tokens > max_len {max_len}"
  if truncation == "drop":
    return None
  if truncation == "error":
    raise PromptTooLongError(f"{too_long} (truncation='error'; use 'drop' or 'left_context', or a "
                             "larger bucket)")
  best = _encode_once(tok, example, 0, double_bos)
  if len(best) > max_len:
    raise PromptTooLongError(f"{too_long}; {len(best)} tokens even without findings")
  lo, hi = 0, full - 1  # invariant: lo findings fit, hi + 1 do not
  while lo < hi:
    mid = (lo + hi + 1) // 2
    cand = _encode_once(tok, example, mid, double_bos)
    if len(cand) <= max_len:
      lo, best = mid, cand
    else:
      hi = mid - 1
  return best


def pad_to_bucket(examples: Sequence[Encoded], buckets: Sequence[int], pad_id: int, *,
                  batch_size: int | None = None,
                  truncation: str = "error") -> tuple[dict[str, np.ndarray], list[str]]:
  """Right-pads examples to the smallest bucket that holds the longest one.

  Args:
    examples: encoded examples (``encode`` with ``max_len=max(buckets)`` never needs a drop here).
    buckets: the allowed padded lengths L (one compile each).
    pad_id: the pad token.
    batch_size: B; rows beyond the examples are empty (``valid`` 0). None: B = kept examples.
    truncation: a row longer than the largest bucket: ``"error"`` (``PromptTooLongError`` naming
      it) or ``"drop"`` (its id is returned in the dropped list).

  Returns:
    ``(batch, dropped_ids)``; batch: ``tokens`` int32[B, L] (pad), ``attention_mask`` int32[B, L],
    ``targets`` int32[B, L] (pad), ``weights`` float32[B, L] (the loss mask), ``valid``
    float32[B] (1 for real rows).

  Raises:
    ValueError: empty or unsorted buckets, unknown policy, more examples than ``batch_size``.
    PromptTooLongError: a row longer than the largest bucket under ``"error"``.
  """
  buckets = tuple(int(b) for b in buckets)
  if not buckets or any(b <= 0 for b in buckets) or list(buckets) != sorted(set(buckets)):
    raise ValueError(f"buckets must be increasing positive lengths, got {buckets}")
  if truncation not in ("error", "drop"):
    raise ValueError(f"pad_to_bucket truncation must be 'error' or 'drop', got {truncation!r}")
  kept, dropped = [], []
  for ex in examples:
    if len(ex) <= buckets[-1]:
      kept.append(ex)
    elif truncation == "drop":
      dropped.append(ex.id)
    else:
      raise PromptTooLongError(f"example {ex.id!r}: {len(ex)} tokens > the largest bucket "
                               f"{buckets[-1]} (buckets {buckets})")
  rows = len(kept) if batch_size is None else batch_size
  if len(kept) > rows:
    raise ValueError(f"{len(kept)} examples for a batch of {batch_size}")
  longest = max((len(ex) for ex in kept), default=0)
  length = next(b for b in buckets if b >= longest)
  batch = {"tokens": np.full((rows, length), pad_id, np.int32),
           "attention_mask": np.zeros((rows, length), np.int32),
           "targets": np.full((rows, length), pad_id, np.int32),
           "weights": np.zeros((rows, length), np.float32),
           "valid": np.zeros((rows,), np.float32)}
  for r, ex in enumerate(kept):
    t = len(ex)
    batch["tokens"][r, :t] = ex.input_ids
    batch["attention_mask"][r, :t] = 1
    batch["targets"][r, :t] = ex.targets
    batch["weights"][r, :t] = ex.loss_mask
    batch["valid"][r] = 1.0
  return batch, dropped
