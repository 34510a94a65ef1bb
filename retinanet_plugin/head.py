"""RetinaNet's dense head: a classification and a box subnet shared across pyramid levels."""
import logging
import math
from typing import List, Tuple

import torch
from torch import Tensor, nn

from detectron2.config import configurable
from detectron2.layers import CycleBatchNormList, ShapeSpec, get_norm
from detectron2.modeling.anchor_generator import build_anchor_generator
from detectron2.utils.registry import Registry

__all__ = ["RETINANET_HEAD_REGISTRY", "build_retinanet_head", "FocalLossHead"]

logger = logging.getLogger(__name__)

RETINANET_HEAD_REGISTRY = Registry("RETINANET_HEAD")
RETINANET_HEAD_REGISTRY.__doc__ = """
Registry for the dense heads of :class:`FocalLossRetinaNet`, selected by
``MODEL.RETINANET.HEAD_NAME``. A head is called with ``(cfg, input_shape: list[ShapeSpec])`` and
maps a list of per-level features (N, C, Hi, Wi) to ``(logits, deltas)``: two lists of
(N, A*K, Hi, Wi) and (N, A*4, Hi, Wi) tensors.
"""


def build_retinanet_head(cfg, input_shape: List[ShapeSpec]) -> nn.Module:
    """Builds the head named by ``cfg.MODEL.RETINANET.HEAD_NAME``."""
    return RETINANET_HEAD_REGISTRY.get(cfg.MODEL.RETINANET.HEAD_NAME)(cfg, input_shape)


def _conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)


@RETINANET_HEAD_REGISTRY.register()
class FocalLossHead(nn.Module):
    """The paper's head (Sec. 4, Fig. 3): per level, a classification subnet and a box subnet,
    each ``num_convs`` 3x3 convs of C channels with ReLU (optionally normalised), ending in a 3x3
    conv with K*A (class logits) or 4*A (box deltas) outputs. The two subnets share no weights;
    each is shared across all pyramid levels.

    Initialisation as in the paper: all convs N(0, 0.01) with zero bias, except the final
    classification bias -log((1 - pi) / pi), so every anchor starts with foreground confidence
    pi and the many easy negatives do not swamp the first iterations.

    Module names match detectron2's ``RetinaNetHead`` (``cls_subnet``, ``bbox_subnet``,
    ``cls_score``, ``bbox_pred``), so checkpoints load in either.
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
            conv_dims: output channels of each subnet conv (its length is the depth).
            norm: normalisation after each subnet conv: "" (none, the paper), "GN", or any
                name ``detectron2.layers.get_norm`` takes. "BN"/"SyncBN" keep separate
                statistics per level (detectron2's ``CycleBatchNormList``).
            prior_prob: pi, the initial foreground probability of every anchor.
        """
        super().__init__()
        channels = {s.channels for s in input_shape}
        if len(channels) != 1:
            raise ValueError(
                f"FocalLossHead needs the same channels on every input level, got {channels}"
            )
        if not 0 < prior_prob < 1:
            raise ValueError(f"MODEL.RETINANET.PRIOR_PROB must be in (0, 1), got {prior_prob}")
        self._num_features = len(input_shape)
        self.num_classes = num_classes
        self.num_anchors = num_anchors

        if norm in ("BN", "SyncBN"):
            bn_class = nn.BatchNorm2d if norm == "BN" else nn.SyncBatchNorm

            def make_norm(c):
                return CycleBatchNormList(
                    length=self._num_features, bn_class=bn_class, num_features=c
                )

        elif norm:

            def make_norm(c):
                return get_norm(norm, c)

        else:
            make_norm = None

        in_dims = [input_shape[0].channels] + list(conv_dims[:-1])
        self.cls_subnet = self._subnet(in_dims, conv_dims, make_norm)
        self.bbox_subnet = self._subnet(in_dims, conv_dims, make_norm)
        last_dim = conv_dims[-1] if conv_dims else input_shape[0].channels
        self.cls_score = _conv3x3(last_dim, num_anchors * num_classes)
        self.bbox_pred = _conv3x3(last_dim, num_anchors * 4)

        self.prior_prob = prior_prob
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, mean=0, std=0.01)
                nn.init.constant_(module.bias, 0)
        self.reset_classification_bias(prior_prob)

    @staticmethod
    def _subnet(in_dims, out_dims, make_norm) -> nn.Sequential:
        # Layer order conv, [norm], ReLU per block: the same module indices as detectron2.
        layers = []
        for in_dim, out_dim in zip(in_dims, out_dims):
            layers.append(_conv3x3(in_dim, out_dim))
            if make_norm is not None:
                layers.append(make_norm(out_dim))
            layers.append(nn.ReLU())
        return nn.Sequential(*layers)

    def reset_classification_bias(self, prior_prob: float) -> None:
        """Sets the final classification bias to -log((1 - pi) / pi) (the paper's prior init)."""
        nn.init.constant_(self.cls_score.bias, -math.log((1 - prior_prob) / prior_prob))

    @torch.no_grad()
    def reset_classification_layer(self) -> None:
        """Re-initialises the final classification conv as at construction: weight N(0, 0.01),
        bias from the prior probability (used when fine-tuning to other classes)."""
        nn.init.normal_(self.cls_score.weight, mean=0, std=0.01)
        self.reset_classification_bias(self.prior_prob)

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

    def forward(self, features: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        """
        Args:
            features: per level, a (N, C, Hi, Wi) feature map, highest resolution first.

        Returns:
            logits: per level, (N, A*K, Hi, Wi) classification logits.
            deltas: per level, (N, A*4, Hi, Wi) box regression deltas (dx, dy, dw, dh).
        """
        if len(features) != self._num_features:
            raise ValueError(
                f"FocalLossHead was built for {self._num_features} levels, got {len(features)}"
            )
        logits = [self.cls_score(self.cls_subnet(f)) for f in features]
        deltas = [self.bbox_pred(self.bbox_subnet(f)) for f in features]
        return logits, deltas
