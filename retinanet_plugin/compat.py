"""Make detectron2 usable on current libraries, touching only what the installed copy needs.

This is the only module of the plugin that changes detectron2's behaviour. Each patch is
feature-detected, so on an upstream detectron2 built from source (with its native ops, on a
recent Pillow) nothing is changed. ``import retinanet_plugin`` calls :func:`apply` before any
detectron2 submodule is imported.

Patches:

* ``detectron2._C`` missing or not loadable (the pure-Python build made by
  ``tools/install_detectron2.py``): a stand-in module is installed so ``detectron2.layers``
  imports. Calling any native op through it raises :class:`MissingNativeOpError` naming the op;
  nothing returns a fake result. Only the build-information queries of
  ``detectron2.utils.collect_env`` are answered, truthfully ("not built").
* ``PIL.Image.LINEAR`` (removed in Pillow 10) used as a default argument by detectron2 0.6's
  ``detectron2.data.transforms``: aliased to ``PIL.Image.BILINEAR``, the same filter.
* ``COCOEvaluator``'s fast path needs ``detectron2._C``: without the native ops it evaluates
  with the official pycocotools implementation instead.
"""
import importlib
import importlib.machinery
import importlib.util
import logging
import os
import sys
import types
from typing import Dict, List, Optional

logger = logging.getLogger(__name__)

# Names of the patches applied in this process, for `python -m retinanet_plugin.env`.
APPLIED: List[str] = []
# Why detectron2._C could not be used, or None if the native ops are present.
NATIVE_OPS_ERROR: Optional[str] = None

_HOW_TO_GET_NATIVE_OPS = (
    "This detectron2 was installed without its C++/CUDA extension (detectron2._C), e.g. by "
    "tools/install_detectron2.py. RetinaNet does not need it; to use this op, build detectron2 "
    "from source with its native ops: "
    "https://detectron2.readthedocs.io/en/latest/tutorials/install.html"
)


class MissingNativeOpError(RuntimeError):
    """Raised when code calls a detectron2 native op that the installed build lacks."""


class _MissingNativeOps(types.ModuleType):
    """Stand-in for ``detectron2._C``: importable, but every op raises a clear error."""

    # Build-information queries made by detectron2.utils.collect_env; answered truthfully.
    _BUILD_INFO = {
        "get_compiler_version": lambda: "not built (detectron2 without native ops)",
        "get_cuda_version": lambda: "not built (detectron2 without native ops)",
        "has_cuda": lambda: False,
    }

    def __init__(self, reason: str):
        super().__init__("detectron2._C", "Stand-in for detectron2's missing native ops.")
        # A spec without origin, so importlib.util.find_spec("detectron2._C") answers.
        self.__spec__ = importlib.machinery.ModuleSpec("detectron2._C", loader=None)
        self._reason = reason

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        if name in self._BUILD_INFO:
            return self._BUILD_INFO[name]

        def missing_op(*args, **kwargs):
            raise MissingNativeOpError(
                f"detectron2 native op '{name}' is not available ({self._reason}). "
                + _HOW_TO_GET_NATIVE_OPS
            )

        return missing_op


def _native_ops_error() -> Optional[str]:
    """Returns why ``detectron2._C`` cannot be used, or None if it loads."""
    if importlib.util.find_spec("detectron2._C") is None:
        return "detectron2._C is not installed"
    try:
        importlib.import_module("detectron2._C")
    except ImportError as e:
        return f"detectron2._C failed to load: {e}"
    return None


def _install_native_ops_stand_in(reason: str) -> None:
    import detectron2

    stand_in = _MissingNativeOps(reason)
    sys.modules["detectron2._C"] = stand_in
    detectron2._C = stand_in
    APPLIED.append("detectron2._C stand-in (native ops raise MissingNativeOpError)")


def _detectron2_source_mentions(relative_path: str, text: str) -> bool:
    """True if detectron2's source file ``relative_path`` contains ``text``.

    Reads the file instead of importing it: importing is what fails before the patch.
    """
    import detectron2

    path = os.path.join(os.path.dirname(detectron2.__file__), relative_path)
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as f:
        return text in f.read()


def _patch_pil_linear() -> None:
    from PIL import Image

    if hasattr(Image, "LINEAR"):
        return
    if _detectron2_source_mentions("data/transforms/transform.py", "Image.LINEAR"):
        Image.LINEAR = Image.BILINEAR
        APPLIED.append("PIL.Image.LINEAR = PIL.Image.BILINEAR (removed in Pillow 10)")


def _patch_coco_evaluator_fast_path() -> None:
    from detectron2.evaluation import coco_evaluation

    evaluator_cls = coco_evaluation.COCOEvaluator
    original_init = evaluator_cls.__init__

    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        if self._use_fast_impl:
            self._logger.info(
                "COCOEvaluator: detectron2's fast evaluation needs its native ops, which this "
                "build lacks; evaluating with the official pycocotools COCOeval instead."
            )
            self._use_fast_impl = False

    __init__.__wrapped__ = original_init
    evaluator_cls.__init__ = __init__
    APPLIED.append("COCOEvaluator(use_fast_impl=True) falls back to pycocotools")


_applied_once = False


def apply() -> Dict[str, object]:
    """Applies the patches the installed detectron2 needs; safe to call more than once.

    Returns:
        dict with ``patches`` (list of str) and ``native_ops_error`` (str or None).
    """
    global _applied_once, NATIVE_OPS_ERROR
    if not _applied_once:
        _applied_once = True
        NATIVE_OPS_ERROR = _native_ops_error()
        if NATIVE_OPS_ERROR is not None:
            _install_native_ops_stand_in(NATIVE_OPS_ERROR)
        _patch_pil_linear()
        if NATIVE_OPS_ERROR is not None:
            _patch_coco_evaluator_fast_path()
        for patch in APPLIED:
            logger.debug("retinanet_plugin.compat: %s", patch)
    return {"patches": list(APPLIED), "native_ops_error": NATIVE_OPS_ERROR}
