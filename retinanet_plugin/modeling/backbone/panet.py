"""PANet's bottom-up path augmentation (Liu et al. 2018, "Path Aggregation Network for Instance
Segmentation") on RetinaNet's FPN, for ResNet and timm bottom-ups."""

from typing import Dict

from fvcore.nn import weight_init
from torch import Tensor
from torch.nn import functional as F

from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import build_resnet_backbone
from detectron2.modeling.backbone.fpn import FPN

from .fpn import retinanet_fpn_arguments
from .timm_fpn import build_timm_backbone

__all__ = ["PANet", "build_retinanet_resnet_panet_backbone", "build_retinanet_timm_panet_backbone"]


class PANet(FPN):
    """detectron2's FPN followed by PANet's bottom-up path.

    With the FPN outputs P_3 .. P_7 (the levels of ``FPN._out_features``)::

        N_3 = P_3
        N_{l+1} = ReLU(norm(conv3x3(ReLU(norm(conv3x3_stride2(N_l))) + P_{l+1})))

    every conv ``out_channels`` to ``out_channels`` followed by ReLU, as in the paper. The outputs
    keep the FPN's names and shapes ("p3" .. "p7"), so the head's ``MODEL.RETINANET.IN_FEATURES``
    stay as they are; the FPN's parameters keep their names too, so an FPN RetinaNet checkpoint
    loads into everything but the new path (``pan_*``).

    Args:
        panet_norm: normalization of the new convs, a ``detectron2.layers.get_norm`` name
            ("" = none, convs with bias).
        **fpn_arguments: those of detectron2's ``FPN``.
    """

    def __init__(self, *, panet_norm: str = "", **fpn_arguments):
        super().__init__(**fpn_arguments)
        channels = fpn_arguments["out_channels"]
        use_bias = panet_norm == ""

        def conv(stride: int) -> Conv2d:
            layer = Conv2d(
                channels,
                channels,
                kernel_size=3,
                stride=stride,
                padding=1,
                bias=use_bias,
                norm=get_norm(panet_norm, channels),
                activation=F.relu,
            )
            weight_init.c2_xavier_fill(layer)
            return layer

        self.pan_downsamples, self.pan_outputs = [], []
        for lower, upper in zip(self._out_features, self._out_features[1:]):
            # "p3" -> "p4": pan_downsample3 and pan_output4.
            downsample, output = conv(stride=2), conv(stride=1)
            self.add_module(f"pan_downsample{lower[1:]}", downsample)
            self.add_module(f"pan_output{upper[1:]}", output)
            self.pan_downsamples.append(downsample)
            self.pan_outputs.append(output)

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        """
        Args:
            x: images, (N, C, H, W).

        Returns:
            "p<l>" -> N_l, (N, out_channels, H_l, W_l) with the FPN's P_l sizes.
        """
        fpn_outputs = super().forward(x)
        names = self._out_features
        outputs = [fpn_outputs[names[0]]]
        for downsample, output, name in zip(self.pan_downsamples, self.pan_outputs, names[1:]):
            outputs.append(output(downsample(outputs[-1]) + fpn_outputs[name]))
        return dict(zip(names, outputs))


@BACKBONE_REGISTRY.register()
def build_retinanet_resnet_panet_backbone(cfg, input_shape: ShapeSpec) -> PANet:
    """detectron2's ResNet, RetinaNet's FPN (as ``build_retinanet_resnet_fpn_backbone``) and
    PANet's bottom-up path (``MODEL.PANET.*``)."""
    bottom_up = build_resnet_backbone(cfg, input_shape)
    return PANet(**retinanet_fpn_arguments(cfg, bottom_up), panet_norm=cfg.MODEL.PANET.NORM)


@BACKBONE_REGISTRY.register()
def build_retinanet_timm_panet_backbone(cfg, input_shape: ShapeSpec) -> PANet:
    """A timm model (``MODEL.TIMM.*``), RetinaNet's FPN and PANet's bottom-up path."""
    bottom_up = build_timm_backbone(cfg, input_shape)
    return PANet(**retinanet_fpn_arguments(cfg, bottom_up), panet_norm=cfg.MODEL.PANET.NORM)
