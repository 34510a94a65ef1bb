"""retinanet_plugin.engine.predictor.Predictor: the weights file alone gives detectron2's own
detections, with class names, for a path, a PIL image or an array; the same as predict's JSON."""

import json
import os

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import plugin_cfg, run_main
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model
from retinanet_plugin.checkpoint.metadata import checkpoint_metadata
from retinanet_plugin.cli import predict
from retinanet_plugin.data.synthetic_shapes import SHAPE_CLASSES
from retinanet_plugin.engine import Predictor
from retinanet_plugin.engine.predictor import PredictorInputError

OPTS = ["INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "96", "TEST.DETECTIONS_PER_IMAGE", "5"]
OPTS += ["MODEL.RETINANET.SCORE_THRESH_TEST", "0.0", "MODEL.RETINANET.NUM_CLASSES", "4"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A self-describing checkpoint (config and class names) of an untrained tiny model."""
    cfg = plugin_cfg("retinanet_R18_GN_tiny.yaml", *OPTS)
    torch.manual_seed(0)
    metadata = checkpoint_metadata(cfg)
    metadata["class_names"] = list(SHAPE_CLASSES)
    path = tmp_path_factory.mktemp("predictor") / "model.pth"
    torch.save({"model": build_model(cfg).state_dict(), "retinanet_plugin": metadata}, path)
    return str(path)


def _photo(shapes_dataset) -> str:
    return os.path.join(shapes_dataset["val"][1], "00001.png")


def test_predictor_gives_detectron2_default_predictors_detections(checkpoint, shapes_dataset):
    """The reference: detectron2's DefaultPredictor, its config built by hand (not from the
    checkpoint), on the BGR array cv2.imread gives; every input type gives the same."""
    cfg = plugin_cfg("retinanet_R18_GN_tiny.yaml", *OPTS, "MODEL.WEIGHTS", checkpoint)
    bgr = cv2.imread(_photo(shapes_dataset))
    expected = DefaultPredictor(cfg)(bgr)["instances"]
    assert len(expected) == 5
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    inputs = {
        "path": (_photo(shapes_dataset), "BGR"),
        "BGR array": (bgr, "BGR"),
        "RGB array": (np.ascontiguousarray(bgr[:, :, ::-1]), "RGB"),
        "PIL image": (Image.open(_photo(shapes_dataset)), "BGR"),
    }
    for what, (image, order) in inputs.items():
        detections = predictor(image, channel_order=order)
        assert np.allclose(detections.boxes, expected.pred_boxes.tensor.numpy(), atol=1e-4), what
        assert np.allclose(detections.scores, expected.scores.numpy(), atol=1e-6), what
        assert detections.class_ids.tolist() == expected.pred_classes.tolist(), what
        assert detections.class_names == [SHAPE_CLASSES[c] for c in detections.class_ids]
        assert detections.image_size == (128, 128)
    batch = predictor.predict_batch([bgr, _photo(shapes_dataset)])
    assert [d.class_ids.tolist() for d in batch] == [expected.pred_classes.tolist()] * 2


def test_predictor_overrides_and_bad_images(checkpoint, shapes_dataset):
    predictor = Predictor.from_checkpoint(
        checkpoint, score_threshold=0.5, class_names=["a", "b", "c", "d"]
    )
    assert predictor.cfg.MODEL.RETINANET.SCORE_THRESH_TEST == 0.5
    assert predictor.class_names == ["a", "b", "c", "d"]
    # The untrained model scores about 0.01 (its prior): nothing reaches 0.5.
    assert len(predictor(_photo(shapes_dataset))) == 0
    with pytest.raises(PredictorInputError, match=r"float32 array of shape \(8, 8, 3\)"):
        predictor(np.zeros((8, 8, 3), dtype=np.float32))
    with pytest.raises(PredictorInputError, match="channel_order 'BRG'"):
        predictor(np.zeros((8, 8, 3), dtype=np.uint8), channel_order="BRG")
    with pytest.raises(PredictorInputError, match="3 names for a model of 4 classes"):
        Predictor.from_checkpoint(checkpoint, class_names=["a", "b", "c"])


def test_predictor_equals_the_predict_commands_json(checkpoint, shapes_dataset, tmp_path):
    """No --config-file: the command and the Python API both take the checkpoint's config."""
    photo = _photo(shapes_dataset)
    argv = ["--input", photo, "--output", tmp_path / "out", "--score-threshold", "0"]
    status, log = run_main(predict.main, [*argv, "MODEL.WEIGHTS", checkpoint])
    assert status == 0, log[-3000:]
    records = json.loads((tmp_path / "out" / "coco_results.json").read_text())
    detections = Predictor.from_checkpoint(checkpoint)(photo)
    assert len(records) == len(detections) == 5
    for record, box, score, class_id, name in zip(
        records,
        detections.boxes.tolist(),
        detections.scores.tolist(),
        detections.class_ids.tolist(),
        detections.class_names,
    ):
        x0, y0, x1, y1 = box
        assert record["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0], abs=1e-4)
        assert record["score"] == pytest.approx(score, abs=1e-6)
        assert (record["category_id"], record["category_name"]) == (class_id, name)
        assert (record["image_id"], record["file_name"]) == (0, photo)
