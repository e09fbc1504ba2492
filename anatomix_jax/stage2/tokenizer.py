"""The stage-2 tokenizer: a local Hugging Face (MedGemma / Gemma3) tokenizer + AnatomiX's 45 tokens.

The reference (``src/models/LM.py::LMTokenizer``, REFERENCE.md §1.4) adds 45 tokens with
``add_tokens`` (not special) to MedGemma's tokenizer, in the order of ``NEW_TOKENS``; they get the
ids right after the base vocabulary (262145…262189), inside MedGemma's 262208-row embedding, which
is not resized. ``load_tokenizer`` does the same and collects every id that prompts and losses need.

``train_demo_tokenizer`` makes a small Gemma-like tokenizer for the offline CPU demo: Gemma's
special tokens at Gemma's ids 0–3 (``<pad> <eos> <bos> <unk>``) plus ``<start_of_turn>`` and
``<end_of_turn>``, digits split into single tokens (Gemma's SentencePiece ``split_digits``), a
byte-level BPE so any text round-trips, the 45 AnatomiX tokens, and Gemma3's chat template
(``GEMMA3_CHAT_TEMPLATE``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from typing import Any

NUM_OBJECTS = 36
NEW_TOKENS: tuple[str, ...] = (
    ("<image>", "<image_start>", "<image_end>", "<box>", "</box>", "<emb>", "</emb>")
    + tuple(f"<obj_{i}>" for i in range(NUM_OBJECTS))
    + ("<ref>", "</ref>"))
assert len(NEW_TOKENS) == 45

# Gemma3's chat template (google/gemma-3-*-it tokenizer_config.json "chat_template"; MedGemma 4B-it
# ships the same). The Jinja string literals '\n\n' and '\n' hold real newlines, as in the JSON.
GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"
# Gemma's ids: <pad>=0, <eos>=1, <bos>=2, <unk>=3; the demo puts the turn markers right after.
DEMO_SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", START_OF_TURN, END_OF_TURN)
# Prompt scaffolding added to every demo corpus so its words become single tokens.
_DEMO_SCAFFOLD = ("<start_of_turn>user\n", "<start_of_turn>model\n", "Image: ",
                  "Likely findings:\n", "emb: box:", "Task: ")


class TokenizerError(ValueError):
  """A tokenizer directory that is missing or unfit for AnatomiX (names the path and problem)."""


@dataclasses.dataclass(frozen=True)
class TokenizerInfo:
  """A loaded tokenizer and the ids stage 2 needs.

  Attributes:
    tokenizer: the Hugging Face tokenizer (with the 45 AnatomiX tokens).
    path: the directory it came from.
    vocab_size: ``len(tokenizer)``, added tokens included; the LM's embedding table needs at least
      this many rows (MedGemma: 262190 tokens, 262208 rows).
    pad_id, bos_id, eos_id: the special tokens.
    start_of_turn_id, end_of_turn_id: ``<start_of_turn>``, ``<end_of_turn>``.
    model_turn_ids: the tokens of ``"<start_of_turn>model"`` (the reference finds the assistant
      turn by them: ``LMTokenizer.start_token_ids``).
    image_id, image_start_id, image_end_id: ``<image>``, ``<image_start>``, ``<image_end>``.
    emb_id, emb_end_id: ``<emb>``, ``</emb>``.
    box_id, box_end_id, ref_id, ref_end_id: ``<box>``, ``</box>``, ``<ref>``, ``</ref>``.
    obj_ids: ``<obj_0>`` … ``<obj_35>``, contiguous (``obj_ids[i] == obj_ids[0] + i``).
  """

  tokenizer: Any
  path: str
  vocab_size: int
  pad_id: int
  bos_id: int
  eos_id: int
  start_of_turn_id: int
  end_of_turn_id: int
  model_turn_ids: tuple[int, ...]
  image_id: int
  image_start_id: int
  image_end_id: int
  emb_id: int
  emb_end_id: int
  box_id: int
  box_end_id: int
  ref_id: int
  ref_end_id: int
  obj_ids: tuple[int, ...]

  @property
  def first_obj_id(self) -> int:
    return self.obj_ids[0]

  @property
  def never_target_ids(self) -> frozenset[int]:
    """Ids never in the loss (the reference's ``get_special_tokens_to_be_masked`` + pad)."""
    return frozenset((self.image_id, self.image_start_id, self.image_end_id, self.emb_id,
                      self.emb_end_id, self.pad_id) + self.obj_ids)


def _single_id(tok: Any, text: str, path: str) -> int:
  ids = tok.encode(text, add_special_tokens=False)
  if len(ids) != 1:
    raise TokenizerError(f"{path}: {text!r} should be one token, the tokenizer gives {ids}")
  return ids[0]


def load_tokenizer(path: str) -> TokenizerInfo:
  """Loads a local tokenizer directory and adds the 45 AnatomiX tokens where absent.

  Args:
    path: a Hugging Face tokenizer (or model) directory with ``tokenizer.json`` or
      ``tokenizer.model``; nothing is downloaded.

  Returns:
    The ``TokenizerInfo``.

  Raises:
    TokenizerError: no such directory or tokenizer file; the tokenizer lacks Gemma's chat tokens or
      a pad/bos/eos token; an added token does not encode to one id; the object ids are not
      contiguous.
  """
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel

  if not os.path.isdir(path):
    raise TokenizerError(f"{path}: no such tokenizer directory")
  if not any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model")):
    raise TokenizerError(f"{path}: no tokenizer.json or tokenizer.model in the directory")
  try:
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
  except (OSError, ValueError, KeyError) as e:
    raise TokenizerError(f"{path}: could not load the tokenizer ({e})") from e
  vocab = tok.get_vocab()
  lacking = [t for t in (START_OF_TURN, END_OF_TURN) if t not in vocab]
  if lacking:
    raise TokenizerError(f"{path}: the tokenizer lacks Gemma's chat token(s) {lacking}; stage 2 "
                         "needs a Gemma3 / MedGemma tokenizer (or train_demo_tokenizer's)")
  for name in ("pad", "bos", "eos"):
    if getattr(tok, f"{name}_token_id") is None:
      raise TokenizerError(f"{path}: the tokenizer has no {name} token")
  missing = [t for t in NEW_TOKENS if t not in vocab]
  if missing:
    tok.add_tokens(missing)  # not special, as the reference (add_special_tokens: false)
  ids = {t: _single_id(tok, t, path) for t in NEW_TOKENS + (START_OF_TURN, END_OF_TURN)}
  obj_ids = tuple(ids[f"<obj_{i}>"] for i in range(NUM_OBJECTS))
  if obj_ids != tuple(range(obj_ids[0], obj_ids[0] + NUM_OBJECTS)):
    raise TokenizerError(f"{path}: <obj_0>…<obj_35> must have contiguous ids, got {obj_ids}")
  model_turn_ids = tuple(tok.encode(START_OF_TURN + "model", add_special_tokens=False))
  if len(model_turn_ids) < 2 or model_turn_ids[0] != ids[START_OF_TURN]:
    raise TokenizerError(f"{path}: '<start_of_turn>model' encodes to {model_turn_ids}")
  return TokenizerInfo(
      tokenizer=tok, path=path, vocab_size=len(tok), pad_id=tok.pad_token_id,
      bos_id=tok.bos_token_id, eos_id=tok.eos_token_id, start_of_turn_id=ids[START_OF_TURN],
      end_of_turn_id=ids[END_OF_TURN], model_turn_ids=model_turn_ids, image_id=ids["<image>"],
      image_start_id=ids["<image_start>"], image_end_id=ids["<image_end>"], emb_id=ids["<emb>"],
      emb_end_id=ids["</emb>"], box_id=ids["<box>"], box_end_id=ids["</box>"],
      ref_id=ids["<ref>"], ref_end_id=ids["</ref>"], obj_ids=obj_ids)


def train_demo_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int) -> str:
  """Trains a small Gemma-like byte-level BPE tokenizer on a corpus (offline, seconds).

  Same texts (in the same order) → the same ``tokenizer.json``, byte for byte.

  Args:
    texts: the corpus (e.g. the synthetic reports, sentences and instructions).
    out_dir: the directory to write (``tokenizer.json``, ``tokenizer_config.json``,
      ``special_tokens_map.json``); created if absent, files replaced.
    vocab_size: the most tokens in all (specials, 256 byte symbols, merges and the 45 AnatomiX
      tokens); a small corpus may give fewer.

  Returns:
    ``out_dir``, loadable by ``load_tokenizer`` and ``AutoTokenizer.from_pretrained``.

  Raises:
    TokenizerError: ``vocab_size`` leaves no room for merges, or the corpus is empty.
  """
  from tokenizers import (  # pylint: disable=import-outside-toplevel
      AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers)

  smallest = len(DEMO_SPECIAL_TOKENS) + 256 + len(NEW_TOKENS) + 1
  if vocab_size < smallest:
    raise TokenizerError(f"vocab_size {vocab_size} is too small for a demo tokenizer "
                         f"(at least {smallest}: specials, 256 bytes, 45 AnatomiX tokens, merges)")
  corpus = [t for t in texts if t]
  if not corpus:
    raise TokenizerError(f"{out_dir}: the demo tokenizer needs a non-empty corpus")
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size - len(NEW_TOKENS), special_tokens=list(DEMO_SPECIAL_TOKENS),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(list(_DEMO_SCAFFOLD) + corpus, trainer=trainer)
  bos_id = tok.token_to_id("<bos>")
  # Gemma's post-processor: tokenizer(text) prepends <bos>.
  tok.post_processor = processors.TemplateProcessing(
      single="<bos> $A", pair="<bos> $A <bos>:1 $B:1", special_tokens=[("<bos>", bos_id)])
  tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in NEW_TOKENS])
  os.makedirs(out_dir, exist_ok=True)
  tok.save(os.path.join(out_dir, "tokenizer.json"))
  special = {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>",
             "unk_token": "<unk>", "additional_special_tokens": [START_OF_TURN, END_OF_TURN]}
  config = dict(special, tokenizer_class="PreTrainedTokenizerFast", add_bos_token=True,
                add_eos_token=False, clean_up_tokenization_spaces=False, padding_side="right",
                model_max_length=131072, chat_template=GEMMA3_CHAT_TEMPLATE)
  for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
    with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
      json.dump(content, f, indent=2, ensure_ascii=False)
      f.write("\n")
  return out_dir
