"""Joint image/box augmentation (anatomix_jax/data/augment.py) against independent geometry."""

import cmath
import math

import numpy as np
import pytest

from anatomix_jax.data import augment

S = 128


def _reference_boxes(boxes, size, angle, translate, scale):
  """Independent box transform: complex-number rotation of the corners, enclosing box, no clip.

  A point is z = x + iy in the y-down image frame; multiplying by e^{iθ} turns +x towards +y, i.e.
  clockwise on screen (torchvision F.affine). p' = c + t + s·e^{iθ}(p − c), c = (S/2, S/2).
  """
  c = complex(size / 2, size / 2)
  t = complex(*translate)
  rot = scale * cmath.exp(1j * math.radians(angle))
  out = []
  for x1, y1, x2, y2 in boxes:
    pts = [c + t + rot * (complex(x, y) - c) for x, y in ((x1, y1), (x2, y1), (x2, y2), (x1, y2))]
    out.append([min(p.real for p in pts), min(p.imag for p in pts),
                max(p.real for p in pts), max(p.imag for p in pts)])
  return np.array(out)


def _bright_box(image, threshold=0.5):
  """Continuous xyxy extent of the pixels above threshold (pixel j covers [j, j+1])."""
  img = np.asarray(image, np.float32).reshape(image.shape[:2])
  if img.max() > 1.5:
    img = img / 255.0
  ys, xs = np.nonzero(img > threshold)
  return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)


@pytest.mark.parametrize("angle,translate,scale", [
    (0.0, (0, 0), 1.0), (12.0, (5, -7), 1.05), (-15.0, (-12, 9), 0.9), (7.5, (0, 12), 1.1)])
def test_box_transform_matches_independent_points(angle, translate, scale):
  rng = np.random.default_rng(0)
  xy = rng.uniform(40, 75, size=(20, 2))
  wh = rng.uniform(1, 20, size=(20, 2))
  boxes = np.concatenate([xy, xy + wh], axis=1)  # central boxes: no clipping for these transforms
  matrix = augment.affine_matrix(S, angle, translate, scale)
  got = augment.transform_boxes(boxes, matrix, S)
  want = _reference_boxes(boxes, S, angle, translate, scale)
  assert want.min() > 0 and want.max() < S
  np.testing.assert_allclose(got, want, atol=1e-3)


def test_box_transform_clips_to_image():
  boxes = np.array([[100.0, 100.0, 127.0, 127.0], [0.0, 0.0, 20.0, 10.0]])
  matrix = augment.affine_matrix(S, 10.0, (12, 12), 1.1)
  got = augment.transform_boxes(boxes, matrix, S)
  want = np.clip(_reference_boxes(boxes, S, 10.0, (12, 12), 1.1), 0, S)
  np.testing.assert_allclose(got, want, atol=1e-3)
  assert got[0, 2] == S and got[0, 3] == S


def test_rotation_by_90_is_exact_clockwise_rot90():
  # Checks the half-pixel conjugation into OpenCV's frame: pixel centres map onto pixel centres.
  img = np.random.default_rng(1).integers(0, 256, size=(16, 16), dtype=np.uint8)
  matrix = augment.affine_matrix(16, 90.0, (0, 0), 1.0)
  out, _, _ = augment.apply_affine(img, np.zeros((1, 4)), matrix)
  np.testing.assert_array_equal(out, np.rot90(img, k=-1))  # k=-1: clockwise


@pytest.mark.parametrize("angle,translate,scale", [(12.0, (5, -7), 1.05), (-15.0, (-10, 6), 0.9),
                                                    (0.0, (9, 3), 1.1)])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_image_and_box_move_together(angle, translate, scale, dtype):
  box = np.array([[40.0, 50.0, 90.0, 80.0]])
  img = np.zeros((S, S, 1), dtype)
  img[50:80, 40:90] = 255 if dtype == np.uint8 else 1.0
  matrix = augment.affine_matrix(S, angle, translate, scale)
  out, boxes, present = augment.apply_affine(img, box, matrix)
  assert out.shape == img.shape and out.dtype == img.dtype and present.tolist() == [True]
  bright = _bright_box(out)
  hull = _reference_boxes(box, S, angle, translate, scale)[0]
  np.testing.assert_allclose(boxes[0], hull, atol=1e-3)
  np.testing.assert_allclose(bright, hull, atol=1.0)  # the pixels' extent matches the hull box
  # The enclosing-box rule: the bright pixels lie inside the box (up to a pixel of resampling).
  assert np.all(bright[:2] >= boxes[0, :2] - 1.0) and np.all(bright[2:] <= boxes[0, 2:] + 1.0)


def test_hflip_is_exact_and_keeps_rows():
  boxes = np.array([[10.0, 20.0, 40.0, 60.0], [70.0, 5.0, 128.0, 30.0], [0.0, 0.0, 0.0, 0.0]])
  img = np.zeros((S, S), np.uint8)
  img[20:60, 10:40] = 200
  out, flipped = augment.hflip(img, boxes)
  np.testing.assert_array_equal(flipped[:, [0, 2]], S - boxes[:, [2, 0]])  # x → W − x
  np.testing.assert_array_equal(flipped[:, [1, 3]], boxes[:, [1, 3]])
  np.testing.assert_array_equal(out, img[:, ::-1])
  np.testing.assert_array_equal(_bright_box(out), flipped[0])  # pixel-exact
  back_img, back = augment.hflip(out, flipped)
  np.testing.assert_array_equal(back, boxes)
  np.testing.assert_array_equal(back_img, img)


def test_rows_never_dropped_and_degenerate_reported():
  boxes = np.array([[10.0, 10.0, 20.0, 20.0],     # pushed off the image by the translation
                    [60.0, 60.0, 70.0, 70.0],     # stays inside
                    [0.0, 0.0, 0.0, 0.0]])        # absent anatomy
  present = np.array([True, True, False])
  matrix = augment.affine_matrix(S, 0.0, (-40, 0), 1.0)
  _, out, out_present = augment.apply_affine(np.zeros((S, S), np.uint8), boxes, matrix, present)
  assert out.shape == (3, 4)
  assert out_present.tolist() == [False, True, False]
  assert out[0, 0] == out[0, 2] == 0.0  # clamped to zero width, kept in its row
  np.testing.assert_allclose(out[1], [20, 60, 30, 70])


def test_sampled_parameters_stay_in_range():
  cfg = dict(augment.DEFAULT_AUGMENT)
  rng = np.random.default_rng(3)
  angles, scales = [], []
  for _ in range(300):
    m = augment.sample_affine(rng, cfg, S)
    scale = math.sqrt(np.linalg.det(m[:, :2]))
    angle = math.degrees(math.atan2(m[1, 0], m[0, 0]))
    centre = np.array([S / 2, S / 2])
    t = m[:, :2] @ centre + m[:, 2] - centre  # where the centre goes = the translation
    angles.append(angle)
    scales.append(scale)
    assert np.all(np.abs(t) <= 0.1 * S + 0.5) and np.allclose(t, np.round(t), atol=1e-6)
  assert max(np.abs(angles)) <= 15 and max(np.abs(angles)) > 13
  assert 0.9 <= min(scales) < 0.92 and 1.08 < max(scales) <= 1.1


def test_random_augment_is_deterministic_and_flips_at_rate():
  img = np.zeros((32, 32), np.uint8)
  img[8:20, 4:12] = 255
  boxes = np.array([[4.0, 8.0, 12.0, 20.0]])
  outs = [augment.random_augment(img, boxes, np.random.default_rng(7)) for _ in range(2)]
  np.testing.assert_array_equal(outs[0][0], outs[1][0])
  np.testing.assert_array_equal(outs[0][1], outs[1][1])
  # Disabled: identity.
  same = augment.random_augment(img, boxes, np.random.default_rng(7), {"enabled": False})
  np.testing.assert_array_equal(same[0], img)
  np.testing.assert_array_equal(same[1], boxes)
  # Flip only (no affine motion): the flip rate follows hflip_prob.
  cfg = {"enabled": True, "degrees": 0.0, "translate": 0.0, "scale_min": 1.0, "scale_max": 1.0,
         "hflip_prob": 0.3}
  rng = np.random.default_rng(0)
  flips = [augment.random_augment(img, boxes, rng, cfg)[1][0, 0] != 4.0 for _ in range(1000)]
  assert 0.25 < np.mean(flips) < 0.35


def test_nearest_interpolation_keeps_values():
  img = np.random.default_rng(2).choice(np.array([0, 100, 255], np.uint8), size=(S, S))
  matrix = augment.affine_matrix(S, 9.0, (3, -4), 1.07)
  out, _, _ = augment.apply_affine(img, np.zeros((1, 4)), matrix, interpolation="nearest")
  assert set(np.unique(out)) <= {0, 100, 255}
