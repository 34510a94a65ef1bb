"""The detector: the meta-architecture, its head, anchors, losses, post-processing and
backbones. Importing it registers them in detectron2's registries and the plugin's head
registry."""

from . import backbone  # noqa: F401  (registers the timm and PANet backbones)
from .anchor_generator import RetinaNetAnchorGenerator, octave_scaled_sizes
from .head import RETINANET_HEAD_REGISTRY, FocalLossHead, build_retinanet_head
from .losses import focal_loss_from_labels, sigmoid_focal_loss, sigmoid_focal_loss_star
from .meta_arch import FocalLossRetinaNet

__all__ = [
    "FocalLossHead",
    "FocalLossRetinaNet",
    "RETINANET_HEAD_REGISTRY",
    "RetinaNetAnchorGenerator",
    "build_retinanet_head",
    "focal_loss_from_labels",
    "octave_scaled_sizes",
    "sigmoid_focal_loss",
    "sigmoid_focal_loss_star",
]
