"""RetinaNet with focal loss (Lin et al. 2017) as a detectron2 plugin.

Importing this package registers the plugin's components and changes nothing else: the
meta-architecture ``FocalLossRetinaNet`` and the anchor generator ``RetinaNetAnchorGenerator`` in
detectron2's registries, the head ``FocalLossHead`` in the plugin's ``RETINANET_HEAD_REGISTRY``,
and the timm and PANet backbones in detectron2's backbone registry.
"""

import warnings

# detectron2 0.6 and fvcore script functions with torch.jit when they are imported, which
# recent torch answers with a FutureWarning each time that no user can act on: ignored while
# the plugin imports them (not for the rest of the process).
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="`torch.jit.script", category=FutureWarning)
    from .config import add_retinanet_config, get_cfg, get_config_file
    from .modeling import (
        RETINANET_HEAD_REGISTRY,
        FocalLossHead,
        FocalLossRetinaNet,
        RetinaNetAnchorGenerator,
        build_retinanet_head,
        focal_loss_from_labels,
        octave_scaled_sizes,
        sigmoid_focal_loss,
        sigmoid_focal_loss_star,
    )

__version__ = "0.1.0"

__all__ = [
    "add_retinanet_config",
    "get_cfg",
    "get_config_file",
    "FocalLossRetinaNet",
    "FocalLossHead",
    "RETINANET_HEAD_REGISTRY",
    "build_retinanet_head",
    "RetinaNetAnchorGenerator",
    "octave_scaled_sizes",
    "sigmoid_focal_loss",
    "sigmoid_focal_loss_star",
    "focal_loss_from_labels",
]
