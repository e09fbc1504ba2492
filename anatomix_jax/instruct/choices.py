"""Option lists with random labels (the reference's ``add_choice_styles``) and seeded record draws.

The reference (``instruction_tune/templates.py``) renders close-ended questions as::

  "{question} Options:\\n(Q) no\\n(D) yes"

with the labels drawn from one random style (A–Z, a–z or 1–26; distinct labels drawn at random from
that style, so not necessarily consecutive) and the options in random order. With probability 0.5
the suffix :data:`DIRECT_SUFFIX` is appended and the answer is only the label (``"(D)"``); otherwise
the answer is the whole option (``"(D) yes"``).

Every draw is made once, when a record is built, from :func:`keyed_rng` (a stream keyed by the seed
and the record's identity, so a record does not change when other records are added or removed).
A record therefore stores the one question text and the one answer that belong together: the
stage-2 loader draws an instruction and a response independently, so a record must never hold two
instructions whose correct answers differ.
"""

from __future__ import annotations

import hashlib
import string
from collections.abc import Sequence

import numpy as np

CHOICE_STYLES: tuple[tuple[str, ...], ...] = (
    tuple(string.ascii_uppercase), tuple(string.ascii_lowercase),
    tuple(str(i) for i in range(1, 27)))
DIRECT_SUFFIX = "\nAnswer with the option\u2019s letter/number from the given choices directly."
YES_NO = ("yes", "no")


def keyed_rng(seed: int, *key: object) -> np.random.Generator:
  """A random stream that depends only on ``seed`` and ``key`` (e.g. source, split, record id)."""
  text = "\x1f".join(str(k) for k in key)
  digest = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
  return np.random.default_rng([int(seed), digest])


def labelled(rng: np.random.Generator, names: Sequence[str]) -> list[str]:
  """``names`` in random order as ``"(L) name"`` lines, labels distinct and of one random style.

  Raises:
    ValueError: more than 26 names.
  """
  if len(names) > 26:
    raise ValueError(f"at most 26 options can be labelled, got {len(names)}")
  style = CHOICE_STYLES[int(rng.integers(len(CHOICE_STYLES)))]
  labels = rng.choice(len(style), size=len(names), replace=False)
  lines = [f"({style[int(j)]}) {name}" for j, name in zip(labels, names)]
  return [lines[int(i)] for i in rng.permutation(len(lines))]


def label_of(line: str) -> str:
  """``"(Q) yes"`` → ``"(Q)"`` (the reference's ``option.split(" ")[0]``)."""
  return line.split(" ", 1)[0]


def close_ended(question: str, answer: str, rng: np.random.Generator) -> tuple[str, str]:
  """A yes/no question with a labelled, shuffled option list → (instruction, response).

  Args:
    question: the question text, verbatim.
    answer: ``"yes"`` or ``"no"`` (any case).
    rng: the record's stream (:func:`keyed_rng`).

  Returns:
    ``("{question} Options:\\n(A) yes\\n(B) no" [+ DIRECT_SUFFIX], "(B)" or "(B) no")``.
  """
  word = answer.strip().lower()
  if word not in YES_NO:
    raise ValueError(f"a close-ended answer must be yes or no, got {answer!r}")
  lines = labelled(rng, YES_NO)
  correct = next(line for line in lines if line.split(" ", 1)[1] == word)
  block = f"{question} Options:\n" + "\n".join(lines)
  if rng.random() < 0.5:
    return block + DIRECT_SUFFIX, label_of(correct)
  return block, correct
