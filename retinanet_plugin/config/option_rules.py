"""The rules on the options of the plugin's components, one table per component.

Each table maps a constructor argument to its config key and rule (see :mod:`.rules`). The
component's constructor checks its arguments against its table, and config validation checks a
config's values against all of them, so each rule is written once and config validation needs
none of the components' code.
"""

from .rules import OptionRules, above, at_least, in_interval, one_of

__all__ = [
    "ANCHOR_GENERATOR_RULES",
    "BACKENDS",
    "BOX_REG_LOSS_TYPES",
    "CLS_LOSS_TYPES",
    "COMPONENT_RULES",
    "EVALUATION_RULES",
    "HEAD_RULES",
    "INFERENCE_DTYPE_NAMES",
    "LOSS_NORMALIZERS",
    "LR_SCHEDULERS",
    "META_ARCH_RULES",
    "OHEM_NO_RATIO",
    "OPTIMIZERS",
    "SOLVER_RULES",
    "TIMM_NORMS",
    "TIMM_RULES",
    "WARMUP_METHODS",
]

# -- FocalLossRetinaNet ----------------------------------------------------------------------
CLS_LOSS_TYPES = ("focal", "focal_star", "ohem")
# Those of detectron2's _dense_box_regression_loss ("smooth_l1" with beta 0 is the L1 loss).
BOX_REG_LOSS_TYPES = ("smooth_l1", "giou", "diou", "ciou")
LOSS_NORMALIZERS = ("ema", "batch")
INFERENCE_DTYPE_NAMES = ("float32", "bfloat16", "auto")
# OHEM_POSITIVE_FRACTION meaning "no ratio": the hardest examples whatever their class.
OHEM_NO_RATIO = -1.0

_RETINANET = "MODEL.RETINANET."
META_ARCH_RULES: OptionRules = {
    "cls_loss_type": (_RETINANET + "CLS_LOSS_TYPE", one_of(CLS_LOSS_TYPES)),
    "box_reg_loss_type": (_RETINANET + "BBOX_REG_LOSS_TYPE", one_of(BOX_REG_LOSS_TYPES)),
    "loss_normalizer": (_RETINANET + "LOSS_NORMALIZER", one_of(LOSS_NORMALIZERS)),
    "inference_dtype": ("MODEL.INFERENCE_DTYPE", one_of(INFERENCE_DTYPE_NAMES)),
    "focal_loss_gamma": (_RETINANET + "FOCAL_LOSS_GAMMA", at_least(0)),
    # As focal_loss.py (`if alpha >= 0`): any negative alpha turns the weighting off.
    "focal_loss_alpha": (
        _RETINANET + "FOCAL_LOSS_ALPHA",
        lambda alpha: None if alpha <= 1 else "must be in [0, 1], or negative for no weighting",
    ),
    "focal_loss_star_gamma": (_RETINANET + "FOCAL_LOSS_STAR_GAMMA", above(0)),
    "smooth_l1_beta": (_RETINANET + "SMOOTH_L1_LOSS_BETA", at_least(0)),
    "ohem_batch_size_per_image": (_RETINANET + "OHEM_BATCH_SIZE_PER_IMAGE", at_least(1)),
    "ohem_positive_fraction": (
        _RETINANET + "OHEM_POSITIVE_FRACTION",
        in_interval(0, 1, low_open=True, or_equal_to=(OHEM_NO_RATIO,), meaning="(no ratio)"),
    ),
    "ohem_nms_thresh": (_RETINANET + "OHEM_NMS_THRESH", in_interval(0, 1)),
    "test_score_thresh": (_RETINANET + "SCORE_THRESH_TEST", in_interval(0, 1)),
    "test_nms_thresh": (_RETINANET + "NMS_THRESH_TEST", in_interval(0, 1)),
    "test_topk_candidates": (_RETINANET + "TOPK_CANDIDATES_TEST", at_least(1)),
}

# -- FocalLossHead ---------------------------------------------------------------------------
HEAD_RULES: OptionRules = {
    "prior_prob": (_RETINANET + "PRIOR_PROB", in_interval(0, 1, low_open=True, high_open=True)),
    "num_convs": (_RETINANET + "NUM_CONVS", at_least(1)),
}

# -- RetinaNetAnchorGenerator ----------------------------------------------------------------
ANCHOR_GENERATOR_RULES: OptionRules = {
    "scales_per_octave": ("MODEL.ANCHOR_GENERATOR.SCALES_PER_OCTAVE", at_least(1)),
}

# -- timm backbones --------------------------------------------------------------------------
TIMM_NORMS = ("FrozenBN", "BN", "SyncBN")
TIMM_RULES: OptionRules = {"norm": ("MODEL.TIMM.NORM", one_of(TIMM_NORMS))}

# -- optimizers and schedules ----------------------------------------------------------------
OPTIMIZERS = ("SGD", "AdamW")
# The first two are detectron2's own; all four are warmup + an fvcore ParamScheduler.
LR_SCHEDULERS = ("WarmupMultiStepLR", "WarmupCosineLR", "WarmupPolyLR", "WarmupExponentialLR")
WARMUP_METHODS = ("linear", "constant")  # detectron2's WarmupParamScheduler
SOLVER_RULES: OptionRules = {
    "optimizer": ("SOLVER.OPTIMIZER", one_of(OPTIMIZERS)),
    "lr_scheduler_name": ("SOLVER.LR_SCHEDULER_NAME", one_of(LR_SCHEDULERS)),
    "warmup_method": ("SOLVER.WARMUP_METHOD", one_of(WARMUP_METHODS)),
}

# -- COCO evaluation -------------------------------------------------------------------------
BACKENDS = ("faster_coco_eval", "pycocotools")
EVALUATION_RULES: OptionRules = {"backend": ("TEST.COCO_EVAL_BACKEND", one_of(BACKENDS))}

# Every table, for config validation.
COMPONENT_RULES = (
    META_ARCH_RULES,
    HEAD_RULES,
    ANCHOR_GENERATOR_RULES,
    TIMM_RULES,
    SOLVER_RULES,
    EVALUATION_RULES,
)
