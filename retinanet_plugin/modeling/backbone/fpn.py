"""RetinaNet's FPN (P3-P7) on any bottom-up network."""

from typing import Any, Dict

from detectron2.modeling import Backbone
from detectron2.modeling.backbone.fpn import LastLevelP6P7

__all__ = ["retinanet_fpn_arguments"]


def retinanet_fpn_arguments(cfg, bottom_up: Backbone) -> Dict[str, Any]:
    """Arguments of detectron2's ``FPN`` as its ``build_retinanet_resnet_fpn_backbone`` sets them:
    lateral and output convs on ``MODEL.FPN.IN_FEATURES`` of ``bottom_up``, and P6/P7 computed
    from the last of them (C5 for a ResNet) by ``LastLevelP6P7``.

    Args:
        cfg: the config (``MODEL.FPN.*``).
        bottom_up: the network whose outputs ``MODEL.FPN.IN_FEATURES`` names.

    Returns:
        The keyword arguments of ``FPN`` (and of ``PANet``, which takes the same).
    """
    in_features = list(cfg.MODEL.FPN.IN_FEATURES)
    shapes = bottom_up.output_shape()
    missing = [f for f in in_features if f not in shapes]
    if missing:
        raise ValueError(
            f"MODEL.FPN.IN_FEATURES names {missing}, which the bottom-up network does not "
            f"output (it has {sorted(shapes)})"
        )
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    last = in_features[-1]
    return {
        "bottom_up": bottom_up,
        "in_features": in_features,
        "out_channels": out_channels,
        "norm": cfg.MODEL.FPN.NORM,
        "top_block": LastLevelP6P7(shapes[last].channels, out_channels, in_feature=last),
        "fuse_type": cfg.MODEL.FPN.FUSE_TYPE,
    }
