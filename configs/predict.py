"""``--mode=predict``: a trained stage-2 model on PNG / JPEG / DICOM files or a folder of them.

    python -m anatomix_jax.main --config=configs/predict.py --workdir=<stage-2 workdir> \
        --mode=predict --config.predict.inputs=image.dcm [--config.predict.task=report]

The model is the workdir's (the config saved in its checkpoint). Tasks: report,
anatomy_grounding, phrase_grounding, grounded_captioning, grounded_diagnosis,
abnormality_detection, question (``predict.query`` holds the anatomy name, phrase, region
``<box>(x1,y1),(x2,y2)</box>`` on the 1024 canvas, or question).
"""

import ml_collections

from anatomix_jax.core import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, apm_only=False)
  c = ml_collections.ConfigDict()
  c.stage = "stage2"
  c.predict = ml_collections.ConfigDict(dict(
      inputs="",                       # an image file or a folder (not recursive)
      task="report", query="",
      checkpoint=-1,                   # -1: the latest
      generate=not arg.apm_only,       # False: APM boxes + retrieved findings only
      max_new_tokens=350,
      batch_size=4,
      overlay=True,                    # a PNG per image beside its JSON
      output_dir="",                   # default {workdir}/predict
  ))
  c.mesh = config_lib.mesh_config()
  c.sharding_rules = config_lib.DEFAULT_RULES
  return c
