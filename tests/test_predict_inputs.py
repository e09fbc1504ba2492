"""--mode=predict's input listing and task prompts (no model needed)."""

import pytest

from anatomix_jax.stage2 import predict


def test_list_inputs(tmp_path):
  with pytest.raises(FileNotFoundError, match="holds no image files"):
    predict.list_inputs(str(tmp_path))  # an empty folder
  with pytest.raises(FileNotFoundError, match="does not exist"):
    predict.list_inputs(str(tmp_path / "missing"))
  with pytest.raises(ValueError, match="inputs is empty"):
    predict.list_inputs("")
  for name in ("b.PNG", "a.dcm", "c.jpeg", "notes.txt"):
    (tmp_path / name).write_bytes(b"x")
  (tmp_path / "sub.png").mkdir()  # a folder named like an image is not an input
  assert [p.rsplit("/", 1)[1] for p in predict.list_inputs(str(tmp_path))] == [
      "a.dcm", "b.PNG", "c.jpeg"]
  assert predict.list_inputs(str(tmp_path / "notes.txt")) == [str(tmp_path / "notes.txt")]
  # Folders are searched recursively (MIMIC-CXR-JPG: files/p10/p10000032/s50414267/<id>.jpg);
  # results are named by the path below the folder, so equal file names do not collide.
  for sub in ("p10/s1", "p10/s2"):
    (tmp_path / sub).mkdir(parents=True)
    (tmp_path / sub / "view.jpg").write_bytes(b"x")
  found = predict.list_inputs(str(tmp_path))
  assert [p[len(str(tmp_path)) + 1:] for p in found] == [
      "a.dcm", "b.PNG", "c.jpeg", "p10/s1/view.jpg", "p10/s2/view.jpg"]
  assert [predict.output_name(p, str(tmp_path)) for p in found] == [
      "a", "b", "c", "p10/s1/view", "p10/s2/view"]
  assert predict.output_name(found[3], found[3]) == "view"  # a single file: its stem


def test_instruction_templates():
  assert predict.instruction("phrase_grounding", "left pleural effusion") == (
      "Phrase Grounding", "Please locate the following phrase: left pleural effusion")
  assert predict.instruction("report", "") == ("Report Generation", "Generate report:\n")
  with pytest.raises(ValueError, match="needs predict.query"):
    predict.instruction("anatomy_grounding", "")
  with pytest.raises(ValueError, match="not one of"):
    predict.instruction("segment", "")
