"""Weights whose activations and scores look like a trained model's, for the model cases.

Random weights are a poor stand-in for timing a detector: a from-scratch ResNet's FrozenBN
layers are identities, its features grow to ~1e3 and the sigmoid saturates, so that nearly every
(anchor, class) pair passes the 0.05 score threshold and the post-processing sorts and
suppresses far more candidates than a trained model gives it. :func:`calibrate` fixes both, on
the benchmark's own images and in one pass each:

1. every FrozenBN takes the per-channel mean and variance of its input as its statistics (its
   input normalized to zero mean and unit variance, as a trained network's batch norm gives);
2. the classifier's weight is scaled to unit-variance logits, and its bias is set so that a
   chosen fraction of the (anchor, class) scores exceeds the score threshold.

The result is a state_dict that loads into detectron2's RetinaNet and the plugin alike.
"""

import math
from typing import Dict, List

import torch
from torch import Tensor, nn

from detectron2.layers import FrozenBatchNorm2d

__all__ = ["calibrate", "candidate_counts"]


@torch.no_grad()
def calibrate(model: nn.Module, images: List[Tensor], candidate_fraction: float) -> Dict:
    """Calibrates ``model`` (a detectron2 ``RetinaNet``-like model) in place on ``images``.

    Args:
        model: with ``backbone``, ``head`` (``cls_score`` conv), ``head_in_features``,
            ``preprocess_image`` and ``test_score_thresh``.
        images: (3, H, W) uint8 images.
        candidate_fraction: fraction of all (anchor, class) scores above the score threshold.

    Returns:
        the calibrated state_dict.
    """
    model.eval()
    batch = model.preprocess_image([{"image": x} for x in images]).tensor

    def normalize_input(norm, inputs):
        x = inputs[0].double()
        norm.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        norm.running_var.copy_(x.var(dim=(0, 2, 3)) + 1e-6)
        norm.weight.fill_(1.0)
        norm.bias.zero_()

    hooks = [
        m.register_forward_pre_hook(normalize_input)
        for m in model.backbone.modules()
        if isinstance(m, FrozenBatchNorm2d)
    ]
    try:
        features = model.backbone(batch)
    finally:
        for hook in hooks:
            hook.remove()
    features = [features[f] for f in model.head_in_features]
    cls_score = model.head.cls_score
    cls_score.bias.zero_()
    logits = torch.cat([x.flatten() for x in model.head(features)[0]])
    cls_score.weight.div_(logits.std())
    logits = logits / logits.std()
    # Bias b: a fraction f of the logits + b above logit(threshold), the threshold midway
    # between two logits (so that no score sits on it, where rounding would decide).
    rank = min(max(1, int(round(len(logits) * (1.0 - candidate_fraction)))), len(logits) - 1)
    below, above = torch.topk(logits, len(logits) - rank + 1).values[-2:].tolist()[::-1]
    quantile = (below + above) / 2
    threshold = math.log(model.test_score_thresh / (1.0 - model.test_score_thresh))
    cls_score.bias.fill_(threshold - quantile)
    return {k: v.clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def candidate_counts(model: nn.Module, logits: List[Tensor]) -> Dict[str, float]:
    """Candidates per image of head outputs ``logits`` (per level, (N, A*K, Hi, Wi)): scores
    above the model's ``test_score_thresh``, and what remains of them after the per-level top-k
    (``test_topk_candidates``)."""
    threshold = math.log(model.test_score_thresh / (1.0 - model.test_score_thresh))
    above = torch.stack([(x > threshold).flatten(1).sum(dim=1) for x in logits])  # (L, N)
    kept = above.clamp(max=model.test_topk_candidates)
    num_images = above.shape[1]
    return {
        "above_threshold": above.sum().item() / num_images,
        "after_topk": kept.sum().item() / num_images,
    }
