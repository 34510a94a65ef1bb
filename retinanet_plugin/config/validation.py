"""The rules a config's values must follow: a table of rules per key, and checks across keys.

:func:`validate_config` checks a merged config (``config_io.load_config`` calls it) and fails with
one :class:`ConfigError` naming the source, every invalid key, its value and the rule it breaks.
The rules on the options of the plugin's components are the tables of :mod:`.option_rules`,
which the components' constructors also check, so each rule is written once and validating a
config needs none of the model's code; :data:`KEY_RULES` holds the rules on keys no single
constructor owns (detectron2's solver, input, loader and model keys), and the functions below
the rules that relate several keys. Registry names (``MODEL.BACKBONE.NAME``, ...) are checked
against the registries' contents, which importing ``retinanet_plugin`` has filled.
:func:`validate_training` adds the rules that only matter when training starts (warm-up length,
mixed precision).
"""

import functools
import logging
import os
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from detectron2.config import CfgNode
from detectron2.layers import get_norm
from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.anchor_generator import ANCHOR_GENERATOR_REGISTRY
from detectron2.modeling.meta_arch.retinanet import RetinaNet
from detectron2.solver.build import GradientClipType

from ..errors import UserError
from .option_rules import COMPONENT_RULES
from .rules import (
    Rule,
    above,
    at_least,
    config_errors,
    config_value,
    in_interval,
    key_errors,
    one_of,
    optional,
    registered_in,
)

__all__ = [
    "ConfigError",
    "INPUT_FORMATS",
    "KEY_RULES",
    "add_key_rule",
    "validate_config",
    "validate_training",
]

logger = logging.getLogger(__name__)

# detectron2's read_image formats: "BGR", "YUV-BT.601" and PIL modes; these are the ones a
# detector's PIXEL_MEAN can describe (3 channels, or 1 for grey "L").
INPUT_FORMATS = {"BGR": 3, "RGB": 3, "YUV-BT.601": 3, "L": 1}
AUGMENTATIONS = ("ROTATION", "SCALE_CROP", "COLOR_JITTER", "MOSAIC", "MIXUP", "CUTMIX")
# The depths detectron2's build_resnet_backbone has a block layout for.
RESNET_DEPTHS = (18, 34, 50, 101, 152)
# Names detectron2's get_norm may know (0.6 and main); the rule lists those this one knows.
_NORM_NAMES = (
    "",
    "BN",
    "SyncBN",
    "FrozenBN",
    "GN",
    "LN",
    "nnSyncBN",
    "naiveSyncBN",
    "naiveSyncBN_N",
)
# The samplers detectron2's build_detection_train_loader builds, and the key each one needs.
_TRAIN_SAMPLERS = {
    "TrainingSampler": None,
    "RepeatFactorTrainingSampler": "REPEAT_THRESHOLD",
    "RandomSubsetTrainingSampler": "RANDOM_SUBSET_RATIO",
}


class ConfigError(UserError, ValueError):
    """A config file or override that cannot be loaded or holds an invalid value."""


@functools.lru_cache(maxsize=None)
def _known_norms() -> Tuple[str, ...]:
    """The norm names this detectron2's ``get_norm`` builds a layer for (asked, not copied)."""
    known = []
    for name in _NORM_NAMES:
        try:
            get_norm(name, 32)
        except KeyError:
            continue
        known.append(name)
    return tuple(known)


def _norm(value) -> Optional[str]:
    broken = one_of(_known_norms())(value)
    return broken and f"{broken} (detectron2's get_norm; 'GN' is GroupNorm with 32 groups)"


_SOLVER, _INPUT, _MODEL = "SOLVER.", "INPUT.", "MODEL."


# Config key -> rule, for the keys that no single component's OPTION_RULES owns.
KEY_RULES: Dict[str, Rule] = {
    _SOLVER + "BASE_LR": above(0),
    _SOLVER + "MAX_ITER": at_least(1),
    _SOLVER + "IMS_PER_BATCH": at_least(1),
    _SOLVER + "MOMENTUM": in_interval(0, 1, high_open=True),
    _SOLVER + "WEIGHT_DECAY": at_least(0),
    _SOLVER + "WEIGHT_DECAY_NORM": at_least(0),
    _SOLVER + "WEIGHT_DECAY_BIAS": optional(at_least(0), "as SOLVER.WEIGHT_DECAY"),
    _SOLVER + "BIAS_LR_FACTOR": above(0),
    # Multiplies the LR at each of SOLVER.STEPS: a decay.
    _SOLVER + "GAMMA": in_interval(0, 1, low_open=True),
    # The LR starts at this fraction of BASE_LR and rises to it during the warm-up.
    _SOLVER + "WARMUP_FACTOR": in_interval(0, 1),
    _SOLVER + "WARMUP_ITERS": at_least(0),
    _SOLVER + "CHECKPOINT_PERIOD": at_least(1),
    _SOLVER + "REFERENCE_WORLD_SIZE": at_least(0),
    _SOLVER + "POLY_LR_POWER": above(0),
    _SOLVER + "EXPONENTIAL_LR_FINAL_FACTOR": in_interval(0, 1, low_open=True),
    _SOLVER + "CLIP_GRADIENTS.CLIP_TYPE": one_of(tuple(t.value for t in GradientClipType)),
    _SOLVER + "CLIP_GRADIENTS.CLIP_VALUE": above(0),
    _SOLVER + "CLIP_GRADIENTS.NORM_TYPE": above(0),
    "TEST.EVAL_PERIOD": at_least(0),  # 0: evaluate only after training
    "TEST.DETECTIONS_PER_IMAGE": at_least(1),
    "TEST.EARLY_STOPPING_PATIENCE": at_least(0),  # 0: off
    # 0: the EMA follows the weights; 1 would never move from the first iteration's.
    "MODEL_EMA.DECAY": in_interval(0, 1, high_open=True),
    "DATALOADER.NUM_WORKERS": at_least(0),  # 0: load in the training process
    "DATALOADER.REPEAT_THRESHOLD": at_least(0),
    _INPUT + "FORMAT": one_of(tuple(INPUT_FORMATS)),
    _INPUT + "MIN_SIZE_TRAIN_SAMPLING": one_of(("choice", "range")),
    _INPUT + "MAX_SIZE_TRAIN": above(0),
    _INPUT + "MIN_SIZE_TEST": at_least(0),  # 0: no resizing
    _INPUT + "MAX_SIZE_TEST": above(0),
    _INPUT + "RANDOM_FLIP": one_of(("none", "horizontal", "vertical")),
    **{f"{_INPUT}AUG.{name}.PROB": in_interval(0, 1) for name in AUGMENTATIONS},
    _INPUT + "AUG.MOSAIC.MIN_SIZE": at_least(0),
    _INPUT + "AUG.MIXUP.ALPHA": above(0),
    _INPUT + "AUG.CUTMIX.ALPHA": above(0),
    _INPUT + "AUG.CUTMIX.MIN_VISIBLE": in_interval(0, 1, low_open=True),
    _MODEL + "META_ARCHITECTURE": registered_in(META_ARCH_REGISTRY, "meta-architecture"),
    _MODEL + "BACKBONE.NAME": registered_in(BACKBONE_REGISTRY, "backbone"),
    _MODEL + "ANCHOR_GENERATOR.NAME": registered_in(ANCHOR_GENERATOR_REGISTRY, "anchor generator"),
    _MODEL + "RETINANET.NUM_CLASSES": at_least(1),
    _MODEL + "RESNETS.DEPTH": one_of(RESNET_DEPTHS),
    _MODEL + "RESNETS.NORM": _norm,
    _MODEL + "RESNETS.NUM_GROUPS": at_least(1),
    _MODEL + "RESNETS.WIDTH_PER_GROUP": at_least(1),
    _MODEL + "RESNETS.STEM_OUT_CHANNELS": at_least(1),
    _MODEL + "RESNETS.RES2_OUT_CHANNELS": at_least(1),
    _MODEL + "RESNETS.RES5_DILATION": one_of((1, 2)),
    _MODEL + "FPN.OUT_CHANNELS": at_least(1),
    _MODEL + "FPN.NORM": _norm,
    _MODEL + "RETINANET.NORM": _norm,
    _MODEL + "PANET.NORM": _norm,
}


def add_key_rule(key: str, rule: Rule) -> None:
    """Adds the rule of a config key whose values a component defines, e.g. the names of a
    registry the modeling package owns (``MODEL.RETINANET.HEAD_NAME``): the component adds it
    when it is imported, so validation needs none of its code."""
    KEY_RULES[key] = rule


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
    # Steps beyond MAX_ITER are allowed: detectron2 ignores them (with a warning), and a short
    # run of a full config (`SOLVER.MAX_ITER 10`) relies on that.
    yield from check(
        "SOLVER.STEPS",
        all(isinstance(s, int) and s > 0 for s in solver_cfg.STEPS)
        and _increasing(solver_cfg.STEPS),
        "must be positive and strictly increasing",
    )
    betas = list(solver_cfg.ADAMW_BETAS)
    yield from check(
        "SOLVER.ADAMW_BETAS",
        len(betas) == 2 and all(in_interval(0, 1, high_open=True)(b) is None for b in betas),
        "must be (beta1, beta2), each in [0, 1)",
    )


def _model_errors(cfg: CfgNode, check: Check) -> Iterator[str]:
    retina, anchors = cfg.MODEL.RETINANET, cfg.MODEL.ANCHOR_GENERATOR
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
    resnets = cfg.MODEL.RESNETS
    yield from check(
        "MODEL.RESNETS.RES2_OUT_CHANNELS",
        resnets.DEPTH not in (18, 34) or resnets.RES2_OUT_CHANNELS == 64,
        f"must be 64 with MODEL.RESNETS.DEPTH {resnets.DEPTH} (detectron2's basic blocks)",
    )
    # GroupNorm has 32 groups: the FPN's, PANet's and head's layers have FPN.OUT_CHANNELS.
    group_norms = [f"MODEL.{k}" for k in ("FPN.NORM", "RETINANET.NORM", "PANET.NORM")]
    group_norms = [k for k in group_norms if config_value(cfg, k) == "GN"]
    channels = cfg.MODEL.FPN.OUT_CHANNELS
    yield from check(
        "MODEL.FPN.OUT_CHANNELS",
        not group_norms or not isinstance(channels, int) or channels % 32 == 0,
        f"must be a multiple of 32 with {', '.join(group_norms)} 'GN' (GroupNorm, 32 groups)",
    )


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
    """The normalization, the sizes and the training sampler."""
    model, inputs = cfg.MODEL, cfg.INPUT
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
    sizes_valid = bool(sizes) and all(isinstance(s, int) and s > 0 for s in sizes)
    yield from check(
        "INPUT.MIN_SIZE_TRAIN", sizes_valid, "must be one or more positive pixel sizes"
    )
    yield from check(
        "INPUT.MIN_SIZE_TRAIN",
        inputs.MIN_SIZE_TRAIN_SAMPLING != "range" or len(sizes) == 2,
        "must be (min, max) with INPUT.MIN_SIZE_TRAIN_SAMPLING 'range'",
    )
    # detectron2's ResizeShortestEdge caps the longer edge at MAX_SIZE: below the shorter edge's
    # size, the shorter edge never reaches that size.
    largest = {"TRAIN": max(sizes) if sizes_valid else 0, "TEST": inputs.MIN_SIZE_TEST}
    for split, min_size in largest.items():
        max_size = inputs[f"MAX_SIZE_{split}"]
        yield from check(
            f"INPUT.MAX_SIZE_{split}",
            not all(isinstance(v, (int, float)) for v in (min_size, max_size))
            or max_size >= min_size,
            f"must be >= the largest INPUT.MIN_SIZE_{split} ({min_size}): it caps the longer "
            "edge, so the shorter one would never reach that size",
        )
    samplers = [
        name
        for name, needs in _TRAIN_SAMPLERS.items()
        if needs is None or needs in cfg.DATALOADER  # RANDOM_SUBSET_RATIO: detectron2 main
    ]
    sampler_rule = one_of(samplers)(cfg.DATALOADER.SAMPLER_TRAIN)
    yield from check(
        "DATALOADER.SAMPLER_TRAIN",
        sampler_rule is None,
        f"{sampler_rule} (the samplers of detectron2's build_detection_train_loader)",
    )


def _augmentation_errors(cfg: CfgNode, check: Check) -> Iterator[str]:
    aug = cfg.INPUT.AUG
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
    for rules in COMPONENT_RULES:
        yield from config_errors(cfg, rules)
    yield from key_errors(cfg, KEY_RULES)
    check = _checker(cfg)
    for area in _AREAS:
        yield from area(cfg, check)


def _feature_errors(cfg: CfgNode) -> Iterator[str]:
    """MODEL.RETINANET.IN_FEATURES against the features the config's backbone outputs (which
    the anchors are made for), asked of the backbone itself built on the "meta" device, which
    allocates and initializes nothing."""
    if not issubclass(META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE), RetinaNet):
        return
    probe = cfg.clone()
    probe.defrost()
    probe.MODEL.TIMM.WEIGHTS = ""  # the feature names do not depend on the weights
    try:
        # torch's device context is scoped to this block and this thread.
        with torch.device("meta"):
            outputs = build_backbone(probe).output_shape()
    except UserError:
        raise
    except Exception:
        # Not a rule of this module: the model's own build raises it again, with its traceback.
        return
    in_features = list(cfg.MODEL.RETINANET.IN_FEATURES)
    missing = [f for f in in_features if f not in outputs]
    if missing:
        yield (
            f"MODEL.RETINANET.IN_FEATURES = {in_features!r}: names {missing}, which the backbone "
            f"{cfg.MODEL.BACKBONE.NAME} does not output; name some of {sorted(outputs)}"
        )


def _raise(source: str, errors) -> None:
    if len(errors) == 1:
        raise ConfigError(f"{source}: invalid config value: {errors[0]}")
    if errors:
        raise ConfigError(f"{source}: invalid config values:\n  " + "\n  ".join(errors))


def validate_config(cfg: CfgNode, source: str) -> None:
    """Checks the values of a plugin config (after ``add_retinanet_config`` and any merges).

    Args:
        cfg: the config.
        source: where the config came from (usually its file), named in the error.

    Raises:
        ConfigError: naming ``source`` and every invalid key, its value and the rule it breaks;
            when every value is valid, ``MODEL.RETINANET.IN_FEATURES`` naming a level the
            backbone does not output.
    """
    errors = list(config_value_errors(cfg))
    # The backbone is asked for its features only with names and values it can be built from.
    _raise(source, errors or list(_feature_errors(cfg)))


# The COCO box metrics detectron2's COCOEvaluator reports, beside "AP-<class name>".
_COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _model_selection_errors(cfg: CfgNode) -> List[str]:
    """TEST.BEST_METRIC names a metric the training's evaluations report, and early stopping
    has evaluations to count."""
    metric, test_sets = cfg.TEST.BEST_METRIC, list(cfg.DATASETS.TEST)
    errors = []
    if cfg.TEST.EARLY_STOPPING_PATIENCE and not (cfg.TEST.EVAL_PERIOD and metric and test_sets):
        errors.append(
            f"TEST.EARLY_STOPPING_PATIENCE = {cfg.TEST.EARLY_STOPPING_PATIENCE}: early stopping "
            "counts evaluations without a new best TEST.BEST_METRIC; it needs TEST.EVAL_PERIOD "
            "> 0, a TEST.BEST_METRIC and DATASETS.TEST (or set it to 0)"
        )
    if not metric:
        return errors
    parts = metric.split("/")
    ema = parts[0] == "ema"
    if ema:
        parts = parts[1:]
    dataset_ok = len(test_sets) < 2 or (len(parts) == 3 and parts[0] in test_sets)
    if len(test_sets) > 1:
        parts = parts[1:]
    if ema and not cfg.MODEL_EMA.ENABLED:
        errors.append(
            f"TEST.BEST_METRIC = {metric!r}: the EMA's metrics need MODEL_EMA.ENABLED True "
            "(or name the model's metric, without 'ema/')"
        )
    elif not (
        dataset_ok
        and len(parts) == 2
        and parts[0] == "bbox"
        and (parts[1] in _COCO_METRICS or parts[1].startswith("AP-"))
    ):
        prefix = "<dataset>/" if len(test_sets) > 1 else ""
        errors.append(
            f"TEST.BEST_METRIC = {metric!r}: must be a box metric as metrics.json names it, "
            f"'{prefix}bbox/<metric>' ('ema/{prefix}bbox/<metric>' for the EMA's), <metric> one "
            f"of {', '.join(_COCO_METRICS)} or AP-<class name>"
            + (f", <dataset> one of {test_sets}" if prefix else "")
            + "; or '' for no model_best.pth"
        )
    return errors


def validate_training(cfg: CfgNode, source: str, shortened_run: bool = False) -> None:
    """Checks what matters only when training starts from ``cfg`` (a valid config): a saved
    config of a short run can still be evaluated or exported.

    Args:
        cfg: the config.
        source: where the config came from, named in the error.
        shortened_run: whether ``SOLVER.MAX_ITER`` was lowered by a command-line override, not
            ``SOLVER.WARMUP_ITERS`` (a short trial run of a config): a warm-up longer than the
            run is then logged as a warning instead of refused.

    Raises:
        ConfigError: a warm-up longer than the run, or mixed precision on a device without CUDA.
    """
    errors = []
    solver_cfg = cfg.SOLVER
    if solver_cfg.WARMUP_ITERS > solver_cfg.MAX_ITER:
        # detectron2 stretches the warm-up over the whole run: the LR reaches BASE_LR at its end.
        what = (
            f"SOLVER.WARMUP_ITERS = {solver_cfg.WARMUP_ITERS} is longer than the run "
            f"(SOLVER.MAX_ITER = {solver_cfg.MAX_ITER}): the learning rate would rise during the "
            "whole run and reach SOLVER.BASE_LR only at its end"
        )
        if not shortened_run:
            errors.append(f"{what}; set SOLVER.WARMUP_ITERS <= {solver_cfg.MAX_ITER}")
        else:
            logger.warning("%s: %s", source, what)
    errors += _model_selection_errors(cfg)
    # detectron2's AMPTrainer (0.6 and main) autocasts and scales gradients on CUDA only.
    if solver_cfg.AMP.ENABLED and torch.device(cfg.MODEL.DEVICE).type != "cuda":
        errors.append(
            f"SOLVER.AMP.ENABLED = True: detectron2's mixed-precision trainer needs CUDA, but "
            f"MODEL.DEVICE = {cfg.MODEL.DEVICE!r}; set SOLVER.AMP.ENABLED False (or MODEL.DEVICE "
            "cuda)"
        )
    _raise(source, errors)
