"""Online hard example mining (OHEM) for the classification loss, the baseline of Table 1d of
Lin et al. 2017.

OHEM (Shrivastava et al. 2016) scores every example by its loss, applies non-maximum suppression
to the examples' boxes with the loss as score, so that near-duplicates of one hard example do not
fill the minibatch, and trains on the highest-loss survivors only; easy examples get no loss at
all. SSD's variant ("OHEM 1:3") caps the positives at a fixed fraction of the minibatch.

For RetinaNet an example is a non-ignored anchor, its loss is the sigmoid cross-entropy summed
over the K classes (no alpha weighting, no focal term: the plain CE that OHEM replaces FL with),
and its box is the predicted box: the anchor with the predicted deltas applied.
"""

from typing import List, Tuple

import torch
from torch import Tensor
from torch.nn import functional as F
from torchvision.ops import nms

from ...config.option_rules import OHEM_NO_RATIO

__all__ = ["NO_RATIO", "anchor_cross_entropy", "select_hard_examples", "ohem_cross_entropy"]

# OHEM_POSITIVE_FRACTION value for "no ratio": the minibatch is the B highest-loss survivors
# whatever their labels (the paper's plain OHEM rows).
NO_RATIO = OHEM_NO_RATIO

# NMS first runs on this many times B of the highest-loss anchors (doubled while that is not
# enough): NMS over all ~100k anchors of a COCO image would cost far more than the selection.
_FIRST_CANDIDATES_PER_SAMPLE = 4


def anchor_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Sigmoid cross-entropy of each anchor, summed over its classes.

    Args:
        logits: (M, K) class logits.
        labels: (M,) int64 in [0, K]: a class, or K for background (all targets 0).

    Returns:
        (M,) loss per anchor, in the dtype of ``logits`` (at least float32).
    """
    num_classes = logits.shape[1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    targets = F.one_hot(labels, num_classes + 1)[:, :num_classes].to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(dim=1)


def select_hard_examples(
    losses: Tensor,
    boxes: Tensor,
    is_positive: Tensor,
    batch_size: int,
    positive_fraction: float,
    nms_thresh: float,
) -> Tensor:
    """The OHEM minibatch of one image: NMS over all examples with the loss as score, then the
    highest-loss survivors.

    Without a ratio (``positive_fraction`` = ``NO_RATIO``) these are the first ``batch_size``
    survivors. With one, at most ``int(batch_size * positive_fraction)`` positives (the
    highest-loss positive survivors), and negatives fill the rest of ``batch_size``, as in
    detectron2's ``subsample_labels`` but by loss instead of at random.

    NMS runs on the highest-loss candidates only, doubling their number until enough survivors
    are known: greedy NMS never lets a lower-scoring box suppress a higher one, so the survivors
    among the top-m candidates are exactly the survivors of NMS over all examples that rank in
    the top m, and the result equals NMS over all examples (up to the order of equal losses).

    Args:
        losses: (M,) loss of each example.
        boxes: (M, 4) box (x1, y1, x2, y2) of each example.
        is_positive: (M,) bool, True for foreground examples.
        batch_size: B, examples selected at most.
        positive_fraction: fraction of B that positives may take, or ``NO_RATIO``.
        nms_thresh: examples whose box overlaps a higher-loss survivor's with IoU above this are
            dropped (1.0 keeps all).

    Returns:
        (S,) int64 indices into the M examples, S <= B: positives first when a ratio is set,
        each group by decreasing loss.
    """
    total = len(losses)
    max_positives = int(batch_size * positive_fraction)  # used only with a ratio
    total_positives = int(is_positive.sum())
    num_candidates = min(total, _FIRST_CANDIDATES_PER_SAMPLE * batch_size)
    while True:
        candidates = losses.topk(num_candidates).indices
        survivors = candidates[nms(boxes[candidates], losses[candidates], nms_thresh)]
        all_seen = num_candidates == total
        if positive_fraction < 0:
            if len(survivors) >= batch_size or all_seen:
                return survivors[:batch_size]
        else:
            positive = is_positive[survivors]
            positives, negatives = survivors[positive], survivors[~positive]
            positives_seen = int(is_positive[candidates].sum()) == total_positives
            num_positives = min(len(positives), max_positives)
            # The positives are final once enough survived or every positive was a candidate;
            # then the negatives are once enough survived or every anchor was a candidate.
            if (len(positives) >= max_positives or positives_seen) and (
                len(negatives) >= batch_size - num_positives or all_seen
            ):
                return torch.cat(
                    [positives[:num_positives], negatives[: batch_size - num_positives]]
                )
        num_candidates = min(total, 2 * num_candidates)


def ohem_cross_entropy(
    logits: Tensor,
    labels: Tensor,
    boxes: Tensor,
    batch_size_per_image: int,
    positive_fraction: float,
    nms_thresh: float,
) -> Tuple[Tensor, int]:
    """Summed sigmoid cross-entropy over the OHEM minibatch of every image.

    Args:
        logits: (N, R, K) class logits of the R anchors of each of N images.
        labels: (N, R) int64: a class in [0, K), K for background, -1 for ignored (never
            selected).
        boxes: (N, R, 4) predicted boxes of the anchors (used for NMS only, no gradient).
        batch_size_per_image, positive_fraction, nms_thresh: see :func:`select_hard_examples`.

    Returns:
        The summed loss of the selected anchors (gradient flows to their logits only) and the
        number S of selected anchors, at most N * batch_size_per_image.
    """
    num_images, num_anchors, num_classes = logits.shape
    selected: List[Tensor] = []
    with torch.no_grad():
        for image, (image_logits, image_labels) in enumerate(zip(logits, labels)):
            valid = (image_labels >= 0).nonzero().squeeze(1)
            if len(valid) == 0:
                continue
            valid_labels = image_labels[valid]
            keep = select_hard_examples(
                anchor_cross_entropy(image_logits[valid], valid_labels),
                boxes[image, valid].float(),
                valid_labels != num_classes,
                batch_size_per_image,
                positive_fraction,
                nms_thresh,
            )
            selected.append(valid[keep] + image * num_anchors)
    if not selected:
        return logits.sum() * 0.0, 0
    selected_idxs = torch.cat(selected)
    loss = anchor_cross_entropy(
        logits.reshape(-1, num_classes)[selected_idxs], labels.reshape(-1)[selected_idxs]
    ).sum()
    return loss, len(selected_idxs)
