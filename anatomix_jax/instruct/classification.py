"""MIMIC-CXR CheXpert labels → Image Classification records (``mimic_cxr_classification``).

Follows the reference's ``instruction_tune/mimic_cxr.py`` and ``templates.py``
(``image_classification_mimic_cxr``), REFERENCE.md §4.1 and §4.3:

  * one record per study of ``mimic-cxr-2.0.0-chexpert.csv[.gz]`` (first row of a repeated study),
    with one image of the study from ``mimic-cxr-2.0.0-split.csv[.gz]`` and the study's split. When
    ``mimic-cxr-2.0.0-metadata.csv[.gz]`` is present, only ``views`` (PA, AP) images are used and
    the best by the reference's view ranking (PA, AP, LATERAL, …) is taken; without it (e.g. the
    synthetic dataset), the study's first image in the split table;
  * labels: empty → 0; uncertain (−1) → :data:`UNCERTAIN_MAP` (1 for Atelectasis, Edema and Pleural
    Effusion, 0 for Cardiomegaly and Consolidation); other uncertain labels stay −1: listed as
    options, never an answer, never a yes/no negative;
  * studies without any positive label (the reference's empty answer) are dropped;
  * train studies with "No Finding" = 1 are subsampled to ``no_finding_cap`` (50,000);
  * three prompt families, as in the reference:

    - ``options``: the 14 labels as a labelled, shuffled option list, 3 templates, suffix "There may
      be more than one answer." (with probability 0.5 "… Answer with the options’ letter/number from
      the given choices directly." and the answer is the labels only), answer = the positive options
      in display order, ``", "``-joined;
    - ``combination`` (1–5 positives, Pleural Other and No Finding excluded): "Which findings are in
      this chest X-ray? Options:" (3 templates) over the positive combination and 3 other
      combinations of as many labels, lower-cased, labelled and shuffled; answer = that option;
    - ``yes_no`` (at least one positive and one negative label, same exclusions): "Does this chest
      X-ray show {disease}?" about a positive or (probability 0.5) a negative label, answered
      "Yes"/"No"; or ``yes_no_options``, the same with a labelled Yes/No option list, answered
      ``"(L) Yes"``.

Instruction/response consistency: the reference stores all 8 variants of a study in one sample and
draws an instruction and a response independently, so most drawn pairs do not belong together.
Here each record holds ONE family, chosen at build time with the reference's odds (each of its
instruction variants equally likely: 3 options, 3 combination, 1 + 1 yes/no), and all instructions
of a record share one option layout and hence one answer. Draws come from a stream keyed by
(seed, study id).

Other differences: the "No Finding" subsample is an exact random ``no_finding_cap`` of the train
studies with an image (the reference keeps each with probability 50,000 / all No-Finding rows of the
table); the 3 distractor combinations are distinct (the reference could repeat one, leaving fewer
options); a missing image file is a counted skip.

Inputs: ``mimic_dir`` (MIMIC-CXR-JPG root with ``files/`` and the tables; ``generator.layout(root)``
of a synthetic dataset works as it is). Record ``image`` paths are relative to it
(``files/pXX/pSUBJECT/sSTUDY/{dicom_id}.jpg``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from anatomix_jax import anatomy
from anatomix_jax.data import preprocess
from anatomix_jax.instruct import choices, common, schema

SOURCE = "mimic_cxr_classification"
TASK = "Image Classification"
METADATA_CSV = "mimic-cxr-2.0.0-metadata.csv"
NO_FINDING = "No Finding"
NO_FINDING_CAP = 50_000
UNCERTAIN_MAP = {"Atelectasis": 1, "Cardiomegaly": 0, "Consolidation": 0, "Edema": 1,
                 "Pleural Effusion": 1}
# For data whose −1 cells are true negatives (the synthetic generator's tables).
UNCERTAIN_AS_NEGATIVE = {n: 0 for n in anatomy.CHEXPERT_LABELS}
EXCLUDED_FROM_CHOICES = ("Pleural Other", NO_FINDING)
RANKED_VIEWS = ("PA", "AP", "LATERAL", "LL", "AP AXIAL", "AP LLD", "AP RLD", "PA RLD", "PA LLD",
                "LAO", "RAO", "LPO", "XTABLE LATERAL", "SWIMMERS", "")
OPTION_TEMPLATES = (
    "Please review the chest X-ray(s) and classify any diseases from the following list that are "
    "present in the image. Options:\n{options}",
    "Given the CXR, identify any diseases. Options:\n{options}",
    "Identify any diseases visible in the given CXR. Options:\n{options}")
OPTION_SUFFIX = "\nThere may be more than one answer."
OPTION_DIRECT_SUFFIX = ("\nThere may be more than one answer. Answer with the options\u2019 "
                        "letter/number from the given choices directly.")
COMBINATION_TEMPLATES = (
    "Which findings are in this chest X-ray? Options:\n{options}",
    "Which diseases are represented in this image:\n{options}",
    "Perform disease classification given the following label set:\n{options}")
YES_NO_TEMPLATE = "Does this chest X-ray show {disease}?"
YES_NO_OPTIONS_TEMPLATE = "Does this chest X-ray show {disease}? Options:\n{options}"
_CHOICE_LABELS = tuple(n for n in anatomy.CHEXPERT_LABELS if n not in EXCLUDED_FROM_CHOICES)


# --- labels ---------------------------------------------------------------------------------------


def read_labels(path: str, uncertain_map: Mapping[str, int] = UNCERTAIN_MAP
                ) -> dict[str, dict[str, int]]:
  """``mimic-cxr-2.0.0-chexpert.csv[.gz]`` → {study_id: {label: 1, 0 or −1}} in table order.

  Empty cells are 0; −1 becomes ``uncertain_map[label]`` where the label has an entry, else stays
  −1.

  Raises:
    schema.SchemaError: a missing column, or a cell that is not 1, 0, −1 or empty (file, line and
      column named).
  """
  unknown = sorted(set(uncertain_map) - set(anatomy.CHEXPERT_LABELS))
  if unknown:
    raise ValueError(f"uncertain_map names unknown labels {unknown}")
  table: dict[str, dict[str, int]] = {}
  for line, row in common.read_csv(path, ("subject_id", "study_id") + anatomy.CHEXPERT_LABELS):
    where = f"{path}:{line}"
    study = str(int(common.number(row["study_id"], where, "study_id")))
    values = {}
    for name in anatomy.CHEXPERT_LABELS:
      text = (row[name] or "").strip()
      value = float(text) if text.lower() == "nan" else (
          common.number(text, where, name) if text else 0.0)
      if math.isnan(value):
        value = 0.0
      if value not in (1.0, 0.0, -1.0):
        raise schema.SchemaError(
            f"{where}: column {name!r} must be 1, 0, -1 or empty, got {text!r}")
      values[name] = int(uncertain_map.get(name, -1)) if value == -1.0 else int(value)
    table.setdefault(study, values)
  return table


def _table(mimic_dir: str, name: str, optional: bool = False) -> str | None:
  try:
    return preprocess.find_table(mimic_dir, name)
  except preprocess.DataError as e:
    if optional:
      return None
    raise schema.SchemaError(str(e)) from e


def study_images(mimic_dir: str, views: Sequence[str] | None = ("PA", "AP")
                 ) -> dict[str, dict[str, str]]:
  """study_id → the split-table row (dicom_id, subject_id, study_id, split) of its one image.

  With the metadata table present, images whose ``ViewPosition`` is not in ``views`` (None: all) are
  left out and the best-ranked view (:data:`RANKED_VIEWS`) wins; ties and the no-metadata case keep
  the table order.

  Raises:
    schema.SchemaError: a malformed split or metadata table.
  """
  try:
    rows = preprocess.read_split_table(_table(mimic_dir, preprocess.SPLIT_CSV))
  except preprocess.DataError as e:
    raise schema.SchemaError(str(e)) from e
  metadata_path = _table(mimic_dir, METADATA_CSV, optional=True)
  view_of = None
  if metadata_path is not None:
    view_of = {r["dicom_id"].strip(): (r["ViewPosition"] or "").strip()
               for _, r in common.read_csv(metadata_path, ("dicom_id", "ViewPosition"))}
  best: dict[str, tuple[int, dict[str, str]]] = {}
  for row in rows:
    rank = 0
    if view_of is not None:
      view = view_of.get(row["dicom_id"], "")
      if views is not None and view not in views:
        continue
      rank = RANKED_VIEWS.index(view) if view in RANKED_VIEWS else len(RANKED_VIEWS)
    if row["study_id"] not in best or rank < best[row["study_id"]][0]:
      best[row["study_id"]] = (rank, row)
  return {study: row for study, (_, row) in best.items()}


# --- prompt families ------------------------------------------------------------------------------


def option_texts(values: Mapping[str, int], rng: np.random.Generator) -> tuple[list[str], str]:
  """``options`` family: (3 instructions sharing one layout, answer)."""
  lines = choices.labelled(rng, anatomy.CHEXPERT_LABELS)
  positives = [line for line in lines if values[line.split(" ", 1)[1]] >= 1]
  direct = rng.random() < 0.5
  suffix = OPTION_DIRECT_SUFFIX if direct else OPTION_SUFFIX
  answer = ", ".join(choices.label_of(p) if direct else p for p in positives)
  block = "\n".join(lines)
  return [t.format(options=block) + suffix for t in OPTION_TEMPLATES], answer


def _positives(values: Mapping[str, int]) -> list[str]:
  return [n for n in _CHOICE_LABELS if values[n] == 1]


def has_combination(values: Mapping[str, int]) -> bool:
  """Whether the ``combination`` family applies (1–5 positive labels outside the exclusions)."""
  return 1 <= len(_positives(values)) <= 5


def combination_texts(values: Mapping[str, int], rng: np.random.Generator
                      ) -> tuple[list[str], str]:
  """``combination`` family: the positive combination among 3 others → (3 instructions, answer)."""
  positives = frozenset(_positives(values))
  seen, others = {positives}, []
  while len(others) < 3:
    pick = frozenset(_CHOICE_LABELS[int(j)]
                     for j in rng.choice(len(_CHOICE_LABELS), len(positives), replace=False))
    if pick not in seen:
      seen.add(pick)
      others.append(pick)
  text = lambda names: ", ".join(n for n in _CHOICE_LABELS if n in names).lower()  # noqa: E731
  lines = choices.labelled(rng, [text(positives)] + [text(o) for o in others])
  answer = next(line for line in lines if line.split(" ", 1)[1] == text(positives))
  block = "\n".join(lines)
  return [t.format(options=block) for t in COMBINATION_TEMPLATES], answer


def has_yes_no(values: Mapping[str, int]) -> bool:
  """Whether the yes/no families apply (a positive and a negative label outside the exclusions)."""
  return bool(_positives(values)) and any(values[n] == 0 for n in _CHOICE_LABELS)


def yes_no_texts(values: Mapping[str, int], rng: np.random.Generator, with_options: bool
                 ) -> tuple[list[str], str]:
  """``yes_no``/``yes_no_options``: about a positive or (p = 0.5) a negative label."""
  yes = rng.random() < 0.5
  pool = _positives(values) if yes else [n for n in _CHOICE_LABELS if values[n] == 0]
  disease = pool[int(rng.integers(len(pool)))].lower()
  word = "Yes" if yes else "No"
  if not with_options:
    return [YES_NO_TEMPLATE.format(disease=disease)], word
  lines = choices.labelled(rng, ("Yes", "No"))
  answer = next(line for line in lines if line.split(" ", 1)[1] == word)
  return [YES_NO_OPTIONS_TEMPLATE.format(disease=disease, options="\n".join(lines))], answer


def classification_texts(values: Mapping[str, int], rng: np.random.Generator
                         ) -> tuple[str, list[str], str]:
  """One family drawn with the reference's odds → (family, instructions, answer).

  Raises:
    ValueError: no positive label (no answer exists).
  """
  if not any(v >= 1 for v in values.values()):
    raise ValueError("a classification record needs at least one positive label")
  families = [("options", 3)]
  if has_combination(values):
    families.append(("combination", 3))
  if has_yes_no(values):
    families += [("yes_no", 1), ("yes_no_options", 1)]
  weights = np.array([w for _, w in families], np.float64)
  family = families[int(rng.choice(len(families), p=weights / weights.sum()))][0]
  if family == "options":
    instructions, answer = option_texts(values, rng)
  elif family == "combination":
    instructions, answer = combination_texts(values, rng)
  else:
    instructions, answer = yes_no_texts(values, rng, with_options=family == "yes_no_options")
  return family, instructions, answer


# --- builder --------------------------------------------------------------------------------------


def build(inputs: Mapping[str, str], out_dir: str, *, seed: int = 2025,
          no_finding_cap: int | None = NO_FINDING_CAP,
          uncertain_map: Mapping[str, int] = UNCERTAIN_MAP,
          views: Sequence[str] | None = ("PA", "AP")) -> dict[str, int]:
  """Writes ``{out_dir}/mimic_cxr_classification/{split}.jsonl`` (see the module docstring).

  Args:
    inputs: ``mimic_dir``.
    out_dir: output root.
    seed: the subsample and every prompt draw are a function of it.
    no_finding_cap: train studies with "No Finding" = 1 kept (None: all).
    uncertain_map: label → value of its −1 cells (others stay uncertain). For a synthetic dataset,
      whose generator writes −1 only for true negatives, pass :data:`UNCERTAIN_AS_NEGATIVE`.
    views: frontal views used when the metadata table is present (None: any view).

  Returns:
    ``{split: records}`` plus ``skipped_missing_image``, ``skipped_no_image`` (a labelled study
    without a usable image in the split table), ``dropped_no_positive`` and
    ``dropped_no_finding_cap``.

  Raises:
    schema.SchemaError: a malformed table (file, line and column named).
  """
  paths = common.require_inputs(inputs, ("mimic_dir",), SOURCE, dirs=("mimic_dir",))
  mimic_dir = paths["mimic_dir"]
  labels = read_labels(_table(mimic_dir, preprocess.CHEXPERT_CSV), uncertain_map)
  images = study_images(mimic_dir, views)
  skips = common.Skips(SOURCE, ("missing_image", "no_image"))
  candidates: list[tuple[dict[str, str], str, dict[str, int]]] = []
  no_positive = 0
  for study, values in labels.items():
    row = images.get(study)
    if row is None:
      skips.add("no_image", f"study {study} has no usable image in the split table")
      continue
    path = preprocess.image_path(mimic_dir, row["subject_id"], study, row["dicom_id"])
    if not os.path.isfile(path):
      skips.add("missing_image", f"study {study}: {path} does not exist")
      continue
    if not any(v >= 1 for v in values.values()):
      no_positive += 1
      continue
    candidates.append((row, os.path.relpath(path, mimic_dir), values))
  no_finding = [k for k, (row, _, v) in enumerate(candidates)
                if row["split"] == "train" and v[NO_FINDING] == 1]
  dropped: set[int] = set()
  if no_finding_cap is not None and len(no_finding) > no_finding_cap:
    rng = choices.keyed_rng(seed, SOURCE, "no_finding")
    keep = set(rng.choice(len(no_finding), size=no_finding_cap, replace=False).tolist())
    dropped = {k for j, k in enumerate(no_finding) if j not in keep}
  by_split: dict[str, list[dict[str, Any]]] = {s: [] for s in schema.SPLITS}
  for k, (row, image, values) in enumerate(candidates):
    if k in dropped:
      continue
    if row["split"] not in by_split:
      raise schema.SchemaError(f"{mimic_dir}: split table gives study {row['study_id']} the split "
                               f"{row['split']!r}, not one of {list(schema.SPLITS)}")
    family, instructions, answer = classification_texts(
        values, choices.keyed_rng(seed, SOURCE, row["study_id"]))
    by_split[row["split"]].append({
        "id": row["study_id"], "source": SOURCE, "split": row["split"], "task": TASK,
        "image": image, "instructions": instructions, "responses": [answer],
        "meta": {"dicom_id": row["dicom_id"], "study_id": row["study_id"],
                 "subject_id": row["subject_id"], "variant": family,
                 "positives": [n for n, v in values.items() if v == 1],
                 "uncertain": [n for n, v in values.items() if v == -1]}})
  counts = common.write_splits(out_dir, SOURCE, by_split)
  return {**counts, **skips.summary(), "dropped_no_positive": no_positive,
          "dropped_no_finding_cap": len(dropped)}
