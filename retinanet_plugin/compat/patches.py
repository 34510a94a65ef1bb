"""Fixes for detectron2 bugs that current libraries expose; each applied only where detected.

Each ``patch_*`` function looks at the installed detectron2 (its source or behavior), changes
it only if it has the bug, and returns a one-line description of what it changed, or None.
Each docstring names the upstream fix, if there is one.
"""

import functools
import importlib
import inspect
import random
import re
import types
from typing import Dict, List, Optional

import numpy

from .sources import detectron2_source

__all__ = [
    "patch_coco_evaluator_fast_path",
    "patch_create_ddp_model_for_cpu",
    "patch_map_dataset_retry",
    "patch_numpy_aliases",
    "patch_pil_linear",
    "patch_voc_single_id_split",
]


def patch_pil_linear() -> Optional[str]:
    """``PIL.Image.LINEAR`` (removed in Pillow 10) is a default argument in detectron2 0.6's
    ``detectron2.data.transforms``: aliased to ``PIL.Image.BILINEAR``, the same filter.
    Fixed upstream by ff53992b (2023-07-06)."""
    from PIL import Image

    if hasattr(Image, "LINEAR"):
        return None
    if "Image.LINEAR" not in detectron2_source("data/transforms/transform.py"):
        return None
    Image.LINEAR = Image.BILINEAR
    return "PIL.Image.LINEAR = PIL.Image.BILINEAR (removed in Pillow 10)"


def patch_coco_evaluator_fast_path() -> Optional[str]:
    """``COCOEvaluator(use_fast_impl=True)`` (the default) evaluates with detectron2's native
    COCOeval; without the native ops and with ``detectron2._C`` stood in for, it evaluates with
    the official pycocotools ``COCOeval`` instead. Upstream main falls back by itself (710e7795,
    2022-01-25)."""
    from detectron2.evaluation import coco_evaluation

    if coco_evaluation.COCOeval_opt is coco_evaluation.COCOeval:
        return None  # detectron2 already fell back
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
    return "COCOEvaluator(use_fast_impl=True) falls back to pycocotools"


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


class NumpyProxy(types.ModuleType):
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


def patch_numpy_aliases() -> List[str]:
    """``np.int``/``np.str``/... (removed in numpy 2) in detectron2 0.6's VOC loader, dataset
    class histogram, visualizer and masks: those modules get a ``np`` that has the aliases.
    Fixed upstream by 027099d3 and 654570a2 (2023-06)."""
    if all(hasattr(numpy, alias) for alias in _NUMPY_ALIASES):
        return []
    done = []
    for module_name, relative_path in _MODULES_USING_NUMPY.items():
        if _NUMPY_ALIAS_USE.search(detectron2_source(relative_path)):
            module = importlib.import_module(module_name)
            module.np = NumpyProxy(module.np, _NUMPY_ALIASES, "np.int/... for detectron2 0.6")
            done.append(f"{module_name}: np.int/np.str/... aliases (removed in numpy 2)")
    return done


def patch_voc_single_id_split() -> Optional[str]:
    """detectron2's VOC loader reads the split file with ``np.loadtxt``, which returns a 0-d
    array for a file with one id, and then fails to iterate it; ``ndmin=1`` keeps it a list.
    Not fixed upstream (main 02b5c4e)."""
    from detectron2.data.datasets import pascal_voc

    source = inspect.getsource(pascal_voc.load_voc_instances)
    if "np.loadtxt(" not in source or "ndmin" in source:
        return None
    loadtxt = functools.partial(numpy.loadtxt, ndmin=1)
    pascal_voc.np = NumpyProxy(pascal_voc.np, {"loadtxt": loadtxt}, "np.loadtxt(ndmin=1)")
    return "load_voc_instances: a split file with a single id"


def patch_create_ddp_model_for_cpu() -> Optional[str]:
    """detectron2's create_ddp_model passes ``device_ids=[local rank]``, which DDP rejects for
    CPU modules; CPU models get ``device_ids=None`` (GPU models are unchanged), so
    multi-process CPU training (gloo) works. Not fixed upstream (main 02b5c4e)."""
    import detectron2.engine
    from detectron2.engine import defaults

    original = defaults.create_ddp_model
    source = inspect.getsource(original)
    if "device_ids" not in source or "cpu" in source.lower() or "is_cuda" in source:
        return None

    @functools.wraps(original)
    def create_ddp_model(model, *, fp16_compression=False, **kwargs):
        if "device_ids" not in kwargs and not any(p.is_cuda for p in model.parameters()):
            kwargs["device_ids"] = None
        return original(model, fp16_compression=fp16_compression, **kwargs)

    defaults.create_ddp_model = detectron2.engine.create_ddp_model = create_ddp_model
    return "create_ddp_model: no device_ids for CPU models (DDP with gloo)"


class _SampleFromSets(random.Random):
    """``random.Random`` whose ``sample`` also takes a set, as before Python 3.11 (in the set's
    iteration order, as detectron2's fix, 400a49c1, does with ``list(set)``)."""

    def sample(self, population, k, **kwargs):
        if isinstance(population, (set, frozenset)):
            population = list(population)
        return super().sample(population, k, **kwargs)


def patch_map_dataset_retry() -> Optional[str]:
    """``MapDataset.__getitem__`` draws a replacement for an element its mapper returned None
    for with ``random.sample(set, k=1)``, a TypeError since Python 3.11, so the first such
    element crashed training: each ``MapDataset`` gets a random generator whose ``sample``
    takes the set (same seed, 42). Fixed upstream by 400a49c1 (2025-04-13). (Skipping
    unreadable images, which returns None for them, is the plugin's training loader's own.)"""
    from detectron2.data import common

    map_dataset = common.MapDataset
    if "sample(self._fallback_candidates" not in inspect.getsource(map_dataset.__getitem__):
        return None
    original_init = map_dataset.__init__

    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self._rng = _SampleFromSets(42)

    map_dataset.__init__ = __init__
    return "MapDataset: its retry samples from a set (random.sample on a set, Python >= 3.11)"
