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
* ``np.int``/``np.str``/... (removed in numpy 2) used by detectron2 0.6's VOC loader, dataset
  class histogram, visualizer and masks: those modules get a ``np`` that has the aliases.
* ``create_ddp_model`` passes ``device_ids`` even for CPU models, which DDP rejects: CPU models
  are wrapped without it, so multi-process CPU training (gloo) works.
* ``MapDataset.__getitem__`` draws a replacement for a failed element with
  ``random.sample(set, k=1)``, a TypeError since Python 3.11, so the first image it cannot load
  crashed training: it draws from a tuple, and an image that cannot be read (``OSError``, e.g. a
  truncated file, or PIL's ``SyntaxError``) is skipped with a warning naming its file and the
  number skipped so far, then another element is tried, as detectron2 intends.
* ``load_voc_instances`` reads the split file with ``np.loadtxt``, which gives a 0-d array for a
  split of one image, and then fails to iterate it: its ``np.loadtxt`` returns at least 1-d.
"""
import functools
import importlib
import importlib.machinery
import importlib.util
import inspect
import logging
import os
import re
import sys
import types
import warnings
from typing import Dict, List, Optional

import numpy

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


def _detectron2_source(relative_path: str) -> str:
    """Text of detectron2's source file ``relative_path`` ("" if it does not exist).

    Reads the file instead of importing it: importing is what fails before some patches.
    """
    import detectron2

    path = os.path.join(os.path.dirname(detectron2.__file__), relative_path)
    if not os.path.isfile(path):
        return ""
    with open(path, encoding="utf-8") as f:
        return f.read()


def _patch_pil_linear() -> None:
    from PIL import Image

    if hasattr(Image, "LINEAR"):
        return
    if "Image.LINEAR" in _detectron2_source("data/transforms/transform.py"):
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


# Aliases numpy 2 removed (deprecated since numpy 1.20); detectron2 0.6 still uses them.
_NUMPY_ALIASES = {"int": int, "float": float, "bool": bool, "str": str, "object": object}
_NUMPY_ALIAS_USE = re.compile(r"\bnp\.(int|float|bool|str|object)\b")
# detectron2 modules on the plugin's paths that may use them: VOC loading, the dataset class
# histogram, the visualizer, mask structures.
_MODULES_USING_NUMPY = {
    "detectron2.data.datasets.pascal_voc": "data/datasets/pascal_voc.py",
    "detectron2.data.build": "data/build.py",
    "detectron2.utils.visualizer": "utils/visualizer.py",
    "detectron2.structures.masks": "structures/masks.py",
}


class _NumpyProxy(types.ModuleType):
    """The ``np`` of one detectron2 module: numpy (or the module's previous ``np``) with some
    attributes replaced; numpy itself is left alone."""

    def __init__(self, base: types.ModuleType, overrides: Dict[str, object], why: str):
        super().__init__("numpy", why)
        self._base = base
        self._overrides = overrides

    def __getattr__(self, name: str):
        if name in self._overrides:
            return self._overrides[name]
        return getattr(self._base, name)


def _patch_numpy_aliases() -> None:
    if all(hasattr(numpy, alias) for alias in _NUMPY_ALIASES):
        return
    for module_name, relative_path in _MODULES_USING_NUMPY.items():
        if _NUMPY_ALIAS_USE.search(_detectron2_source(relative_path)):
            module = importlib.import_module(module_name)
            module.np = _NumpyProxy(module.np, _NUMPY_ALIASES, "np.int/... for detectron2 0.6")
            APPLIED.append(f"{module_name}: np.int/np.str/... aliases (removed in numpy 2)")


def _patch_voc_single_id_split() -> None:
    """detectron2's VOC loader reads the split file with ``np.loadtxt``, which returns a 0-d
    array for a file with one id, and then fails to iterate it; ``ndmin=1`` keeps it a list."""
    from detectron2.data.datasets import pascal_voc

    source = inspect.getsource(pascal_voc.load_voc_instances)
    if "np.loadtxt(" not in source or "ndmin" in source:
        return
    loadtxt = functools.partial(numpy.loadtxt, ndmin=1)
    pascal_voc.np = _NumpyProxy(pascal_voc.np, {"loadtxt": loadtxt}, "np.loadtxt(ndmin=1)")
    APPLIED.append("load_voc_instances: a split file with a single id")


def _patch_create_ddp_model_for_cpu() -> None:
    """detectron2's create_ddp_model passes device_ids=[local rank], which DDP rejects for CPU
    modules; CPU models get device_ids=None (GPU models are unchanged)."""
    import detectron2.engine
    from detectron2.engine import defaults

    original = defaults.create_ddp_model
    source = inspect.getsource(original)
    if "device_ids" not in source or "cpu" in source.lower() or "is_cuda" in source:
        return

    @functools.wraps(original)
    def create_ddp_model(model, *, fp16_compression=False, **kwargs):
        if "device_ids" not in kwargs and not any(p.is_cuda for p in model.parameters()):
            kwargs["device_ids"] = None
        return original(model, fp16_compression=fp16_compression, **kwargs)

    defaults.create_ddp_model = detectron2.engine.create_ddp_model = create_ddp_model
    APPLIED.append("create_ddp_model: no device_ids for CPU models (DDP with gloo)")


# What reading a truncated, corrupt or missing image raises in detectron2's read_image: PIL's
# UnidentifiedImageError and "image file is truncated" are OSErrors; some broken PNG chunks give
# SyntaxError.
_UNREADABLE_IMAGE_ERRORS = (OSError, SyntaxError)


def _patch_map_dataset_retry() -> None:
    from detectron2.data import common

    map_dataset = common.MapDataset
    if "sample(self._fallback_candidates" not in inspect.getsource(map_dataset.__getitem__):
        return
    data_logger = logging.getLogger("detectron2.data.common")

    def skip(self, element, cur_idx: int, reason: str) -> None:
        self._num_skipped = getattr(self, "_num_skipped", 0) + 1
        name = element.get("file_name") if isinstance(element, dict) else None
        data_logger.warning(
            "Skipped %s: %s; %d elements skipped so far by this data loader process",
            name or f"dataset element {cur_idx}", reason, self._num_skipped,
        )

    def __getitem__(self, idx):
        retry_count = 0
        cur_idx = int(idx)
        while True:
            element = self._dataset[cur_idx]
            try:
                data = self._map_func(element)
                reason = "the mapper returned None"
            except _UNREADABLE_IMAGE_ERRORS as e:
                data, reason = None, f"cannot read it ({type(e).__name__}: {e})"
            if data is not None:
                self._fallback_candidates.add(cur_idx)
                return data
            skip(self, element, cur_idx, reason)

            # As detectron2: try a random other element that has not failed.
            retry_count += 1
            self._fallback_candidates.discard(cur_idx)
            if not self._fallback_candidates:
                raise RuntimeError(f"none of the {len(self)} dataset elements could be loaded")
            cur_idx = self._rng.choice(tuple(self._fallback_candidates))
            if retry_count >= 3:
                data_logger.warning(
                    "Failed to apply `_map_func` for idx: %d, retry count: %d", idx, retry_count
                )

    __getitem__.__wrapped__ = map_dataset.__getitem__
    map_dataset.__getitem__ = __getitem__
    APPLIED.append("MapDataset: skip unreadable images with a warning (random.sample on a set)")


def _silence_import_time_warnings() -> None:
    # detectron2 0.6 and fvcore script functions with torch.jit, and model_zoo imports
    # pkg_resources, at import time; both warn on every run and nothing a user does fixes them.
    warnings.filterwarnings("ignore", message="`torch.jit.script", category=FutureWarning)
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)


_applied_once = False


def apply() -> Dict[str, object]:
    """Applies the patches the installed detectron2 needs; safe to call more than once.

    Returns:
        dict with ``patches`` (list of str) and ``native_ops_error`` (str or None).
    """
    global _applied_once, NATIVE_OPS_ERROR
    if not _applied_once:
        _applied_once = True
        _silence_import_time_warnings()
        NATIVE_OPS_ERROR = _native_ops_error()
        if NATIVE_OPS_ERROR is not None:
            _install_native_ops_stand_in(NATIVE_OPS_ERROR)
        _patch_pil_linear()
        _patch_numpy_aliases()
        if NATIVE_OPS_ERROR is not None:
            _patch_coco_evaluator_fast_path()
        _patch_create_ddp_model_for_cpu()
        _patch_map_dataset_retry()
        _patch_voc_single_id_split()
        for patch in APPLIED:
            logger.debug("retinanet_plugin.compat: %s", patch)
    return {"patches": list(APPLIED), "native_ops_error": NATIVE_OPS_ERROR}
