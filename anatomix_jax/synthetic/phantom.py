"""A seeded chest-radiograph phantom: per-image anatomy geometry and its 36 boxes (pixels: render).

Geometry lives in a local thorax frame (unit = half the thorax width; ``x`` grows to the IMAGE right,
which is the PATIENT's left, as on a PA film; ``y`` grows downwards; the lung apices are near
``y = 0``). Each image draws its own lung height, diaphragm heights, left/right asymmetry, heart size
and mediastinal width, then a similarity transform (scale, rotation, position) into a non-square
pixel grid. Every anatomy box is the axis-aligned bounding box, in pixels, of a structure that is
drawn: the dark lung fields, bright mediastinum and left-heavy heart (the aortic knob and gastric
bubble on the image right, the liver on the image left, so left and right stay identifiable after a
flip), the spine, trachea and carina, clavicles, ribs and diaphragm domes.

Findings (:class:`Findings`) change the pixels where their anatomy is: cardiomegaly (cardiothoracic
ratio > 0.5), mediastinal widening, effusion (meniscus at a base), opacity / consolidation /
pneumonia (inside one lung zone), atelectasis (band + raised hemidiaphragm), edema (bilateral
perihilar haze), nodule, apical pneumothorax (dark, no lung markings, visible pleural line), clavicle
fracture, pleural thickening and support devices.

Sides are indexed 0 = patient right (image left, ``sign = -1``) and 1 = patient left (``sign = +1``);
zones 0/1/2 = upper/mid/lower.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from anatomix_jax import anatomy

SIDES = ("right", "left")
ZONES = ("upper", "mid", "lower")
DEVICES = ("endotracheal tube", "ij line", "pacemaker", "enteric tube")
MIN_BOX_FRACTION = 0.065  # every box spans at least this fraction of the long image side


@dataclasses.dataclass(frozen=True)
class Findings:
  """What one image shows. Sides/zones index :data:`SIDES`/:data:`ZONES`; ``None``: absent."""
  cardiomegaly: bool = False
  wide_mediastinum: bool = False
  effusion: tuple[int, ...] = ()            # sides with an effusion
  opacity: tuple[int, int] | None = None    # (side, zone), faint hazy opacity
  consolidation: tuple[int, int] | None = None
  pneumonia: tuple[int, int] | None = None
  atelectasis: int | None = None            # side (lower zone)
  edema: bool = False
  nodule: tuple[int, int] | None = None
  pneumothorax: int | None = None           # side (apex)
  fracture: int | None = None               # side of the broken clavicle
  pleural_thickening: tuple[int, int] | None = None
  devices: tuple[str, ...] = ()


def sample_findings(rng: np.random.Generator) -> Findings:
  """Draws each finding independently (prevalence 10–25%) so every label has val positives."""
  def side_zone(zones=(0, 1, 2)) -> tuple[int, int]:
    return int(rng.integers(2)), int(rng.choice(zones))
  effusion: tuple[int, ...] = ()
  if rng.random() < 0.2:
    effusion = (0, 1) if rng.random() < 0.3 else (int(rng.integers(2)),)
  devices: tuple[str, ...] = ()
  if rng.random() < 0.22:
    chosen = [d for d in DEVICES if rng.random() < 0.45]
    devices = tuple(chosen) or (DEVICES[int(rng.integers(len(DEVICES)))],)
  return Findings(
      cardiomegaly=bool(rng.random() < 0.2),
      wide_mediastinum=bool(rng.random() < 0.15),
      effusion=effusion,
      opacity=side_zone() if rng.random() < 0.12 else None,
      consolidation=side_zone() if rng.random() < 0.12 else None,
      pneumonia=side_zone((1, 2)) if rng.random() < 0.13 else None,
      atelectasis=int(rng.integers(2)) if rng.random() < 0.14 else None,
      edema=bool(rng.random() < 0.12),
      nodule=side_zone() if rng.random() < 0.12 else None,
      pneumothorax=int(rng.integers(2)) if rng.random() < 0.12 else None,
      fracture=int(rng.integers(2)) if rng.random() < 0.12 else None,
      pleural_thickening=side_zone((0, 1)) if rng.random() < 0.1 else None,
      devices=devices)


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Per-image anatomy in the local frame plus the local → pixel transform (see module docstring)."""
  height: int
  width: int
  scale: float            # pixels per local unit
  angle: float            # radians, rotation of the local frame on the image
  origin: tuple[float, float]  # pixel position of the local origin
  mid_x: float            # midline
  lateral: tuple[float, float]     # lateral lung edge x per side
  apex: tuple[float, float]
  cp_y: tuple[float, float]        # costophrenic angle y per side
  dome_y: tuple[float, float]      # diaphragm dome top y per side
  dome_x: tuple[float, float]
  medial_y: tuple[float, float]    # diaphragm y at the mediastinum
  med_half: float                  # superior mediastinum half-width
  knob: tuple[float, float, float]  # aortic knob centre x, y and radius
  heart: tuple[float, float, float, float]  # x_right_border, top, x_left_border, bottom
  carina_y: float
  clavicles: tuple[np.ndarray, np.ndarray]  # [P, 2] local polylines per side
  clavicle_width: float

  def to_pixels(self, points: np.ndarray) -> np.ndarray:
    """``[..., 2]`` local points → ``[..., 2]`` pixel (x, y) float64."""
    c, s = math.cos(self.angle), math.sin(self.angle)
    rot = np.array([[c, -s], [s, c]]) * self.scale
    return np.asarray(points, np.float64) @ rot.T + np.asarray(self.origin)

  def diaphragm_y(self, side: int, x: np.ndarray | float) -> np.ndarray:
    """y of the diaphragm under ``x`` (local) on one side: two parabolas meeting at the dome."""
    x = np.asarray(x, np.float64)
    sign = -1 if side == 0 else 1
    cp_x, med_x = self.cp_x(side), self.mid_x + sign * self.med_half
    lateral_part = (x - self.dome_x[side]) / (cp_x - self.dome_x[side])
    medial_part = (x - self.dome_x[side]) / (med_x - self.dome_x[side])
    return np.where(sign * (x - self.dome_x[side]) > 0,
                    self.dome_y[side] + (self.cp_y[side] - self.dome_y[side]) * lateral_part ** 2,
                    self.dome_y[side] + (self.medial_y[side] - self.dome_y[side]) * medial_part ** 2)

  def cp_x(self, side: int) -> float:
    return self.lateral[side] - (-1 if side == 0 else 1) * 0.05


def sample_geometry(rng: np.random.Generator, height: int, width: int,
                    findings: Findings) -> Geometry:
  """Draws one patient's anatomy and its placement on a ``height × width`` image."""
  u = rng.uniform
  lung_len = u(1.5, 1.95)
  mid_x = u(-0.05, 0.05)
  lateral = (-u(0.9, 1.06), u(0.9, 1.06))
  apex = (u(-0.04, 0.05), u(-0.04, 0.05))
  cp_y = [lung_len - u(0.0, 0.14), lung_len + u(-0.05, 0.04)]  # right dome usually higher
  rise = [u(0.17, 0.33), u(0.15, 0.3)]
  if findings.atelectasis is not None:  # volume loss: the hemidiaphragm is pulled up
    cp_y[findings.atelectasis] -= u(0.14, 0.22)
  dome_y = (cp_y[0] - rise[0], cp_y[1] - rise[1])
  dome_x = (mid_x + u(0.45, 0.6) * (lateral[0] - mid_x), mid_x + u(0.45, 0.6) * (lateral[1] - mid_x))
  medial_y = (dome_y[0] + u(0.06, 0.14), dome_y[1] + u(0.06, 0.14))
  med_half = u(0.28, 0.36) if findings.wide_mediastinum else u(0.14, 0.2)
  top = min(apex)
  length = max(cp_y) - top
  knob_r = u(0.09, 0.13)
  knob = (mid_x + med_half + u(0.0, 0.04), top + u(0.17, 0.24) * length, knob_r)
  carina_y = knob[1] + knob_r + u(0.03, 0.08)
  thorax = lateral[1] - lateral[0]
  ratio = u(0.56, 0.66) if findings.cardiomegaly else u(0.35, 0.45)
  left_share = u(0.6, 0.7)  # the heart lies mostly on the patient's left
  heart_width = ratio * thorax
  heart_top = top + u(0.4, 0.5) * length
  heart_bottom = max(medial_y)
  heart = (mid_x - (1 - left_share) * heart_width, heart_top, mid_x + left_share * heart_width,
           heart_bottom)
  clavicles = []
  for side, sign in ((0, -1), (1, 1)):
    med = (mid_x + sign * u(0.12, 0.17), apex[side] + u(0.05, 0.14))
    lat = (mid_x + sign * u(0.85, 1.0), apex[side] - u(0.08, 0.2))
    t = np.linspace(0, 1, 12)[:, None]
    points = (1 - t) * np.array(med) + t * np.array(lat)
    points[:, 1] += 0.05 * np.sin(t[:, 0] * 2 * math.pi) * sign  # the clavicle's gentle S-curve
    clavicles.append(points)
  # Placement: the local extent x ∈ [-1.15, 1.15], y ∈ [-0.45, length + 0.65] fits with a margin.
  fit = min(width / 2.35, height / (length + 1.15))
  scale = fit * u(0.74, 0.97)
  angle = math.radians(u(-10, 10))
  slack_x = max(0.0, width - 2.35 * scale) / 2
  slack_y = max(0.0, height - (length + 1.15) * scale) / 2
  centre = np.array([0.0, top + (length + 0.2) / 2])
  target = np.array([width / 2 + u(-0.85, 0.85) * slack_x, height / 2 + u(-0.85, 0.85) * slack_y])
  c, s = math.cos(angle), math.sin(angle)
  origin = target - scale * np.array([[c, -s], [s, c]]) @ centre
  return Geometry(height=height, width=width, scale=scale, angle=angle,
                  origin=(float(origin[0]), float(origin[1])), mid_x=mid_x,
                  lateral=lateral, apex=apex, cp_y=(cp_y[0], cp_y[1]), dome_y=dome_y,
                  dome_x=dome_x, medial_y=medial_y, med_half=med_half, knob=knob, heart=heart,
                  carina_y=carina_y, clavicles=(clavicles[0], clavicles[1]),
                  clavicle_width=u(0.06, 0.08))


def lung_polygon(g: Geometry, side: int) -> np.ndarray:
  """``[P, 2]`` local outline of one lung: apex, lateral wall, costophrenic angle, dome, medial edge."""
  sign = -1 if side == 0 else 1
  medial = g.mid_x + sign * g.med_half
  apex_x, apex_y = medial + sign * 0.28, g.apex[side]
  mid_y = apex_y + 0.5 * (g.cp_y[side] - apex_y)
  cp_x = g.cp_x(side)
  t = np.linspace(0, math.pi / 2, 10)
  # Medial shoulder of the apex: from the mediastinum up to the apex (quarter ellipse).
  shoulder = np.stack([apex_x - sign * 0.28 * np.cos(t), apex_y + 0.2 - 0.2 * np.sin(t)], -1)
  # Upper lateral wall: from the apex out to the widest point at mid height.
  t = np.linspace(0, math.pi / 2, 14)[1:]
  wall = np.stack([apex_x + (g.lateral[side] - apex_x) * np.sin(t),
                   mid_y - (mid_y - apex_y) * np.cos(t)], -1)
  # Lower lateral wall: curving slightly in to the costophrenic angle.
  ys = np.linspace(mid_y, g.cp_y[side], 8)[1:]
  lower = np.stack([g.lateral[side] + (cp_x - g.lateral[side]) * ((ys - mid_y) /
                                                                  (g.cp_y[side] - mid_y)) ** 2,
                    ys], -1)
  xs = np.linspace(cp_x, medial, 20)[1:]
  dome = np.stack([xs, g.diaphragm_y(side, xs)], -1)
  return np.concatenate([shoulder, wall, lower, dome])


def clip_band(polygon: np.ndarray, y0: float, y1: float) -> np.ndarray:
  """Points spanning the part of a local polygon ``[P, 2]`` with ``y0 <= y <= y1``.

  Returns the vertices inside the band plus every crossing of an edge with the band's two lines,
  unordered: exactly the bounding box of the polygon clipped to the band.
  """
  a, b = polygon, np.roll(polygon, -1, axis=0)
  inside = a[(a[:, 1] >= y0) & (a[:, 1] <= y1)]
  crossings = [inside]
  for cut in (y0, y1):
    crosses = (a[:, 1] - cut) * (b[:, 1] - cut) < 0
    t = (cut - a[crosses, 1]) / (b[crosses, 1] - a[crosses, 1])
    crossings.append(a[crosses] + t[:, None] * (b[crosses] - a[crosses]))
  return np.concatenate(crossings)


def rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
  """``[4, 2]`` corners of an axis-aligned local rectangle (corner order does not matter)."""
  return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64)


def zone_band(g: Geometry, side: int, zone: int | str) -> tuple[float, float]:
  """(y0, y1) local band of a lung zone (``zone``: 0–2 or ``"apical"``)."""
  top, length = g.apex[side], g.cp_y[side] - g.apex[side]
  if zone == "apical":
    return top, top + 0.22 * length
  return top + zone * length / 3, top + (zone + 1) * length / 3


def structure_outlines(g: Geometry) -> dict[str, np.ndarray]:
  """Local outline points (``[P, 2]``) of each anatomy, keyed by Chest ImaGenome ``bbox_name``."""
  out: dict[str, np.ndarray] = {}
  mx, mw = g.mid_x, g.med_half
  hr, ht, hl, hb = g.heart
  hh = hb - ht
  kx, ky, kr = g.knob
  for side, name in enumerate(SIDES):
    sign = -1 if side == 0 else 1
    lung = lung_polygon(g, side)
    out[f"{name} lung"] = lung
    for zone, zone_name in enumerate(ZONES):
      out[f"{name} {zone_name} lung zone"] = clip_band(lung, *zone_band(g, side, zone))
    out[f"{name} apical zone"] = clip_band(lung, *zone_band(g, side, "apical"))
    length = g.cp_y[side] - g.apex[side]
    medial = mx + sign * mw
    out[f"{name} hilar structure"] = rect(medial - sign * 0.03, g.apex[side] + 0.36 * length,
                                           medial + sign * 0.3, g.apex[side] + 0.58 * length)
    cp_x = g.cp_x(side)
    xs = np.linspace(cp_x, medial, 12)
    dome = np.stack([xs, g.diaphragm_y(side, xs)], -1)
    out[f"{name} hemidiaphragm"] = np.concatenate([dome - [0, 0.04], dome + [0, 0.04]])
    out[f"{name} costophrenic angle"] = rect(cp_x + sign * 0.04, g.cp_y[side] - 0.24,
                                              cp_x - sign * 0.24, g.cp_y[side] + 0.04)
    border = hr if side == 0 else hl
    y = float(g.diaphragm_y(side, border))
    out[f"{name} cardiophrenic angle"] = rect(border + sign * 0.1, y - 0.18, border - sign * 0.12,
                                               y + 0.04)
    out[f"{name} clavicle"] = g.clavicles[side]
    dome_y = g.dome_y[side]
    out[f"{name} upper abdomen"] = rect(cp_x, dome_y, mx, dome_y + 0.5)
  out["cardiac silhouette"] = rect(hr, ht, hl, hb)
  out["right cardiac silhouette"] = rect(hr - 0.04, ht + 0.3 * hh, hr + 0.16, hb)
  out["left cardiac silhouette"] = rect(hl - 0.22, ht + 0.15 * hh, hl + 0.04, hb)
  out["right atrium"] = rect(hr, ht + 0.25 * hh, hr + 0.3, hb - 0.04)
  out["cavoatrial junction"] = rect(mx - mw - 0.06, ht - 0.12, mx - mw + 0.14, ht + 0.1)
  clavicle_y = min(g.clavicles[0][0, 1], g.clavicles[1][0, 1])
  out["svc"] = rect(mx - mw - 0.04, clavicle_y + 0.05, mx - mw + 0.14, ht)
  out["aortic arch"] = rect(mx - 0.02, ky - kr, kx + kr, ky + kr)
  out["descending aorta"] = rect(mx + 0.05, ky + 0.5 * kr, mx + 0.2, hb)
  top = min(g.apex)
  out["mediastinum"] = rect(min(hr, mx - mw), top - 0.1, max(hl, kx + kr), hb)
  out["upper mediastinum"] = rect(mx - mw, top - 0.1, kx + kr, ht)
  out["carina"] = rect(mx - 0.1, g.carina_y - 0.1, mx + 0.1, g.carina_y + 0.08)
  out["trachea"] = rect(mx - 0.2, clavicle_y - 0.2, mx + 0.2, g.carina_y + 0.12)
  out["spine"] = rect(mx - 0.11, top - 0.35, mx + 0.11, max(g.cp_y) + 0.05)
  out["abdomen"] = rect(g.cp_x(0), min(g.dome_y), g.cp_x(1), max(g.cp_y) + 0.55)
  return out


def anatomy_boxes(g: Geometry) -> np.ndarray:
  """float64 ``[36, 4]`` xyxy pixel boxes of the original image, in ``anatomy`` order.

  Each box is the bounding box of the structure's outline on the image, widened symmetrically to at
  least :data:`MIN_BOX_FRACTION` of the long side, kept inside the image.
  """
  outlines = structure_outlines(g)
  boxes = np.zeros((anatomy.NUM_ANATOMIES, 4))
  min_size = MIN_BOX_FRACTION * max(g.height, g.width)
  limits = (g.width, g.height)
  for a in anatomy.ANATOMIES:
    pts = g.to_pixels(outlines[a.bbox_name])
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    if a.bbox_name.endswith("clavicle"):
      half = 0.5 * g.clavicle_width * g.scale
      lo, hi = lo - half, hi + half
    for k in range(2):
      lo[k], hi[k] = max(lo[k], 0.0), min(hi[k], limits[k])
      grow = max(0.0, min_size - (hi[k] - lo[k])) / 2
      lo[k], hi[k] = lo[k] - grow, hi[k] + grow
      shift = max(0.0, -lo[k]) - max(0.0, hi[k] - limits[k])  # slide back inside the image
      lo[k], hi[k] = max(lo[k] + shift, 0.0), min(hi[k] + shift, limits[k])
    boxes[a.index] = [lo[0], lo[1], hi[0], hi[1]]
  return boxes

