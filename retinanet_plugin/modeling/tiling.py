"""Sliced (tiled) prediction for images much larger than the objects, e.g. aerial photographs.

An image is cut into overlapping square tiles; each tile is predicted as an image of its own
(resized as ``INPUT.MIN_SIZE_TEST`` says: set it to the tile size to predict at the image's own
resolution), and the tiles' detections are shifted back and merged:

1. **Ownership**: a detection is kept only from the tile whose center is nearest to the box's
   center (per axis). Every point of the image has exactly one owner, and the owner is the tile
   in which the point lies farthest from an edge, at least half the overlap inside; so an object
   up to ``overlap`` pixels across is detected whole, once, in the tile that owns it, and its
   cut-off copies in neighbouring tiles are dropped.
2. **NMS**: class-wise NMS (``MODEL.RETINANET.NMS_THRESH_TEST``) over the kept detections, for
   objects larger than the overlap, whose pieces may be found in several tiles.

The ``sahi`` package does sliced prediction too, but requires ``opencv-python``, which cannot be
installed next to detectron2's usual ``opencv-python-headless`` (both provide ``cv2``), and its
detectron2 wrapper loads weights with detectron2's unpickling checkpointer; the slicing and
merging here are a few lines on detectron2's ``Instances`` and the plugin's ``grouped_nms``.
"""

from typing import Callable, List, Sequence, Tuple

import numpy as np
import torch

from detectron2.layers import cat
from detectron2.structures import Boxes, Instances

from .postprocessing import grouped_nms

__all__ = ["TiledPredictor", "merge_tile_detections", "tile_windows"]

Window = Tuple[int, int, int, int]  # x0, y0, x1, y1 in image pixels


def _starts(length: int, tile: int, stride: int) -> List[int]:
    """Tile starts along one axis: every ``stride`` pixels, the last one flush with the end."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def tile_windows(height: int, width: int, tile: int, overlap: float) -> List[Window]:
    """The tiles covering a ``height`` x ``width`` image, row by row.

    Args:
        height, width: image size in pixels.
        tile: tile side in pixels; an image side shorter than it gives one tile along that side.
        overlap: fraction of the tile shared by neighbouring tiles, in [0, 1).

    Returns:
        (x0, y0, x1, y1) windows; neighbours overlap by at least ``overlap * tile`` pixels.
    """
    stride = max(1, int(tile * (1.0 - overlap)))
    return [
        (x, y, min(x + tile, width), min(y + tile, height))
        for y in _starts(height, tile, stride)
        for x in _starts(width, tile, stride)
    ]


def _owner(centers: torch.Tensor, tile_centers: torch.Tensor) -> torch.Tensor:
    """Index of the nearest tile center along one axis, for each box center."""
    return (centers[:, None] - tile_centers[None, :]).abs().argmin(dim=1)


def merge_tile_detections(
    windows: Sequence[Window],
    detections: Sequence[Instances],
    image_size: Tuple[int, int],
    nms_thresh: float,
) -> Instances:
    """The detections of an image from those of its tiles.

    Args:
        windows: the tiles, as :func:`tile_windows` gives them.
        detections: per tile, ``Instances`` (``pred_boxes``, ``scores``, ``pred_classes``) in
            the tile's pixel coordinates.
        image_size: (height, width) of the image.
        nms_thresh: IoU threshold of the class-wise NMS over the merged detections.

    Returns:
        ``Instances`` of ``image_size`` in image coordinates, by decreasing score.
    """
    if len(windows) == 1:
        # Nothing to merge (and a second NMS after detectron2 clipped the boxes to the image
        # could suppress a few more than the model did).
        return detections[0]
    x_centers = torch.tensor(sorted({(x0 + x1) / 2 for x0, _, x1, _ in windows}))
    y_centers = torch.tensor(sorted({(y0 + y1) / 2 for _, y0, _, y1 in windows}))
    kept = []
    for (x0, y0, x1, y1), instances in zip(windows, detections):
        boxes = instances.pred_boxes.tensor + torch.tensor([x0, y0, x0, y0], dtype=torch.float32)
        centers = Boxes(boxes).get_centers()
        own_x = x_centers[_owner(centers[:, 0], x_centers)] == (x0 + x1) / 2
        own_y = y_centers[_owner(centers[:, 1], y_centers)] == (y0 + y1) / 2
        mine = own_x & own_y
        kept.append((boxes[mine], instances.scores[mine], instances.pred_classes[mine]))
    boxes, scores, classes = (cat(list(parts)) for parts in zip(*kept))
    keep = grouped_nms(boxes, scores, classes, nms_thresh)
    return Instances(
        image_size, pred_boxes=Boxes(boxes[keep]), scores=scores[keep], pred_classes=classes[keep]
    )


class TiledPredictor:
    """Wraps a predictor of whole images (``images -> [Instances]``, such as
    ``engine.predictor.BatchPredictor``) to predict each image tile by tile.

    Args:
        predictor: called on lists of (h, w, C) arrays; returns ``Instances`` per array, in its
            pixel coordinates; its ``input_format`` is passed on.
        tile: tile side in pixels.
        overlap: fraction of a tile shared with each neighbour, in [0, 1).
        nms_thresh: IoU threshold of the class-wise NMS merging the tiles.
        batch_size: tiles per call of ``predictor``.
    """

    def __init__(
        self,
        predictor: Callable[[Sequence[np.ndarray]], List[Instances]],
        tile: int,
        overlap: float,
        nms_thresh: float,
        batch_size: int = 4,
    ):
        self.predictor = predictor
        self.input_format = getattr(predictor, "input_format", None)
        self.tile, self.overlap = tile, overlap
        self.nms_thresh, self.batch_size = nms_thresh, batch_size

    def __call__(self, images: Sequence[np.ndarray]) -> List[Instances]:
        results = []
        for image in images:
            height, width = image.shape[:2]
            windows = tile_windows(height, width, self.tile, self.overlap)
            crops = [image[y0:y1, x0:x1] for x0, y0, x1, y1 in windows]
            detections = []
            for start in range(0, len(crops), self.batch_size):
                detections += self.predictor(crops[start : start + self.batch_size])
            results.append(
                merge_tile_detections(windows, detections, (height, width), self.nms_thresh)
            )
        return results
