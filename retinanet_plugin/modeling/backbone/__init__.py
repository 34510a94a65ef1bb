"""Backbones registered in detectron2's ``BACKBONE_REGISTRY`` (on import):

- ``build_retinanet_timm_fpn_backbone``: a timm model with RetinaNet's FPN (timm optional);
- ``build_retinanet_resnet_panet_backbone`` and ``build_retinanet_timm_panet_backbone``: the
  same FPNs followed by PANet's bottom-up path augmentation.

detectron2's own ``build_retinanet_resnet_fpn_backbone`` covers ResNet-18 to -152.
"""

from .fpn import retinanet_fpn_arguments
from .panet import PANet, build_retinanet_resnet_panet_backbone, build_retinanet_timm_panet_backbone
from .timm_fpn import TimmBackbone, build_retinanet_timm_fpn_backbone, build_timm_backbone

__all__ = [
    "PANet",
    "TimmBackbone",
    "build_retinanet_resnet_panet_backbone",
    "build_retinanet_timm_fpn_backbone",
    "build_retinanet_timm_panet_backbone",
    "build_timm_backbone",
    "retinanet_fpn_arguments",
]
