"""MIMIC-CXR-VQA, SLAKE and RaDialog-Instruct → Close-Ended VQA, Open-Ended VQA and RQA records.

Three sources (REFERENCE.md §4.1; the reference's ``instruction_tune/mimic_cxr_vqa.py``,
``slake.py``, ``radialog_instruct.py``), one builder each (:data:`BUILDERS`), all with the common
signature ``build(inputs, out_dir, *, seed=2025, ...) -> {split: records, skipped_{reason}: n}``.

Close-ended records use the reference's option format (:func:`choices.close_ended`):
``"{question} Options:\\n(A) yes\\n(B) no"``, labels of a random style (A–Z, a–z, 1–26), random
order, and with probability 0.5 the direct-answer suffix with the bare label as the answer. The
layout is drawn once per record from a stream keyed by (seed, source, split, record id), and each
record holds exactly one instruction and one response, so the loader's independent draws of an
instruction and a response can never pair a question with another layout's answer. Open-ended
records hold the question verbatim and the raw answer.

``mimic_vqa`` (MIMIC-Ext-MIMIC-CXR-VQA 1.0.0 ``dataset/{train,valid,test}.json``: lists of
``{"image_id", "image_path", "study_id", "subject_id", "question", "answer": [..], ...}``):
  * test: ``test_size`` (6000) random questions; validate: sampled down to the test count; train:
    capped at ``train_val_ratio`` (20) × the validate count. The sampling is done on the files,
    before any filter, as in the reference.
  * questions containing "any abnormalities" but not " in " are dropped, as are empty answers;
  * Close-Ended VQA: questions whose first answer is yes/no; Open-Ended VQA: every question (yes/no
    ones too), answer ``", ".join(answers).capitalize()`` with "F"/"M" → "Female"/"Male";
  * written close-ended first, then open-ended (the reference's ``close + open``).
  Inputs: ``vqa_dir`` (the directory with the three files), ``mimic_dir`` (MIMIC-CXR-JPG root).
  ``image_path`` may be given relative to ``files/`` (``p10/p10000032/s5…/{dicom}.jpg``) or to the
  root (``files/p10/…``); records store it relative to ``mimic_dir`` (``files/pXX/…``).

``slake`` (SLAKE 1.0 ``{train,validate,test}.json``: lists of ``{"img_id", "img_name", "question",
"answer", "q_lang", "modality", "answer_type", "content_type", "qid", ...}``, images in ``imgs/``):
  * only ``modality == "X-Ray"``, ``q_lang == "en"``, ``content_type`` not Modality or Plane;
  * ``answer_type`` CLOSED with a yes/no answer → Close-Ended VQA; OPEN → Open-Ended VQA; other
    closed questions are dropped. Written close-ended first.
  Inputs: ``slake_dir`` (the release root: the three files and ``imgs/``); records store
  ``imgs/{img_name}``, relative to ``slake_dir``.

``radialog_instruct`` (RaDialog-Instruct ``mimic_cxr_instruct_llava_v2.json``: a LLaVA-style list of
``{"id": dicom_id, "image": path, "task_type": "CPbQA"|..., "conversations": [{"from": "human",
"value": "<image>. …"}, {"from": "gpt", "value": "…"}]}``):
  * single-turn conversations only (exactly two messages); task types VC and RG dropped; MIMIC
    images only (a ``files`` path segment);
  * a random 80/10/10 split of the distinct image ids (``seed``), not the official MIMIC split;
  * CPbQA → Close-Ended VQA, CPaQA → Open-Ended VQA, RQA → RQA, as released text (no option
    template, as in the reference); the instruction is the human turn without ``"<image>"``.
  Inputs: ``radialog_json`` and ``mimic_dir`` (MIMIC-CXR-JPG root; its
  ``mimic-cxr-2.0.0-split.csv[.gz]`` maps dicom ids to studies, as the reference's metadata table).
  Records store the image path from its ``files`` segment on, relative to ``mimic_dir``.

Differences from the reference:
  * No Chest ImaGenome context filter: the reference drops questions whose image has no scene-graph
    context; here the context is built at load time for every image (``stage2.prompt``).
  * Sampling never fails on small files (the reference's ``random.sample`` needs 6000 test
    questions); samples are written in file order, and draws come from keyed numpy streams, so the
    chosen questions are not the reference's (its draws used the global ``random`` state).
  * SLAKE texts keep the curly apostrophe of the direct-answer suffix (the reference strips
    ``\\u2019`` from SLAKE questions and answers only).
  * RaDialog: the split is over distinct image ids (the reference split the id list with repeats,
    so an image could land in two splits); task types other than CPbQA/CPaQA/RQA that survive the
    filters are counted skips (``unsupported_task``: the schema has no task for them; the released
    v2 file has none); leading/trailing whitespace of both turns is stripped.
  * Entries whose image file is missing are counted skips (``missing_image``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from anatomix_jax.data import preprocess
from anatomix_jax.instruct import choices, common, schema

MIMIC_VQA, SLAKE, RADIALOG = "mimic_vqa", "slake", "radialog_instruct"
MIMIC_VQA_FILES = {"train": "train.json", "validate": "valid.json", "test": "test.json"}
SLAKE_FILES = {"train": "train.json", "validate": "validate.json", "test": "test.json"}
SLAKE_EXCLUDED_CONTENT = ("Modality", "Plane")
RADIALOG_DROPPED_TASKS = ("VC", "RG")
RADIALOG_TASKS = {"CPbQA": "Close-Ended VQA", "CPaQA": "Open-Ended VQA", "RQA": "RQA"}
GENDERS = {"f": "Female", "m": "Male"}
_TEXT = (str,)
_ID = (str, int, float)


# --- input parsing --------------------------------------------------------------------------------


def load_entries(path: str) -> list[Any]:
  """A JSON file holding a list of entries.

  Raises:
    FileNotFoundError: no such file.
    schema.SchemaError: not JSON, or not a list.
  """
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise schema.SchemaError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
  except UnicodeDecodeError as e:
    raise schema.SchemaError(f"{path}: not UTF-8 text ({e})") from None
  if not isinstance(data, list):
    raise schema.SchemaError(f"{path}: expected a JSON list of entries, got {type(data).__name__}")
  return data


def field(entry: Any, name: str, types: tuple[type, ...], where: str) -> Any:
  """``entry[name]``, checked to be one of ``types``.

  Raises:
    schema.SchemaError: ``"{where}: missing field 'name'"`` or ``"... field 'name' must be ..."``.
  """
  if not isinstance(entry, dict):
    raise schema.SchemaError(f"{where}: an entry must be a JSON object, got {type(entry).__name__}")
  if name not in entry:
    raise schema.SchemaError(f"{where}: missing field {name!r}")
  value = entry[name]
  if isinstance(value, bool) or not isinstance(value, types):
    kinds = " or ".join(t.__name__ for t in types)
    raise schema.SchemaError(f"{where}: field {name!r} must be {kinds}, got {value!r}")
  return value


def _id_text(value: Any, where: str, name: str) -> str:
  return str(int(common.number(value, where, name)))


def mimic_relative(path: str) -> str | None:
  """A MIMIC-CXR-JPG image path → relative to the MIMIC-CXR-JPG root (``files/pXX/…``).

  Accepts paths holding a ``files`` segment (anything before it is dropped) and paths relative to
  ``files/`` (``pXX/…``); None for anything else.
  """
  parts = [p for p in path.replace("\\", "/").split("/") if p and p != "."]
  if "files" in parts:
    rest = parts[parts.index("files"):]
    return "/".join(rest) if len(rest) > 1 else None
  if parts and len(parts[0]) == 3 and parts[0][0] == "p" and parts[0][1:].isdigit():
    return "/".join(["files"] + parts)
  return None


class _Images:
  """Existence of image files under one root (each path checked once)."""

  def __init__(self, root: str):
    self.root = root
    self._seen: dict[str, bool] = {}

  def exists(self, relative: str) -> bool:
    if relative not in self._seen:
      self._seen[relative] = os.path.isfile(os.path.join(self.root, relative))
    return self._seen[relative]


def _record(source: str, split: str, rid: str, task: str, image: str, instruction: str,
            response: str, meta: dict[str, Any]) -> dict[str, Any]:
  return {"id": rid, "source": source, "split": split, "task": task, "image": image,
          "instructions": [instruction], "responses": [response], "meta": meta}


def _sample(rng: Any, n: int, k: int | None) -> list[int]:
  """``min(k, n)`` distinct indices of ``range(n)`` in increasing order (all when k is None)."""
  if k is None or k >= n:
    return list(range(n))
  return sorted(int(i) for i in rng.choice(n, size=max(k, 0), replace=False))


# --- MIMIC-CXR-VQA --------------------------------------------------------------------------------


def mimic_vqa_selection(sizes: Mapping[str, int], seed: int, test_size: int | None,
                        train_val_ratio: float | None) -> dict[str, list[int]]:
  """Indices kept per split: test ≤ ``test_size``, validate ≤ test count, train ≤ ratio × val."""
  rng = choices.keyed_rng(seed, MIMIC_VQA, "sample")
  test = _sample(rng, sizes["test"], test_size)
  val = _sample(rng, sizes["validate"], len(test))
  train_cap = None if train_val_ratio is None else int(len(val) * train_val_ratio)
  return {"train": _sample(rng, sizes["train"], train_cap), "validate": val, "test": test}


def open_answer(answers: Sequence[str]) -> str:
  """The reference's open-ended answer: joined, ``str.capitalize``-d, F/M spelled out."""
  text = ", ".join(answers).capitalize()
  return GENDERS.get(text.lower(), text)


def _mimic_vqa_entry(entry: Any, where: str) -> dict[str, Any]:
  question = field(entry, "question", _TEXT, where)
  answer = field(entry, "answer", (list, str), where)
  answers = [answer] if isinstance(answer, str) else answer
  if not all(isinstance(a, str) for a in answers):
    raise schema.SchemaError(f"{where}: field 'answer' must be a list of strings, got {answer!r}")
  image_path = field(entry, "image_path", _TEXT, where)
  image = mimic_relative(image_path)
  if image is None:
    raise schema.SchemaError(f"{where}: field 'image_path' is not a MIMIC-CXR-JPG path "
                             f"(pXX/pSUBJECT/sSTUDY/DICOM.jpg): {image_path!r}")
  meta = {"dicom_id": field(entry, "image_id", _TEXT, where),
          "study_id": _id_text(field(entry, "study_id", _ID, where), where, "study_id")}
  if entry.get("subject_id") is not None:
    meta["subject_id"] = _id_text(entry["subject_id"], where, "subject_id")
  for key in ("content_type", "semantic_type"):
    if isinstance(entry.get(key), str):
      meta[key] = entry[key]
  return {"question": question, "answers": [a.strip() for a in answers if a.strip()],
          "image": image, "meta": meta}


def build_mimic_vqa(inputs: Mapping[str, str], out_dir: str, *, seed: int = 2025,
                    test_size: int | None = 6000, train_val_ratio: float | None = 20
                    ) -> dict[str, int]:
  """Writes ``{out_dir}/mimic_vqa/{split}.jsonl`` (see the module docstring).

  Args:
    inputs: ``vqa_dir`` (``train.json``, ``valid.json``, ``test.json``) and ``mimic_dir``.
    out_dir: output root.
    seed: the sampling and the option layouts are a function of it.
    test_size: test questions kept (None: all).
    train_val_ratio: train questions kept per kept validation question (None: all).

  Returns:
    ``{split: records}`` plus ``skipped_missing_image`` (questions whose image file is missing).

  Raises:
    schema.SchemaError: a file or entry in the wrong schema (file, entry and field named).
  """
  paths = common.require_inputs(inputs, ("vqa_dir", "mimic_dir"), MIMIC_VQA,
                                dirs=("vqa_dir", "mimic_dir"))
  files = {s: os.path.join(paths["vqa_dir"], name) for s, name in MIMIC_VQA_FILES.items()}
  # Every entry is checked, sampled or not, so a malformed file fails whatever the seed.
  data = {s: [_mimic_vqa_entry(e, f"{path}: entry {i}") for i, e in enumerate(load_entries(path))]
          for s, path in files.items()}
  keep = mimic_vqa_selection({s: len(v) for s, v in data.items()}, seed, test_size,
                             train_val_ratio)
  images, skips = _Images(paths["mimic_dir"]), common.Skips(MIMIC_VQA, ("missing_image",))
  by_split = {}
  for split in schema.SPLITS:
    close, open_ = [], []
    for i in keep[split]:
      where, e = f"{files[split]}: entry {i}", data[split][i]
      if ("any abnormalities" in e["question"] and " in " not in e["question"]) or not e["answers"]:
        continue
      if not images.exists(e["image"]):
        skips.add("missing_image", f"{where}: {e['image']} not under {paths['mimic_dir']}")
        continue
      if e["answers"][0].lower() in choices.YES_NO:
        rid = f"close-{i}"
        q, a = choices.close_ended(e["question"], e["answers"][0],
                                   choices.keyed_rng(seed, MIMIC_VQA, split, rid))
        close.append(_record(MIMIC_VQA, split, rid, "Close-Ended VQA", e["image"], q, a,
                             {**e["meta"], "answer": e["answers"][0].lower()}))
      open_.append(_record(MIMIC_VQA, split, f"open-{i}", "Open-Ended VQA", e["image"],
                           e["question"], open_answer(e["answers"]), e["meta"]))
    by_split[split] = close + open_
  return {**common.write_splits(out_dir, MIMIC_VQA, by_split), **skips.summary()}


# --- SLAKE ----------------------------------------------------------------------------------------


def _slake_entry(entry: Any, where: str) -> dict[str, Any]:
  out = {k: field(entry, k, _TEXT, where) for k in ("img_name", "question", "q_lang", "modality",
                                                   "answer_type", "content_type")}
  answer = field(entry, "answer", (str, int, float), where)
  out["answer"] = str(answer).strip()
  return out


def build_slake(inputs: Mapping[str, str], out_dir: str, *, seed: int = 2025) -> dict[str, int]:
  """Writes ``{out_dir}/slake/{split}.jsonl`` (see the module docstring).

  Args:
    inputs: ``slake_dir`` (``train.json``, ``validate.json``, ``test.json``, ``imgs/``).
    out_dir: output root.
    seed: the option layouts are a function of it.

  Returns:
    ``{split: records}`` plus ``skipped_missing_image``.

  Raises:
    schema.SchemaError: a file or entry in the wrong schema (file, entry and field named).
  """
  paths = common.require_inputs(inputs, ("slake_dir",), SLAKE, dirs=("slake_dir",))
  images, skips = _Images(paths["slake_dir"]), common.Skips(SLAKE, ("missing_image",))
  by_split = {}
  for split, name in SLAKE_FILES.items():
    path = os.path.join(paths["slake_dir"], name)
    close, open_ = [], []
    for i, raw in enumerate(load_entries(path)):
      where = f"{path}: entry {i}"
      e = _slake_entry(raw, where)
      if (e["modality"] != "X-Ray" or e["q_lang"] != "en"
          or e["content_type"] in SLAKE_EXCLUDED_CONTENT):
        continue
      kind = e["answer_type"].lower()
      if not e["answer"] or kind not in ("open", "closed") or (
          kind == "closed" and e["answer"].lower() not in choices.YES_NO):
        continue
      image = f"imgs/{e['img_name'].lstrip('/')}"
      if not images.exists(image):
        skips.add("missing_image", f"{where}: {image} not under {paths['slake_dir']}")
        continue
      meta = {"content_type": e["content_type"], "answer": e["answer"]}
      meta.update({k: raw[k] for k in ("qid", "img_id", "location") if k in raw})
      if kind == "closed":
        rid = f"close-{i}"
        q, a = choices.close_ended(e["question"], e["answer"],
                                   choices.keyed_rng(seed, SLAKE, split, rid))
        close.append(_record(SLAKE, split, rid, "Close-Ended VQA", image, q, a, meta))
      else:
        open_.append(_record(SLAKE, split, f"open-{i}", "Open-Ended VQA", image, e["question"],
                             e["answer"], meta))
    by_split[split] = close + open_
  return {**common.write_splits(out_dir, SLAKE, by_split), **skips.summary()}


# --- RaDialog-Instruct ----------------------------------------------------------------------------


def random_split(ids: Sequence[str], rng: Any, ratios: Sequence[float] = (0.8, 0.1, 0.1)
                 ) -> dict[str, str]:
  """Distinct ``ids`` → split: shuffled, first ``int(0.8 n)`` train, next ``int(0.1 n)`` val."""
  if len(ratios) != 3 or any(r < 0 for r in ratios) or abs(sum(ratios) - 1.0) > 1e-6:
    raise ValueError(f"split ratios must be 3 non-negative numbers summing to 1, got {ratios}")
  order = [ids[int(i)] for i in rng.permutation(len(ids))]
  n_train = int(ratios[0] * len(ids))
  n_val = int(ratios[1] * len(ids))
  return {image_id: ("train" if k < n_train else "validate" if k < n_train + n_val else "test")
          for k, image_id in enumerate(order)}


def _turns(conversations: list[Any], where: str) -> tuple[str, str]:
  """(human text, gpt text) of a two-message conversation."""
  by_role = {}
  for j, message in enumerate(conversations):
    role = field(message, "from", _TEXT, f"{where}: conversations[{j}]")
    by_role[role] = field(message, "value", _TEXT, f"{where}: conversations[{j}]")
  if set(by_role) != {"human", "gpt"}:
    raise schema.SchemaError(f"{where}: field 'conversations' must hold one 'human' and one 'gpt' "
                             f"message, got roles {[m.get('from') for m in conversations]}")
  instruction = by_role["human"].replace("<image>. ", "").replace("<image>", "")
  return instruction.strip(), by_role["gpt"].strip()


def _split_table(mimic_dir: str) -> dict[str, dict[str, str]]:
  try:
    rows = preprocess.read_split_table(preprocess.find_table(mimic_dir, preprocess.SPLIT_CSV))
  except preprocess.DataError as e:
    raise schema.SchemaError(str(e)) from e
  return {r["dicom_id"]: r for r in rows}


def build_radialog_instruct(inputs: Mapping[str, str], out_dir: str, *, seed: int = 2025,
                            ratios: Sequence[float] = (0.8, 0.1, 0.1)) -> dict[str, int]:
  """Writes ``{out_dir}/radialog_instruct/{split}.jsonl`` (see the module docstring).

  Args:
    inputs: ``radialog_json`` (``mimic_cxr_instruct_llava_v2.json``) and ``mimic_dir``.
    out_dir: output root.
    seed: the image-id split is a function of it.
    ratios: train/validate/test shares of the image ids.

  Returns:
    ``{split: records}`` plus ``skipped_{reason}`` for ``missing_image``, ``unknown_dicom`` (not in
    the split table), ``unsupported_task`` and ``empty_text``.

  Raises:
    schema.SchemaError: an entry or the split table in the wrong schema (file and field named).
  """
  paths = common.require_inputs(inputs, ("radialog_json", "mimic_dir"), RADIALOG,
                                dirs=("mimic_dir",))
  path = paths["radialog_json"]
  table = _split_table(paths["mimic_dir"])
  kept = []
  for i, entry in enumerate(load_entries(path)):
    where = f"{path}: entry {i}"
    image_id = field(entry, "id", _TEXT, where)
    image_path = field(entry, "image", _TEXT, where)
    task_type = field(entry, "task_type", _TEXT, where)
    conversations = field(entry, "conversations", (list,), where)
    image = mimic_relative(image_path)
    if len(conversations) == 2 and task_type not in RADIALOG_DROPPED_TASKS and image is not None:
      kept.append((i, where, image_id, image, task_type, conversations))
  split_of = random_split(list(dict.fromkeys(k[2] for k in kept)),
                          choices.keyed_rng(seed, RADIALOG, "split"), ratios)
  images = _Images(paths["mimic_dir"])
  skips = common.Skips(RADIALOG, ("missing_image", "unknown_dicom", "unsupported_task",
                                  "empty_text"))
  by_split: dict[str, list[dict[str, Any]]] = {s: [] for s in schema.SPLITS}
  for i, where, image_id, image, task_type, conversations in kept:
    instruction, response = _turns(conversations, where)
    if task_type not in RADIALOG_TASKS:
      skips.add("unsupported_task", f"{where}: task_type {task_type!r}")
    elif image_id not in table:
      skips.add("unknown_dicom", f"{where}: id {image_id!r} is not in the MIMIC split table")
    elif not images.exists(image):
      skips.add("missing_image", f"{where}: {image} not under {paths['mimic_dir']}")
    elif not instruction or not response:
      skips.add("empty_text", f"{where}: an empty turn")
    else:
      row = table[image_id]
      split = split_of[image_id]
      by_split[split].append(_record(
          RADIALOG, split, f"{image_id}-{i}", RADIALOG_TASKS[task_type], image, instruction,
          response, {"dicom_id": image_id, "study_id": row["study_id"],
                     "subject_id": row["subject_id"], "task_type": task_type}))
  return {**common.write_splits(out_dir, RADIALOG, by_split), **skips.summary()}


BUILDERS: dict[str, Callable[..., dict[str, int]]] = {
    MIMIC_VQA: build_mimic_vqa, SLAKE: build_slake, RADIALOG: build_radialog_instruct}
