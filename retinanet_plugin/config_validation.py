"""The rules a config's values must follow, one function per area of the config.

:func:`validate_config` checks a merged config (``config_io.load_config`` calls it) and fails with
one :class:`ConfigError` naming the source, every invalid key, its value and the rule it breaks.
The rules on the options of the plugin's components come from the components' own
``OPTION_RULES`` tables (see :mod:`retinanet_plugin.rules`), which their constructors also check,
so each rule is written once; the rules here are those on keys no single constructor owns.
"""

import os
from typing import Callable, Iterator

import torch

from detectron2.config import CfgNode

from . import anchor_generator, evaluation, head, meta_arch, solver
from .backbone import timm_fpn
from .errors import UserError
from .rules import config_errors, config_value

__all__ = ["ConfigError", "INPUT_FORMATS", "validate_config"]

# The components whose OPTION_RULES the config's values are checked against.
_COMPONENT_RULES = (
    meta_arch.OPTION_RULES,
    head.OPTION_RULES,
    anchor_generator.OPTION_RULES,
    solver.OPTION_RULES,
    timm_fpn.OPTION_RULES,
    evaluation.OPTION_RULES,
)
# detectron2's read_image formats: "BGR", "YUV-BT.601" and PIL modes; these are the ones a
# detector's PIXEL_MEAN can describe (3 channels, or 1 for grey "L").
INPUT_FORMATS = {"BGR": 3, "RGB": 3, "YUV-BT.601": 3, "L": 1}
AUGMENTATIONS = ("ROTATION", "SCALE_CROP", "COLOR_JITTER", "MOSAIC", "MIXUP", "CUTMIX")


class ConfigError(UserError, ValueError):
    """A config file or override that cannot be loaded or holds an invalid value."""


Check = Callable[[str, bool, str], Iterator[str]]


def _checker(cfg: CfgNode) -> Check:
    """``check(key, ok, rule)``: yields "KEY = value: rule" unless ``ok``."""

    def check(key: str, ok: bool, rule: str) -> Iterator[str]:
        if not ok:
            yield f"{key} = {config_value(cfg, key)!r}: {rule}"

    return check


def _is_range(values, low: float = -float("inf"), high: float = float("inf")) -> bool:
    """Whether ``values`` is a (min, max) pair of numbers, low <= min <= max <= high."""
    values = list(values)
    return (
        len(values) == 2
        and all(isinstance(v, (int, float)) for v in values)
        and low <= values[0] <= values[1] <= high
    )


def _increasing(values) -> bool:
    values = list(values)
    return all(a < b for a, b in zip(values, values[1:]))


def _solver_errors(cfg: CfgNode, check: Check) -> Iterator[str]:
    solver_cfg = cfg.SOLVER
    yield from check("SOLVER.BASE_LR", solver_cfg.BASE_LR > 0, "must be > 0")
    yield from check("SOLVER.MAX_ITER", solver_cfg.MAX_ITER >= 1, "must be >= 1")
    yield from check("SOLVER.IMS_PER_BATCH", solver_cfg.IMS_PER_BATCH >= 1, "must be >= 1")
    # Steps beyond MAX_ITER are allowed: detectron2 ignores them (with a warning), and a short
    # run of a full config (`SOLVER.MAX_ITER 10`) relies on that.
    yield from check(
        "SOLVER.STEPS",
        all(s > 0 for s in solver_cfg.STEPS) and _increasing(solver_cfg.STEPS),
        "must be positive and strictly increasing",
    )
    yield from check("SOLVER.WARMUP_ITERS", solver_cfg.WARMUP_ITERS >= 0, "must be >= 0")
    yield from check("SOLVER.POLY_LR_POWER", solver_cfg.POLY_LR_POWER > 0, "must be > 0")
    yield from check(
        "SOLVER.EXPONENTIAL_LR_FINAL_FACTOR",
        0 < solver_cfg.EXPONENTIAL_LR_FINAL_FACTOR <= 1,
        "must be in (0, 1]",
    )


def _model_errors(cfg: CfgNode, check: Check) -> Iterator[str]:
    retina, anchors = cfg.MODEL.RETINANET, cfg.MODEL.ANCHOR_GENERATOR
    yield from check("MODEL.RETINANET.NUM_CLASSES", retina.NUM_CLASSES >= 1, "must be >= 1")
    thresholds = list(retina.IOU_THRESHOLDS)
    yield from check(
        "MODEL.RETINANET.IOU_THRESHOLDS",
        all(0 <= t <= 1 for t in thresholds) and _increasing(thresholds),
        "must be in [0, 1] and strictly increasing",
    )
    labels = list(retina.IOU_LABELS)
    yield from check(
        "MODEL.RETINANET.IOU_LABELS",
        len(labels) == len(thresholds) + 1 and all(label in (-1, 0, 1) for label in labels),
        f"must be {len(thresholds) + 1} values (one more than MODEL.RETINANET.IOU_THRESHOLDS) "
        "from -1 (ignore), 0 (background), 1 (foreground)",
    )
    # Like detectron2's anchor generator: a list of lists gives one entry per feature level, or
    # one entry for all levels; a flat list is one entry for all levels.
    levels = len(retina.IN_FEATURES)
    for key in ("SIZES", "ASPECT_RATIOS"):
        values = list(anchors[key])
        per_level = bool(values) and all(isinstance(v, (list, tuple)) for v in values)
        flat = [x for v in values for x in v] if per_level else values
        yield from check(
            f"MODEL.ANCHOR_GENERATOR.{key}",
            bool(flat)
            and all(isinstance(x, (int, float)) and x > 0 for x in flat)
            and (not per_level or len(values) in (1, levels)),
            f"must be positive numbers, as one list for all levels or one list per level (1 or "
            f"{levels}: the levels of MODEL.RETINANET.IN_FEATURES {list(retina.IN_FEATURES)})",
        )
    try:
        torch.device(cfg.MODEL.DEVICE)
        known_device = True
    except (RuntimeError, TypeError):
        known_device = False
    yield from check("MODEL.DEVICE", known_device, "must be a torch device such as cpu or cuda")


def _timm_errors(cfg: CfgNode, check: Check) -> Iterator[str]:
    timm_cfg = cfg.MODEL.TIMM
    indices = list(timm_cfg.OUT_INDICES)
    yield from check(
        "MODEL.TIMM.OUT_INDICES",
        bool(indices)
        and all(isinstance(i, int) and i >= 0 for i in indices)
        and _increasing(indices),
        "must be non-negative integers in increasing order",
    )
    yield from check(
        "MODEL.TIMM.WEIGHTS",
        not timm_cfg.WEIGHTS or os.path.isfile(timm_cfg.WEIGHTS),
        "must be an existing local file, or empty for random initialization",
    )


def _input_errors(cfg: CfgNode, check: Check) -> Iterator[str]:
    """The input format, normalization, sizes and loader workers."""
    model, inputs = cfg.MODEL, cfg.INPUT
    yield from check(
        "INPUT.FORMAT",
        inputs.FORMAT in INPUT_FORMATS,
        "must be one of " + ", ".join(map(repr, INPUT_FORMATS)),
    )
    channels = INPUT_FORMATS.get(inputs.FORMAT, 3)
    for key in ("PIXEL_MEAN", "PIXEL_STD"):
        values = list(model[key])
        yield from check(
            f"MODEL.{key}",
            len(values) == channels
            and all(isinstance(v, (int, float)) for v in values)
            and (key == "PIXEL_MEAN" or all(v > 0 for v in values)),
            f"must be {channels} number(s), one per channel of INPUT.FORMAT {inputs.FORMAT!r}"
            + (", each > 0" if key == "PIXEL_STD" else ""),
        )
    sizes = list(inputs.MIN_SIZE_TRAIN)
    yield from check(
        "INPUT.MIN_SIZE_TRAIN",
        bool(sizes) and all(isinstance(s, int) and s > 0 for s in sizes),
        "must be one or more positive pixel sizes",
    )
    yield from check(
        "INPUT.MIN_SIZE_TRAIN_SAMPLING",
        inputs.MIN_SIZE_TRAIN_SAMPLING in ("choice", "range"),
        "must be one of 'choice', 'range'",
    )
    yield from check(
        "INPUT.MIN_SIZE_TRAIN",
        inputs.MIN_SIZE_TRAIN_SAMPLING != "range" or len(sizes) == 2,
        "must be (min, max) with INPUT.MIN_SIZE_TRAIN_SAMPLING 'range'",
    )
    yield from check("INPUT.MAX_SIZE_TRAIN", inputs.MAX_SIZE_TRAIN > 0, "must be > 0")
    yield from check(
        "INPUT.MIN_SIZE_TEST", inputs.MIN_SIZE_TEST >= 0, "must be >= 0 (0: no resizing)"
    )
    yield from check("INPUT.MAX_SIZE_TEST", inputs.MAX_SIZE_TEST > 0, "must be > 0")
    yield from check(
        "DATALOADER.NUM_WORKERS",
        cfg.DATALOADER.NUM_WORKERS >= 0,
        "must be >= 0 (0: load in the training process)",
    )


def _augmentation_errors(cfg: CfgNode, check: Check) -> Iterator[str]:
    aug = cfg.INPUT.AUG
    for name in AUGMENTATIONS:
        yield from check(f"INPUT.AUG.{name}.PROB", 0 <= aug[name].PROB <= 1, "must be in [0, 1]")
    yield from check(
        "INPUT.AUG.ROTATION.ANGLE", _is_range(aug.ROTATION.ANGLE), "must be (min, max) degrees"
    )
    yield from check(
        "INPUT.AUG.SCALE_CROP.SCALE_RANGE",
        _is_range(aug.SCALE_CROP.SCALE_RANGE, low=0) and aug.SCALE_CROP.SCALE_RANGE[0] > 0,
        "must be (min, max) with 0 < min <= max",
    )
    size = list(aug.SCALE_CROP.SIZE)
    yield from check(
        "INPUT.AUG.SCALE_CROP.SIZE",
        len(size) == 2 and all(isinstance(s, int) and s >= 1 for s in size),
        "must be (height, width) in pixels",
    )
    for key in ("BRIGHTNESS", "CONTRAST", "SATURATION"):
        yield from check(
            f"INPUT.AUG.COLOR_JITTER.{key}",
            _is_range(aug.COLOR_JITTER[key], low=0),
            "must be (min, max) factors with 0 <= min <= max",
        )
    yield from check(
        "INPUT.AUG.MOSAIC.CENTER_RANGE",
        _is_range(aug.MOSAIC.CENTER_RANGE, low=0, high=1),
        "must be (min, max) with 0 <= min <= max <= 1",
    )
    yield from check("INPUT.AUG.MOSAIC.MIN_SIZE", aug.MOSAIC.MIN_SIZE >= 0, "must be >= 0")
    for name in ("MIXUP", "CUTMIX"):
        yield from check(f"INPUT.AUG.{name}.ALPHA", aug[name].ALPHA > 0, "must be > 0")
    yield from check(
        "INPUT.AUG.CUTMIX.MIN_VISIBLE", 0 < aug.CUTMIX.MIN_VISIBLE <= 1, "must be in (0, 1]"
    )


def _test_errors(cfg: CfgNode, check: Check) -> Iterator[str]:
    yield from check(
        "TEST.AUG.ENABLED", not cfg.TEST.AUG.ENABLED, "RetinaNet has no test-time augmentation"
    )


_AREAS = (
    _solver_errors,
    _model_errors,
    _timm_errors,
    _input_errors,
    _augmentation_errors,
    _test_errors,
)


def config_value_errors(cfg: CfgNode) -> Iterator[str]:
    """One "KEY = value: rule" line for each invalid value of ``cfg``."""
    for rules in _COMPONENT_RULES:
        yield from config_errors(cfg, rules)
    check = _checker(cfg)
    for area in _AREAS:
        yield from area(cfg, check)


def validate_config(cfg: CfgNode, source: str) -> None:
    """Checks the values of a plugin config (after ``add_retinanet_config`` and any merges).

    Args:
        cfg: the config.
        source: where the config came from (usually its file), named in the error.

    Raises:
        ConfigError: naming ``source`` and every invalid key, its value and the rule it breaks.
    """
    errors = list(config_value_errors(cfg))
    if len(errors) == 1:
        raise ConfigError(f"{source}: invalid config value: {errors[0]}")
    if errors:
        raise ConfigError(f"{source}: invalid config values:\n  " + "\n  ".join(errors))
