"""Words for a synthetic image: CheXpert labels, Chest ImaGenome attributes, and the report text.

Each finding of :class:`phantom.Findings` becomes one report phrase and a set of
``"category|yes|finding"`` attributes on the anatomies it involves, in the vocabulary of Chest
ImaGenome (``anatomicalfinding``, ``disease``, ``tubesandlines``, ``device``, plus the ``nlp``,
``laterality`` and ``severity`` tags the reference's sentence rule skips). Normal statements become
``"...|no|..."`` attributes, so readers see negations that must not make a sentence. With the
reference rule the attributes give sentences like "Right lower lung zone shows lung opacity and
pneumonia.".

:func:`read_labels` (from :mod:`anatomix_jax.instruct.report_labels`, a layer below, so that
``evaluation`` can use it too) reads the labels back from the report text:
``read_labels(report) == labels_of(f)``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from anatomix_jax import anatomy
from anatomix_jax.instruct import report_labels
from anatomix_jax.synthetic.phantom import SIDES, ZONES, Findings


# The rule-based reader inverting :func:`describe`'s phrases (float32 [14] labels of a report text).
read_labels = report_labels.read_labels


@dataclasses.dataclass
class Description:
  """Text side of one image.

  Attributes:
    labels: float32 ``[14]`` CheXpert labels (1 positive, 0 negative), ``CHEXPERT_LABELS`` order.
    mentions: {bbox_name: [(phrase, [attribute strings])]} — one group per phrase naming the anatomy.
    findings: report FINDINGS phrases, in order.
    impression: report IMPRESSION phrases, in order.
  """
  labels: np.ndarray
  mentions: dict[str, list[tuple[str, list[str]]]]
  findings: list[str]
  impression: list[str]


def labels_of(f: Findings) -> np.ndarray:
  """float32 ``[14]`` CheXpert labels of a finding set; "No Finding" iff nothing else is positive."""
  positive = {
      "Atelectasis": f.atelectasis is not None,
      "Cardiomegaly": f.cardiomegaly,
      "Consolidation": f.consolidation is not None,
      "Edema": f.edema,
      "Enlarged Cardiomediastinum": f.wide_mediastinum,
      "Fracture": f.fracture is not None,
      "Lung Lesion": f.nodule is not None,
      "Lung Opacity": any(x is not None for x in (f.opacity, f.consolidation, f.pneumonia)),
      "Pleural Effusion": bool(f.effusion),
      "Pleural Other": f.pleural_thickening is not None,
      "Pneumonia": f.pneumonia is not None,
      "Pneumothorax": f.pneumothorax is not None,
      "Support Devices": bool(f.devices),
  }
  positive["No Finding"] = not any(positive.values())
  return np.array([float(positive[name]) for name in anatomy.CHEXPERT_LABELS], np.float32)


def _zone(side: int, zone: int) -> str:
  return f"{SIDES[side]} {ZONES[zone]} lung zone"


def describe(f: Findings, rng: np.random.Generator) -> Description:
  """Builds labels, scene-graph attributes and report phrases for one image's findings."""
  mentions: dict[str, list[tuple[str, list[str]]]] = {}
  findings: list[str] = []
  impression: list[str] = []

  def say(phrase: str, where: dict[str, list[str]], summary: str | None = None,
          side: int | None = None, severity: str | None = None) -> None:
    findings.append(phrase)
    if summary:
      impression.append(summary)
    for bbox_name, attributes in where.items():
      group = list(attributes)
      if attributes and "|yes|" in attributes[0]:
        group.append("nlp|yes|abnormal")
        if side is not None:
          group.append(f"laterality|yes|{SIDES[side]}")
        if severity:
          group.append(f"severity|yes|{severity}")
      mentions.setdefault(bbox_name, []).append((phrase, group))

  if f.cardiomegaly:
    say("The heart is enlarged.", {"cardiac silhouette":
                                   ["anatomicalfinding|yes|enlarged cardiac silhouette"]},
        "Cardiomegaly.")
  else:
    say("The heart size is normal.", {"cardiac silhouette":
                                      ["anatomicalfinding|no|enlarged cardiac silhouette",
                                       "nlp|yes|normal"]})
  if f.wide_mediastinum:
    widened = ["anatomicalfinding|yes|mediastinal widening"]
    say("The mediastinum is widened.", {"upper mediastinum": widened, "mediastinum": widened},
        "Widened mediastinum.")
  for side in f.effusion:
    severity = str(rng.choice(["small", "moderate"]))
    name = SIDES[side]
    fluid = ["anatomicalfinding|yes|pleural effusion"]
    say(f"There is a {severity} {name} pleural effusion with blunting of the {name} costophrenic "
        "angle.",
        {f"{name} lung": fluid, f"{name} lower lung zone": fluid,
         f"{name} costophrenic angle": fluid + ["anatomicalfinding|yes|costophrenic angle blunting"],
         f"{name} hemidiaphragm": fluid},
        f"{severity.capitalize()} {name} pleural effusion.", side,
        "mild" if severity == "small" else "moderate")
  if f.opacity is not None:
    zone = _zone(*f.opacity)
    hazy = ["anatomicalfinding|yes|lung opacity"]
    say(f"There is a hazy opacity in the {zone}.",
        {zone: hazy, f"{SIDES[f.opacity[0]]} lung": hazy}, f"Opacity in the {zone}.", f.opacity[0])
  if f.consolidation is not None:
    zone = _zone(*f.consolidation)
    dense = ["anatomicalfinding|yes|consolidation", "anatomicalfinding|yes|lung opacity"]
    say(f"Dense consolidation with air bronchograms is seen in the {zone}.",
        {zone: dense, f"{SIDES[f.consolidation[0]]} lung": dense},
        f"Consolidation in the {zone}.", f.consolidation[0])
  if f.pneumonia is not None:
    zone = _zone(*f.pneumonia)
    patchy = ["anatomicalfinding|yes|lung opacity", "disease|yes|pneumonia"]
    say(f"Patchy opacities in the {zone} are concerning for pneumonia.",
        {zone: patchy, f"{SIDES[f.pneumonia[0]]} lung": patchy}, f"Pneumonia in the {zone}.",
        f.pneumonia[0])
  if f.atelectasis is not None:
    name = SIDES[f.atelectasis]
    collapse = ["anatomicalfinding|yes|atelectasis"]
    say(f"Band-like opacity at the {name} lung base with elevation of the {name} hemidiaphragm, "
        "consistent with atelectasis.",
        {f"{name} lower lung zone": collapse, f"{name} lung": collapse,
         f"{name} hemidiaphragm": ["anatomicalfinding|yes|elevated hemidiaphragm"]},
        f"{name.capitalize()} basilar atelectasis.", f.atelectasis)
  if f.edema:
    haze = ["anatomicalfinding|yes|pulmonary edema/hazy opacity"]
    congestion = ["anatomicalfinding|yes|vascular congestion"]
    say("Bilateral perihilar haziness and vascular congestion consistent with pulmonary edema.",
        {"right lung": haze, "left lung": haze, "right hilar structure": congestion,
         "left hilar structure": congestion}, "Pulmonary edema.")
  if f.nodule is not None:
    zone = _zone(*f.nodule)
    size = int(rng.integers(8, 20))
    nodule = ["anatomicalfinding|yes|mass/nodule (not otherwise specified)"]
    say(f"A {size} mm nodule is seen in the {zone}.",
        {zone: nodule, f"{SIDES[f.nodule[0]]} lung": nodule}, f"Nodule in the {zone}.",
        f.nodule[0])
  if f.pneumothorax is not None:
    name = SIDES[f.pneumothorax]
    air = ["anatomicalfinding|yes|pneumothorax"]
    severity = str(rng.choice(["small", "moderate"]))
    say(f"There is a {severity} {name} apical pneumothorax.",
        {f"{name} apical zone": air, f"{name} upper lung zone": air, f"{name} lung": air},
        f"{severity.capitalize()} {name} pneumothorax.", f.pneumothorax,
        "mild" if severity == "small" else "moderate")
  if not f.effusion and f.pneumothorax is None:
    normal = ["anatomicalfinding|no|pleural effusion", "anatomicalfinding|no|pneumothorax",
              "nlp|yes|normal"]
    say("No pleural effusion or pneumothorax.", {"right lung": normal, "left lung": normal})
  if f.pleural_thickening is not None:
    zone = _zone(*f.pleural_thickening)
    rind = ["anatomicalfinding|yes|pleural/parenchymal scarring"]
    say(f"Pleural thickening along the lateral {zone}.",
        {zone: rind, f"{SIDES[f.pleural_thickening[0]]} lung": rind},
        f"Pleural thickening in the {zone}.", f.pleural_thickening[0])
  if f.fracture is not None:
    name = SIDES[f.fracture]
    say(f"There is a displaced fracture of the {name} clavicle.",
        {f"{name} clavicle": ["anatomicalfinding|yes|fracture"]},
        f"{name.capitalize()} clavicular fracture.", f.fracture)
  else:
    say("No acute osseous abnormality.", {})
  device_text = {
      "endotracheal tube": ("An endotracheal tube terminates above the carina.",
                            {"trachea": ["tubesandlines|yes|endotracheal tube"]}),
      "ij line": ("A right internal jugular line terminates in the superior vena cava.",
                  {"svc": ["tubesandlines|yes|ij line"]}),
      "pacemaker": ("A left-sided pacemaker is seen with leads in the heart.",
                    {"left upper lung zone": ["device|yes|cardiac pacer and wires"],
                     "cardiac silhouette": ["device|yes|cardiac pacer and wires"]}),
      "enteric tube": ("An enteric tube courses below the diaphragm into the stomach.",
                       {"left upper abdomen": ["tubesandlines|yes|enteric tube"],
                        "abdomen": ["tubesandlines|yes|enteric tube"]}),
  }
  for device in f.devices:
    phrase, where = device_text[device]
    say(phrase, where)
  if f.devices:
    impression.append("Support devices as described.")
  labels = labels_of(f)
  if labels[anatomy.CHEXPERT_LABELS.index("No Finding")]:
    impression.append("No acute cardiopulmonary process.")
  return Description(labels=labels, mentions=mentions, findings=findings, impression=impression)


def report_text(d: Description, indication: str, view: str) -> str:
  """A MIMIC-CXR-style free-text report with FINDINGS and IMPRESSION sections."""
  technique = "PA and lateral views of the chest." if view == "PA" else "Portable AP view of the chest."
  return ("                                 FINAL REPORT\n"
          f" EXAMINATION:  CHEST ({'PA AND LAT' if view == 'PA' else 'PORTABLE AP'})\n \n"
          f" INDICATION:  {indication}\n \n"
          f" TECHNIQUE:  {technique}\n \n"
          " COMPARISON:  None.\n \n"
          " FINDINGS:\n \n"
          f" {' '.join(d.findings)}\n \n"
          " IMPRESSION:\n \n"
          f" {' '.join(d.impression)}\n")
