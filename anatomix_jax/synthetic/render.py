"""Pixels of the synthetic radiograph: draws a :class:`phantom.Geometry` and its findings.

Intensities are float32 in [0, 1] (bright = radio-dense): air 0.04, soft tissue ~0.42, aerated lung
~0.14, mediastinum/heart ~0.65, bone brighter, metal devices brightest. Shapes are rasterised with
OpenCV (anti-aliased, sub-pixel) into masks and blended, which keeps one ~300 px image at a few
milliseconds. All randomness comes from the caller's generator, so a seed fixes every pixel.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from anatomix_jax.synthetic import phantom
from anatomix_jax.synthetic.phantom import Findings, Geometry

_SHIFT = 4  # sub-pixel bits for cv2 drawing


class _Canvas:
  """A float image plus helpers that draw local-frame shapes into masks and blend them."""

  def __init__(self, g: Geometry):
    self.g = g
    self.image = np.zeros((g.height, g.width), np.float32)

  def _pts(self, local: np.ndarray) -> np.ndarray:
    return np.round(self.g.to_pixels(local) * (1 << _SHIFT)).astype(np.int32)

  def mask(self) -> np.ndarray:
    return np.zeros((self.g.height, self.g.width), np.uint8)

  def poly_mask(self, local: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    mask = self.mask() if mask is None else mask
    cv2.fillPoly(mask, [self._pts(local)], 255, cv2.LINE_AA, _SHIFT)
    return mask

  def line_mask(self, local: np.ndarray, width: float, mask: np.ndarray | None = None
                ) -> np.ndarray:
    """Polyline of ``width`` local units (at least one pixel)."""
    mask = self.mask() if mask is None else mask
    thickness = max(1, int(round(width * self.g.scale)))
    cv2.polylines(mask, [self._pts(local)], False, 255, thickness, cv2.LINE_AA, _SHIFT)
    return mask

  def ellipse_mask(self, centre, radii, mask: np.ndarray | None = None, n: int = 28
                   ) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    pts = np.stack([centre[0] + radii[0] * np.cos(t), centre[1] + radii[1] * np.sin(t)], -1)
    return self.poly_mask(pts, mask)

  def blur(self, mask: np.ndarray, sigma_units: float) -> np.ndarray:
    """Gaussian blur (in place) of the part of ``mask`` that has content; tiny sigmas are skipped."""
    sigma = sigma_units * self.g.scale
    x, y, w, h = cv2.boundingRect(mask)
    if sigma < 0.8 or w == 0:  # anti-aliased drawing already softens edges by ~1 pixel
      return mask
    # Only the content's neighbourhood: a ~10x saving for small structures on a ~300 px image.
    margin = int(4 * sigma) + 2
    y0, y1 = max(0, y - margin), min(mask.shape[0], y + h + margin)
    x0, x1 = max(0, x - margin), min(mask.shape[1], x + w + margin)
    region = mask[y0:y1, x0:x1]
    if sigma <= 3:
      mask[y0:y1, x0:x1] = cv2.GaussianBlur(region, (0, 0), sigma)
      return mask
    # Wide blurs (haze): blur a downsampled copy, then upsample; the cost stops growing with sigma.
    factor = sigma / 1.5
    small = cv2.resize(region, (max(1, round(region.shape[1] / factor)),
                                max(1, round(region.shape[0] / factor))),
                       interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), 1.5)
    mask[y0:y1, x0:x1] = cv2.resize(small, (region.shape[1], region.shape[0]),
                                    interpolation=cv2.INTER_LINEAR)
    return mask

  def set(self, mask: np.ndarray, value: float, alpha: float = 1.0) -> None:
    """Blends towards ``value`` where the uint8 mask is on."""
    x, y, w, h = cv2.boundingRect(mask)
    if w == 0:
      return
    region = self.image[y:y + h, x:x + w]
    a = mask[y:y + h, x:x + w].astype(np.float32) * np.float32(alpha / 255.0)
    region += (np.float32(value) - region) * a

  def add(self, mask: np.ndarray, amount: float) -> None:
    """Adds ``amount`` times the uint8 mask (0..255 → 0..1)."""
    x, y, w, h = cv2.boundingRect(mask)
    if w == 0:
      return
    self.image[y:y + h, x:x + w] += mask[y:y + h, x:x + w].astype(np.float32) * np.float32(
        amount / 255.0)


def _rib_paths(g: Geometry, side: int) -> list[np.ndarray]:
  """Posterior ribs: arcs from the spine out and down across one hemithorax."""
  sign = -1 if side == 0 else 1
  top, length = g.apex[side], g.cp_y[side] - g.apex[side]
  spacing = length / 8.5
  t = np.linspace(0, 1, 10)
  reach = abs(g.lateral[side] - g.mid_x) + 0.12
  paths = []
  for k in range(10):
    y0 = top - 0.1 + k * spacing
    x = g.mid_x + sign * (0.1 + t * reach)
    y = y0 - 0.12 * np.sin(math.pi * t * 0.9) + 0.28 * t ** 2
    paths.append(np.stack([x, y], -1))
  return paths


def _draw_body(c: _Canvas, g: Geometry) -> dict[str, np.ndarray]:
  """Soft tissue of neck, shoulders and trunk on air; returns the lung masks."""
  mx, top = g.mid_x, min(g.apex)
  bottom = max(g.cp_y) + 1.3
  body = np.array([[-0.3, -0.9], [0.3, -0.9], [0.34, top - 0.3], [1.3, top - 0.2],
                   [1.28, 0.7], [1.2, bottom], [-1.2, bottom], [-1.28, 0.7], [-1.3, top - 0.2],
                   [-0.34, top - 0.3]]) + [mx, 0]
  c.image[:] = 0.04
  c.set(c.blur(c.poly_mask(body), 0.012), 0.42)
  return {f"lung{side}": c.poly_mask(phantom.lung_polygon(g, side)) for side in (0, 1)}


def _draw_abdomen(c: _Canvas, g: Geometry, rng) -> None:
  """Everything below the domes, drawn over the heart's lower part as the diaphragm hides it."""
  mx, bottom = g.mid_x, max(g.cp_y) + 1.3
  xs = np.linspace(c.g.cp_x(0), c.g.cp_x(1), 40)
  # The two domes, joined under the mediastinum by a straight line between their medial ends.
  inner = np.interp(xs, [mx - g.med_half, mx + g.med_half], g.medial_y)
  domes = np.where(xs < mx - g.med_half, g.diaphragm_y(0, xs),
                   np.where(xs > mx + g.med_half, g.diaphragm_y(1, xs), inner))
  abdomen = np.concatenate([np.stack([xs, domes], -1),
                            [[xs[-1] + 0.3, bottom], [xs[0] - 0.3, bottom]]])
  c.set(c.poly_mask(abdomen), 0.56)
  # Liver under the right dome (image left), a bit denser than the left upper quadrant.
  liver = np.concatenate([np.stack([xs[xs < mx], domes[xs < mx]], -1),
                          [[mx, g.dome_y[0] + 0.9], [xs[0] - 0.2, g.dome_y[0] + 0.9]]])
  c.set(c.blur(c.poly_mask(liver), 0.02), 0.62)
  # Gastric bubble under the left dome: air below the diaphragm on the image right only.
  bubble = (g.dome_x[1] + 0.05, g.dome_y[1] + 0.16)
  c.set(c.blur(c.ellipse_mask(bubble, (rng.uniform(0.12, 0.18), 0.07)), 0.01), 0.22)


def _draw_lungs(c: _Canvas, g: Geometry, masks: dict[str, np.ndarray], rng) -> None:
  for side in (0, 1):
    lung = masks[f"lung{side}"]
    c.set(lung, 0.14)
    # Vascular markings: branches fanning out from the hilum, fading towards the periphery.
    sign = -1 if side == 0 else 1
    length = g.cp_y[side] - g.apex[side]
    hilum = np.array([g.mid_x + sign * (g.med_half + 0.12), g.apex[side] + 0.47 * length])
    vessels = c.mask()
    for angle in rng.uniform(-1.2, 1.2, 9):
      direction = np.array([sign * math.cos(angle), math.sin(angle) * 1.3])
      t = np.linspace(0, rng.uniform(0.45, 0.8), 6)[:, None]
      path = hilum + t * direction + rng.normal(0, 0.015, (6, 2))
      c.line_mask(path, 0.018, vessels)
    c.add(cv2.bitwise_and(c.blur(vessels, 0.01), lung), 0.07)
    hila = c.mask()
    for _ in range(3):
      c.ellipse_mask(hilum + rng.normal(0, 0.04, 2), (0.07, 0.045), hila)
    c.add(cv2.bitwise_and(c.blur(hila, 0.02), lung), 0.12)


def _zone_mask(c: _Canvas, g: Geometry, side: int, zone, masks) -> np.ndarray:
  y0, y1 = phantom.zone_band(g, side, zone)
  return cv2.bitwise_and(c.poly_mask(phantom.rect(-3, y0, 3, y1)), masks[f"lung{side}"])


def _zone_centre(g: Geometry, side: int, zone: int, rng) -> np.ndarray:
  y0, y1 = phantom.zone_band(g, side, zone)
  sign = -1 if side == 0 else 1
  x = g.mid_x + sign * (g.med_half + rng.uniform(0.25, 0.55) * (abs(g.lateral[side] - g.mid_x)
                                                                - g.med_half))
  return np.array([x, rng.uniform(y0 + 0.3 * (y1 - y0), y0 + 0.7 * (y1 - y0))])


def _draw_parenchyma(c: _Canvas, g: Geometry, f: Findings, masks, rng) -> None:
  """Findings inside the lungs: opacities, edema, nodule, atelectasis, effusion, pneumothorax."""
  if f.edema:
    for side in (0, 1):
      sign = -1 if side == 0 else 1
      length = g.cp_y[side] - g.apex[side]
      hilum = (g.mid_x + sign * (g.med_half + 0.2), g.apex[side] + 0.5 * length)
      haze = c.blur(c.ellipse_mask(hilum, (0.38, 0.5 * length)), 0.12)
      c.add(cv2.bitwise_and(haze, masks[f"lung{side}"]), 0.2)
  if f.opacity is not None:
    side, zone = f.opacity
    blob = c.blur(c.ellipse_mask(_zone_centre(g, side, zone, rng), (0.34, 0.24)), 0.07)
    c.add(cv2.bitwise_and(blob, _zone_mask(c, g, side, zone, masks)), 0.3)
  if f.pneumonia is not None:
    side, zone = f.pneumonia
    patches = c.mask()
    centre = _zone_centre(g, side, zone, rng)
    for _ in range(int(rng.integers(6, 10))):
      c.ellipse_mask(centre + rng.normal(0, [0.14, 0.08]), rng.uniform(0.08, 0.15, 2), patches)
    c.add(cv2.bitwise_and(c.blur(patches, 0.03), _zone_mask(c, g, side, zone, masks)), 0.36)
  if f.consolidation is not None:
    side, zone = f.consolidation
    zone_mask = _zone_mask(c, g, side, zone, masks)
    dense = c.blur(c.ellipse_mask(_zone_centre(g, side, zone, rng), (0.4, 0.25)), 0.015)
    dense = cv2.bitwise_and(dense, zone_mask)
    c.set(dense, 0.55)
    bronchi = c.mask()  # air bronchograms: dark branching lines inside the dense region
    start = _zone_centre(g, side, zone, rng)
    for _ in range(3):
      c.line_mask(start + np.cumsum(rng.normal(0, 0.05, (4, 2)), axis=0), 0.02, bronchi)
    c.set(cv2.bitwise_and(bronchi, dense), 0.4, 0.6)
  if f.atelectasis is not None:
    side = f.atelectasis
    sign = -1 if side == 0 else 1
    y0, y1 = phantom.zone_band(g, side, 2)
    y = rng.uniform(y0 + 0.2 * (y1 - y0), y0 + 0.5 * (y1 - y0))
    x_in, x_out = g.mid_x + sign * (g.med_half + 0.05), g.lateral[side]
    band = np.array([[x_in, y + 0.05], [x_out, y - 0.08]])
    plate = c.blur(c.line_mask(band, rng.uniform(0.08, 0.12)), 0.01)
    c.add(cv2.bitwise_and(plate, masks[f"lung{side}"]), 0.36)
  if f.nodule is not None:
    side, zone = f.nodule
    nodule = c.blur(c.ellipse_mask(_zone_centre(g, side, zone, rng),
                                   (r := rng.uniform(0.09, 0.14), r)), 0.008)
    c.add(cv2.bitwise_and(nodule, masks[f"lung{side}"]), 0.45)
  if f.pleural_thickening is not None:
    side, zone = f.pleural_thickening
    y0, y1 = phantom.zone_band(g, side, zone)
    lung = phantom.lung_polygon(g, side)
    sign = -1 if side == 0 else 1
    edge = lung[(lung[:, 1] >= y0) & (lung[:, 1] <= y1) & (sign * (lung[:, 0] - g.mid_x) > 0.5)]
    if len(edge) >= 2:
      rind = c.blur(c.line_mask(edge, 0.2), 0.01)
      c.add(cv2.bitwise_and(rind, masks[f"lung{side}"]), 0.45)
  for side in f.effusion:
    sign = -1 if side == 0 else 1
    depth = rng.uniform(0.18, 0.4) * (g.cp_y[side] - g.apex[side])
    level = g.cp_y[side] - depth
    xs = np.linspace(g.mid_x, g.lateral[side] + sign * 0.1, 16)
    lateral_frac = (xs - g.mid_x) / (g.lateral[side] - g.mid_x)
    surface = level - 0.22 * depth * np.clip(lateral_frac, 0, None) ** 3  # meniscus
    fluid = np.concatenate([np.stack([xs, surface], -1),
                            [[xs[-1], g.cp_y[side] + 0.6], [xs[0], g.cp_y[side] + 0.6]]])
    fluid_mask = cv2.bitwise_and(c.blur(c.poly_mask(fluid), 0.02), masks[f"lung{side}"])
    c.set(fluid_mask, 0.56)
  if f.pneumothorax is not None:
    side = f.pneumothorax
    lung = phantom.lung_polygon(g, side)
    sign = -1 if side == 0 else 1
    length = g.cp_y[side] - g.apex[side]
    hilum = np.array([g.mid_x + sign * (g.med_half + 0.1), g.apex[side] + 0.55 * length])
    collapsed = hilum + (lung - hilum) * rng.uniform(0.55, 0.7)  # the lung edge pulls away
    upper = lung[:, 1] < g.apex[side] + 0.45 * length
    air = cv2.bitwise_and(masks[f"lung{side}"], cv2.bitwise_not(c.poly_mask(collapsed)))
    apical = c.poly_mask(phantom.rect(-3, -3, 3, g.apex[side] + 0.45 * length))
    air = cv2.bitwise_and(air, apical)
    c.set(air, 0.05)  # no lung markings: everything inside is replaced by air density
    edge = collapsed[upper & (sign * (collapsed[:, 0] - g.mid_x) > g.med_half + 0.05)]
    if len(edge) >= 2:
      c.add(cv2.bitwise_and(c.line_mask(edge, 0.025), masks[f"lung{side}"]), 0.3)


def _draw_mediastinum(c: _Canvas, g: Geometry) -> None:
  mx, mw = g.mid_x, g.med_half
  hr, ht, hl, hb = g.heart
  top = min(g.apex)
  c.set(c.blur(c.poly_mask(phantom.rect(mx - mw, top - 0.9, mx + mw, hb)), 0.01), 0.62)
  kx, ky, kr = g.knob
  c.set(c.blur(c.ellipse_mask((kx, ky), (kr, kr)), 0.01), 0.64)
  # Heart: two half-ellipses meeting at the midline, the left one wider (left-heavy silhouette),
  # widest just above the diaphragm, which hides their lower parts.
  ry = 0.8 * (hb - ht)
  t = np.linspace(-math.pi / 2, math.pi / 2, 24)
  left = np.stack([mx + (hl - mx) * np.cos(t), ht + ry + ry * np.sin(t)], -1)
  right = np.stack([mx - (mx - hr) * np.cos(t), ht + ry - ry * np.sin(t)], -1)
  c.set(c.blur(c.poly_mask(np.concatenate([left, right])), 0.012), 0.68)
  # Descending aorta: a faint paraspinal stripe through the heart shadow.
  aorta = np.array([[kx - 0.02, ky + 0.5 * kr], [mx + 0.12, hb]])
  c.add(c.blur(c.line_mask(aorta, 0.06), 0.01), 0.05)


def _draw_airway_and_spine(c: _Canvas, g: Geometry) -> None:
  mx, top = g.mid_x, min(g.apex)
  spacing = (g.cp_y[0] - g.apex[0]) / 8.5
  spine = c.mask()
  for k in range(-6, 14):
    y = top - 0.1 + k * spacing
    c.poly_mask(phantom.rect(mx - 0.1, y, mx + 0.1, y + 0.8 * spacing), spine)
  c.add(c.blur(spine, 0.01), 0.11)
  airway = c.mask()
  c.line_mask(np.array([[mx, top - 0.9], [mx, g.carina_y]]), 0.1, airway)
  for sign in (-1, 1):
    c.line_mask(np.array([[mx, g.carina_y - 0.02], [mx + sign * 0.2, g.carina_y + 0.17]]), 0.07,
                airway)
  c.set(c.blur(airway, 0.01), 0.3, 0.75)


def _draw_bones(c: _Canvas, g: Geometry, f: Findings, masks, rng) -> None:
  ribs = c.mask()
  for side in (0, 1):
    for path in _rib_paths(g, side):
      c.line_mask(path, 0.045, ribs)
  thorax = cv2.max(masks["lung0"], masks["lung1"])
  c.add(cv2.bitwise_and(ribs, thorax), 0.07)
  c.add(ribs, 0.02)
  for side in (0, 1):
    clavicle = g.clavicles[side]
    if f.fracture == side:
      # Discontinuity: a gap mid-shaft and a displaced lateral fragment.
      k = int(rng.integers(5, 8))
      gap = (clavicle[k] - clavicle[k - 1]) * 2.5
      medial_part = clavicle[:k]
      lateral_part = clavicle[k:] + gap + [0.0, rng.uniform(0.12, 0.2)]
      bone = c.line_mask(medial_part, g.clavicle_width)
      c.line_mask(lateral_part, g.clavicle_width, bone)
    else:
      bone = c.line_mask(clavicle, g.clavicle_width)
    c.set(c.blur(bone, 0.006), 0.82)


def _draw_devices(c: _Canvas, g: Geometry, f: Findings) -> None:
  mx, top = g.mid_x, min(g.apex)
  hr, ht, hl, hb = g.heart
  wires = c.mask()
  if "endotracheal tube" in f.devices:
    c.line_mask(np.array([[mx + 0.01, top - 1.0], [mx + 0.01, g.carina_y - 0.14]]), 0.025, wires)
  if "ij line" in f.devices:
    path = np.array([[mx - 0.45, top - 0.9], [mx - 0.3, top - 0.2], [mx - g.med_half + 0.05,
                                                                       top + 0.2],
                     [mx - g.med_half + 0.06, ht - 0.05]])
    c.line_mask(path, 0.035, wires)
  if "enteric tube" in f.devices:
    path = np.array([[mx + 0.03, top - 1.0], [mx + 0.04, g.carina_y + 0.3], [mx + 0.06, hb],
                     [mx + 0.3, g.dome_y[1] + 0.3], [mx + 0.45, g.dome_y[1] + 0.35]])
    c.line_mask(path, 0.025, wires)
  if "pacemaker" in f.devices:
    box = np.array([g.mid_x + 0.55 * (g.lateral[1] - g.mid_x), g.clavicles[1][-1, 1] + 0.28])
    generator = c.poly_mask(phantom.rect(box[0] - 0.13, box[1] - 0.09, box[0] + 0.13,
                                         box[1] + 0.09))
    c.set(generator, 0.95)
    for end in ((hr + 0.12, hb - 0.1), (hl - 0.15, hb - 0.05)):
      c.line_mask(np.array([box, [mx + 0.05, ht - 0.05], end]), 0.025, wires)
  c.set(wires, 0.9, 0.85)


def render(g: Geometry, f: Findings, rng: np.random.Generator) -> np.ndarray:
  """Draws one radiograph.

  Args:
    g: the geometry (also fixes the image size ``g.height × g.width``).
    f: the findings to show.
    rng: the image's generator (markings, blob positions, noise).

  Returns:
    uint8 ``[height, width]``.
  """
  c = _Canvas(g)
  masks = _draw_body(c, g)
  _draw_lungs(c, g, masks, rng)
  _draw_parenchyma(c, g, f, masks, rng)
  _draw_mediastinum(c, g)
  _draw_abdomen(c, g, rng)
  _draw_airway_and_spine(c, g)
  _draw_bones(c, g, f, masks, rng)
  _draw_devices(c, g, f)
  image = cv2.GaussianBlur(c.image, (0, 0), 0.6)
  image = image * np.float32(rng.uniform(0.9, 1.1)) + np.float32(rng.uniform(-0.04, 0.04))
  image += rng.normal(0, 0.015, image.shape).astype(np.float32)
  return np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8)
