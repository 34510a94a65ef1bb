"""COCO evaluation with a choice of COCOeval implementation (``cfg.TEST.COCO_EVAL_BACKEND``).

Backends:

* ``"faster_coco_eval"`` (default): the maintained `faster-coco-eval
  <https://github.com/MiXaiLL76/faster_coco_eval>`_ package, whose C++ matching and accumulation
  give the same numbers as pycocotools in a fraction of the time. Falls back to pycocotools, with
  one logged warning per process, when the package is not installed, and for datasets whose
  image or category ids are not integers (which it cannot index).
* ``"pycocotools"``: the official implementation.

:class:`RetinaNetCOCOEvaluator` is detectron2's :class:`COCOEvaluator` with only the COCOeval
class swapped, so its results dict (AP, AP50, ..., ``AP-<class>``) and output files are
detectron2's, plus the per-class diagnostics of :mod:`.diagnostics` (precision-recall curves,
precision / recall / F1 at the operating score threshold, best thresholds, confusion matrix, AP
per class) as PNG + JSON in its output folder. :func:`coco_eval_class` gives the bare COCOeval
classes, e.g. for benchmarks::

    for backend in BACKENDS:
        coco_eval = coco_eval_class(backend)(coco_gt, coco_gt.loadRes(results), "bbox")
        coco_eval.evaluate(); coco_eval.accumulate(); coco_eval.summarize()
"""

import functools
import importlib
import itertools
import logging
import numbers
from typing import Optional, Set, Type

from pycocotools.cocoeval import COCOeval

from detectron2.evaluation import COCOEvaluator

from ..compat.private_api import (
    check_coco_evaluator_hooks,
    evaluate_box_predictions,
    evaluates_boxes_only,
    evaluator_coco_api,
    evaluator_output_dir,
)
from ..config.option_rules import BACKENDS, EVALUATION_RULES
from ..config.rules import check_options
from .diagnostics import compute_diagnostics, summary_table, write_diagnostics

__all__ = [
    "BACKENDS",
    "CONFIG_KEY",
    "RetinaNetCOCOEvaluator",
    "build_coco_evaluator",
    "coco_eval_class",
    "resolve_backend",
]

logger = logging.getLogger(__name__)

CONFIG_KEY = "TEST.COCO_EVAL_BACKEND"

# Warnings already logged, by key: trainers build a new evaluator at every evaluation, and the
# same warning at each one would only be noise.
_warnings_logged: Set[str] = set()


def _warn_once(key: str, message: str, *args) -> None:
    if key not in _warnings_logged:
        _warnings_logged.add(key)
        logger.warning(message, *args)


def _faster_coco_eval_import_error() -> Optional[ImportError]:
    """The error importing faster_coco_eval raises, or None if it imports.

    Imported on demand (not at module import) so that the plugin works without the package and
    the check sees the environment as it is now.
    """
    try:
        importlib.import_module("faster_coco_eval")
    except ImportError as e:
        return e
    return None


def resolve_backend(backend: str) -> str:
    """The backend that will actually evaluate when ``backend`` is asked for.

    Args:
        backend: one of :data:`BACKENDS`.

    Returns:
        ``backend``, or ``"pycocotools"`` if ``"faster_coco_eval"`` was asked for but the package
        cannot be imported (logged as a warning the first time).

    Raises:
        ValueError: ``backend`` is not one of :data:`BACKENDS`.
    """
    check_options(EVALUATION_RULES, backend=backend)
    if backend == "faster_coco_eval":
        error = _faster_coco_eval_import_error()
        if error is not None:
            _warn_once(
                "not installed",
                "COCO evaluation backend 'faster_coco_eval' selected, but faster-coco-eval "
                "cannot be imported (%s); falling back to pycocotools (same numbers, slower). "
                "Install it with `pip install faster-coco-eval`, or set %s pycocotools.",
                error,
                CONFIG_KEY,
            )
            return "pycocotools"
    return backend


@functools.lru_cache(maxsize=None)
def _faster_coco_eval_class() -> type:
    """Defines, once, the faster-coco-eval COCOeval with pycocotools' constructor."""
    from faster_coco_eval import COCOeval_faster

    class FasterCOCOeval(COCOeval_faster):
        """faster-coco-eval's ``COCOeval_faster`` as a drop-in for pycocotools' ``COCOeval``.

        It evaluates pycocotools ``COCO`` objects as they are (ground truth, and detections from
        ``coco_gt.loadRes``), so both backends see identical annotations, areas and ids; its
        ``stats`` (12 numbers for bbox/segm) and ``eval["precision"]`` ([T, R, K, A, M]) have
        pycocotools' layout. The constructor differs from ``COCOeval_faster``'s in two ways:

        * ``params.imgIds``/``catIds`` are set as pycocotools sets them. ``COCOeval_faster``
          would read ``cocoGt.cat_img_map`` for keypoints, which pycocotools' ``COCO`` lacks, and
          keep only categories with annotations, which changes the K axis.
        * Progress and the summary table are printed, as pycocotools does, instead of logged to
          a logger that detectron2 does not set up.
        """

        def __init__(self, cocoGt=None, cocoDt=None, iouType: str = "segm"):
            # Without datasets, the base constructor neither reads faster-coco-eval-only COCO
            # attributes nor sets print_function on the caller's COCO objects.
            super().__init__(None, None, iouType, print_function=print)
            self.cocoGt = cocoGt
            self.cocoDt = cocoDt
            if cocoGt is not None:
                self.params.imgIds = sorted(cocoGt.getImgIds())
                self.params.catIds = sorted(cocoGt.getCatIds())

    FasterCOCOeval.__module__ = __name__
    return FasterCOCOeval


def coco_eval_class(backend: str) -> Type:
    """The COCOeval class of ``backend``, constructed as ``cls(coco_gt, coco_dt, iou_type)``.

    Unlike the evaluator, this does not fall back: a benchmark asking for faster-coco-eval must
    not silently time pycocotools.

    Args:
        backend: one of :data:`BACKENDS`.

    Returns:
        pycocotools' ``COCOeval``, or a subclass of faster-coco-eval's ``COCOeval_faster`` taking
        the same arguments (pycocotools ``COCO`` objects) and giving the same results.

    Raises:
        ValueError: ``backend`` is not one of :data:`BACKENDS`.
        ImportError: ``"faster_coco_eval"`` and the package cannot be imported.
    """
    check_options(EVALUATION_RULES, backend=backend)
    if backend == "pycocotools":
        return COCOeval
    error = _faster_coco_eval_import_error()
    if error is not None:
        raise ImportError(
            f"COCO evaluation backend 'faster_coco_eval' needs faster-coco-eval: {error}"
        )
    return _faster_coco_eval_class()


class RetinaNetCOCOEvaluator(COCOEvaluator):
    """detectron2's :class:`COCOEvaluator` evaluating with the chosen COCOeval implementation.

    With "pycocotools" everything is detectron2's (its official-COCOeval path). With
    "faster_coco_eval", box predictions are evaluated by detectron2's steps with faster-coco-eval's
    class passed in (:func:`~retinanet_plugin.compat.private_api.evaluate_box_predictions`), so no
    module global of detectron2 is changed and evaluators may run in threads at once; other tasks
    and other ``max_dets_per_image`` take detectron2's pycocotools path.

    faster-coco-eval indexes annotations by numeric image and category ids; datasets with other
    ids (e.g. Pascal VOC converted by detectron2, whose image ids are file names) are evaluated
    with pycocotools, with a warning.

    With an output folder, a box evaluation also writes the per-class diagnostics of
    :func:`~retinanet_plugin.evaluation.diagnostics.write_diagnostics` there, at
    ``score_threshold``, from the COCOeval both paths hand to ``_derive_coco_results``.
    """

    def __init__(
        self,
        dataset_name: str,
        tasks=None,
        distributed: bool = True,
        output_dir: Optional[str] = None,
        *,
        backend: str = "faster_coco_eval",
        score_threshold: float = 0.05,
        **kwargs,
    ):
        """
        Args:
            dataset_name: name of a registered dataset, as for :class:`COCOEvaluator`.
            tasks: as for :class:`COCOEvaluator`.
            distributed: as for :class:`COCOEvaluator`.
            output_dir: as for :class:`COCOEvaluator`.
            backend: one of :data:`BACKENDS`; ``"faster_coco_eval"`` falls back to
                ``"pycocotools"`` (with a warning) if the package cannot be imported or the
                dataset has non-integer ids.
            score_threshold: the operating score threshold of the diagnostics' precision,
                recall, F1 and confusion matrix (``build_coco_evaluator`` gives
                MODEL.RETINANET.SCORE_THRESH_TEST; 0.05 is its default).
            **kwargs: other keyword arguments of :class:`COCOEvaluator` (``max_dets_per_image``,
                ``kpt_oks_sigmas``, ...), except ``use_fast_impl``, which ``backend`` replaces.

        Raises:
            ValueError: unknown ``backend``.
            TypeError: ``use_fast_impl`` given.
        """
        if "use_fast_impl" in kwargs:
            raise TypeError("RetinaNetCOCOEvaluator: use `backend` instead of `use_fast_impl`")
        check_coco_evaluator_hooks()
        # Before the base constructor, which loads the annotations: fail fast on a typo.
        self._backend = resolve_backend(backend)
        self.score_threshold = float(score_threshold)
        # use_fast_impl=False: detectron2's own path is the official pycocotools one.
        super().__init__(
            dataset_name, tasks, distributed, output_dir, use_fast_impl=False, **kwargs
        )
        if self._backend == "faster_coco_eval" and not _has_integer_ids(evaluator_coco_api(self)):
            _warn_once(
                f"ids of {dataset_name}",
                "Dataset %s has non-integer image or category ids, which faster-coco-eval cannot "
                "index; evaluating it with pycocotools (same numbers, slower).",
                dataset_name,
            )
            self._backend = "pycocotools"

    @property
    def backend(self) -> str:
        """The backend that evaluates (after any fallback to pycocotools)."""
        return self._backend

    def _eval_predictions(self, predictions, img_ids=None):
        # pycocotools' COCOeval is detectron2's own path (use_fast_impl=False).
        if self._backend == "pycocotools" or not evaluates_boxes_only(self):
            logger.info("COCO evaluation backend: pycocotools")
            return super()._eval_predictions(predictions, img_ids=img_ids)
        logger.info("COCO evaluation backend: %s", self._backend)
        evaluate_box_predictions(self, predictions, img_ids, coco_eval_class(self._backend))

    def _derive_coco_results(self, coco_eval, iou_type, class_names=None):
        results = super()._derive_coco_results(coco_eval, iou_type, class_names=class_names)
        output_dir = evaluator_output_dir(self)
        if iou_type == "bbox" and coco_eval is not None and output_dir:
            diagnostics = compute_diagnostics(coco_eval, class_names, self.score_threshold)
            written = write_diagnostics(diagnostics, output_dir)
            logger.info(
                "Box detections per category at score >= %g and IoU 0.5:\n%s\nWrote %s",
                self.score_threshold,
                summary_table(diagnostics),
                ", ".join(written),
            )
        return results


def _has_integer_ids(coco_api) -> bool:
    """Whether all image and category ids of a pycocotools ``COCO`` are integers."""
    ids = itertools.chain(coco_api.getImgIds(), coco_api.getCatIds())
    return all(isinstance(i, numbers.Integral) for i in ids)


def build_coco_evaluator(
    cfg, dataset_name: str, output_dir: Optional[str] = None, **kwargs
) -> RetinaNetCOCOEvaluator:
    """The COCO evaluator for ``dataset_name`` with the backend of ``cfg.TEST.COCO_EVAL_BACKEND``.

    Args:
        cfg: a config with the plugin's keys (:func:`retinanet_plugin.add_retinanet_config`).
        dataset_name: name of a registered dataset.
        output_dir: where the evaluator writes its predictions, results and diagnostics files.
        **kwargs: passed on to :class:`RetinaNetCOCOEvaluator`; ``score_threshold`` is
            MODEL.RETINANET.SCORE_THRESH_TEST unless given.

    Raises:
        ValueError: ``cfg.TEST.COCO_EVAL_BACKEND`` is not one of :data:`BACKENDS`.
    """
    backend = cfg.TEST.COCO_EVAL_BACKEND
    check_options(EVALUATION_RULES, backend=backend)
    kwargs.setdefault("score_threshold", cfg.MODEL.RETINANET.SCORE_THRESH_TEST)
    return RetinaNetCOCOEvaluator(dataset_name, output_dir=output_dir, backend=backend, **kwargs)
