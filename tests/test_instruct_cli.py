"""The instruction-data command line: every source has a builder; a MIMIC tree builds end to end."""

import json
import os
import subprocess
import sys

import pytest
from absl import app

import tiny
from anatomix_jax.instruct import build, schema
from anatomix_jax.synthetic import generator


def test_every_source_has_a_builder_and_inputs_parse():
  assert set(build.BUILDERS) == set(schema.SOURCES)
  assert build.parse_inputs(["a=/x", "b = /y=z"]) == {"a": "/x", "b": "/y=z"}
  with pytest.raises(app.UsageError, match="'nopath'"):
    build.parse_inputs(["nopath"])


def test_all_mimic_from_a_synthetic_tree(tmp_path):
  paths = generator.generate(str(tmp_path / "raw"), 6, 2, 2, seed=3, min_size=64, max_size=80,
                             workers=1)
  out = tmp_path / "instructions"
  proc = subprocess.run(
      [sys.executable, "-m", "anatomix_jax.instruct.build", "--source=all_mimic",
       f"--out_dir={out}", *[f"--input={k}={paths[k]}" for k in
                             ("mimic_dir", "imagenome_dir", "reports_dir")]],
      cwd=tiny.REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  counts = json.loads(proc.stdout)
  assert counts["mimic_report_gen"]["train"] == 6 and counts["anatomy_grounding"]["train"] == 12
  for source in build.MIMIC_SOURCES:
    records = list(schema.read_jsonl(os.path.join(out, source, "validate.jsonl")))
    assert records and all(r["source"] == source and r["split"] == "validate" for r in records)
