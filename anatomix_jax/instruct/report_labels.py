"""A rule-based CheXpert labeller for the synthetic reports (``synthetic.describe``'s phrases).

``read_labels`` inverts the phrase templates of ``synthetic.describe.describe``: each positive
FINDINGS or IMPRESSION phrase gives the labels ``describe.labels_of`` sets for its finding, so on a
synthetic report (whole, its findings alone or its impression alone) the labels are exact. It lives
here, below both ``synthetic`` and ``evaluation`` (``synthetic.describe`` re-exports it), so the
scorer can read generated reports with it (``evaluate.metrics.synthetic_labels``).

Rules, on the lower-cased text from its first ``findings:`` / ``impression:`` header on (the whole
text without one, so a raw report's INDICATION such as "Line placement." is not read), one sentence
(split at ``.``, ``;`` and newlines) at a time:
  * a keyword counts unless the sentence has ``no`` / ``without`` / ``negative for`` before it
    ("No pleural effusion or pneumothorax." gives nothing);
  * consolidation and pneumonia also give Lung Opacity (``labels_of``: opacity, consolidation or
    pneumonia); an "opacity" / "opacities" gives Lung Opacity except in a sentence that says
    atelectasis (``labels_of``: atelectasis alone is not Lung Opacity);
  * any tube, line, catheter, pacemaker or "support device" gives Support Devices;
  * "No Finding" iff no other label is positive.
Normal statements ("The heart size is normal.", "No acute osseous abnormality.") name no keyword.
"""

from __future__ import annotations

import re

import numpy as np

from anatomix_jax import anatomy

_HEADER = re.compile(r"\b(?:findings|impression)\s*:")
_SENTENCE = re.compile(r"[.;\n]+")
_NEGATION = re.compile(r"\b(?:no|without|negative for)\b")
_ATELECTASIS = re.compile(r"\batelectas[ie]s\b")
_OPACITY = re.compile(r"\bopacit(?:y|ies)\b")
# keyword pattern → labels; a word may end in "s" / "es" (plurals).
_RULES = tuple((re.compile(rf"\b(?:{pattern})(?:s|es)?\b"), labels) for pattern, labels in (
    (r"cardiomegaly|heart is enlarged|enlarged heart|enlarged cardiac silhouette",
     ("Cardiomegaly",)),
    (r"mediastinum is widened|widened mediastinum|mediastinal widening",
     ("Enlarged Cardiomediastinum",)),
    (r"pleural effusion", ("Pleural Effusion",)),
    (r"consolidation", ("Consolidation", "Lung Opacity")),
    (r"pneumonia", ("Pneumonia", "Lung Opacity")),
    (r"atelectas[ie]s", ("Atelectasis",)),
    (r"edema", ("Edema",)),
    (r"nodule|mass", ("Lung Lesion",)),
    (r"pneumothorax", ("Pneumothorax",)),
    (r"pleural thickening", ("Pleural Other",)),
    (r"fracture", ("Fracture",)),
    (r"tube|line|catheter|pacemaker|support device", ("Support Devices",)),
))


def _positive(sentence: str) -> set[str]:
  """The labels one lower-cased sentence affirms."""
  negation = _NEGATION.search(sentence)
  limit = negation.start() if negation else len(sentence)
  found = {label for pattern, labels in _RULES
           for m in pattern.finditer(sentence) if m.start() < limit for label in labels}
  opacity = _OPACITY.search(sentence)
  if opacity and opacity.start() < limit and not _ATELECTASIS.search(sentence):
    found.add("Lung Opacity")
  return found


def read_labels(text: str) -> np.ndarray:
  """float32 ``[14]`` CheXpert labels (1 positive, 0 not), ``anatomy.CHEXPERT_LABELS`` order, of a
  report written with the synthetic phrases (module docstring); empty text → "No Finding"."""
  text = (text or "").lower()
  header = _HEADER.search(text)
  if header:
    text = text[header.start():]
  positive = set().union(*(_positive(s) for s in _SENTENCE.split(text)))
  if not positive:
    positive = {"No Finding"}
  return np.array([float(name in positive) for name in anatomy.CHEXPERT_LABELS], np.float32)
