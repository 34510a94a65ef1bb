"""The plugin's RetinaNet and detectron2's built-in RetinaNet with the same weights, and a batch
to compare them on: the reference of the equality tests."""

import torch

from conftest import detectron2_cfg, plugin_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from retinanet_plugin import FocalLossRetinaNet

# (plugin config, the equivalent detectron2 config). The second pair checks a from-scratch model
# with GroupNorm in backbone and FPN; its head has no norm because detectron2 0.6's
# RetinaNetHead(norm="GN") does not build.
_ANCHOR_SIZES = "[[32, 40.31747359663594, 50.79683366298238], [64, 80.63494719327188, 101.59366732596476], [128, 161.26989438654377, 203.18733465192952], [256, 322.53978877308754, 406.37466930385904], [512, 645.0795775461751, 812.7493386077181]]"  # noqa: E501
# Random ResNet-50 weights with the MSRA pixel std of 1 give features of ~1e3 and saturated
# sigmoids, where ties make top-k selection arbitrary: both models get unit-variance inputs.
_UNIT_STD = ("MODEL.PIXEL_STD", "[57.375, 57.120, 58.395]")
PAIRS = {
    "R50_FPN_1x": (
        lambda *o: plugin_cfg("retinanet_R50_FPN_1x.yaml", *_UNIT_STD, *o),
        lambda *o: detectron2_cfg("COCO-Detection/retinanet_R_50_FPN_1x.yaml", *_UNIT_STD, *o),
    ),
    "R18_GN_tiny": (
        lambda *o: plugin_cfg("retinanet_R18_GN_tiny.yaml", "MODEL.RETINANET.NORM", "", *o),
        lambda *o: plugin_cfg(
            "retinanet_R18_GN_tiny.yaml",
            "MODEL.RETINANET.NORM",
            "",
            "MODEL.META_ARCHITECTURE",
            "RetinaNet",
            "MODEL.ANCHOR_GENERATOR.NAME",
            "DefaultAnchorGenerator",
            "MODEL.ANCHOR_GENERATOR.SIZES",
            _ANCHOR_SIZES,
            *o,
        ),
    ),
}


def build_pair(name, *opts):
    """(plugin model, detectron2 model) with the same random weights."""
    plugin_cfg_fn, d2_cfg_fn = PAIRS[name]
    torch.manual_seed(0)
    reference = build_model(d2_cfg_fn(*opts))
    plugin = build_model(plugin_cfg_fn(*opts))
    assert isinstance(plugin, FocalLossRetinaNet)
    assert type(reference).__name__ == "RetinaNet"
    plugin.load_state_dict(reference.state_dict(), strict=True)
    return plugin, reference


def make_batch(num_classes, with_empty_image=False):
    """Two images with boxes of several sizes; optionally a third with no annotations."""
    generator = torch.Generator().manual_seed(1)
    sizes = [(192, 256), (224, 160)] + ([(160, 192)] if with_empty_image else [])
    batch = []
    for i, (h, w) in enumerate(sizes):
        instances = Instances((h, w))
        if i < 2:
            boxes = torch.tensor([[10.0, 20.0, 100.0, 150.0], [50, 60, 150, 90], [5, 5, 30, 25]])
            instances.gt_boxes = Boxes(boxes)
            instances.gt_classes = torch.tensor([0, num_classes - 1, 1])
        else:
            instances.gt_boxes = Boxes(torch.zeros((0, 4)))
            instances.gt_classes = torch.zeros((0,), dtype=torch.int64)
        image = torch.randint(0, 256, (3, h, w), generator=generator).float()
        batch.append({"image": image, "instances": instances, "height": h, "width": w})
    return batch


def assert_detections_match(ours, theirs, score_atol: float, box_atol: float):
    """Per image, the same number of detections, and each of ours has a twin among theirs and
    each of theirs among ours: same class, score within ``score_atol``, box coordinates within
    ``box_atol`` pixels. Matching instead of comparing in score order: where two scores are
    closer than the rounding differences, their order may differ."""
    for a, b in zip(ours, theirs):
        a, b = a["instances"], b["instances"]
        assert len(a) > 0 and len(a) == len(b)
        same = (
            (a.pred_classes[:, None] == b.pred_classes[None, :])
            & ((a.scores[:, None] - b.scores[None, :]).abs() <= score_atol)
            & (
                (a.pred_boxes.tensor[:, None, :] - b.pred_boxes.tensor[None, :, :])
                .abs()
                .amax(dim=2)
                <= box_atol
            )
        )
        assert same.any(dim=1).all() and same.any(dim=0).all()
