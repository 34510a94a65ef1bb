"""FocalLossRetinaNet's own behavior: anchor labeling, loss normalizers, options, errors."""

import math

import pytest
import torch

from conftest import plugin_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from focal_reference import reference_focal_loss
from retinanet_plugin import sigmoid_focal_loss_star


def tiny_model(*opts):
    torch.manual_seed(0)
    return build_model(plugin_cfg("retinanet_R18_GN_tiny.yaml", *opts))


def instances(boxes, classes, size=(128, 128)):
    result = Instances(size)
    result.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    result.gt_classes = torch.tensor(classes, dtype=torch.int64)
    return result


def test_label_anchors_thresholds_hand_computed():
    """IoU >= 0.5 foreground, < 0.4 background, between ignored, best anchor kept if low."""
    model = tiny_model()
    anchors = [
        Boxes(
            torch.tensor(
                [
                    [0.0, 0.0, 10.0, 10.0],  # IoU 1.0 with gt 0 -> class 2
                    [0.0, 0.0, 10.0, 5.5],  # IoU 0.55 -> class 2
                    [0.0, 0.0, 10.0, 4.5],  # IoU 0.45 -> ignored
                    [0.0, 0.0, 10.0, 3.0],  # IoU 0.30 -> background
                    [50.0, 50.0, 60.0, 60.0],  # IoU 0 -> background
                    [100.0, 100.0, 110.0, 130.0],  # best anchor of gt 1 (IoU 1/3) -> class 0
                ]
            )
        )
    ]
    gt = instances([[0, 0, 10, 10], [100, 100, 110, 110]], [2, 0])
    labels, boxes = model.label_anchors(anchors, [gt])  # detectron2's, per image
    background = model.num_classes
    assert torch.stack(labels).tolist() == [[2, 2, -1, background, background, 0]]
    assert boxes[0][5].tolist() == [100, 100, 110, 110]


def test_image_without_annotations_is_all_background():
    model = tiny_model()
    anchors = [Boxes(torch.tensor([[0.0, 0.0, 10.0, 10.0], [5, 5, 20, 20]]))]
    labels, boxes = model.label_anchors(anchors, [instances([], [])])
    assert torch.stack(labels).tolist() == [[model.num_classes] * 2]
    assert torch.equal(torch.stack(boxes), torch.zeros(1, 2, 4))


def synthetic_loss_inputs(num_classes):
    """Two levels of anchors/predictions for 2 images, with fixed labels."""
    generator = torch.Generator().manual_seed(0)
    anchors = [
        Boxes(
            torch.rand(6, 2, generator=generator).repeat(1, 2) * 50
            + torch.tensor([0.0, 0.0, 20.0, 20.0])
        )
        for _ in range(2)
    ]
    logits = [torch.randn(2, 6, num_classes, generator=generator) for _ in range(2)]
    deltas = [torch.randn(2, 6, 4, generator=generator) * 0.1 for _ in range(2)]
    labels = torch.tensor([[0, 1, num_classes, -1, num_classes, 2] * 2, [num_classes] * 12])
    gt_boxes = torch.cat([a.tensor for a in anchors]).repeat(2, 1, 1) + 1.0
    return anchors, logits, labels, deltas, gt_boxes


@pytest.mark.parametrize("normalizer", ["batch", "ema"])
def test_loss_normalizers(normalizer):
    """'batch' divides by this batch's foreground count; 'ema' by 0.9 * 100 + 0.1 * count."""
    model = tiny_model("MODEL.RETINANET.LOSS_NORMALIZER", normalizer)
    anchors, logits, labels, deltas, gt_boxes = synthetic_loss_inputs(model.num_classes)
    with EventStorage():
        losses = model.losses(anchors, logits, labels, deltas, gt_boxes)
    num_foreground = 6  # three foreground anchors per level-pair repetition in image 0
    expected_normalizer = num_foreground if normalizer == "batch" else 0.9 * 100 + 0.1 * 6
    valid = labels >= 0
    targets = torch.nn.functional.one_hot(labels[valid], model.num_classes + 1)[:, :-1]
    summed = reference_focal_loss(torch.cat(logits, 1)[valid], targets, 0.25, 2.0, "sum")
    torch.testing.assert_close(losses["loss_cls"].double(), summed / expected_normalizer)


def test_focal_loss_star_option():
    """CLS_LOSS_TYPE focal_star sums FL* with the configured gamma* and beta."""
    model = tiny_model(
        "MODEL.RETINANET.CLS_LOSS_TYPE",
        "focal_star",
        "MODEL.RETINANET.FOCAL_LOSS_STAR_GAMMA",
        "3.0",
        "MODEL.RETINANET.FOCAL_LOSS_STAR_BETA",
        "1.0",
        "MODEL.RETINANET.FOCAL_LOSS_ALPHA",
        "-1.0",
        "MODEL.RETINANET.LOSS_NORMALIZER",
        "batch",
    )
    anchors, logits, labels, deltas, gt_boxes = synthetic_loss_inputs(model.num_classes)
    with EventStorage():
        losses = model.losses(anchors, logits, labels, deltas, gt_boxes)
    valid = labels >= 0
    targets = torch.nn.functional.one_hot(labels[valid], model.num_classes + 1)[:, :-1]
    x_t = (2.0 * targets - 1) * torch.cat(logits, 1)[valid].double()
    expected = (-torch.nn.functional.logsigmoid(3.0 * x_t + 1.0) / 3.0).sum() / 6
    torch.testing.assert_close(losses["loss_cls"].double(), expected, rtol=1e-5, atol=0)
    direct = sigmoid_focal_loss_star(torch.cat(logits, 1)[valid], targets, 3.0, 1.0, -1, "sum")
    torch.testing.assert_close(losses["loss_cls"], direct / 6)


def test_prior_probability_initialization_of_the_model():
    """At initialization every anchor scores about pi = 0.01 (the paper's stability trick)."""
    model = tiny_model()
    model.eval()
    with torch.no_grad():
        features = model.backbone(torch.randn(1, 3, 128, 128))
        logits, _ = model.head([features[f] for f in model.head_in_features])
    probabilities = torch.cat([x.flatten() for x in logits]).sigmoid()
    assert abs(probabilities.mean().item() - 0.01) < 0.002
    assert model.head.cls_score.bias[0].item() == pytest.approx(-math.log(99))


def test_training_step_with_empty_image_is_finite():
    model = tiny_model()
    model.train()
    batch = [
        {"image": torch.rand(3, 128, 128) * 255, "instances": instances([[10, 10, 60, 50]], [1])},
        {"image": torch.rand(3, 128, 128) * 255, "instances": instances([], [])},
    ]
    with EventStorage():
        losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_inference_caps_detections_and_thresholds():
    """At most TEST.DETECTIONS_PER_IMAGE results, all scores above SCORE_THRESH_TEST."""
    model = tiny_model("TEST.DETECTIONS_PER_IMAGE", "7", "MODEL.RETINANET.SCORE_THRESH_TEST", "0.3")
    with torch.no_grad():
        model.head.cls_score.bias.zero_()  # scores around 0.5
    model.eval()
    with torch.no_grad():
        (result,) = model([{"image": torch.rand(3, 128, 96) * 255, "height": 256, "width": 192}])
    detections = result["instances"]
    assert len(detections) == 7
    assert (detections.scores > 0.3).all()
    assert detections.image_size == (256, 192)
    assert torch.all(detections.scores[:-1] >= detections.scores[1:])


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("MODEL.RETINANET.CLS_LOSS_TYPE", "hinge", "CLS_LOSS_TYPE"),
        ("MODEL.RETINANET.LOSS_NORMALIZER", "median", "LOSS_NORMALIZER"),
        ("MODEL.RETINANET.IN_FEATURES", "['p3', 'p9']", "p9"),
        ("MODEL.RETINANET.PRIOR_PROB", "1.5", "PRIOR_PROB"),
        ("MODEL.ANCHOR_GENERATOR.SCALES_PER_OCTAVE", "0", "SCALES_PER_OCTAVE"),
    ],
)
def test_bad_config_values_are_named(key, value, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(key, value)


@pytest.mark.parametrize(
    "image, hint",
    [
        (torch.rand(96, 128, 3), "permute(2, 0, 1)"),  # an (H, W, C) image, as numpy gives it
        (torch.rand(1, 96, 128), "shape (1, 96, 128)"),  # one channel
        (torch.rand(96, 128), "shape (96, 128)"),  # no channel dimension
    ],
    ids=["hwc", "one-channel", "2d"],
)
def test_image_of_the_wrong_layout_is_named(image, hint):
    """The message names the input and its shape instead of a convolution's shape error."""
    model = build_model(plugin_cfg("retinanet_R18_GN_tiny.yaml")).eval()
    good = {"image": torch.rand(3, 96, 128)}
    with pytest.raises(ValueError) as info, torch.no_grad():
        model([good, {"image": image}])
    message = str(info.value)
    assert message.startswith("Input 1:") and "(C, H, W)" in message and hint in message
