"""OHEM (CLS_LOSS_TYPE "ohem"): selection, loss and gradients against independent references."""

import math

import pytest
import torch

from conftest import plugin_cfg
from detectron2.modeling import build_model
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from retinanet_plugin import get_config_file
from retinanet_plugin.config.loading import ConfigError, load_config
from retinanet_plugin.modeling.losses.ohem import NO_RATIO, ohem_cross_entropy, select_hard_examples


def python_iou(a, b):
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    intersection = width * height
    area = lambda box: (box[2] - box[0]) * (box[3] - box[1])  # noqa: E731
    return intersection / (area(a) + area(b) - intersection)


def reference_selection(losses, boxes, positive, batch_size, positive_fraction, nms_thresh):
    """Plain greedy NMS over every example (no torchvision), then the minibatch."""
    order = sorted(range(len(losses)), key=lambda i: -losses[i])
    survivors = []
    for i in order:
        if all(python_iou(boxes[i], boxes[j]) <= nms_thresh for j in survivors):
            survivors.append(i)
    if positive_fraction == NO_RATIO:
        return survivors[:batch_size]
    positives = [i for i in survivors if positive[i]][: int(batch_size * positive_fraction)]
    negatives = [i for i in survivors if not positive[i]][: batch_size - len(positives)]
    return positives + negatives


# A hand-made image: example 1 overlaps example 0 (IoU 90 / 110 = 0.82) and example 4 overlaps
# example 2 (0.82), so NMS at 0.5 drops 1 and 4; the survivors by loss are 0, 2, 3, 5, 6.
HAND_LOSSES = [5.0, 4.0, 3.0, 2.5, 2.0, 1.0, 0.5]
HAND_BOXES = [
    [0, 0, 10, 10],
    [1, 0, 11, 10],
    [20, 20, 30, 30],
    [50, 50, 60, 60],
    [20, 21, 30, 31],
    [80, 80, 90, 90],
    [0, 40, 10, 50],
]
HAND_POSITIVE = [False, False, True, False, True, True, False]


@pytest.mark.parametrize(
    "batch_size, positive_fraction, nms_thresh, expected",
    [
        (3, NO_RATIO, 0.5, [0, 2, 3]),  # the three highest-loss survivors
        (10, NO_RATIO, 0.5, [0, 2, 3, 5, 6]),  # fewer survivors than B
        (4, 0.5, 0.5, [2, 5, 0, 3]),  # up to 2 positives (2, 5), negatives fill up
        (4, 0.25, 0.5, [2, 0, 3, 6]),  # "1:3": 1 positive, 3 negatives
        (3, NO_RATIO, 1.0, [0, 1, 2]),  # threshold 1: no suppression
    ],
)
def test_selection_hand_computed(batch_size, positive_fraction, nms_thresh, expected):
    selected = select_hard_examples(
        torch.tensor(HAND_LOSSES),
        torch.tensor(HAND_BOXES, dtype=torch.float32),
        torch.tensor(HAND_POSITIVE),
        batch_size,
        positive_fraction,
        nms_thresh,
    )
    assert selected.tolist() == expected
    reference = reference_selection(
        HAND_LOSSES, HAND_BOXES, HAND_POSITIVE, batch_size, positive_fraction, nms_thresh
    )
    assert reference == expected


def clustered_examples(num, seed):
    """Boxes in a few clusters (so NMS removes many) with distinct losses, ~10% positives."""
    generator = torch.Generator().manual_seed(seed)
    centers = torch.rand(6, 2, generator=generator) * 200
    xy = centers[torch.randint(0, 6, (num,), generator=generator)]
    xy = xy + torch.randn(num, 2, generator=generator) * 3
    size = 15 + torch.rand(num, 2, generator=generator) * 10
    boxes = torch.cat([xy, xy + size], dim=1)
    losses = torch.randperm(num, generator=generator).float() / num + 0.01
    positive = torch.rand(num, generator=generator) < 0.1
    return losses, boxes, positive


@pytest.mark.parametrize("positive_fraction", [NO_RATIO, 0.25, 0.5])
@pytest.mark.parametrize("batch_size", [4, 16, 64])
def test_selection_equals_nms_over_all_examples(batch_size, positive_fraction):
    """NMS on a growing top of the candidates gives what NMS over all examples gives, including
    when the first 4 * B candidates are not enough."""
    for seed in range(3):
        losses, boxes, positive = clustered_examples(400, seed)
        selected = select_hard_examples(losses, boxes, positive, batch_size, positive_fraction, 0.5)
        expected = reference_selection(
            losses.tolist(), boxes.tolist(), positive.tolist(), batch_size, positive_fraction, 0.5
        )
        assert selected.tolist() == expected


def tiny_model(*opts):
    torch.manual_seed(0)
    return build_model(plugin_cfg("retinanet_R18_GN_tiny.yaml", *opts))


def synthetic_inputs(num_classes):
    """Two images, two levels of 30 anchors each, labels with foreground, background, ignored."""
    generator = torch.Generator().manual_seed(0)
    anchors = []
    for _ in range(2):
        xy = torch.rand(30, 2, generator=generator) * 80
        anchors.append(
            Boxes(torch.cat([xy, xy + 10 + torch.rand(30, 2, generator=generator) * 30], 1))
        )
    logits = [torch.randn(2, 30, num_classes, generator=generator) * 2 for _ in range(2)]
    deltas = [torch.randn(2, 30, 4, generator=generator) * 0.2 for _ in range(2)]
    labels = torch.randint(0, num_classes + 1, (2, 60), generator=generator)
    labels[torch.rand(2, 60, generator=generator) < 0.4] = num_classes  # mostly background
    labels[:, ::7] = -1
    gt_boxes = torch.cat([a.tensor for a in anchors]).repeat(2, 1, 1) + 2.0
    return anchors, logits, labels, deltas, gt_boxes


@pytest.mark.parametrize("positive_fraction", [NO_RATIO, 0.25])
def test_model_loss_is_mean_float64_cross_entropy_over_selected(positive_fraction):
    model = tiny_model(
        "MODEL.RETINANET.CLS_LOSS_TYPE",
        "ohem",
        "MODEL.RETINANET.OHEM_BATCH_SIZE_PER_IMAGE",
        "8",
        "MODEL.RETINANET.OHEM_POSITIVE_FRACTION",
        str(positive_fraction),
        "MODEL.RETINANET.OHEM_NMS_THRESH",
        "0.5",
    )
    num_classes = model.num_classes
    anchors, logits, labels, deltas, gt_boxes = synthetic_inputs(num_classes)
    logits = [x.requires_grad_() for x in logits]
    with EventStorage():
        losses = model.losses(anchors, logits, labels, deltas, gt_boxes)

    # Independent reference: float64 per-anchor BCE, detectron2's decoding, greedy NMS in Python.
    all_logits = torch.cat(logits, 1).detach().double()
    all_anchors = torch.cat([a.tensor for a in anchors])
    transform = Box2BoxTransform(weights=(1.0, 1.0, 1.0, 1.0))
    expected_rows, total = [], 0.0
    for image in range(2):
        boxes = transform.apply_deltas(torch.cat(deltas, 1)[image], all_anchors).tolist()
        valid = [i for i in range(60) if labels[image, i] >= 0]
        per_anchor = []
        for i in valid:
            label = int(labels[image, i])
            bce = 0.0
            for k in range(num_classes):
                x = float(all_logits[image, i, k])
                target = 1.0 if k == label else 0.0
                bce += max(x, 0) - x * target + math.log1p(math.exp(-abs(x)))
            per_anchor.append(bce)
        chosen = reference_selection(
            per_anchor,
            [boxes[i] for i in valid],
            [labels[image, i] != num_classes for i in valid],
            8,
            positive_fraction,
            0.5,
        )
        expected_rows += [(image, valid[c]) for c in chosen]
        total += sum(per_anchor[c] for c in chosen)
    assert len(expected_rows) == 16
    torch.testing.assert_close(
        losses["loss_cls"].double(),
        torch.tensor(total / 16, dtype=torch.float64),
        rtol=1e-6,
        atol=0,
    )

    # Gradients reach the selected anchors' logits, and no other.
    losses["loss_cls"].backward()
    grad = torch.cat([x.grad for x in logits], 1)
    with_gradient = {tuple(ix) for ix in (grad.abs().sum(-1) > 0).nonzero().tolist()}
    assert with_gradient == set(expected_rows)


def test_ignored_anchors_and_empty_batches():
    """Ignored anchors are never selected, however high their loss; no valid anchor, no loss."""
    logits = torch.tensor([[[9.0], [0.1], [-0.2]]])  # anchor 0 would have the highest loss
    labels = torch.tensor([[-1, 1, 1]])  # K = 1: label 1 is background
    boxes = torch.tensor([[[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]]]).float()
    loss, count = ohem_cross_entropy(logits, labels, boxes, 4, NO_RATIO, 0.5)
    assert count == 2
    expected = sum(math.log1p(math.exp(x)) for x in (0.1, -0.2))  # BCE with target 0
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss, count = ohem_cross_entropy(logits, torch.full_like(labels, -1), boxes, 4, NO_RATIO, 0.5)
    assert count == 0 and loss.item() == 0.0


def test_training_with_ohem_runs_and_lowers_the_loss(single_thread):
    """A few AdamW steps on one fixed batch: finite losses, OHEM minibatches of B per image, and
    a lower classification loss at the end than at the start."""
    model = tiny_model(
        "MODEL.RETINANET.CLS_LOSS_TYPE", "ohem", "MODEL.RETINANET.OHEM_BATCH_SIZE_PER_IMAGE", "32"
    )
    model.train()
    generator = torch.Generator().manual_seed(0)
    batch = []
    for boxes, classes in (
        ([[10, 10, 60, 50], [70, 64, 120, 120]], [1, 3]),
        ([[30, 20, 90, 80]], [0]),
    ):
        target = Instances((128, 128))
        target.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        target.gt_classes = torch.tensor(classes)
        batch.append(
            {"image": torch.rand(3, 128, 128, generator=generator) * 255, "instances": target}
        )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = []
    with EventStorage() as storage:
        for _ in range(8):
            losses = model(batch)
            assert all(torch.isfinite(v) for v in losses.values())
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
            history.append(losses["loss_cls"].item())
            storage.step()
        assert storage.history("ohem_num_selected").latest() == 32
    assert history[-1] < 0.5 * history[0]


@pytest.mark.parametrize(
    "key, value",
    [
        ("MODEL.RETINANET.OHEM_BATCH_SIZE_PER_IMAGE", "0"),
        ("MODEL.RETINANET.OHEM_POSITIVE_FRACTION", "0.0"),
        ("MODEL.RETINANET.OHEM_POSITIVE_FRACTION", "1.5"),
        ("MODEL.RETINANET.OHEM_NMS_THRESH", "1.2"),
    ],
)
def test_bad_ohem_values_are_named(key, value):
    with pytest.raises(ConfigError, match=key):
        load_config(get_config_file("retinanet_R18_GN_tiny.yaml"), [key, value])
