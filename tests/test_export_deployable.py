"""The deployable graph: an exported file that runs in a bare onnxruntime session (or
``torch.jit.load``) gives the PyTorch model's detections, with the class names in its metadata."""

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from test_export import MIN_DETECTIONS, build_tiny_model, conv_count, run_cli, tiny_cfg
from torch import nn

from detectron2.data import transforms as T
from retinanet_plugin.export.deployable import resize_to_test_size, resized_size
from retinanet_plugin.export.exporter import export_model, load_exported, synthetic_test_image

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("single_thread")

CLASS_NAMES = ["circle", "square", "triangle", "star"]
MIN_SIZE, MAX_SIZE = 96, 160  # test_export.OPTS' INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST
# (H, W) of the decoded test images: one at its test size (no resize), one scaled up to it, one
# scaled down with its longest edge capped at MAX_SIZE; the trace's sample is (96, 128).
IMAGE_SIZES = ((96, 150), (70, 110), (300, 250))

# Run by a Python with no plugin, torch or detectron2 import: onnxruntime and numpy only.
BARE_RUNTIME = """
import json, sys
import numpy as np
import onnxruntime

path, images, results = sys.argv[1:]
session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
metadata = session.get_modelmeta().custom_metadata_map
outputs = {}
for name, image in np.load(images).items():
    boxes, scores, classes = session.run(["boxes", "scores", "classes"], {"image": image})
    outputs.update({name + "/boxes": boxes, name + "/scores": scores, name + "/classes": classes})
np.savez(results, **outputs)
imported = sorted(m for m in ("torch", "detectron2", "retinanet_plugin") if m in sys.modules)
print(json.dumps({"class_names": json.loads(metadata["class_names"]),
                  "input_format": metadata["input_format"], "imported": imported}))
"""


@pytest.fixture(scope="module")
def model():
    """test_export's random model with small box deltas: boxes stay near their anchors, whose
    neighbours overlap (IoU > 0.5), so that NMS removes many of the best-scoring boxes."""
    cfg = tiny_cfg()
    network = build_tiny_model(cfg)
    with torch.no_grad():
        nn.init.normal_(network.head.bbox_pred.weight, std=0.01)
    return cfg, network


@pytest.fixture(scope="module")
def images(shapes_dataset):
    """Decoded validation images, (H, W, 3) uint8 BGR (the config's INPUT.FORMAT), resized to
    IMAGE_SIZES as stand-ins for photos of those sizes."""
    _, image_root = shapes_dataset["val"]
    names = sorted(os.listdir(image_root))
    return [
        cv2.resize(cv2.imread(os.path.join(image_root, name)), (width, height))
        for name, (height, width) in zip(names, IMAGE_SIZES)
    ]


def model_detections(model, image: np.ndarray):
    """The PyTorch model's detections, the detectron2 way: the test-size image (the graph's
    own resize, checked against detectron2's in test_resize_is_detectron2s_test_resize) with
    the decoded image's size to scale back to."""
    resized = resize_to_test_size(torch.as_tensor(image), MIN_SIZE, MAX_SIZE)
    inputs = {"image": resized, "height": image.shape[0], "width": image.shape[1]}
    with torch.no_grad():
        instances = model([inputs])[0]["instances"]
    return instances.pred_boxes.tensor, instances.scores, instances.pred_classes


def assert_same_detections(actual, expected, min_detections=MIN_DETECTIONS):
    """Same classes; scores within 1e-5; boxes within 1e-3 px + 1e-5 relative (float32 kernels
    differ in summation order, and decoding scales a delta's rounding by the anchor size)."""
    boxes, scores, classes = (torch.as_tensor(np.asarray(x)) for x in actual)
    expected_boxes, expected_scores, expected_classes = expected
    assert len(expected_scores) >= min_detections
    assert torch.equal(classes, expected_classes)
    torch.testing.assert_close(scores, expected_scores, rtol=0, atol=1e-5)
    torch.testing.assert_close(boxes, expected_boxes, rtol=1e-5, atol=1e-3)


def test_resize_is_detectron2s_test_resize(images):
    """Sizes equal detectron2's ResizeShortestEdge's; pixels equal its PIL resize of uint8
    images up to PIL's rounding to uint8 (and its fixed-point weights)."""
    resize = T.ResizeShortestEdge(MIN_SIZE, MAX_SIZE)
    for height, width in [(1, 1), (95, 96), (96, 1000), (333, 500), (1080, 1920), (4000, 17)]:
        expected = resize.get_transform(np.zeros((height, width, 3), np.uint8))
        size = resized_size(torch.tensor(height), torch.tensor(width), MIN_SIZE, MAX_SIZE)
        assert size.tolist() == [expected.new_h, expected.new_w]
    for image in images:
        expected = resize.get_transform(image).apply_image(image).transpose(2, 0, 1)
        resized = resize_to_test_size(torch.as_tensor(image), MIN_SIZE, MAX_SIZE)
        assert resized.shape == expected.shape
        difference = (resized - torch.as_tensor(expected).float()).abs()
        assert difference.max() <= 1.0 and difference.mean() < 0.3
        if image.shape[:2] == resized.shape[1:]:  # at its test size: unchanged
            assert torch.equal(resized, torch.as_tensor(image).permute(2, 0, 1).float())


def test_bare_onnxruntime_gives_the_models_detections(model, images, tmp_path):
    """Exported, then run by onnxruntime in a process that imports neither the plugin nor torch,
    at three image sizes (none the traced one): the PyTorch model's detections."""
    cfg, network = model
    path = tmp_path / "model.onnx"
    export_model(
        cfg, network, "onnx", str(path), synthetic_test_image(cfg), class_names=CLASS_NAMES
    )
    np.savez(tmp_path / "images.npz", **{str(i): image for i, image in enumerate(images)})
    results = tmp_path / "results.npz"
    command = [sys.executable, "-c", BARE_RUNTIME, str(path), str(tmp_path / "images.npz")]
    run = subprocess.run([*command, str(results)], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report == {"class_names": CLASS_NAMES, "input_format": "BGR", "imported": []}
    outputs = np.load(results)
    for i, image in enumerate(images):
        actual = [outputs[f"{i}/{name}"] for name in ("boxes", "scores", "classes")]
        assert actual[2].dtype == np.int64 and actual[0].dtype == actual[1].dtype == np.float32
        assert_same_detections(actual, model_detections(network, image))
    graph = onnx.load(str(path)).graph
    assert [n.op_type for n in graph.node].count("NonMaxSuppression") == 1


def test_torchscript_gives_the_models_detections(model, images, tmp_path):
    cfg, network = model
    path = str(tmp_path / "model.ts")
    export_model(
        cfg, network, "torchscript", path, synthetic_test_image(cfg), class_names=CLASS_NAMES
    )
    extra_files = {"class_names": "", "input_format": ""}
    loaded = torch.jit.load(path, _extra_files=extra_files)
    assert json.loads(extra_files["class_names"]) == CLASS_NAMES
    assert extra_files["input_format"] == b"BGR"  # extra files load as bytes
    for image in images:
        with torch.no_grad():
            actual = loaded(torch.as_tensor(image))
        assert_same_detections(actual, model_detections(network, image))


def test_bfloat16_torchscript_gives_the_models_bfloat16_detections(images, tmp_path):
    """With MODEL.INFERENCE_DTYPE bfloat16 (TorchScript only), the file computes as the PyTorch
    model's bfloat16 path does. bfloat16 scores tie often (8 significant bits) and the file
    orders equal scores differently from the model, which decides which of tied boxes the top-k,
    NMS and the detection limit keep: at least 95% of the detections are the same (bit for
    bit: the same kernels), the rest are ties."""
    cfg = tiny_cfg("MODEL.INFERENCE_DTYPE", "bfloat16")
    network = build_tiny_model(cfg)
    with torch.no_grad():
        nn.init.normal_(network.head.bbox_pred.weight, std=0.01)
    path = str(tmp_path / "model_bf16.ts")
    export_model(cfg, network, "torchscript", path, synthetic_test_image(cfg))
    loaded = torch.jit.load(path)
    for image in images:
        with torch.no_grad():
            actual = loaded(torch.as_tensor(image))
        expected = model_detections(network, image)
        assert len(expected[1]) >= MIN_DETECTIONS and len(actual[1]) == len(expected[1])
        rows = [
            set(map(tuple, torch.cat([b, s[:, None], c[:, None]], dim=1).tolist()))
            for b, s, c in (actual, expected)
        ]
        assert len(rows[0] & rows[1]) >= 0.95 * len(expected[1])


def test_no_detections_gives_empty_outputs(tmp_path):
    """Every score below the threshold: (0, 4), (0,), (0,) outputs, as the model gives none."""
    cfg = tiny_cfg()
    network = build_tiny_model(cfg)
    with torch.no_grad():
        nn.init.constant_(network.head.cls_score.bias, -30.0)  # scores ~1e-13
    path = tmp_path / "model.onnx"
    export_model(cfg, network, "onnx", str(path), synthetic_test_image(cfg))
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    image = np.full((120, 90, 3), 128, np.uint8)
    boxes, scores, classes = session.run(None, {"image": image})
    assert boxes.shape == (0, 4) and scores.shape == classes.shape == (0,)
    assert len(model_detections(network, image)[1]) == 0


def test_the_test_images_exercise_nms(model, images):
    """The comparisons above would miss a wrong NMS only if it removed nothing: with NMS
    switched off, at least 10 of the model's detections on every test image are other boxes
    (ones NMS removes)."""
    cfg, network = model
    with_nms = [model_detections(network, image)[0] for image in images]
    network.test_nms_thresh = 1.0  # nothing suppressed
    try:
        without_nms = [model_detections(network, image)[0] for image in images]
    finally:
        network.test_nms_thresh = cfg.MODEL.RETINANET.NMS_THRESH_TEST
    for kept, all_boxes in zip(with_nms, without_nms):
        removed = set(map(tuple, all_boxes.tolist())) - set(map(tuple, kept.tolist()))
        assert len(removed) >= 10


def test_nms_is_per_class_for_boxes_past_the_top_left(model):
    """Two classes' boxes at the same place past the image's top-left (decoded boxes may be):
    both kept, and only the lower-scoring box of one class is suppressed (hand-computed).
    torchvision's offsets from the maximum coordinate (here 10) alone would shift class 1 by 11
    px only, overlapping class 0's 60 px boxes."""
    from retinanet_plugin.export.deployable import DeployableRetinaNet

    _, network = model
    graph = DeployableRetinaNet(network, MIN_SIZE, MAX_SIZE)
    num_classes = network.num_classes
    anchors = torch.tensor([[-50.0, -50.0, 10.0, 10.0]] * 2)  # 2 anchors at one location
    logits = torch.full((1, 2 * num_classes, 1, 1), -10.0)  # channel = anchor * K + class
    logits[0, 0], logits[0, num_classes], logits[0, num_classes + 1] = 5.0, 4.0, 3.0
    deltas = torch.zeros(1, 2 * 4, 1, 1)  # the anchors themselves
    boxes, scores, classes = graph._detections([anchors], [logits], [deltas])
    assert classes.tolist() == [0, 1]
    torch.testing.assert_close(scores, torch.tensor([5.0, 3.0]).sigmoid())
    torch.testing.assert_close(boxes, anchors)


def test_cli_default_is_the_deployable_graph(model, images, tmp_path):
    """tools/export.py writes the deployable graph unless --graph raw-head; load_exported runs
    either with the model's detections."""
    _, network = model
    deployable, raw_head = tmp_path / "model.onnx", tmp_path / "head.onnx"
    assert run_cli(network, tmp_path, "--format", "onnx", "--output", str(deployable)) == 0
    argv = ["--format", "onnx", "--graph", "raw-head", "--output", str(raw_head)]
    assert run_cli(network, tmp_path, *argv) == 0
    ops = [{n.op_type for n in onnx.load(str(p)).graph.node} for p in (deployable, raw_head)]
    assert "NonMaxSuppression" in ops[0] and "NonMaxSuppression" not in ops[1]
    image = images[0]  # at its test size, as load_exported's inputs are
    inputs = [{"image": torch.as_tensor(image).permute(2, 0, 1), "height": 192, "width": 300}]
    with torch.no_grad():
        expected = network(inputs)[0]["instances"]
    for path in (deployable, raw_head):
        exported = load_exported(str(path))
        assert exported.graph_kind == ("deployable" if path == deployable else "raw-head")
        instances = exported(inputs)[0]["instances"]
        assert_same_detections(
            (instances.pred_boxes.tensor, instances.scores, instances.pred_classes),
            (expected.pred_boxes.tensor, expected.scores, expected.pred_classes),
        )


def test_int8_quantizes_the_network_only(model, images, tmp_path):
    """int8 deployable graph: every convolution reads int8 weights and activations; the
    resize, decoding and NMS stay float32 (no quantized node outside backbone and head)."""
    cfg, network = model
    path = str(tmp_path / "model_int8.onnx")
    calibration = [torch.as_tensor(i).permute(2, 0, 1).float() for i in images]
    sample = synthetic_test_image(cfg)
    export_model(
        cfg, network, "onnx", path, sample, quantize="int8", calibration_images=calibration
    )
    graph = onnx.load(path).graph
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    num_convs = conv_count(network.backbone) + len(network.head_in_features) * conv_count(
        network.head
    )
    assert len(convs) == num_convs
    assert all(n.input[0] in dequantized and n.input[1] in dequantized for n in convs)
    float_ops = [n for n in graph.node if n.op_type in ("MatMul", "Exp", "NonMaxSuppression")]
    assert len(float_ops) == 2 + 2 * len(network.head_in_features) + 1
    assert not any(i in dequantized for n in float_ops for i in n.input)
