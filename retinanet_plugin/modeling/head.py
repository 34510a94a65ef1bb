"""RetinaNet's dense head: a classification and a box subnet shared across pyramid levels."""

import math
from typing import List

import torch
from torch import nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec, get_norm
from detectron2.modeling.anchor_generator import build_anchor_generator
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from detectron2.utils.registry import Registry

from ..config.option_rules import HEAD_RULES
from ..config.rules import check_options, registered_in
from ..config.validation import add_key_rule

__all__ = ["RETINANET_HEAD_REGISTRY", "build_retinanet_head", "FocalLossHead"]


RETINANET_HEAD_REGISTRY = Registry("RETINANET_HEAD")
RETINANET_HEAD_REGISTRY.__doc__ = """
Registry for the dense heads of :class:`FocalLossRetinaNet`, selected by
``MODEL.RETINANET.HEAD_NAME``. A head is called with ``(cfg, input_shape: list[ShapeSpec])`` and
maps a list of per-level features (N, C, Hi, Wi) to ``(logits, deltas)``: two lists of
(N, A*K, Hi, Wi) and (N, A*4, Hi, Wi) tensors.
"""


add_key_rule("MODEL.RETINANET.HEAD_NAME", registered_in(RETINANET_HEAD_REGISTRY, "RetinaNet head"))


def build_retinanet_head(cfg, input_shape: List[ShapeSpec]) -> nn.Module:
    """Builds the head named by ``cfg.MODEL.RETINANET.HEAD_NAME``."""
    return RETINANET_HEAD_REGISTRY.get(cfg.MODEL.RETINANET.HEAD_NAME)(cfg, input_shape)


def _norm_passing_the_probe(norm: str):
    """``norm`` as detectron2's ``RetinaNetHead`` can take it.

    detectron2 0.6 probes the norm with one channel (``get_norm(norm, 1)``, only to log its type),
    which fails for "GN" (GroupNorm(32, 1)); upstream main probes with 32 channels. A callable
    norm (which ``get_norm`` accepts) builds the probe with 32 channels and every real layer as
    ``get_norm(norm, channels)``. "BN"/"SyncBN" (per-level statistics) and "" pass as they are.
    """
    if norm in ("", "BN", "SyncBN"):
        return norm

    def make_norm(channels: int) -> nn.Module:
        return get_norm(norm, 32 if channels == 1 else channels)

    return make_norm


@RETINANET_HEAD_REGISTRY.register()
class FocalLossHead(RetinaNetHead):
    """The paper's head (Sec. 4, Fig. 3): detectron2's ``RetinaNetHead``, with GroupNorm usable
    on detectron2 0.6 and a way to re-initialize the classifier for fine-tuning.

    Per level, a classification subnet and a box subnet, each of ``len(conv_dims)`` 3x3 convs
    with ReLU (optionally normalized; "BN"/"SyncBN" keep per-level statistics), ending in a 3x3
    conv with K*A (class logits) or 4*A (box deltas) outputs; each subnet is shared across all
    pyramid levels. All convs are initialized N(0, 0.01) with zero bias, except the final
    classification bias -log((1 - pi) / pi), so every anchor starts with foreground confidence
    pi. Module names are detectron2's, so checkpoints load in either.
    """

    @configurable
    def __init__(
        self,
        *,
        input_shape: List[ShapeSpec],
        num_classes: int,
        num_anchors: int,
        conv_dims: List[int],
        norm: str = "",
        prior_prob: float = 0.01,
    ):
        """
        Args:
            input_shape: shapes of the input feature maps; all must have the same channels.
            num_classes: K, the number of foreground classes.
            num_anchors: A, anchors per location (the same on every level).
            conv_dims: output channels of each subnet conv (its length is the depth, >= 1).
            norm: normalization after each subnet conv: "" (none, the paper), "GN", "BN",
                "SyncBN" or any name ``detectron2.layers.get_norm`` takes.
            prior_prob: pi, the initial foreground probability of every anchor.
        """
        check_options(HEAD_RULES, prior_prob=prior_prob, num_convs=len(conv_dims))
        channels = {s.channels for s in input_shape}
        if len(channels) != 1:
            raise ValueError(
                f"FocalLossHead needs the same channels on every input level, got {channels}"
            )
        super().__init__(
            input_shape=input_shape,
            num_classes=num_classes,
            num_anchors=num_anchors,
            conv_dims=conv_dims,
            norm=_norm_passing_the_probe(norm),
            prior_prob=prior_prob,
        )
        self.num_classes = num_classes
        self.num_anchors = num_anchors
        self.prior_prob = prior_prob

    @torch.no_grad()
    def reset_classification_layer(self) -> None:
        """Re-initializes the final classification conv as at construction: weight N(0, 0.01),
        bias -log((1 - pi) / pi) (used when fine-tuning to other classes)."""
        nn.init.normal_(self.cls_score.weight, mean=0, std=0.01)
        nn.init.constant_(self.cls_score.bias, -math.log((1 - self.prior_prob) / self.prior_prob))

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        num_anchors = build_anchor_generator(cfg, input_shape).num_cell_anchors
        if len(set(num_anchors)) != 1:
            raise ValueError(
                "FocalLossHead shares its convs across levels, so every level needs the same "
                f"number of anchors per location; MODEL.ANCHOR_GENERATOR gives {num_anchors}"
            )
        return {
            "input_shape": input_shape,
            "num_classes": cfg.MODEL.RETINANET.NUM_CLASSES,
            "num_anchors": num_anchors[0],
            "conv_dims": [input_shape[0].channels] * cfg.MODEL.RETINANET.NUM_CONVS,
            "norm": cfg.MODEL.RETINANET.NORM,
            "prior_prob": cfg.MODEL.RETINANET.PRIOR_PROB,
        }
