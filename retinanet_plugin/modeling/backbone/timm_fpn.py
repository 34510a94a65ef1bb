"""timm models (https://github.com/huggingface/pytorch-image-models) as detectron2 backbones,
with RetinaNet's FPN on top.

timm is optional: ``pip install retinanet_plugin[timm]``. It is imported only when a timm
backbone is built.
"""

import math
import os
from typing import Any, Dict, Mapping, Optional, Sequence

from torch import Tensor

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN

from ...config.option_rules import TIMM_RULES
from ...config.rules import check_options
from .fpn import retinanet_fpn_arguments

__all__ = ["TimmBackbone", "build_timm_backbone", "build_retinanet_timm_fpn_backbone"]


def _import_timm():
    try:
        import timm
    except ImportError as e:
        raise ImportError(
            "timm backbones (MODEL.BACKBONE.NAME build_retinanet_timm_*) need the timm package: "
            "pip install 'retinanet_plugin[timm]'"
        ) from e
    return timm


class TimmBackbone(Backbone):
    """A timm model's feature levels (``features_only``) as a detectron2 backbone.

    Each level is named ``"res<k>"`` after its stride ``2**k`` (like detectron2's ResNet stages),
    so configs can swap a timm model in for a ResNet under the same ``MODEL.FPN.IN_FEATURES``.

    Args:
        model_name: a timm model name, e.g. "efficientnet_b0".
        out_indices: timm feature levels to output (indices into the model's ``feature_info``).
        weights: a local checkpoint of the whole timm model to load (timm's loader: safetensors,
            or ``torch.load`` with ``weights_only=True``); "" = random initialization.
        norm: "FrozenBN", "BN" or "SyncBN" (see ``MODEL.TIMM.NORM``).
        in_channels: channels of the input images.
        model_args: keyword arguments of the timm model's constructor (``MODEL.TIMM.MODEL_ARGS``).
    """

    def __init__(
        self,
        model_name: str,
        out_indices: Sequence[int],
        weights: str = "",
        norm: str = "FrozenBN",
        in_channels: int = 3,
        model_args: Optional[Mapping[str, Any]] = None,
    ):
        super().__init__()
        timm = _import_timm()
        if not timm.is_model(model_name):
            raise ValueError(f"MODEL.TIMM.NAME = {model_name!r} is not a timm model")
        check_options(TIMM_RULES, norm=norm)
        pretrained = {}
        if weights:
            if not os.path.isfile(weights):
                raise FileNotFoundError(f"MODEL.TIMM.WEIGHTS = {weights!r} is not a file")
            # A file source wins over every download location in timm's pretrained config.
            pretrained = {"pretrained": True, "pretrained_cfg_overlay": {"file": weights}}
        model_args = dict(model_args or {})
        try:
            self.model = timm.create_model(
                model_name,
                features_only=True,
                out_indices=tuple(out_indices),
                in_chans=in_channels,
                **pretrained,
                **model_args,
            )
        except TypeError as e:  # an argument the model's constructor does not take
            raise ValueError(
                f"MODEL.TIMM.MODEL_ARGS = {model_args} are not all arguments of timm's "
                f"{model_name} ({e}); see that model's constructor for the ones it takes"
            ) from e
        if norm == "FrozenBN":
            # timm's conversion also freezes its BatchNormAct2d (norm + activation) layers.
            self.model = timm.layers.freeze_batch_norm_2d(self.model)
        elif norm == "SyncBN":
            self.model = timm.layers.convert_sync_batchnorm(self.model)

        strides = self.model.feature_info.reduction()
        channels = self.model.feature_info.channels()
        names = [f"res{int(math.log2(s))}" for s in strides]
        if any(2 ** int(math.log2(s)) != s for s in strides) or len(set(names)) != len(names):
            raise ValueError(
                f"MODEL.TIMM.OUT_INDICES = {tuple(out_indices)} select levels of {model_name} "
                f"with strides {strides}: each must be a different power of two"
            )
        self._out_features = names
        self._out_feature_strides = dict(zip(names, strides))
        self._out_feature_channels = dict(zip(names, channels))

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        """
        Args:
            x: images, (N, C, H, W).

        Returns:
            ``"res<k>"`` -> features of stride ``2**k``, (N, channels, ~H / 2**k, ~W / 2**k).
        """
        return dict(zip(self._out_features, self.model(x)))

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(
                channels=self._out_feature_channels[name], stride=self._out_feature_strides[name]
            )
            for name in self._out_features
        }


def build_timm_backbone(cfg, input_shape: ShapeSpec) -> TimmBackbone:
    """The ``TimmBackbone`` of ``MODEL.TIMM.*``."""
    timm_cfg = cfg.MODEL.TIMM
    return TimmBackbone(
        timm_cfg.NAME,
        timm_cfg.OUT_INDICES,
        weights=timm_cfg.WEIGHTS,
        norm=timm_cfg.NORM,
        in_channels=input_shape.channels,
        model_args=timm_cfg.MODEL_ARGS,
    )


@BACKBONE_REGISTRY.register()
def build_retinanet_timm_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """A timm model with RetinaNet's FPN (``MODEL.FPN.IN_FEATURES`` of the timm levels, P6/P7
    from the last), as detectron2's ``build_retinanet_resnet_fpn_backbone`` for a ResNet."""
    return FPN(**retinanet_fpn_arguments(cfg, build_timm_backbone(cfg, input_shape)))
