"""Tiled prediction (retinanet_plugin.modeling.tiling): windows, merging against whole-image
prediction."""

import numpy as np
import pytest
import torch

import retinanet_plugin  # noqa: F401  (registers the plugin's components)
from conftest import plugin_cfg
from detectron2.structures import Boxes, Instances
from retinanet_plugin.engine.predictor import BatchPredictor
from retinanet_plugin.modeling.tiling import TiledPredictor, merge_tile_detections, tile_windows

pytestmark = pytest.mark.usefixtures("single_thread")


def test_windows_hand_computed():
    """500 x 300 (h x w), 200 px tiles, overlap 0.25: stride 150; the last tile of each axis is
    flush with the image's edge."""
    windows = tile_windows(500, 300, 200, 0.25)
    xs, ys = sorted({w[0] for w in windows}), sorted({w[1] for w in windows})
    assert xs == [0, 100] and ys == [0, 150, 300]
    assert len(windows) == 6 and all(
        x1 - x0 == 200 and y1 - y0 == 200 for x0, y0, x1, y1 in windows
    )
    assert tile_windows(120, 80, 200, 0.25) == [(0, 0, 80, 120)]  # smaller than a tile


class OracleDetector:
    """Detects the scene's objects in an image cut from it: every object that intersects the
    crop, clipped to it, scored by the fraction of it that is visible (a cut-off object is a
    worse detection). The crop's position is read from its pixels (x, y coordinates)."""

    input_format = "BGR"

    def __init__(self, boxes: np.ndarray, classes: np.ndarray):
        self.boxes, self.classes = boxes, classes

    def __call__(self, crops):
        outputs = []
        for crop in crops:
            x0, y0 = int(crop[0, 0, 0]), int(crop[0, 0, 1])
            height, width = crop.shape[:2]
            clipped = np.clip(self.boxes - [x0, y0, x0, y0], 0, [width, height, width, height])
            area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # noqa: E731
            visible = area(clipped) / area(self.boxes)
            seen = visible > 0
            outputs.append(
                Instances(
                    (height, width),
                    pred_boxes=Boxes(torch.tensor(clipped[seen], dtype=torch.float32)),
                    scores=torch.tensor(visible[seen], dtype=torch.float32),
                    pred_classes=torch.tensor(self.classes[seen]),
                )
            )
        return outputs


def _scene(rng, height, width, count, max_side):
    corners = rng.uniform([0, 0], [width - max_side, height - max_side], size=(count, 2))
    sides = rng.uniform(4, max_side, size=(count, 2))
    boxes = np.concatenate([corners, corners + sides], axis=1)
    coordinates = np.stack(np.meshgrid(np.arange(width), np.arange(height)), axis=-1)
    return coordinates.astype(np.int32), boxes, rng.integers(0, 3, size=count)


@pytest.mark.parametrize("tile, overlap", [(128, 0.25), (100, 0.5), (256, 0.125)])
def test_tiled_equals_whole_image_prediction_for_objects_within_the_overlap(tile, overlap):
    """Objects up to overlap * tile pixels across: every object once, whole (the oracle's
    whole-image prediction), and no cut-off copy."""
    rng = np.random.default_rng(tile)
    image, boxes, classes = _scene(rng, 500, 700, 60, max_side=overlap * tile)
    detector = OracleDetector(boxes, classes)
    whole = detector([image])[0]
    (tiled,) = TiledPredictor(detector, tile, overlap, nms_thresh=0.5, batch_size=3)([image])
    assert tiled.image_size == (500, 700)
    assert len(tiled) == len(whole) == 60
    order = np.lexsort(tiled.pred_boxes.tensor.numpy().T[::-1])
    expected = np.lexsort(whole.pred_boxes.tensor.numpy().T[::-1])
    assert torch.allclose(tiled.pred_boxes.tensor[order], whole.pred_boxes.tensor[expected])
    assert torch.equal(tiled.pred_classes[order], whole.pred_classes[expected])
    assert torch.all(tiled.scores == 1.0)  # the whole copy of each object, never a cut one


def test_merge_drops_copies_in_tiles_that_do_not_own_the_box_and_runs_nms():
    """Two tiles (0-100 and 60-160 along x) both see a box centred at x = 70, nearer the first
    tile's center (50) than the second's (110): only the first tile's copy is kept. A box seen
    twice by its owner (as pieces of a large object) is merged by NMS."""
    windows = [(0, 0, 100, 100), (60, 0, 160, 100)]
    box = [60.0, 10.0, 80.0, 30.0]  # image coordinates
    first = Instances((100, 100), pred_boxes=Boxes(torch.tensor([box, [61.0, 10.0, 80.0, 30.0]])))
    first.scores = torch.tensor([0.9, 0.8])
    first.pred_classes = torch.tensor([1, 1])
    second = Instances((100, 100), pred_boxes=Boxes(torch.tensor([[0.0, 10.0, 20.0, 30.0]])))
    second.scores, second.pred_classes = torch.tensor([0.95]), torch.tensor([1])
    merged = merge_tile_detections(windows, [first, second], (100, 160), nms_thresh=0.5)
    assert merged.pred_boxes.tensor.tolist() == [box] and merged.scores.tolist() == [
        pytest.approx(0.9)
    ]


def test_one_tile_gives_the_models_own_detections():
    """A tile as large as the image: the same detections as predicting the whole image."""
    cfg = plugin_cfg("retinanet_R18_GN_tiny.yaml", "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0")
    cfg.MODEL.RETINANET.NUM_CLASSES = 3
    torch.manual_seed(0)
    predictor = BatchPredictor(cfg)
    image = np.random.default_rng(0).integers(0, 256, size=(150, 180, 3), dtype=np.uint8)
    (whole,) = predictor([image])
    (tiled,) = TiledPredictor(predictor, 256, 0.25, cfg.MODEL.RETINANET.NMS_THRESH_TEST)([image])
    assert len(whole) == cfg.TEST.DETECTIONS_PER_IMAGE
    assert torch.equal(tiled.pred_boxes.tensor, whole.pred_boxes.tensor)
    assert torch.equal(tiled.scores, whole.scores)
    assert torch.equal(tiled.pred_classes, whole.pred_classes)
