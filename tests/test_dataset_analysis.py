"""Dataset analysis (retinanet_plugin.data.analysis, tools/analyze_dataset.py): anchor coverage
against anchors and IoUs computed here in float64 from the paper's definition."""

import itertools
import json
import os
import sys

import numpy as np
import pytest

import retinanet_plugin  # noqa: F401  (registers the plugin's components)
from conftest import REPO, TINY, plugin_cfg, run_main
from detectron2.structures import BoxMode
from retinanet_plugin.config.loading import load_config
from retinanet_plugin.data.analysis import (
    DatasetBoxes,
    analyze_dataset,
    dataset_boxes,
    fit_anchor_sizes,
)

sys.path.insert(0, os.path.join(REPO, "tools"))

import analyze_dataset as analyze_tool  # noqa: E402  (tools/analyze_dataset.py)

pytestmark = pytest.mark.usefixtures("single_thread")


def reference_anchors(height, width, strides, base_sizes, scales_per_octave, aspect_ratios):
    """Per level, (A, 4) float64 anchors of a (height, width) input padded to 128: at every
    stride-spaced location (offset 0), sizes base * 2^(i / scales), area size^2, h / w = ratio."""
    padded = [-(-side // 128) * 128 for side in (height, width)]
    levels = []
    for stride, base in zip(strides, base_sizes):
        shapes = []
        for i, ratio in itertools.product(range(scales_per_octave), aspect_ratios):
            size = base * 2 ** (i / scales_per_octave)
            w = np.sqrt(size * size / ratio)
            shapes.append((w, ratio * w))
        ys = np.arange(-(-padded[0] // stride)) * stride
        xs = np.arange(-(-padded[1] // stride)) * stride
        levels.append(
            np.array(
                [
                    (x - w / 2, y - h / 2, x + w / 2, y + h / 2)
                    for y in ys
                    for x in xs
                    for w, h in shapes
                ]
            )
        )
    return levels


def reference_best_iou(boxes, anchors):
    """(G,) float64 highest IoU of each box with the anchors."""
    x0 = np.maximum(boxes[:, None, 0], anchors[None, :, 0])
    y0 = np.maximum(boxes[:, None, 1], anchors[None, :, 1])
    x1 = np.minimum(boxes[:, None, 2], anchors[None, :, 2])
    y1 = np.minimum(boxes[:, None, 3], anchors[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # noqa: E731
    return (inter / (area(boxes)[:, None] + area(anchors)[None, :] - inter)).max(axis=1)


def _record(height, width, boxes, categories=None):
    return {
        "height": height,
        "width": width,
        "annotations": [
            {"bbox": list(b), "bbox_mode": BoxMode.XYXY_ABS, "category_id": c}
            for b, c in zip(boxes, categories or [0] * len(boxes))
        ],
    }


def test_best_iou_per_level_equals_the_float64_reference():
    rng = np.random.default_rng(0)
    records = []
    for height, width in ((192, 192), (150, 260)):
        centers = rng.uniform(10, 140, size=(6, 2))
        sides = rng.uniform(8, 120, size=(6, 2))
        boxes = np.concatenate([centers - sides / 2, centers + sides / 2], axis=1)
        records.append(_record(height, width, boxes.tolist()))
    cfg = plugin_cfg("retinanet_R18_GN_tiny.yaml")
    report = analyze_dataset(cfg, records, ["thing"])
    data = dataset_boxes(records, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    # 150 x 260: 192 / 150 would make the long side 333 > MAX_SIZE_TEST 320, so 320 / 260.
    assert data.image_sizes == [(192, 192), (185, 320)]
    expected = []
    for (height, width), boxes in zip(data.image_sizes, data.boxes):
        anchors = reference_anchors(
            height, width, (8, 16, 32, 64, 128), (32, 64, 128, 256, 512), 3, (0.5, 1.0, 2.0)
        )
        expected.append(np.stack([reference_best_iou(boxes, a) for a in anchors], axis=1))
    expected = np.concatenate(expected)
    levels = ["p3", "p4", "p5", "p6", "p7"]
    assert report["coverage"] == pytest.approx((expected.max(axis=1) >= 0.5).mean())
    assert report["mean_best_iou"] == pytest.approx(expected.max(axis=1).mean(), abs=1e-6)
    for i, level in enumerate(levels):
        assert report["coverage_per_level"][level] == pytest.approx((expected[:, i] >= 0.5).mean())
    assert report["boxes"] == 12 and report["boxes_per_class"] == {"thing": 12}


def test_small_boxes_hand_computed_and_fitted_sizes_cover_them():
    """A 16 px box at a stride-8 location: a 32 px anchor overlaps it with IoU 1/4 at best, so
    the paper's sizes cover none. Base sizes 2 x stride (16 px on P3: IoU 1) and 2.5 x stride
    (20 px: IoU 256 / 400) cover all; the tie goes to the one closer to the paper's 4 x stride."""
    boxes = [[x, y, x + 16, y + 16] for x in (16, 48, 96) for y in (24, 64)]
    records = [_record(192, 192, boxes)]
    cfg = plugin_cfg("retinanet_R18_GN_tiny.yaml")
    report = analyze_dataset(cfg, records, ["thing"], fit=True)
    assert report["coverage"] == 0.0
    assert report["mean_best_iou"] == pytest.approx(0.25)
    assert report["box_size"]["counts"][2] == 6  # 16-32 px bin
    tried = report["fitted"]["coverage_by_size_factor"]
    assert tried["2.0"] == tried["2.5"] == 1.0 and tried["4.0"] == 0.0
    assert report["fitted"]["anchor_sizes"] == [[20.0], [40.0], [80.0], [160.0], [320.0]]
    assert report["fitted"]["coverage"] == 1.0
    assert report["fitted"]["coverage_per_level"]["p3"] == 1.0


def test_fit_prefers_the_papers_sizes_when_they_cover_as_much():
    """Boxes of 32-64 px: several factors cover them all; the tie goes to 4 x stride."""
    boxes = [[40, 40, 40 + s, 40 + s] for s in (32, 40, 64)]
    data = DatasetBoxes([(192, 192)], [np.array(boxes, dtype=np.float64)], [np.zeros(3)])
    sizes, tried = fit_anchor_sizes(plugin_cfg("retinanet_R18_GN_tiny.yaml"), data)
    best = max(tried.values())
    assert tried[4.0] == best == 1.0
    assert sizes == [[32.0], [64.0], [128.0], [256.0], [512.0]]


def test_command_line_writes_report_plot_and_a_config_with_the_fitted_sizes(
    shapes_dataset, tmp_path
):
    config = tmp_path / "fitted.yaml"
    argv = [
        *["--config-file", TINY, "--register-coco", "analysis_train", *shapes_dataset["train"]],
        *["--dataset", "analysis_train", "--fit-anchors", "--output", str(tmp_path / "out")],
        *["--write-config", str(config), "INPUT.MIN_SIZE_TEST", "128"],
    ]
    status, output = run_main(analyze_tool.main, argv)
    assert status == 0, output
    report = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert (tmp_path / "out" / "analysis.png").stat().st_size > 0
    assert report["dataset"] == "analysis_train" and report["input_size"]["min_size_test"] == 128
    assert sum(report["boxes_per_class"].values()) == report["boxes"] > 0
    fitted = report["fitted"]
    assert fitted["coverage"] >= report["coverage"]
    assert fitted["coverage"] == max(fitted["coverage_by_size_factor"].values())
    sizes = fitted["anchor_sizes"]
    override = "[" + ", ".join(f"[{s[0]:g}]" for s in sizes) + "]"
    assert f'MODEL.ANCHOR_GENERATOR.SIZES "{override}"' in output
    assert f"coverage {report['coverage']:.1%}" in output
    assert load_config(str(config)).MODEL.ANCHOR_GENERATOR.SIZES == sizes
    # The written config is never overwritten.
    status, output = run_main(analyze_tool.main, argv)
    assert status == 2 and "fitted.yaml exists" in output
