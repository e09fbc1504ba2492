"""``--mode=eval``: score a stage-2 checkpoint on each task's test records (REFERENCE.md §5-6).

    python -m anatomix_jax.main --config=configs/eval.py --workdir=<stage-2 workdir> --mode=eval

The model, APM and data are those the workdir was trained with (the config saved in its
checkpoint); this config chooses the records, the generation budget and the metrics. ``:demo``
evaluates the stage-2 demo in a few minutes (a few records per task, short answers), with the
synthetic reports' exact label F1 (``metrics.synthetic_labels``).
"""

import ml_collections

from anatomix_jax.core import config as config_lib
from anatomix_jax.instruct import schema


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, demo=False)
  c = ml_collections.ConfigDict()
  c.stage = "stage2"
  c.evaluate = ml_collections.ConfigDict(dict(
      split="test",
      checkpoint=-1,                   # the step to score; -1: the latest
      # source → fraction of its test records; the reference scores 35 % of VinDr-Instruct.
      sources=ml_collections.ConfigDict({s: 0.35 if s == "vindr_instruct" else 1.0
                                         for s in schema.SOURCES}),
      tasks=(),                        # only these tasks (empty: all)
      max_per_task=0,                  # cap per (source, task); 0: none
      seed=2025,                       # the subsampling draw
      batch_size=8,                    # generation batch (this host)
      max_new_tokens=350,              # the reference's benchmark setting
      data_dir="", image_root="",      # override the training run's data location
      # Test-time ablations (empty: as the run was trained). context: full | skip | only_emb |
      # names (stage2.prompt); image_tokens: patches | cls. The results are labelled with them
      # and the run's phase (align = step 1 only, finetune = both steps).
      context="", image_tokens="",
      output_dir="",                   # default {workdir}/eval/{split}_step{N}
      # The left/right flip test (stage2.flip): also answer every record on its image mirrored
      # (boxes x → 1024 − x, left/right words and sided anatomies swapped); results.json/.md
      # compare each task's metrics, the APM's box IoU and the side accuracy (original vs mirrored).
      flip=False,
      # A trivial image-blind baseline scored on the same samples (stage2.baselines: the mean
      # training box of each phrase, the most common training answer), from the data's train
      # split; results.json "baseline", results.md a row under Table 1 and a model-vs-baseline
      # table. With predictions it needs data_dir (the instruction data); skipped without.
      baseline=True,
      # Score another system's answers instead of generating: a JSONL with id, source, task,
      # reference, answer; box_format says how those answers write boxes.
      predictions="",
      box_format="anatomix",           # anatomix | chexagent | radvlm | maira2 | medrega | paligemma
      metrics=ml_collections.ConfigDict(dict(
          semantic_matching="minilm",  # mAP labels: MiniLM cosine (the reference) or "exact"
          match_threshold=0.8,
          # BERTScore: a local BERT/DistilBERT directory (the reference: distilbert-base-uncased,
          # layer 5, rescaled with bert_score's baseline: a TSV path or "P,R,F").
          bertscore_dir="", bertscore_layers=5, bertscore_baseline="",
          # CheXbert: chexbert.pth (or .safetensors) + a bert-base-uncased config/tokenizer dir.
          chexbert_weights="", chexbert_bert_dir="",
          radgraph_dir="",             # RadGraph-F1: needs the radgraph package and this model
          # Report Generation label F1 read by the synthetic reports' rule-based labeller
          # (instruct.report_labels, exact on synthetic/describe's phrases): the demo data only.
          synthetic_labels=False,
      )),
  ))
  c.mesh = config_lib.mesh_config()
  c.sharding_rules = config_lib.DEFAULT_RULES
  if arg.demo:
    c.evaluate.update(dict(max_per_task=16, max_new_tokens=64, batch_size=8))
    c.evaluate.metrics.synthetic_labels = True
  return c
