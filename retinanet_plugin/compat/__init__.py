"""The plugin's compatibility layer with detectron2 0.6 and upstream main, on current libraries.

This is the only part of the plugin that changes detectron2's behavior or reaches into its
private names:

* :mod:`.native_ops`: clear :class:`MissingNativeOpError` for detectron2's native ops when the
  build lacks them (the pure-Python build of ``tools/install_detectron2.py``).
* :mod:`.patches`: fixes for detectron2 bugs that current Python, numpy, Pillow and torch expose.
* :mod:`.private_api`: one adapter per private detectron2 API the plugin uses, with a clear
  :class:`Detectron2APIError` if it is gone.

Every change is detected from the installed detectron2's code, never its version number, so
on an upstream detectron2 built with its native ops only what it still needs is patched.
``import retinanet_plugin`` calls :func:`apply` before any detectron2 submodule is imported.
"""

import logging
from typing import Dict, List, Optional

from . import patches
from .native_ops import (
    MissingNativeOpError,
    install_c_stand_in,
    install_torch_ops_stand_in,
    native_ops_error,
)
from .private_api import Detectron2APIError

__all__ = ["APPLIED", "Detectron2APIError", "MissingNativeOpError", "NATIVE_OPS_ERROR", "apply"]

logger = logging.getLogger(__name__)

# Descriptions of the patches applied in this process, for `python -m retinanet_plugin.env`.
APPLIED: List[str] = []
# Why detectron2._C could not be used, or None if the native ops are present.
NATIVE_OPS_ERROR: Optional[str] = None


_applied_once = False


def apply() -> Dict[str, object]:
    """Applies the patches the installed detectron2 needs; safe to call more than once.

    Returns:
        dict with ``patches`` (list of str) and ``native_ops_error`` (str or None).
    """
    global _applied_once, NATIVE_OPS_ERROR
    if not _applied_once:
        _applied_once = True
        NATIVE_OPS_ERROR = native_ops_error()
        done: List[Optional[str]] = []
        if NATIVE_OPS_ERROR is not None:
            done.append(install_c_stand_in(NATIVE_OPS_ERROR))
        done.append(patches.patch_pil_linear())
        done += patches.patch_numpy_aliases()
        if NATIVE_OPS_ERROR is not None:
            done += install_torch_ops_stand_in(NATIVE_OPS_ERROR)
            done.append(patches.patch_coco_evaluator_fast_path())
        done.append(patches.patch_create_ddp_model_for_cpu())
        done.append(patches.patch_map_dataset_retry())
        done.append(patches.patch_voc_single_id_split())
        APPLIED.extend(patch for patch in done if patch)
        for patch in APPLIED:
            logger.debug("retinanet_plugin.compat: %s", patch)
    return {"patches": list(APPLIED), "native_ops_error": NATIVE_OPS_ERROR}
