"""RetinaNet with focal loss (Lin et al. 2017) as a detectron2 plugin.

Importing this package makes the installed detectron2 usable on current libraries
(:mod:`retinanet_plugin.compat`) and registers the plugin's components in detectron2's
registries: the meta-architecture ``FocalLossRetinaNet``, the anchor generator
``RetinaNetAnchorGenerator`` and the head ``FocalLossHead`` (in ``RETINANET_HEAD_REGISTRY``).
"""

import warnings

from . import compat

# detectron2 0.6 and fvcore script functions with torch.jit when they are imported, which
# recent torch answers with a FutureWarning each time that no user can act on: ignored while
# the plugin imports them (not for the rest of the process).
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="`torch.jit.script", category=FutureWarning)
    compat.apply()  # before anything below imports detectron2's submodules

    from . import backbone  # noqa: E402, F401  (registers the timm and PANet backbones)
    from .anchor_generator import RetinaNetAnchorGenerator, octave_scaled_sizes  # noqa: E402
    from .config import add_retinanet_config, get_config_file  # noqa: E402
    from .focal_loss import (  # noqa: E402
        focal_loss_from_labels,
        sigmoid_focal_loss,
        sigmoid_focal_loss_star,
    )
    from .head import RETINANET_HEAD_REGISTRY, FocalLossHead, build_retinanet_head  # noqa: E402
    from .meta_arch import FocalLossRetinaNet  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "add_retinanet_config",
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
