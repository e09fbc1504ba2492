"""Scene-graph parsing, the reference sentence rule, and the letterbox geometry, on hand-made inputs."""

import json
import math
import pickle

import cv2
import numpy as np
import pytest

from anatomix_jax import anatomy
from anatomix_jax.data import images, scene_graph

RLL = anatomy.NAME_TO_INDEX["Right lower lung zone"]
HEART = anatomy.NAME_TO_INDEX["Cardiac shadow viewed radiologically;;Heart"]
TRACHEA = anatomy.NAME_TO_INDEX["Trachea&&Main Bronchus"]


def _object(name, bbox_name, grid, original, hw=(300, 200)):
  x1, y1, x2, y2 = grid
  ox1, oy1, ox2, oy2 = original
  return {"object_id": f"img_{bbox_name}", "x1": x1, "y1": y1, "x2": x2, "y2": y2,
          "width": x2 - x1, "height": y2 - y1, "bbox_name": bbox_name, "name": name,
          "synsets": ["C0000000"], "original_x1": ox1, "original_y1": oy1, "original_x2": ox2,
          "original_y2": oy2, "original_width": hw[1], "original_height": hw[0]}


def _graph():
  """Image 300 (high) × 200 (wide): letterbox pads 50 columns each side to a 300×300 square."""
  return {
      "image_id": "img", "viewpoint": "PA", "patient_id": 10000032, "study_id": 50414267,
      "objects": [
          # original (20, 30, 100, 250) → 224 grid round((x+50)·224/300), round(y·224/300).
          _object("Right lower lung zone", "right lower lung zone", (52, 22, 112, 187),
                  (20, 30, 100, 250)),
          _object("Cardiac shadow viewed radiologically;;Heart", "cardiac silhouette",
                  (100, 110, 150, 170), (84, 147, 151, 228)),
          # Found by bbox_name only (name spelled differently).
          {**_object("Trachea and Main Bronchus", "trachea", (105, 10, 120, 60),
                     (91, 13, 111, 80))},
      ],
      "attributes": [
          {"name": "Right lower lung zone", "bbox_name": "right lower lung zone",
           "attributes": [["anatomicalfinding|yes|lung opacity", "disease|yes|pneumonia",
                           "nlp|yes|abnormal", "laterality|yes|right"],
                          ["anatomicalfinding|yes|lung opacity", "severity|yes|mild",
                           "anatomicalfinding|no|pleural effusion"]],
           "phrases": ["Right lower lobe opacity, concerning for pneumonia.", "..."]},
          {"name": "Cardiac shadow viewed radiologically;;Heart", "bbox_name": "cardiac silhouette",
           "attributes": [["anatomicalfinding|no|enlarged cardiac silhouette", "nlp|yes|normal"]]},
          # The left lung has no box: its attributes are ignored (reference get_findings).
          {"name": "Left lung", "bbox_name": "left lung",
           "attributes": [["anatomicalfinding|yes|pneumothorax"]]},
          # An attribute entry for something that is not one of the 36 anatomies is ignored too.
          {"name": "Left breast", "bbox_name": "left breast", "attributes": [["x|yes|y"]]},
      ],
      "relationships": [],
  }


def test_grid224_boxes_follow_the_reference_truncation():
  g = scene_graph.parse_scene_graph(_graph(), source="g.json")
  # int(v · 1024/224): 52→237.71, 22→100.57, 112→512, 187→854.86.
  np.testing.assert_array_equal(g.boxes[RLL], [237, 100, 512, 854])
  np.testing.assert_array_equal(g.boxes[HEART], [457, 502, 685, 777])
  np.testing.assert_array_equal(g.boxes[TRACHEA], [480, 45, 548, 274])
  assert g.boxes.dtype == np.float32 and g.boxes.shape == (36, 4)
  assert g.present.sum() == 3 and g.present[[RLL, HEART, TRACHEA]].all()
  assert not g.boxes[~g.present.astype(bool)].any()
  assert (g.image_id, g.subject_id, g.study_id, g.viewpoint) == ("img", "10000032", "50414267",
                                                                  "PA")
  assert g.num_clipped == 0


def test_original_boxes_map_through_the_exact_letterbox():
  g = scene_graph.parse_scene_graph(_graph(), box_source="original", image_hw=(300, 200))
  # (x + 50) · 1024/300, y · 1024/300.
  np.testing.assert_allclose(g.boxes[RLL], [70 * 1024 / 300, 30 * 1024 / 300, 150 * 1024 / 300,
                                            250 * 1024 / 300], rtol=1e-6)
  with pytest.raises(scene_graph.SceneGraphError, match="does not match") as e:
    scene_graph.parse_scene_graph(_graph(), source="g.json", box_source="original",
                                  image_hw=(301, 200))
  assert e.value.reason == "size_mismatch"
  # Without the image size, the objects' original_width/height define the letterbox.
  alone = scene_graph.parse_scene_graph(_graph(), box_source="original")
  np.testing.assert_array_equal(alone.boxes, g.boxes)


def test_sentences_follow_the_reference_rule():
  g = scene_graph.parse_scene_graph(_graph())
  assert g.sentences[RLL] == "Right lower lung zone shows lung opacity and pneumonia."
  assert g.sentences[HEART] == "Cardiac shadow viewed radiologically;;Heart is healthy."
  left_lung = anatomy.NAME_TO_INDEX["Left lung"]
  assert g.sentences[left_lung] == "Left lung is healthy."
  assert g.sentences[TRACHEA] == "Trachea&&Main Bronchus is healthy."
  assert len(g.sentences) == 36


def test_finding_sentence_orders_and_skips():
  attrs = [["tubesandlines|yes|endotracheal tube", "anatomicalfinding|yes|lung opacity",
            "anatomicalfinding|yes|atelectasis", "device|yes|cardiac pacer and wires",
            "nlp|yes|abnormal", "laterality|yes|left", "severity|yes|severe", "bad item",
            "a|b", "anatomicalfinding|yes|lung opacity", ""]]
  assert scene_graph.finding_sentence(attrs, "Left lung") == (
      "Left lung shows atelectasis and lung opacity and cardiac pacer and wires and "
      "endotracheal tube.")
  assert scene_graph.finding_sentence([["disease|yes|pneumonia"]], "X") == "X shows pneumonia."
  assert scene_graph.finding_sentence([["nlp|yes|abnormal"], []], "X") == "X is healthy."
  assert scene_graph.finding_sentence([], "X") == "X is healthy."


def _write(tmp_path, graph, text=None):
  path = tmp_path / "img_SceneGraph.json"
  path.write_text(text if text is not None else json.dumps(graph))
  return str(path)


def _broken(mutate):
  graph = _graph()
  mutate(graph)
  return graph


@pytest.mark.parametrize("graph, text, field, reason", [
    (None, "{not json", "<file>", "bad_json"),
    (_broken(lambda g: g.pop("objects")), None, "objects", "missing_field"),
    (_broken(lambda g: g.pop("image_id")), None, "image_id", "missing_field"),
    (_broken(lambda g: g["objects"][1].pop("x2")), None, "objects[1].x2", "bad_coordinates"),
    (_broken(lambda g: g["objects"][0].update(y1=float("nan"))), None, "objects[0].y1",
     "bad_coordinates"),
    (_broken(lambda g: g["objects"][0].update(x1="52")), None, "objects[0].x1", "bad_coordinates"),
    (_broken(lambda g: g["objects"][0].update(x1=True)), None, "objects[0].x1", "bad_coordinates"),
    (_broken(lambda g: g["objects"][2].update(name="Spleen", bbox_name="spleen")), None,
     "objects[2].name", "unknown_anatomy"),
    (_broken(lambda g: g["objects"][0].update(x2=52)), None, "objects[0].x2/y2", "degenerate_box"),
    (_broken(lambda g: g["objects"][0].update(y1=200, y2=190)), None, "objects[0].x2/y2",
     "degenerate_box"),
    (_broken(lambda g: g["objects"][0].update(x1=225, x2=240)), None, "objects[0]", "box_outside"),
])
def test_bad_scene_graphs_name_file_and_field(tmp_path, graph, text, field, reason):
  path = _write(tmp_path, graph, text)
  with pytest.raises(scene_graph.SceneGraphError) as e:
    scene_graph.read_scene_graph(path)
  assert path in str(e.value) and repr(field) in str(e.value)
  assert e.value.reason == reason and e.value.field == field
  # Picklable, so worker processes can hand the error back.
  again = pickle.loads(pickle.dumps(e.value))
  assert str(again) == str(e.value) and again.reason == reason


def test_missing_scene_graph_file(tmp_path):
  with pytest.raises(scene_graph.SceneGraphError, match="does not exist"):
    scene_graph.read_scene_graph(str(tmp_path / "nope.json"))


def test_partly_outside_boxes_are_clipped_and_counted():
  graph = _graph()
  graph["objects"][0].update(x1=200, x2=230)   # 914..1051 on the canvas → clipped at 1024
  graph["objects"][1].update(y1=-3)            # int(-13.7) = -13 → clipped at 0
  g = scene_graph.parse_scene_graph(graph)
  np.testing.assert_array_equal(g.boxes[RLL], [914, 100, 1024, 854])
  assert g.boxes[HEART, 1] == 0
  assert g.num_clipped == 2
  graph = _graph()
  graph["objects"][0].update(original_x1=-10)  # clipped to the image before the letterbox
  g = scene_graph.parse_scene_graph(graph, box_source="original")
  assert g.boxes[RLL, 0] == pytest.approx(50 * 1024 / 300)
  assert g.num_clipped == 1


def test_letterbox_pads_centred_and_resizes_like_the_reference():
  tall = np.full((3, 1), 90, np.uint8)
  out, t = images.letterbox(tall, 3)  # pad 1 column each side, already square: no resize
  np.testing.assert_array_equal(out, [[0, 90, 0]] * 3)
  assert (t.pad_left, t.pad_top, t.padded_width, t.padded_height) == (1, 0, 3, 3)
  # Odd difference: 4×1 → 4×3 padded (not square) → stretched to 4×4 by cv2's bilinear resize.
  out, t = images.letterbox(np.full((4, 1), 90, np.uint8), 4)
  assert (t.pad_left, t.padded_width, t.padded_height) == (1, 3, 4)
  # Column sources (x + 0.5)·3/4 − 0.5 = −0.125, 0.625, 1.375, 2.125 → 0, 56.25, 56.25, 0.
  np.testing.assert_array_equal(out, [[0, 56, 56, 0]] * 4)
  np.testing.assert_allclose(t.forward_boxes([0, 0, 1, 4]), [4 / 3, 0, 8 / 3, 4])
  np.testing.assert_allclose(images.map_boxes(np.array([[0, 0, 1, 4]]), t, 1024),
                             [[1024 / 3, 0, 2048 / 3, 1024]])
  # Wide image: rows are padded; the transform inverts exactly.
  out, t = images.letterbox(np.full((21, 36), 7, np.float32), 72)
  assert (t.pad_top, t.padded_height, t.padded_width) == (7, 35, 36)
  assert out.dtype == np.float32 and out.shape == (72, 72)
  boxes = np.array([[1.5, 2.0, 30.0, 20.0]])
  np.testing.assert_allclose(t.inverse_boxes(t.forward_boxes(boxes)), boxes)
  assert out[0].max() == 0 and out[-1].max() == 0 and out[36, 36] == pytest.approx(7)


def test_letterbox_puts_original_pixels_where_boxes_say():
  image = np.zeros((301, 200), np.uint8)
  image[100:140, 30:90] = 255  # a bright block in original pixels
  out, t = images.letterbox(image, 512)
  x1, y1, x2, y2 = t.forward_boxes([30, 100, 90, 140])
  inner = out[int(math.ceil(y1)) + 1:int(y2) - 1, int(math.ceil(x1)) + 1:int(x2) - 1]
  assert inner.min() == 255
  ring = np.ones_like(out, bool)
  ring[int(y1) - 1:int(math.ceil(y2)) + 1, int(x1) - 1:int(math.ceil(x2)) + 1] = False
  assert out[ring].max() == 0


def test_decode_image_errors_and_16bit(tmp_path):
  ok, jpeg = cv2.imencode(".jpg", np.full((20, 30), 128, np.uint8))
  path = tmp_path / "x.jpg"
  path.write_bytes(jpeg.tobytes()[: len(jpeg) // 2])
  with pytest.raises(images.ImageError, match="(?i)x.jpg.*truncated") as e:
    images.read_image(str(path))
  assert e.value.reason == "unreadable_image"
  with pytest.raises(images.ImageError, match="does not exist") as e:
    images.read_image(str(tmp_path / "missing.jpg"))
  assert e.value.reason == "missing_image"
  (tmp_path / "junk.png").write_bytes(b"not an image at all")
  with pytest.raises(images.ImageError, match="junk.png"):
    images.read_image(str(tmp_path / "junk.png"))
  deep = np.array([[0, 65535], [257 * 10, 32768]], np.uint16)
  ok, png16 = cv2.imencode(".png", deep)
  (tmp_path / "d.png").write_bytes(png16.tobytes())
  np.testing.assert_array_equal(images.read_image(str(tmp_path / "d.png")), [[0, 255], [10, 128]])
  np.testing.assert_allclose(images.read_image(str(tmp_path / "d.png"), np.float32),
                             deep / 65535.0, rtol=1e-6)
  (tmp_path / "d_cut.png").write_bytes(png16.tobytes()[:40])
  with pytest.raises(images.ImageError, match="d_cut.png"):
    images.read_image(str(tmp_path / "d_cut.png"))


def test_minmax_stretch_matches_matplotlib_mapping():
  image = np.array([[3, 4, 100], [200, 199, 3]], np.uint8)
  # norm = (v − 3)/197; index = floor(norm·256); value = uint8(index/255·255) (matplotlib's LUT).
  expected = []
  for v in image.ravel():
    index = min(int(np.float32(v - 3) / np.float32(197) * np.float32(256)), 255)
    expected.append(int(np.uint8(np.linspace(0, 1, 256)[index] * 255)))
  np.testing.assert_array_equal(images.minmax_stretch(image).ravel(), expected)
  assert images.minmax_stretch(image).max() == 255
  np.testing.assert_array_equal(images.minmax_stretch(image.astype(np.float32)),
                                images.minmax_stretch(image))
  assert not images.minmax_stretch(np.full((2, 2), 9, np.uint8)).any()
