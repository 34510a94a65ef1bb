"""RetinaNet's inference post-processing: a fast batched version, and one that exports.

Both give the detections of detectron2's per-image, per-level
``RetinaNet.inference_single_image`` (score threshold, top-k candidates per level and image,
class-wise NMS, top detections per image), with scores in the logits' dtype and boxes in float32
as detectron2's.

* :func:`batched_detections` (eager mode) applies the threshold to the logits in the head's own
  (N, A*K, H, W) layout, so neither the sigmoid nor the (N, H*W*A, K) transpose of the full logit
  maps is computed: both run on the few candidates only. One NMS call covers all images
  (:func:`grouped_nms`). Its per-image counts are Python numbers, which a trace would freeze.
* :func:`image_detections` (TorchScript scripting, tracing and ONNX export) processes one image
  with tensor operations only: the candidate counts stay data-dependent in a trace, and it
  compiles with ``torch.jit.script``.
"""

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torchvision.ops import batched_nms, nms

from detectron2.layers import cat
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.structures import Boxes, Instances

__all__ = ["batched_detections", "grouped_nms", "image_detections"]


def batched_detections(
    anchors: Sequence[Tensor],
    logits: Sequence[Tensor],
    deltas: Sequence[Tensor],
    image_sizes: Sequence[Tuple[int, int]],
    box2box_transform: Box2BoxTransform,
    *,
    num_classes: int,
    score_thresh: float,
    topk_candidates: int,
    nms_thresh: float,
    max_detections_per_image: int,
) -> List[Instances]:
    """Detections of every image of a batch, all images and levels processed together.

    Args:
        anchors: per level, (Hi*Wi*A, 4) anchors, location-major (detectron2's order).
        logits: per level, (N, A*K, Hi, Wi) class logits.
        deltas: per level, (N, A*4, Hi, Wi) box deltas.
        image_sizes: N (height, width) of the images, for the ``Instances``.
        box2box_transform: decodes deltas against anchors.
        num_classes: K.
        score_thresh: candidates need a sigmoid score above this.
        topk_candidates: candidates kept per level and image (highest scores).
        nms_thresh: IoU threshold of the class-wise NMS.
        max_detections_per_image: detections kept per image (highest scores).

    Returns:
        per image, ``Instances`` with ``pred_boxes`` (D, 4) float32, ``scores`` (D,) in the
        logits' dtype and ``pred_classes`` (D,), sorted by decreasing score,
        D <= max_detections_per_image.
    """
    num_images = len(image_sizes)
    candidates = [
        _level_candidates(
            anchors_i,
            logits_i,
            deltas_i,
            num_classes,
            box2box_transform,
            score_thresh,
            topk_candidates,
        )
        for anchors_i, logits_i, deltas_i in zip(anchors, logits, deltas)
    ]
    boxes, scores, classes, image_ids = (cat(list(x)) for x in zip(*candidates))
    # One class-wise NMS for the whole batch: groups are (image, class) pairs.
    keep = grouped_nms(boxes, scores.float(), image_ids * num_classes + classes, nms_thresh)
    keep = keep[_first_k_per_image(image_ids[keep], num_images, max_detections_per_image)]
    counts = torch.bincount(image_ids[keep], minlength=num_images).tolist()
    # Indexing with each image's slice of ``keep``, not splitting the kept tensors: split's views
    # of one tensor may not be modified in place when autograd records (detectron2's
    # detector_postprocess scales the boxes in place, also outside torch.no_grad()).
    return [
        Instances(image_size, pred_boxes=Boxes(boxes[k]), scores=scores[k], pred_classes=classes[k])
        for image_size, k in zip(image_sizes, keep.split(counts))
    ]


def _level_candidates(
    anchors: Tensor,
    logits: Tensor,
    deltas: Tensor,
    num_classes: int,
    box2box_transform: Box2BoxTransform,
    score_thresh: float,
    topk_candidates: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Decoded top-k candidates above the score threshold of one level, for all images.

    Args:
        anchors: (H*W*A, 4) anchors of the level, location-major.
        logits: (N, A*K, H, W) class logits.
        deltas: (N, A*4, H, W) box deltas.
        num_classes: K.
        box2box_transform, score_thresh, topk_candidates: as :func:`batched_detections`.

    Returns:
        boxes (C, 4), scores (C,), classes (C,), image indices (C,) of the C candidates.
    """
    num_images, _, height, width = logits.shape
    num_anchors = logits.shape[1] // num_classes
    flat_logits = logits.reshape(num_images, -1)
    # Row-major: candidates come grouped by image.
    image_ids, flat_idxs = _above_threshold(flat_logits, score_thresh).nonzero(as_tuple=True)
    candidate_logits = flat_logits[image_ids, flat_idxs]
    keep = _top_k_per_image(candidate_logits, image_ids, num_images, topk_candidates)
    if keep is not None:
        image_ids, flat_idxs = image_ids[keep], flat_idxs[keep]
        candidate_logits = candidate_logits[keep]
    scores = candidate_logits.sigmoid()
    # flat index -> (anchor a, class k, location y * W + x) of the (A, K, H, W) layout.
    locations = flat_idxs % (height * width)
    anchor_and_class = flat_idxs // (height * width)
    anchor_in_cell = anchor_and_class // num_classes
    classes = anchor_and_class % num_classes
    box_deltas = deltas.reshape(num_images, num_anchors, 4, height * width)[
        image_ids, anchor_in_cell, :, locations
    ]
    boxes = box2box_transform.apply_deltas(
        box_deltas.float(), anchors[locations * num_anchors + anchor_in_cell]
    )
    return boxes, scores, classes, image_ids


def grouped_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """NMS within each group (e.g. image x class): torchvision's ``batched_nms`` result.

    On CPU, torchvision's ``batched_nms`` either runs one NMS over all boxes with per-group
    offsets, quadratic in the total box count, or, above 1000 boxes, scans the whole array once
    per group. Sorting by group once and running NMS on each contiguous slice costs one sort plus
    one small NMS per group. On GPUs torchvision's single-kernel version is faster and is used.

    Args:
        boxes: (C, 4) boxes (x1, y1, x2, y2).
        scores: (C,) scores.
        groups: (C,) int64 group of each box; boxes in different groups never suppress each
            other.
        iou_threshold: boxes with IoU above this with a higher-scoring box of their group are
            removed.

    Returns:
        (D,) int64 indices of the kept boxes in decreasing order of score.
    """
    if boxes.device.type != "cpu" or len(boxes) <= 1000:
        return batched_nms(boxes, scores, groups, iou_threshold)
    order = groups.argsort(stable=True)
    counts = torch.unique_consecutive(groups[order], return_counts=True)[1].tolist()
    kept, start = [], 0
    for count in counts:
        group = order[start : start + count]
        kept.append(group if count == 1 else group[nms(boxes[group], scores[group], iou_threshold)])
        start += count
    keep = cat(kept)
    return keep[scores[keep].argsort(descending=True)]


def image_detections(
    anchors: List[Tensor],
    logits: List[Tensor],
    deltas: List[Tensor],
    box2box_transform: Box2BoxTransform,
    num_classes: int,
    score_thresh: float,
    topk_candidates: int,
    nms_thresh: float,
    max_detections_per_image: int,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Detections of one image with tensor operations only: the same as
    :func:`batched_detections`, and also right in a trace (``torch.jit.trace``, ONNX export) for
    inputs of other sizes and candidate counts than the traced one; compiles with
    ``torch.jit.script``.

    Args:
        anchors: per level, (Hi*Wi*A, 4) anchors, location-major (detectron2's order).
        logits: per level, (A*K, Hi, Wi) class logits of the image.
        deltas: per level, (A*4, Hi, Wi) box deltas of the image.
        box2box_transform, num_classes, score_thresh, topk_candidates, nms_thresh,
        max_detections_per_image: as :func:`batched_detections`.

    Returns:
        boxes (D, 4) float32, scores (D,) in the logits' dtype, classes (D,) int64, sorted by
        decreasing score, D <= max_detections_per_image.
    """
    all_boxes, all_scores, all_classes = [], [], []
    for anchors_i, logits_i, deltas_i in zip(anchors, logits, deltas):
        # detectron2's (Hi*Wi*A*K) layout: flat index = anchor index * K + class.
        flat_logits = logits_i.view(-1, num_classes, logits_i.shape[-2], logits_i.shape[-1])
        flat_logits = flat_logits.permute(2, 3, 0, 1).reshape(-1)
        candidates = _above_threshold(flat_logits, score_thresh).nonzero()[:, 0]
        candidate_logits = flat_logits[candidates]
        num_candidates = candidates.shape[0]
        if isinstance(num_candidates, Tensor):  # a traced size: k follows the input's count
            num_topk = torch.clamp(num_candidates, max=topk_candidates)
        else:
            num_topk = min(num_candidates, topk_candidates)
        candidate_logits, order = candidate_logits.topk(num_topk)
        candidates = candidates[order]
        anchor_idxs = candidates // num_classes
        box_deltas = deltas_i.view(-1, 4, deltas_i.shape[-2], deltas_i.shape[-1])
        box_deltas = box_deltas.permute(2, 3, 0, 1).reshape(-1, 4)[anchor_idxs]
        all_boxes.append(box2box_transform.apply_deltas(box_deltas.float(), anchors_i[anchor_idxs]))
        all_scores.append(candidate_logits.sigmoid())
        all_classes.append(candidates % num_classes)
    boxes, scores, classes = torch.cat(all_boxes), torch.cat(all_scores), torch.cat(all_classes)
    keep = batched_nms(boxes, scores.float(), classes, nms_thresh)[:max_detections_per_image]
    return boxes[keep], scores[keep], classes[keep]


def _above_threshold(logits: Tensor, score_thresh: float) -> Tensor:
    """Where sigmoid(logits) > ``score_thresh``, compared in float32 (exact for bfloat16 and
    float16 logits): as sigmoid is increasing, this thresholds the logits at logit(thresh),
    without computing the sigmoid of all of them."""
    return logits.float() > _logit(score_thresh)


def _logit(probability: float) -> float:
    """Inverse of the sigmoid (-inf / inf outside (0, 1))."""
    if probability <= 0:
        return -math.inf
    if probability >= 1:
        return math.inf
    return math.log(probability / (1.0 - probability))


def _top_k_per_image(
    scores: Tensor, image_ids: Tensor, num_images: int, k: int
) -> Optional[Tensor]:
    """Indices of the ``k`` highest scores of every image, or None if no image has more than k.

    Args:
        scores: (C,) scores (or logits), grouped by image.
        image_ids: (C,) image index of each score, non-decreasing.
        num_images: N, the number of images.
        k: scores kept per image.

    Returns:
        (C',) int64 indices into the C scores, grouped by image, or None (keep all).
    """
    counts = torch.bincount(image_ids, minlength=num_images).tolist()
    if max(counts, default=0) <= k:
        return None
    keep, start = [], 0
    for count in counts:
        # topk is linear in the count; a sort of all candidates is not.
        if count > k:
            keep.append(scores[start : start + count].topk(k).indices + start)
        else:
            keep.append(torch.arange(start, start + count, device=scores.device))
        start += count
    return torch.cat(keep)


def _first_k_per_image(image_ids: Tensor, num_images: int, k: int) -> Tensor:
    """Indices of the first ``k`` elements of every image, keeping their order within it.

    Args:
        image_ids: (C,) image index of each element, e.g. of detections sorted by score.
        num_images: N, the number of images.
        k: elements kept per image.

    Returns:
        (C',) int64 indices into the C elements, grouped by image.
    """
    # Stable: the order (by score) is kept within each image.
    order = image_ids.argsort(stable=True)
    counts = torch.bincount(image_ids, minlength=num_images)
    first_of_image = counts.cumsum(0) - counts
    rank = torch.arange(len(order), device=order.device) - first_of_image[image_ids[order]]
    return order[rank < k]
