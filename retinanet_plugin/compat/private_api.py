"""The private detectron2 APIs the plugin builds on, each behind one small adapter.

detectron2 promises nothing about names that start with an underscore, yet reusing a few of them
is what lets the plugin keep detectron2's own data loading, evaluation and checkpoint loading
instead of copying them. Each is reached only through a function here, which checks that the
installed detectron2 still has it and otherwise raises :class:`Detectron2APIError` naming what
is missing, what needs it and the versions tested (:data:`TESTED_VERSIONS`). All of them exist,
with the same meaning, in detectron2 0.6 and in upstream main at :data:`TESTED_VERSIONS`.
"""

import importlib
import itertools
import json
import os
from typing import Any, Callable, Dict, Iterator, List, Optional

from ..errors import UserError

__all__ = [
    "Detectron2APIError",
    "TESTED_VERSIONS",
    "check_coco_evaluator_hooks",
    "decode_config_value",
    "dense_box_regression_loss",
    "ema_update",
    "evaluate_box_predictions",
    "evaluates_boxes_only",
    "evaluator_coco_api",
    "evaluator_output_dir",
    "find_free_port",
    "inner_trainer",
    "option_actions",
    "restart_data_iterator",
    "sampler_index_stream",
    "sampler_seed",
    "set_local_process_group",
    "set_sampler_seed",
    "set_writer_period",
    "train_loader_arguments",
]

TESTED_VERSIONS = "detectron2 0.6 and upstream main at commit 02b5c4e (2026-06-06)"


class Detectron2APIError(UserError, RuntimeError):
    """The installed detectron2 lacks a (private) API the plugin relies on."""


def _missing(what: str, needed_for: str) -> Detectron2APIError:
    import detectron2

    return Detectron2APIError(
        f"the installed detectron2 ({detectron2.__version__} at "
        f"{os.path.dirname(detectron2.__file__)}) has no {what}, which retinanet_plugin uses "
        f"for {needed_for}; it was tested with {TESTED_VERSIONS}: install one of those, or "
        "report this with `python -m retinanet_plugin.env`"
    )


def _private(module_name: str, name: str, needed_for: str) -> Any:
    module = importlib.import_module(module_name)
    if not hasattr(module, name):
        raise _missing(f"`{module_name}.{name}`", needed_for)
    return getattr(module, name)


def _attribute(obj: Any, name: str, needed_for: str) -> Any:
    if not hasattr(obj, name):
        raise _missing(f"`{type(obj).__module__}.{type(obj).__name__}.{name}`", needed_for)
    return getattr(obj, name)


# -- data loading ---------------------------------------------------------------------------


def train_loader_arguments(cfg, mapper=None, *, dataset=None) -> Dict[str, Any]:
    """The arguments ``build_detection_train_loader(cfg, mapper, dataset=dataset)`` derives from
    the config (``dataset``, ``sampler``, ``mapper``, ``total_batch_size``,
    ``aspect_ratio_grouping``, ``num_workers``), from detectron2's
    ``detectron2.data.build._train_loader_from_config``."""
    from_config = _private(
        "detectron2.data.build", "_train_loader_from_config", "the training data loader"
    )
    arguments = from_config(cfg, mapper, dataset=dataset)
    if _repeat_sqrt_ignored(cfg):
        arguments["sampler"] = _linear_repeat_factor_sampler(arguments)
    return arguments


_REPEAT_NEEDS = "linear repeat factors (DATALOADER.REPEAT_SQRT False)"


def _repeat_sqrt_ignored(cfg) -> bool:
    """Whether the config asks for linear repeat factors (``DATALOADER.REPEAT_SQRT False``,
    upstream main's key since 2023) from a detectron2 that takes the square root regardless
    (0.6 has neither the key nor the ``sqrt`` argument)."""
    from .sources import detectron2_source

    return (
        cfg.DATALOADER.SAMPLER_TRAIN == "RepeatFactorTrainingSampler"
        and not cfg.DATALOADER.get("REPEAT_SQRT", True)
        and "REPEAT_SQRT" not in detectron2_source("data/build.py")
    )


def _linear_repeat_factor_sampler(arguments: Dict[str, Any]):
    """The ``RepeatFactorTrainingSampler`` detectron2 built, with each image's repeat factor
    ``max(1, sqrt(t / f))`` squared: ``max(1, t / f)``, what upstream main computes with
    ``sqrt=False`` (squaring is monotone, so the image's rarest class still decides). Same
    shuffle seed."""
    from detectron2.data.samplers import RepeatFactorTrainingSampler

    built = arguments["sampler"]
    factors = _attribute(built, "_int_part", _REPEAT_NEEDS) + built._frac_part
    return RepeatFactorTrainingSampler(factors**2, seed=sampler_seed(built))


_SAMPLER_NEEDS = "exact --resume of the training data stream"


def sampler_index_stream(sampler) -> Iterator[int]:
    """The infinite stream of dataset indices of a detectron2 training sampler, for all ranks
    together (``TrainingSampler._infinite_indices()`` and the same in its siblings)."""
    return _attribute(sampler, "_infinite_indices", _SAMPLER_NEEDS)()


def sampler_seed(sampler) -> Optional[int]:
    """The seed of a detectron2 training sampler's shuffle (``_seed``; None or negative means
    none was chosen, see :func:`set_sampler_seed`)."""
    seed = _attribute(sampler, "_seed", _SAMPLER_NEEDS)
    return None if seed is None else int(seed)


def set_sampler_seed(sampler, seed: int) -> None:
    """Sets the seed of a detectron2 training sampler's shuffle before it is iterated."""
    _attribute(sampler, "_seed", _SAMPLER_NEEDS)
    sampler._seed = int(seed)


def inner_trainer(trainer):
    """The ``SimpleTrainer`` (or ``AMPTrainer``) that runs a ``DefaultTrainer``'s steps
    (``DefaultTrainer._trainer``): it holds the optimizer, the grad scaler and the data
    iterator."""
    return _attribute(trainer, "_trainer", "saving the optimizer state and exact --resume")


def set_writer_period(writer_hook, period: int) -> None:
    """Makes a ``hooks.PeriodicWriter`` (metrics.json, console, TensorBoard) write every
    ``period`` iterations (``_period``; ``DefaultTrainer`` hard-codes 20)."""
    _attribute(writer_hook, "_period", "logging short runs more often")
    writer_hook._period = int(period)


def restart_data_iterator(trainer) -> None:
    """Makes a detectron2 ``SimpleTrainer`` (or ``AMPTrainer``, see :func:`inner_trainer`) take
    its next batch from a new iterator over its data loader, e.g. after the loader was told
    where to start."""
    if isinstance(getattr(type(trainer), "_data_loader_iter", None), property):
        # After 0.6 the iterator is created lazily, on first use, from `_data_loader_iter_obj`.
        _attribute(trainer, "_data_loader_iter_obj", "restarting the data stream on --resume")
        trainer._data_loader_iter_obj = None
    else:
        _attribute(trainer, "_data_loader_iter", "restarting the data stream on --resume")
        trainer._data_loader_iter = iter(trainer.data_loader)


# -- evaluation -----------------------------------------------------------------------------

_EVALUATOR_NEEDS = "TEST.COCO_EVAL_BACKEND"


def evaluator_coco_api(evaluator):
    """The pycocotools ``COCO`` object of a ``COCOEvaluator``'s ground truth (``_coco_api``)."""
    return _attribute(evaluator, "_coco_api", "checking a dataset's ids for faster-coco-eval")


def evaluator_output_dir(evaluator) -> Optional[str]:
    """The folder a ``COCOEvaluator`` writes its files into (``_output_dir``), or None."""
    return _attribute(evaluator, "_output_dir", _EVALUATOR_NEEDS)


def check_coco_evaluator_hooks() -> None:
    """Checks what the plugin's evaluator overrides and calls: ``COCOEvaluator._eval_predictions``
    (replaced with :func:`evaluate_box_predictions`) and ``_derive_coco_results`` (extended with
    per-class diagnostics; both of detectron2's evaluation paths hand it their COCOeval), so a
    missing piece fails before evaluation rather than silently evaluating with another backend
    or without the diagnostics."""
    from detectron2.evaluation import COCOEvaluator

    for name in ("_eval_predictions", "_derive_coco_results", "_tasks_from_predictions"):
        _attribute(COCOEvaluator, name, _EVALUATOR_NEEDS)


def evaluate_box_predictions(evaluator, predictions, img_ids, cocoeval_class: type) -> None:
    """What ``COCOEvaluator._eval_predictions`` does for box predictions, evaluating with
    ``cocoeval_class`` (a pycocotools-compatible ``COCOeval``): the results in COCO's category
    ids, saved to ``coco_instances_results.json``, then AP per task into the evaluator's
    results. detectron2 picks its COCOeval from a module global and offers no parameter, so the
    steps are repeated here instead of swapping that global.

    Only for the "bbox" task and COCO's default [1, 10, 100] detections per image; other cases
    are detectron2's own path (``evaluator._eval_predictions``).
    """
    results = list(itertools.chain(*[p["instances"] for p in predictions]))
    metadata = _attribute(evaluator, "_metadata", _EVALUATOR_NEEDS)
    if hasattr(metadata, "thing_dataset_id_to_contiguous_id"):
        to_dataset_id = {v: k for k, v in metadata.thing_dataset_id_to_contiguous_id.items()}
        for result in results:
            result["category_id"] = to_dataset_id[result["category_id"]]
    output_dir = evaluator_output_dir(evaluator)
    if output_dir:
        from detectron2.utils.file_io import PathManager

        with PathManager.open(os.path.join(output_dir, "coco_instances_results.json"), "w") as f:
            f.write(json.dumps(results))
    if not _attribute(evaluator, "_do_evaluation", _EVALUATOR_NEEDS):
        return
    tasks = evaluator._tasks or evaluator._tasks_from_predictions(results)
    coco_gt = evaluator_coco_api(evaluator)
    for task in sorted(tasks):
        coco_eval = None
        if results:  # pycocotools cannot load an empty result list
            coco_eval = cocoeval_class(coco_gt, coco_gt.loadRes(results), task)
            coco_eval.params.maxDets = [1, 10, 100]
            if img_ids is not None:
                coco_eval.params.imgIds = img_ids
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        evaluator._results[task] = evaluator._derive_coco_results(
            coco_eval, task, class_names=metadata.get("thing_classes")
        )


def evaluates_boxes_only(evaluator) -> bool:
    """Whether :func:`evaluate_box_predictions` covers what ``evaluator`` was asked for."""
    tasks = _attribute(evaluator, "_tasks", _EVALUATOR_NEEDS)
    max_dets = _attribute(evaluator, "_max_dets_per_image", _EVALUATOR_NEEDS)
    return set(tasks or ("bbox",)) == {"bbox"} and list(max_dets or [1, 10, 100]) == [1, 10, 100]


# -- checkpoints, launching, losses ---------------------------------------------------------


def find_free_port() -> int:
    """A free TCP port on this machine (``detectron2.engine.launch._find_free_port``)."""
    return _private("detectron2.engine.launch", "_find_free_port", "the rendezvous address")()


def dense_box_regression_loss() -> Callable[..., Any]:
    """detectron2's box regression loss of dense detectors
    (``detectron2.modeling.box_regression._dense_box_regression_loss``)."""
    return _private(
        "detectron2.modeling.box_regression", "_dense_box_regression_loss", "the box loss"
    )


def ema_update(model, name: str, value: float, initial_value: float, momentum: float) -> float:
    """detectron2's moving average of the loss normalizer (``DenseDetector._ema_update``): the
    buffer ``name`` of ``model`` updated with ``value``, returned."""
    update = _attribute(model, "_ema_update", "the EMA loss normalizer")
    return update(name, value, initial_value, momentum)


def set_local_process_group(group) -> None:
    """Makes ``group`` this process's machine-local group in detectron2's ``comm``
    (``comm._LOCAL_PROCESS_GROUP``; detectron2 0.6 has no ``create_local_process_group``)."""
    from detectron2.utils import comm

    _private(comm.__name__, "_LOCAL_PROCESS_GROUP", "launching several processes per machine")
    comm._LOCAL_PROCESS_GROUP = group


# -- configs and command lines ----------------------------------------------------------------


def decode_config_value(value: Any) -> Any:
    """A config value as yacs reads it from YAML or the command line: a Python literal where the
    text is one, else the text (``CfgNode._decode_cfg_value``)."""
    from detectron2.config import CfgNode

    decode = getattr(CfgNode, "_decode_cfg_value", None)
    if decode is None:
        raise _missing("`yacs.config.CfgNode._decode_cfg_value`", "reading config values")
    return decode(value)


def option_actions(parser) -> List[Any]:
    """The actions of an ``argparse.ArgumentParser`` (its ``_actions``), to find which option a
    token names wherever it stands on the command line."""
    return list(_attribute(parser, "_actions", "reading options anywhere on the command line"))
