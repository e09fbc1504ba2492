"""VQA (MIMIC-CXR-VQA, SLAKE, RaDialog-Instruct) and MIMIC-CXR classification processors.

Hand-made inputs in the released schemas, written to tmp_path; expectations computed by hand.
"""

import csv
import json
import os
import re
from collections import Counter

import numpy as np
import pytest

from anatomix_jax import anatomy
from anatomix_jax.data import preprocess
from anatomix_jax.instruct import choices, classification, schema, vqa
from anatomix_jax.synthetic import generator

DIRECT = "\nAnswer with the option\u2019s letter/number from the given choices directly."
_LINE = re.compile(r"\(([A-Z]|[a-z]|[1-9]|1[0-9]|2[0-6])\) (.+)")


def _touch(path):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(b"\xff\xd8\xff")


def _dump(path, data):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(data, f)


def _write_csv(path, header, rows):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", newline="") as f:
    csv.writer(f).writerows([header] + rows)


def _read(out_dir, source, split):
  return list(schema.read_jsonl(os.path.join(out_dir, source, f"{split}.jsonl")))


def _options(block):
  """Option lines → ({text: label}, style), checking one label style and distinct labels."""
  found = [_LINE.fullmatch(line) for line in block.split("\n")]
  assert all(found), block
  labels = [m.group(1) for m in found]
  assert len(set(labels)) == len(labels)
  styles = {"upper" if s.isupper() else "lower" if s.isalpha() else "digit" for s in labels}
  assert len(styles) == 1, labels
  return {m.group(2): f"({m.group(1)})" for m in found}, styles.pop()


def _check_close(instruction, response, question, word):
  """The exact close-ended format; returns (direct, style, order of the two words)."""
  direct = instruction.endswith(DIRECT)
  body = instruction[:-len(DIRECT)] if direct else instruction
  head, block = body.split(" Options:\n")
  assert head == question
  labels, style = _options(block)
  assert sorted(labels) == ["no", "yes"]
  assert response == (labels[word] if direct else f"{labels[word]} {word}")
  return direct, style, tuple(line.split(" ", 1)[1] for line in block.split("\n"))


# --- option rendering -----------------------------------------------------------------------------


def test_close_ended_layouts_are_random_and_consistent():
  seen = Counter()
  for k in range(600):
    word = "yes" if k % 2 else "no"
    q, a = choices.close_ended("Is there edema?", word.upper() if k % 3 == 0 else word,
                               choices.keyed_rng(7, "t", k))
    direct, style, order = _check_close(q, a, "Is there edema?", word)
    seen.update([("direct", direct), style, order])
    labels = re.findall(r"\((\w+)\)", q)
    seen["consecutive"] += labels in (["A", "B"], ["B", "A"], ["a", "b"], ["b", "a"],
                                      ["1", "2"], ["2", "1"])
  assert 240 < seen[("direct", True)] < 360
  assert all(seen[s] > 120 for s in ("upper", "lower", "digit"))
  assert seen[("yes", "no")] > 240 and seen[("no", "yes")] > 240
  assert seen["consecutive"] < 60  # labels are drawn from the whole style, not just A/B
  assert choices.close_ended("Q?", "yes", choices.keyed_rng(1, "x")) == choices.close_ended(
      "Q?", "yes", choices.keyed_rng(1, "x"))
  with pytest.raises(ValueError, match="yes or no"):
    choices.close_ended("Q?", "maybe", choices.keyed_rng(1, "x"))


# --- MIMIC-CXR-VQA --------------------------------------------------------------------------------

DICOMS = [f"{k:08x}-0a1b2c3d-4e5f6a7b-8c9d0e1f-2a3b4c5d" for k in range(12)]


def _vqa_entry(idx, question, answer, k, root_relative=False, subject="10000032"):
  study = str(50000000 + k)
  path = f"p{subject[:2]}/p{subject}/s{study}/{DICOMS[k]}.jpg"
  return {"split": "train", "idx": idx, "image_id": DICOMS[k], "question": question,
          "answer": answer, "content_type": "presence", "semantic_type": "verify",
          "subject_id": subject, "study_id": study,
          "image_path": ("files/" + path) if root_relative else path}


def _mimic_tree(root, entries, present):
  """vqa_dir with the three files; mimic_dir with the images of dicom indices ``present``."""
  vqa_dir, mimic_dir = str(root / "vqa"), str(root / "mimic")
  os.makedirs(mimic_dir, exist_ok=True)
  for name, rows in entries.items():
    _dump(os.path.join(vqa_dir, name), rows)
  for k in present:
    _touch(os.path.join(mimic_dir, "files", "p10", "p10000032", f"s{50000000 + k}",
                        f"{DICOMS[k]}.jpg"))
  return {"vqa_dir": vqa_dir, "mimic_dir": mimic_dir}


def test_mimic_vqa_filters_answers_and_options(tmp_path):
  train = [
      _vqa_entry(0, "Is there pleural effusion in the left lung?", ["yes"], 0),
      _vqa_entry(1, "Are there any abnormalities?", ["no"], 0),               # dropped
      _vqa_entry(2, "Are there any abnormalities in the right lung?", ["yes"], 1),
      _vqa_entry(3, "What is the gender of the patient?", ["f"], 1),
      _vqa_entry(4, "What is the sex of this patient?", ["m"], 2),
      _vqa_entry(5, "List all abnormalities in the left lung.", ["lung opacity", "atelectasis"], 2),
      _vqa_entry(6, "Is there edema?", [], 2),                                  # empty: dropped
      _vqa_entry(7, "Is there cardiomegaly?", ["no"], 3),                       # image missing
      _vqa_entry(8, "Is the heart enlarged?", ["No"], 4, root_relative=True),
  ]
  inputs = _mimic_tree(tmp_path, {"train.json": train, "valid.json": [train[0]],
                                  "test.json": [train[5]]}, present=[0, 1, 2, 4])
  out = str(tmp_path / "out")
  counts = vqa.build_mimic_vqa(inputs, out, seed=5, test_size=None, train_val_ratio=None)
  assert counts == {"train": 9, "validate": 2, "test": 1, "skipped_missing_image": 1}
  records = _read(out, "mimic_vqa", "train")
  assert [r["id"] for r in records] == ["close-0", "close-2", "close-8", "open-0", "open-2",
                                        "open-3", "open-4", "open-5", "open-8"]
  by_id = {r["id"]: r for r in records}
  opened = {i: by_id[f"open-{i}"]["responses"] for i in (0, 2, 3, 4, 5, 8)}
  assert opened == {0: ["Yes"], 2: ["Yes"], 3: ["Female"], 4: ["Male"],
                    5: ["Lung opacity, atelectasis"], 8: ["No"]}
  assert by_id["open-3"]["instructions"] == ["What is the gender of the patient?"]
  for i, word in ((0, "yes"), (2, "yes"), (8, "no")):
    r = by_id[f"close-{i}"]
    assert r["task"] == "Close-Ended VQA" and len(r["instructions"]) == len(r["responses"]) == 1
    _check_close(r["instructions"][0], r["responses"][0], train[i]["question"], word)
    assert r["meta"]["answer"] == word
  assert {r["task"] for r in records if r["id"].startswith("open")} == {"Open-Ended VQA"}
  assert by_id["close-8"]["image"] == f"files/p10/p10000032/s50000004/{DICOMS[4]}.jpg"
  assert by_id["open-0"]["image"] == f"files/p10/p10000032/s50000000/{DICOMS[0]}.jpg"
  assert by_id["open-0"]["meta"]["study_id"] == "50000000"
  assert by_id["open-0"]["meta"]["dicom_id"] == DICOMS[0]
  # Same seed → same files; another seed → other layouts.
  first = open(os.path.join(out, "mimic_vqa", "train.jsonl")).read()
  vqa.build_mimic_vqa(inputs, out, seed=5, test_size=None, train_val_ratio=None)
  assert open(os.path.join(out, "mimic_vqa", "train.jsonl")).read() == first
  vqa.build_mimic_vqa(inputs, str(tmp_path / "other"), seed=6, test_size=None,
                      train_val_ratio=None)
  assert open(os.path.join(tmp_path, "other", "mimic_vqa", "train.jsonl")).read() != first


@pytest.mark.parametrize("n_val,expected", [(4, {"train": 6, "validate": 3, "test": 3}),
                                            (2, {"train": 4, "validate": 2, "test": 3})])
def test_mimic_vqa_split_caps(tmp_path, n_val, expected):
  def rows(n):
    return [_vqa_entry(i, f"Which findings are in the left lung ({i})?", ["edema"], 0)
            for i in range(n)]
  inputs = _mimic_tree(tmp_path, {"train.json": rows(10), "valid.json": rows(n_val),
                                  "test.json": rows(5)}, present=[0])
  out = str(tmp_path / "out")
  counts = vqa.build_mimic_vqa(inputs, out, seed=1, test_size=3, train_val_ratio=2)
  assert {s: counts[s] for s in schema.SPLITS} == expected
  ids = [r["id"] for r in _read(out, "mimic_vqa", "train")]
  assert len(set(ids)) == len(ids) and all(0 <= int(i[5:]) < 10 for i in ids)
  other = vqa.mimic_vqa_selection({"train": 10, "validate": n_val, "test": 5}, 2, 3, 2)
  assert {s: len(v) for s, v in other.items()} == expected


def test_mimic_vqa_schema_errors(tmp_path):
  good = _vqa_entry(0, "Is there edema?", ["yes"], 0)
  bad_entries = [({k: v for k, v in good.items() if k != "question"}, "'question'"),
                 ({**good, "answer": 3}, "'answer'"),
                 ({**good, "image_path": "somewhere/else.jpg"}, "'image_path'")]
  for k, (bad, name) in enumerate(bad_entries):
    inputs = _mimic_tree(tmp_path / str(k), {"train.json": [], "valid.json": [good, bad],
                                             "test.json": []}, present=[0])
    with pytest.raises(schema.SchemaError, match=rf"valid\.json: entry 1: .*{name}"):
      vqa.build_mimic_vqa(inputs, str(tmp_path / "out"), test_size=None)
  inputs = _mimic_tree(tmp_path / "x", {"train.json": {"not": "a list"}, "valid.json": [],
                                        "test.json": []}, present=[])
  with pytest.raises(schema.SchemaError, match=r"train\.json: expected a JSON list"):
    vqa.build_mimic_vqa(inputs, str(tmp_path / "out"))


# --- SLAKE ----------------------------------------------------------------------------------------


def _slake(qid, question, answer, answer_type="OPEN", lang="en", modality="X-Ray",
           content="Organ", img=1):
  return {"img_id": img, "img_name": f"xmlab{img}/source.jpg", "question": question,
          "answer": answer, "q_lang": lang, "location": "Lung", "modality": modality,
          "answer_type": answer_type, "base_type": "vqa", "content_type": content,
          "triple": ["vhead", "_", "_"], "qid": qid}


def test_slake_filters_and_formats(tmp_path):
  train = [
      _slake(10, "Does the picture contain lung?", "Yes", "CLOSED", content="Abnormality"),
      _slake(11, "哪个器官不正常?", "肺", lang="zh"),                             # language
      _slake(12, "Where is the liver?", "Left", modality="CT"),                  # modality
      _slake(13, "What modality is used?", "X-Ray", content="Modality"),         # content type
      _slake(14, "Which plane is this?", "Coronal Plane", content="Plane"),      # content type
      _slake(15, "Which organ is abnormal?", "Lung"),
      _slake(16, "Which lung is abnormal, left or right?", "Left", "CLOSED"),    # not yes/no
      _slake(17, "Is the lung healthy?", "No", "CLOSED", img=2),                 # image missing
      _slake(18, "How many lungs are there?", 2, content="Quantity"),
  ]
  root = tmp_path / "slake"
  _dump(str(root / "train.json"), train)
  _dump(str(root / "validate.json"), [])
  _dump(str(root / "test.json"), [train[5]])
  _touch(str(root / "imgs" / "xmlab1" / "source.jpg"))
  out = str(tmp_path / "out")
  counts = vqa.build_slake({"slake_dir": str(root)}, out, seed=3)
  assert counts == {"train": 3, "validate": 0, "test": 1, "skipped_missing_image": 1}
  records = _read(out, "slake", "train")
  assert [r["id"] for r in records] == ["close-0", "open-5", "open-8"]
  assert [r["task"] for r in records] == ["Close-Ended VQA", "Open-Ended VQA", "Open-Ended VQA"]
  _check_close(records[0]["instructions"][0], records[0]["responses"][0],
               "Does the picture contain lung?", "yes")
  assert records[1]["instructions"] == ["Which organ is abnormal?"]
  assert records[1]["responses"] == ["Lung"] and records[2]["responses"] == ["2"]
  assert {r["image"] for r in records} == {"imgs/xmlab1/source.jpg"}
  assert records[1]["meta"]["qid"] == 15
  bad = {k: v for k, v in train[0].items() if k != "modality"}
  _dump(str(root / "validate.json"), [bad])
  with pytest.raises(schema.SchemaError,
                     match=r"validate\.json: entry 0: missing field 'modality'"):
    vqa.build_slake({"slake_dir": str(root)}, out)


# --- RaDialog-Instruct ----------------------------------------------------------------------------

RD = {k: f"{k}{k}{k}{k}aaaa-bbbbbbbb-cccccccc-dddddddd-eeeeeeee" for k in "123456"}


def _rd(dicom, task, turns, image=None, subject="10000001", study="50000001"):
  convo = [{"from": who, "value": text} for who, text in turns]
  return {"id": dicom, "task_type": task, "conversations": convo,
          "image": image or f"mimic-cxr-jpg/2.0.0/files/p10/p{subject}/s{study}/{dicom}.jpg"}


def test_radialog_filters_tasks_and_split(tmp_path):
  qa = [("human", "<image>. Is there edema?"), ("gpt", "No, there is no edema.")]
  entries = [
      _rd(RD["1"], "CPbQA", qa),
      _rd(RD["1"], "CPaQA", [("human", "<image>\nList all findings. "), ("gpt", "Edema.")]),
      _rd(RD["2"], "RQA", [("gpt", "The left lung is clear."),
                           ("human", "<image>. What about the left lung?")], study="50000002"),
      _rd(RD["2"], "RG", qa, study="50000002"),                                  # task dropped
      _rd(RD["3"], "VC", qa, study="50000003"),                                  # task dropped
      _rd(RD["3"], "CPbQA", qa + qa, study="50000003"),                          # multi-turn
      _rd("coco-1", "CPbQA", qa, image="coco/train2017/000000000001.jpg"),       # not MIMIC
      _rd(RD["4"], "EL", qa, study="50000004"),                                  # no schema task
      _rd(RD["5"], "CPbQA", qa, study="50000005"),                               # not in table
      _rd(RD["6"], "CPbQA", qa, study="50000006"),                               # image missing
  ]
  mimic = tmp_path / "mimic"
  _write_csv(str(mimic / "mimic-cxr-2.0.0-split.csv"),
             ["dicom_id", "study_id", "subject_id", "split"],
             [[RD[k], f"5000000{k}", "10000001", "train"] for k in "12346"])
  for k in "1234":
    _touch(str(mimic / "files" / "p10" / "p10000001" / f"s5000000{k}" / f"{RD[k]}.jpg"))
  path = str(tmp_path / "mimic_cxr_instruct_llava_v2.json")
  _dump(path, entries)
  out = str(tmp_path / "out")
  counts = vqa.build_radialog_instruct({"radialog_json": path, "mimic_dir": str(mimic)}, out)
  assert {k: v for k, v in counts.items() if k.startswith("skipped")} == {
      "skipped_missing_image": 1, "skipped_unknown_dicom": 1, "skipped_unsupported_task": 1,
      "skipped_empty_text": 0}
  records = [r for s in schema.SPLITS for r in _read(out, "radialog_instruct", s)]
  assert sum(counts[s] for s in schema.SPLITS) == 3
  by_id = {r["id"]: r for r in records}
  assert set(by_id) == {f"{RD['1']}-0", f"{RD['1']}-1", f"{RD['2']}-2"}
  one, two, three = (by_id[f"{RD['1']}-0"], by_id[f"{RD['1']}-1"], by_id[f"{RD['2']}-2"])
  assert (one["task"], one["instructions"], one["responses"]) == (
      "Close-Ended VQA", ["Is there edema?"], ["No, there is no edema."])
  assert (two["task"], two["instructions"], two["responses"]) == (
      "Open-Ended VQA", ["List all findings."], ["Edema."])
  assert (three["task"], three["instructions"], three["responses"]) == (
      "RQA", ["What about the left lung?"], ["The left lung is clear."])
  assert one["split"] == two["split"]  # one image, one split
  assert one["image"] == f"files/p10/p10000001/s50000001/{RD['1']}.jpg"
  assert three["meta"] == {"dicom_id": RD["2"], "study_id": "50000002", "subject_id": "10000001",
                           "task_type": "RQA"}
  # 5 image ids survive the filters (1, 2, 4, 5, 6): int(0.8·5) = 4 train, int(0.1·5) = 0 val.
  split_of = vqa.random_split([RD[k] for k in "12456"], choices.keyed_rng(2025, vqa.RADIALOG,
                                                                          "split"))
  assert Counter(split_of.values()) == {"train": 4, "test": 1}
  assert one["split"] == split_of[RD["1"]] and three["split"] == split_of[RD["2"]]
  entries[2]["conversations"][0]["from"] = "human"
  _dump(path, entries)
  with pytest.raises(schema.SchemaError, match=r"entry 2: field 'conversations' must hold one"):
    vqa.build_radialog_instruct({"radialog_json": path, "mimic_dir": str(mimic)}, out)
  del entries[4]["task_type"]
  _dump(path, entries)
  with pytest.raises(schema.SchemaError, match=r"entry 4: missing field 'task_type'"):
    vqa.build_radialog_instruct({"radialog_json": path, "mimic_dir": str(mimic)}, out)


def test_random_split_sizes():
  ids = [f"id{i}" for i in range(20)]
  split = vqa.random_split(ids, np.random.default_rng(0))
  assert Counter(split.values()) == {"train": 16, "validate": 2, "test": 2}
  assert split == vqa.random_split(ids, np.random.default_rng(0))
  assert Counter(vqa.random_split(ids[:10], np.random.default_rng(1)).values()) == {
      "train": 8, "validate": 1, "test": 1}
  with pytest.raises(ValueError, match="sum"):
    vqa.random_split(ids, np.random.default_rng(0), (0.8, 0.1, 0.2))


# --- MIMIC-CXR classification ---------------------------------------------------------------------

LABELS = anatomy.CHEXPERT_LABELS


def _labels(**cells):
  return [cells.get(n.replace(" ", "_"), "") for n in LABELS]


def test_uncertain_mapping_per_disease(tmp_path):
  path = str(tmp_path / "mimic-cxr-2.0.0-chexpert.csv")
  _write_csv(path, ["subject_id", "study_id", *LABELS],
             [["10000001", "50000001", *(["-1.0"] * 14)], ["10000001", "50000002", *([""] * 14)]])
  table = classification.read_labels(path)
  assert table["50000001"] == {**{n: -1 for n in LABELS}, "Atelectasis": 1, "Cardiomegaly": 0,
                               "Consolidation": 0, "Edema": 1, "Pleural Effusion": 1}
  assert table["50000002"] == {n: 0 for n in LABELS}
  assert classification.read_labels(path, classification.UNCERTAIN_AS_NEGATIVE)["50000001"] == {
      n: 0 for n in LABELS}
  _write_csv(path, ["subject_id", "study_id", *LABELS],
             [["10000001", "50000001", *_labels(Edema="2.0")]])
  with pytest.raises(schema.SchemaError, match=r"chexpert\.csv:2: column 'Edema' must be 1, 0, -1"):
    classification.read_labels(path)
  _write_csv(path, ["subject_id", "study_id", *LABELS[:-1]], [])
  with pytest.raises(schema.SchemaError, match="Support Devices"):
    classification.read_labels(path)


def _values(positive=(), uncertain=()):
  return {n: 1 if n in positive else -1 if n in uncertain else 0 for n in LABELS}


def test_classification_prompt_families():
  values = _values(("Atelectasis", "Edema"), ("Pneumonia",))
  for k in range(60):
    rng = choices.keyed_rng(0, "families", k)
    questions, answer = classification.option_texts(values, rng)
    blocks = {q.split("Options:\n", 1)[1].split("\nThere may")[0] for q in questions}
    assert len(questions) == 3 and len(blocks) == 1  # one layout shared by the 3 templates
    labels, _ = _options(blocks.pop())
    assert sorted(labels) == sorted(LABELS)  # uncertain Pneumonia is listed
    direct = questions[0].endswith("Answer with the options\u2019 letter/number from the given "
                                   "choices directly.")
    order = [line for line in questions[0].split("\n") if line[:1] == "("]
    positives = [line for line in order if line.split(" ", 1)[1] in ("Atelectasis", "Edema")]
    assert answer == ", ".join(line.split(" ")[0] if direct else line for line in positives)
    assert all(q.endswith(questions[0][-40:]) for q in questions)
    questions, answer = classification.combination_texts(values, rng)
    assert questions[0].startswith("Which findings are in this chest X-ray? Options:\n")
    labels, _ = _options(questions[0].split("Options:\n")[1])
    assert len(labels) == 4 and answer == f"{labels['atelectasis, edema']} atelectasis, edema"
    assert all(len(text.split(", ")) == 2 for text in labels)
    for with_options in (False, True):
      (question,), answer = classification.yes_no_texts(values, rng, with_options)
      disease = re.match(r"Does this chest X-ray show (.+?)\?", question).group(1)
      word = "Yes" if disease in ("atelectasis", "edema") else "No"
      assert disease != "pneumonia" and disease not in ("pleural other", "no finding")
      if with_options:
        labels, _ = _options(question.split("Options:\n")[1])
        assert answer == f"{labels[word]} {word}"
      else:
        assert question == f"Does this chest X-ray show {disease}?" and answer == word
  families = Counter(classification.classification_texts(values, choices.keyed_rng(1, k))[0]
                     for k in range(800))
  assert 240 < families["options"] < 360 and 240 < families["combination"] < 360
  assert 60 < families["yes_no"] < 140 and 60 < families["yes_no_options"] < 140
  only_other = _values(("Pleural Other",))
  assert {classification.classification_texts(only_other, choices.keyed_rng(2, k))[0]
          for k in range(20)} == {"options"}
  with pytest.raises(ValueError, match="positive"):
    classification.classification_texts(_values(), choices.keyed_rng(0))


def _cls_tree(root, metadata):
  mimic = root / "mimic"
  studies = {  # study: (split, [(dicom, view)], label cells, image present)
      "1": ("train", [("d1a", "LATERAL"), ("d1b", "PA")],
            _labels(**{n.replace(" ", "_"): "-1.0" for n in (
                "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion",
                "Pneumonia")}), True),
      "2": ("train", [("d2", "AP")], _labels(Cardiomegaly="1.0"), True),
      "3": ("validate", [("d3", "PA")], _labels(), True),                 # no positive label
      **{str(k): ("train", [(f"d{k}", "PA")], _labels(No_Finding="1.0"), True)
         for k in (4, 5, 6, 7)},
      "8": ("test", [("d8", "PA")], _labels(Lung_Lesion="1.0"), False),   # image missing
      "10": ("test", [("d10", "PA")], _labels(Pleural_Other="1.0"), True),
  }
  split_rows, meta_rows, label_rows = [], [], []
  for study, (split, images, cells, present) in studies.items():
    sid = str(50000000 + int(study))
    label_rows.append(["10000001", sid, *cells])
    for dicom, view in images:
      split_rows.append([dicom, sid, "10000001", split])
      meta_rows.append([dicom, "10000001", sid, view])
      if present:
        _touch(str(mimic / "files" / "p10" / "p10000001" / f"s{sid}" / f"{dicom}.jpg"))
  label_rows.append(["10000001", "50000009", *_labels(Edema="1.0")])  # no image in split table
  _write_csv(str(mimic / "mimic-cxr-2.0.0-split.csv"), ["dicom_id", "study_id", "subject_id",
                                                        "split"], split_rows)
  _write_csv(str(mimic / "mimic-cxr-2.0.0-chexpert.csv"), ["subject_id", "study_id", *LABELS],
             label_rows)
  if metadata:
    _write_csv(str(mimic / "mimic-cxr-2.0.0-metadata.csv"),
               ["dicom_id", "subject_id", "study_id", "ViewPosition"], meta_rows)
  return {"mimic_dir": str(mimic)}


@pytest.mark.parametrize("metadata", [False, True])
def test_classification_records(tmp_path, metadata):
  inputs = _cls_tree(tmp_path, metadata)
  out = str(tmp_path / "out")
  counts = classification.build(inputs, out, seed=4, no_finding_cap=2)
  assert counts == {"train": 4, "validate": 0, "test": 1, "skipped_missing_image": 1,
                    "skipped_no_image": 1, "dropped_no_positive": 1, "dropped_no_finding_cap": 2}
  train = {r["id"]: r for r in _read(out, classification.SOURCE, "train")}
  assert {"50000001", "50000002"} <= set(train)
  assert len({"50000004", "50000005", "50000006", "50000007"} & set(train)) == 2
  first = train["50000001"]
  assert first["meta"]["dicom_id"] == ("d1b" if metadata else "d1a")  # PA over lateral
  assert first["image"] == f"files/p10/p10000001/s50000001/{first['meta']['dicom_id']}.jpg"
  assert first["meta"]["positives"] == ["Atelectasis", "Edema", "Pleural Effusion"]
  assert first["meta"]["uncertain"] == ["Pneumonia"]
  for r in train.values():
    assert r["task"] == "Image Classification" and len(r["responses"]) == 1
    assert len(r["instructions"]) == (3 if r["meta"]["variant"] in ("options", "combination")
                                      else 1)
  (test,) = _read(out, classification.SOURCE, "test")
  assert test["id"] == "50000010" and test["meta"]["variant"] == "options"
  assert re.fullmatch(r"\(\w+\)( Pleural Other)?", test["responses"][0])


def test_classification_on_synthetic_dataset(tmp_path):
  paths = generator.generate(str(tmp_path / "synth"), 8, 3, 3, seed=3, min_size=32, max_size=40,
                             workers=1)
  out = str(tmp_path / "out")
  counts = classification.build(paths, out, seed=2,
                                uncertain_map=classification.UNCERTAIN_AS_NEGATIVE)
  split_rows = preprocess.read_split_table(paths["split_csv"])
  truth = preprocess.read_chexpert_table(paths["chexpert_csv"])  # −1/empty → 0, like the mapping
  expected = Counter(row["split"] for row in split_rows
                     if truth[(row["subject_id"], row["study_id"])].any())
  assert {s: counts[s] for s in schema.SPLITS} == {s: expected[s] for s in schema.SPLITS}
  assert counts["skipped_missing_image"] == counts["skipped_no_image"] == 0
  rows = {row["study_id"]: row for row in split_rows}
  for split in schema.SPLITS:
    for r in _read(out, classification.SOURCE, split):
      row = rows[r["id"]]
      assert r["split"] == row["split"] == split and r["meta"]["dicom_id"] == row["dicom_id"]
      assert os.path.isfile(os.path.join(paths["mimic_dir"], r["image"]))
      labels = truth[(row["subject_id"], row["study_id"])]
      assert r["meta"]["positives"] == [n for n, v in zip(LABELS, labels) if v]
      assert r["meta"]["uncertain"] == []
