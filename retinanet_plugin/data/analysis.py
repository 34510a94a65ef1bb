"""What a detection dataset looks like to RetinaNet: class counts, box sizes, anchor coverage.

Anchor coverage is the fraction of ground-truth boxes that some anchor overlaps with IoU at
least the matcher's foreground threshold (``MODEL.RETINANET.IOU_THRESHOLDS[-1]``, 0.5). A box
below it is still trained on, through its best anchor (detectron2's low-quality matches), but
with one poorly fitting anchor; a small-object dataset under COCO's anchors (32 px and up) has
most of its boxes there. Boxes are measured at the test input size (``INPUT.MIN_SIZE_TEST`` /
``MAX_SIZE_TEST``, as detectron2's ``ResizeShortestEdge``), and the anchors are the model's own
(its registered anchor generator on the backbone's feature grid for that size).

:func:`fit_anchor_sizes` picks the base anchor size per level (``MODEL.ANCHOR_GENERATOR.SIZES``,
one size per level growing with the stride, as the paper's 32-512) that covers the most boxes.
"""

from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from detectron2.config import CfgNode
from detectron2.data.transforms import ResizeShortestEdge
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone
from detectron2.modeling.anchor_generator import build_anchor_generator
from detectron2.structures import Boxes, BoxMode, pairwise_iou

from .images import trained_on

__all__ = [
    "DatasetBoxes",
    "analyze_dataset",
    "anchor_coverage",
    "dataset_boxes",
    "fit_anchor_sizes",
    "plot_report",
]

# Base size of the finest level's anchors, as a multiple of its stride (the paper: 32 / 8 = 4),
# tried by fit_anchor_sizes.
SIZE_FACTORS = (1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)
# Edges (pixels, sqrt of the box area at the input size) of the box-size histogram.
BOX_SIZE_EDGES = (0, 8, 16, 32, 64, 128, 256, 512, 1024, float("inf"))


class DatasetBoxes:
    """The ground-truth boxes of a dataset at the model's test input size.

    Attributes:
        image_sizes: per image, (height, width) after the test-time resize.
        boxes: per image, (G_i, 4) float64 XYXY boxes at that size.
        classes: per image, (G_i,) int64 contiguous class ids.
    """

    def __init__(
        self,
        image_sizes: List[Tuple[int, int]],
        boxes: List[np.ndarray],
        classes: List[np.ndarray],
    ):
        self.image_sizes, self.boxes, self.classes = image_sizes, boxes, classes

    @property
    def all_boxes(self) -> np.ndarray:
        """(G, 4) every box of the dataset."""
        return np.concatenate(self.boxes) if self.boxes else np.zeros((0, 4))


def dataset_boxes(dataset_dicts: Sequence[Dict], short: int, max_size: int) -> DatasetBoxes:
    """The boxes of detectron2 dataset dicts resized as the test loader resizes the images.

    Args:
        dataset_dicts: detectron2's dataset format (``height``, ``width``, ``annotations`` with
            ``bbox``, ``bbox_mode``, ``category_id``; the boxes training leaves out, crowd
            boxes, are left out).
        short, max_size: ``INPUT.MIN_SIZE_TEST`` and ``INPUT.MAX_SIZE_TEST``.
    """
    image_sizes, boxes, classes = [], [], []
    for record in dataset_dicts:
        height, width = record["height"], record["width"]
        new_height, new_width = ResizeShortestEdge.get_output_shape(height, width, short, max_size)
        annotations = [a for a in record.get("annotations", []) if trained_on(a)]
        xyxy = np.array(
            [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annotations],
            dtype=np.float64,
        ).reshape(-1, 4)
        xyxy *= np.array([new_width / width, new_height / height] * 2)
        image_sizes.append((new_height, new_width))
        boxes.append(xyxy)
        classes.append(np.array([a["category_id"] for a in annotations], dtype=np.int64))
    return DatasetBoxes(image_sizes, boxes, classes)


def _feature_grids(
    image_size: Tuple[int, int], strides: Sequence[int], divisibility: int
) -> List[torch.Tensor]:
    """Empty (1, 0, Hi, Wi) tensors with the feature map sizes of a padded input image: what
    the anchor generator reads from the features."""
    padded = [
        -(-side // divisibility) * divisibility if divisibility else side for side in image_size
    ]
    return [torch.empty(1, 0, -(-padded[0] // s), -(-padded[1] // s)) for s in strides]


def anchor_coverage(
    anchor_generator: torch.nn.Module,
    strides: Sequence[int],
    size_divisibility: int,
    data: DatasetBoxes,
) -> np.ndarray:
    """The best IoU of each ground-truth box with the anchors of each level.

    Args:
        anchor_generator: a detectron2 anchor generator (called on feature-shaped tensors).
        strides: stride of each level the generator serves.
        size_divisibility: the backbone's padding multiple (detectron2's ``ImageList``).
        data: the boxes and image sizes.

    Returns:
        (G, L) float64: for each of the G boxes (in the order of ``data.all_boxes``), its
        highest IoU with an anchor of each of the L levels.
    """
    best = []
    anchors_by_size = {}
    for image_size, boxes in zip(data.image_sizes, data.boxes):
        if not len(boxes):
            continue
        if image_size not in anchors_by_size:
            grids = _feature_grids(image_size, strides, size_divisibility)
            anchors_by_size[image_size] = anchor_generator(grids)
        gt = Boxes(torch.as_tensor(boxes, dtype=torch.float32))
        levels = [
            pairwise_iou(gt, anchors).max(dim=1).values for anchors in anchors_by_size[image_size]
        ]
        best.append(torch.stack(levels, dim=1).double().numpy())
    return np.concatenate(best) if best else np.zeros((0, len(strides)))


def _model_geometry(cfg: CfgNode) -> Tuple[List[int], int]:
    """(strides of the RetinaNet head's input levels, the backbone's size divisibility)."""
    backbone = build_backbone(cfg)
    shapes = backbone.output_shape()
    return [shapes[f].stride for f in cfg.MODEL.RETINANET.IN_FEATURES], backbone.size_divisibility


def _coverage_of_sizes(
    cfg: CfgNode, sizes: Sequence[Sequence[float]], strides, divisibility, data: DatasetBoxes
) -> np.ndarray:
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [list(s) for s in sizes]
    generator = build_anchor_generator(cfg, [ShapeSpec(stride=s) for s in strides])
    return anchor_coverage(generator, strides, divisibility, data)


def _summary(best_iou: np.ndarray, threshold: float, level_names: Sequence[str]) -> Dict:
    """Coverage overall and per level, and which level holds each box's best anchor."""
    num_boxes = len(best_iou)
    if not num_boxes:
        return {"coverage": None, "coverage_per_level": {}, "best_level_share": {}}
    best_level = Counter(best_iou.argmax(axis=1).tolist())
    return {
        "coverage": float((best_iou.max(axis=1) >= threshold).mean()),
        "mean_best_iou": float(best_iou.max(axis=1).mean()),
        "coverage_per_level": {
            name: float((best_iou[:, i] >= threshold).mean()) for i, name in enumerate(level_names)
        },
        "best_level_share": {
            name: best_level.get(i, 0) / num_boxes for i, name in enumerate(level_names)
        },
    }


def fit_anchor_sizes(
    cfg: CfgNode,
    data: DatasetBoxes,
    factors: Sequence[float] = SIZE_FACTORS,
) -> Tuple[List[List[float]], Dict[float, float]]:
    """The per-level base anchor sizes ``factor * stride`` that cover the most boxes.

    Args:
        cfg: the model's config (anchor scales, aspect ratios, levels).
        data: the boxes and image sizes.
        factors: base size of each level as a multiple of its stride; ties go to the factor
            closest to the paper's 4.

    Returns:
        (sizes for ``MODEL.ANCHOR_GENERATOR.SIZES``, {factor: coverage} of every factor tried).
    """
    strides, divisibility = _model_geometry(cfg)
    threshold = cfg.MODEL.RETINANET.IOU_THRESHOLDS[-1]
    coverage = {}
    for factor in factors:
        sizes = [[factor * s] for s in strides]
        best_iou = _coverage_of_sizes(cfg, sizes, strides, divisibility, data)
        coverage[factor] = (
            float((best_iou.max(axis=1) >= threshold).mean()) if len(best_iou) else 0.0
        )
    best = max(factors, key=lambda f: (coverage[f], -abs(np.log2(f / 4.0))))
    return [[best * s] for s in strides], coverage


def analyze_dataset(
    cfg: CfgNode,
    dataset_dicts: Sequence[Dict],
    class_names: Sequence[str],
    fit: bool = False,
) -> Dict:
    """Class counts, box-size histogram and anchor coverage of a dataset under ``cfg``'s model.

    Args:
        cfg: the model's config.
        dataset_dicts: the dataset, in detectron2's format.
        class_names: the dataset's class names, by contiguous id.
        fit: also fit ``MODEL.ANCHOR_GENERATOR.SIZES`` (:func:`fit_anchor_sizes`).

    Returns:
        A JSON-serializable report (see ``tools/analyze_dataset.py``).
    """
    data = dataset_boxes(dataset_dicts, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    boxes = data.all_boxes
    classes = np.concatenate(data.classes) if data.classes else np.zeros(0, dtype=np.int64)
    side = np.sqrt(
        np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    )
    counts, _ = np.histogram(side, bins=np.array(BOX_SIZE_EDGES))
    strides, divisibility = _model_geometry(cfg)
    threshold = cfg.MODEL.RETINANET.IOU_THRESHOLDS[-1]
    level_names = list(cfg.MODEL.RETINANET.IN_FEATURES)
    sizes = [list(s) for s in cfg.MODEL.ANCHOR_GENERATOR.SIZES]
    best_iou = _coverage_of_sizes(cfg, sizes, strides, divisibility, data)
    per_class = Counter(classes.tolist())
    report = {
        "images": len(data.image_sizes),
        "boxes": int(len(boxes)),
        "images_without_boxes": sum(1 for b in data.boxes if not len(b)),
        "boxes_per_class": {name: per_class.get(i, 0) for i, name in enumerate(class_names)},
        "input_size": {
            "min_size_test": cfg.INPUT.MIN_SIZE_TEST,
            "max_size_test": cfg.INPUT.MAX_SIZE_TEST,
        },
        "box_size": {
            "edges": [e if np.isfinite(e) else None for e in BOX_SIZE_EDGES],
            "counts": counts.tolist(),
            "median": float(np.median(side)) if len(side) else None,
        },
        "iou_threshold": threshold,
        "strides": strides,
        "anchor_sizes": sizes,
        **_summary(best_iou, threshold, level_names),
    }
    if fit:
        fitted, tried = fit_anchor_sizes(cfg, data)
        fitted_iou = _coverage_of_sizes(cfg, fitted, strides, divisibility, data)
        report["fitted"] = {
            "anchor_sizes": fitted,
            "coverage_by_size_factor": {str(f): c for f, c in tried.items()},
            **_summary(fitted_iou, threshold, level_names),
        }
    return report


def plot_report(report: Dict, path: str, title: Optional[str] = None) -> str:
    """Draws the box-size histogram (with the anchor sizes) and the coverage per level."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, (sizes_axis, levels_axis) = plt.subplots(1, 2, figsize=(11, 4))
    edges = report["box_size"]["edges"]
    labels = [
        f"{int(a)}-{int(b)}" if b is not None else f">{int(a)}" for a, b in zip(edges, edges[1:])
    ]
    sizes_axis.bar(range(len(labels)), report["box_size"]["counts"], color="tab:gray")
    sizes_axis.set_xticks(range(len(labels)), labels, rotation=45)
    sizes_axis.set_xlabel("box size at the test input size (sqrt of area, px)")
    sizes_axis.set_ylabel("boxes")
    levels = list(report["coverage_per_level"])
    x = np.arange(len(levels))
    width = 0.4 if "fitted" in report else 0.8
    current = [report["coverage_per_level"][name] for name in levels]
    sizes_text = ", ".join(f"{s[0]:g}" for s in report["anchor_sizes"])
    levels_axis.bar(x, current, width, label=f"anchor sizes {sizes_text}: {report['coverage']:.0%}")
    if "fitted" in report:
        fitted = report["fitted"]
        fitted_text = ", ".join(f"{s[0]:g}" for s in fitted["anchor_sizes"])
        levels_axis.bar(
            x + width,
            [fitted["coverage_per_level"][name] for name in levels],
            width,
            label=f"fitted {fitted_text}: {fitted['coverage']:.0%}",
        )
    levels_axis.set_xticks(x + (width / 2 if "fitted" in report else 0), levels)
    levels_axis.set_ylim(0, 1)
    levels_axis.set_ylabel(f"boxes with an anchor at IoU >= {report['iou_threshold']:g}")
    levels_axis.legend(loc="upper right", fontsize=8)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
