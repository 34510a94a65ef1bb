"""Config keys the plugin adds to detectron2's defaults.

detectron2 already defines ``MODEL.RETINANET.*`` (classes, IoU thresholds, focal-loss alpha and
gamma, inference thresholds, ...) and ``MODEL.ANCHOR_GENERATOR.*``; this adds only what the
plugin's components read beyond those. Every default reproduces the paper's RetinaNet.
"""
import os
from typing import Sequence

from detectron2.config import CfgNode as CN


def add_retinanet_config(cfg: CN) -> None:
    """Adds the plugin's config keys to ``cfg`` in place (idempotent).

    Args:
        cfg: a detectron2 config, usually from ``detectron2.config.get_cfg()``.
    """
    _C = cfg
    was_frozen = _C.is_frozen()
    _C.defrost()

    # Name of the dense head in retinanet_plugin's RETINANET_HEAD_REGISTRY.
    _C.MODEL.RETINANET.HEAD_NAME = "FocalLossHead"
    # Classification loss: "focal" is FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t) with
    # FOCAL_LOSS_ALPHA / FOCAL_LOSS_GAMMA (gamma 0 = alpha-balanced cross-entropy);
    # "focal_star" is the paper's appendix variant FL* = -log(sigmoid(gamma* x_t + beta)) / gamma*.
    _C.MODEL.RETINANET.CLS_LOSS_TYPE = "focal"
    # gamma* and beta of FL* (the paper's appendix reports gamma* = 4, beta = 0 as best).
    _C.MODEL.RETINANET.FOCAL_LOSS_STAR_GAMMA = 4.0
    _C.MODEL.RETINANET.FOCAL_LOSS_STAR_BETA = 0.0
    # What the summed losses are divided by: "ema" = an exponential moving average of the number
    # of foreground anchors per batch (detectron2's default; steadier with few images per GPU),
    # "batch" = the number of foreground anchors in this batch, at least 1 (the paper).
    _C.MODEL.RETINANET.LOSS_NORMALIZER = "ema"
    # Momentum and starting value of the "ema" normalizer (detectron2: 0.9 and 100).
    _C.MODEL.RETINANET.LOSS_NORMALIZER_MOMENTUM = 0.9
    _C.MODEL.RETINANET.LOSS_NORMALIZER_INIT = 100.0

    # RetinaNetAnchorGenerator: every size in MODEL.ANCHOR_GENERATOR.SIZES is expanded to
    # SCALES_PER_OCTAVE sizes size * 2^(i / SCALES_PER_OCTAVE), i = 0 .. SCALES_PER_OCTAVE - 1
    # (the paper: 3 scales, sizes 32..512 on P3..P7, so 9 anchors per location with 3 ratios).
    _C.MODEL.ANCHOR_GENERATOR.SCALES_PER_OCTAVE = 3

    # Precision of the backbone and head at inference: "float32", or "bfloat16" (autocast on CPUs
    # with bf16 support, e.g. avx512_bf16 / AMX, and on GPUs). Box decoding, scores and NMS stay
    # in float32. Training is unaffected (see SOLVER.AMP for mixed-precision training on GPU).
    _C.MODEL.INFERENCE_DTYPE = "float32"

    # Optimizer: "SGD" (detectron2's, with SOLVER.MOMENTUM) or "AdamW" (SOLVER.ADAMW_BETAS,
    # no weight decay on norm and bias parameters). BASE_LR and WEIGHT_DECAY apply to both.
    _C.SOLVER.OPTIMIZER = "SGD"
    _C.SOLVER.ADAMW_BETAS = (0.9, 0.999)

    # COCO evaluation backend: "faster_coco_eval" (the faster-coco-eval package: same numbers as
    # pycocotools, several times faster) or "pycocotools" (the official implementation). Falls
    # back to pycocotools, with a warning, when faster-coco-eval is not installed.
    _C.TEST.COCO_EVAL_BACKEND = "faster_coco_eval"

    if was_frozen:
        _C.freeze()


def get_config_file(name: str) -> str:
    """Path of one of the plugin's configs, e.g. ``get_config_file("retinanet_R50_FPN_1x.yaml")``.

    Works from a checkout and from an installed package (the configs ship as package data).
    """
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"retinanet_plugin has no config {name!r} (looked for {path})")
    return path


def config_sets_key(config_file: str, opts: Sequence[str], key: str) -> bool:
    """Whether ``key`` (e.g. "MODEL.RETINANET.NUM_CLASSES") is set by ``config_file`` (with its
    ``_BASE_`` chain) or by the ``KEY VALUE`` overrides ``opts``, rather than left at its default.

    Raises:
        ConfigError: ``config_file`` cannot be loaded safely (see ``load_yaml_safely``).
    """
    # Imported here: config_validation imports this module (for add_retinanet_config).
    from .config_validation import load_yaml_safely

    if key in list(opts)[::2]:
        return True
    # Safe loading: never run the Python tags of an untrusted file (see config_validation).
    node = load_yaml_safely(config_file)
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True
