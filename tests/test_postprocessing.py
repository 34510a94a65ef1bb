"""The batched inference post-processing equals detectron2's RetinaNet post-processing."""

import math

import pytest
import torch
from torchvision.ops import batched_nms

from conftest import detectron2_cfg, plugin_cfg
from detectron2.modeling import build_model
from detectron2.structures import ImageList
from retinanet_plugin.modeling.postprocessing import grouped_nms, image_detections

pytestmark = pytest.mark.usefixtures("single_thread")

STRIDES = (8, 16, 32, 64, 128)


@pytest.fixture(scope="module")
def models():
    """(plugin, detectron2) R50-FPN RetinaNets; only their post-processing is used."""
    plugin = build_model(plugin_cfg("retinanet_R50_FPN_1x.yaml")).eval()
    reference = build_model(detectron2_cfg("COCO-Detection/retinanet_R_50_FPN_1x.yaml")).eval()
    return plugin, reference


def _head_outputs(image_sizes, candidate_means, seed=0, num_classes=80, num_anchors=9):
    """Random head outputs for padded images; image i's logits have mean candidate_means[i]."""
    g = torch.Generator().manual_seed(seed)
    n = len(image_sizes)
    h = max(s[0] for s in image_sizes)
    w = max(s[1] for s in image_sizes)
    features = [torch.zeros(n, 1, math.ceil(h / s), math.ceil(w / s)) for s in STRIDES]
    mean = torch.tensor(candidate_means).view(n, 1, 1, 1)
    logits = [
        torch.randn(n, num_anchors * num_classes, *f.shape[2:], generator=g) + mean
        for f in features
    ]
    deltas = [torch.randn(n, num_anchors * 4, *f.shape[2:], generator=g) * 0.3 for f in features]
    return ImageList(torch.zeros(n, 3, h, w), image_sizes), features, (logits, deltas)


def _assert_same_detections(ours, theirs):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.image_size == b.image_size
        assert len(a) == len(b)
        assert torch.equal(a.scores, b.scores)
        assert torch.equal(a.pred_classes, b.pred_classes)
        assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)


@pytest.mark.parametrize(
    "image_sizes, means",
    [
        # Image 0: most logits above the 0.05 threshold (every level over the top-k cap of
        # 1000); image 1: ~0.1% above it (~1000 on P3, fewer on coarser levels); image 2: none.
        ([(320, 416), (256, 320), (320, 384)], [-0.9, -6.0, -30.0]),
        ([(200, 296)], [-2.0]),
        ([(128, 128), (96, 160)], [-30.0, -30.0]),
    ],
)
def test_inference_equals_detectron2(models, image_sizes, means):
    plugin, reference = models
    images, features, (logits, deltas) = _head_outputs(image_sizes, means)
    with torch.no_grad():
        ours = plugin.forward_inference(images, features, (logits, deltas))
        # detectron2 applies sigmoid_ in place on transposed copies; give it its own tensors.
        theirs = reference.forward_inference(
            images, features, ([x.clone() for x in logits], [x.clone() for x in deltas])
        )
    _assert_same_detections(ours, theirs)
    if means[0] > -5:
        assert len(ours[0]) == plugin.max_detections_per_image


def test_inference_thresholds_follow_the_config(models):
    """A different threshold, top-k and detection cap give detectron2's results for the same."""
    plugin, reference = models
    images, features, predictions = _head_outputs([(256, 256), (256, 192)], [-2.5, -3.0], seed=4)
    for model in (plugin, reference):
        model.test_score_thresh, model.test_topk_candidates = 0.2, 50
        model.max_detections_per_image, model.test_nms_thresh = 30, 0.3
    try:
        with torch.no_grad():
            ours = plugin.forward_inference(images, features, predictions)
            theirs = reference.forward_inference(
                images, features, tuple([x.clone() for x in p] for p in predictions)
            )
    finally:
        for model in (plugin, reference):
            model.test_score_thresh, model.test_topk_candidates = 0.05, 1000
            model.max_detections_per_image, model.test_nms_thresh = 100, 0.5
    _assert_same_detections(ours, theirs)
    assert all(len(x) == 30 for x in ours)
    assert all((x.scores > 0.2).all() for x in ours)


@pytest.mark.parametrize("scripted", [False, True], ids=["python", "scripted"])
def test_image_detections_equal_detectron2(models, scripted):
    """The per-image version that scripts and traces (image_detections) gives detectron2's
    detections: an image over the top-k cap on every level, one with ~1000 candidates on P3,
    one with none; also compiled by torch.jit.script."""
    plugin, reference = models
    images, features, (logits, deltas) = _head_outputs(
        [(320, 416), (256, 320), (320, 384)], [-0.9, -6.0, -30.0]
    )
    detect = torch.jit.script(image_detections) if scripted else image_detections
    with torch.no_grad():
        theirs = reference.forward_inference(
            images, features, ([x.clone() for x in logits], [x.clone() for x in deltas])
        )
        anchors = [a.tensor for a in plugin.anchor_generator(features)]
        for i, expected in enumerate(theirs):
            boxes, scores, classes = detect(
                anchors,
                [x[i] for x in logits],
                [x[i] for x in deltas],
                plugin.box2box_transform,
                80,
                0.05,
                1000,
                0.5,
                100,
            )
            assert torch.equal(classes, expected.pred_classes)
            assert torch.equal(scores, expected.scores)
            assert torch.equal(boxes, expected.pred_boxes.tensor)
    assert [len(x) for x in theirs][::2] == [100, 0]


@pytest.mark.parametrize("num_boxes, num_groups", [(0, 1), (1, 1), (800, 5), (3000, 40)])
def test_grouped_nms_equals_torchvision_batched_nms(num_boxes, num_groups):
    g = torch.Generator().manual_seed(num_boxes)
    xy = torch.rand(num_boxes, 2, generator=g) * 200
    wh = torch.rand(num_boxes, 2, generator=g) * 60 + 1
    boxes = torch.cat([xy, xy + wh], dim=1)
    scores = torch.rand(num_boxes, generator=g)
    groups = torch.randint(0, num_groups, (num_boxes,), generator=g)
    ours = grouped_nms(boxes, scores, groups, 0.5)
    theirs = batched_nms(boxes, scores, groups, 0.5)
    assert torch.equal(ours, theirs)


@pytest.mark.cuda
def test_inference_on_cuda_equals_detectron2_on_cuda(models):
    """The batched post-processing on the GPU gives detectron2's detections on the GPU (scores
    and boxes to float32 rounding: the GPU's reductions may order sums differently)."""
    plugin, reference = (model.to("cuda") for model in models)
    try:
        images, features, (logits, deltas) = _head_outputs([(320, 416), (256, 320)], [-2.0, -6.0])
        images = ImageList(images.tensor.cuda(), images.image_sizes)
        features, logits, deltas = ([x.cuda() for x in t] for t in (features, logits, deltas))
        with torch.no_grad():
            ours = plugin.forward_inference(images, features, (logits, deltas))
            # detectron2 applies sigmoid_ in place on transposed copies; give it its own tensors.
            theirs = reference.forward_inference(
                images, features, ([x.clone() for x in logits], [x.clone() for x in deltas])
            )
    finally:
        for model in models:
            model.to("cpu")
    assert len(ours) == len(theirs) == 2
    for a, b in zip(ours, theirs):
        assert a.scores.is_cuda and len(a) == len(b) > 0
        assert torch.equal(a.pred_classes.cpu(), b.pred_classes.cpu())
        torch.testing.assert_close(a.scores.cpu(), b.scores.cpu(), rtol=1e-6, atol=0)
        torch.testing.assert_close(
            a.pred_boxes.tensor.cpu(), b.pred_boxes.tensor.cpu(), rtol=1e-5, atol=1e-4
        )
