"""Config keys the plugin adds to detectron2's defaults.

detectron2 already defines ``MODEL.RETINANET.*`` (classes, IoU thresholds, focal-loss alpha and
gamma, inference thresholds, ...) and ``MODEL.ANCHOR_GENERATOR.*``; this adds only what the
plugin's components read beyond those. The defaults reproduce the paper's RetinaNet, except
where detectron2's RetinaNet (which the plugin equals by default) differs: the loss normalizer is
detectron2's moving average of the foreground count ("ema"), the paper divides by each batch's
count ("batch").
"""

import os

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg as get_detectron2_cfg


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
    # "focal_star" is the paper's appendix variant FL* = -log(sigmoid(gamma* x_t + beta)) / gamma*;
    # "ohem" is the Table 1d baseline: sigmoid cross-entropy averaged over online hard examples.
    _C.MODEL.RETINANET.CLS_LOSS_TYPE = "focal"
    # CLS_LOSS_TYPE "ohem": per image, the non-ignored anchors are scored by their cross-entropy,
    # NMS with IoU threshold OHEM_NMS_THRESH runs over their predicted boxes with the loss as
    # score, and the OHEM_BATCH_SIZE_PER_IMAGE highest-loss survivors form the minibatch.
    # OHEM_POSITIVE_FRACTION caps the positives at that fraction of it (0.25 = the paper's
    # "OHEM 1:3"), -1 = no ratio. Paper's best (Table 1d): 128, -1, 0.5.
    _C.MODEL.RETINANET.OHEM_BATCH_SIZE_PER_IMAGE = 128
    _C.MODEL.RETINANET.OHEM_POSITIVE_FRACTION = -1.0
    _C.MODEL.RETINANET.OHEM_NMS_THRESH = 0.5
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
    # with bf16 support, e.g. avx512_bf16 / AMX, and on GPUs), or "auto": bfloat16 where
    # MODEL.DEVICE computes it natively (those CPUs, GPUs), else float32. Box decoding, scores and
    # NMS stay in float32. Training is unaffected (see SOLVER.AMP for mixed-precision training).
    _C.MODEL.INFERENCE_DTYPE = "float32"
    # Speed-ups of backbone and head at inference (retinanet_plugin.modeling
    # .inference_optimization); the detections equal the plain float32 model's up to float
    # rounding. state_dict, checkpoints and training are unaffected; skipped while the model is
    # scripted, traced (export) or compiled as a whole.
    _C.MODEL.INFERENCE_OPTIMIZATION = CN()
    # Fold each FrozenBatchNorm2d into the convolution before it (in a copy of the backbone that
    # shares all other weights, rebuilt when a weight changes).
    _C.MODEL.INFERENCE_OPTIMIZATION.FOLD_FROZEN_BN = True
    # Run backbone and head on channels-last tensors (the layout oneDNN and cuDNN prefer); where
    # WINOGRAD applies (CPU, float32), whose convolutions need (N, C, H, W), only the backbone.
    _C.MODEL.INFERENCE_OPTIMIZATION.CHANNELS_LAST = True
    # On CPU in float32: compute the 3x3 stride-1 convolutions on large feature maps (at least
    # 56x56 positions and 128 channels) by NNPACK's Winograd algorithm, which ships with torch
    # (retinanet_plugin.modeling.winograd). No effect on GPU, under bfloat16 or with COMPILE.
    _C.MODEL.INFERENCE_OPTIMIZATION.WINOGRAD = True
    # torch.compile backbone and head (inductor; CPU: with weight freezing), with dynamic shapes:
    # images of new sizes reuse the compiled graphs instead of compiling per size. The first call
    # compiles (minutes on a few CPU cores), and so does the first call after a weight changes.
    _C.MODEL.INFERENCE_OPTIMIZATION.COMPILE = False
    # Speed-ups of training; losses and gradients equal the plain model's up to float rounding.
    _C.MODEL.TRAINING_OPTIMIZATION = CN()
    # Run backbone and head on channels-last tensors in training (the images are converted; the
    # weights and checkpoints keep their layout).
    _C.MODEL.TRAINING_OPTIMIZATION.CHANNELS_LAST = False
    # On CPU: the Winograd convolutions of INFERENCE_OPTIMIZATION.WINOGRAD in training: forward,
    # inputs' gradients (NNPACK) and kernels' gradients (F(2x2, 3x3)). Needs the (N, C, H, W)
    # layout: no effect with CHANNELS_LAST, on GPU or under autocast.
    _C.MODEL.TRAINING_OPTIMIZATION.WINOGRAD = True

    # Optimizer: "SGD" (detectron2's, with SOLVER.MOMENTUM) or "AdamW" (SOLVER.ADAMW_BETAS,
    # no weight decay on norm and bias parameters). BASE_LR and WEIGHT_DECAY apply to both.
    _C.SOLVER.OPTIMIZER = "SGD"
    _C.SOLVER.ADAMW_BETAS = (0.9, 0.999)
    # SOLVER.LR_SCHEDULER_NAME also takes "WarmupPolyLR": LR multiplier (1 - iter/MAX_ITER)^power
    # after warmup, with this power (0.9 as in DeepLab), and "WarmupExponentialLR": the LR falls
    # geometrically to this fraction of BASE_LR at MAX_ITER (0.01 = where the default step
    # schedule, GAMMA 0.1 twice, ends).
    _C.SOLVER.POLY_LR_POWER = 0.9
    _C.SOLVER.EXPONENTIAL_LR_FINAL_FACTOR = 0.01

    # timm backbones (MODEL.BACKBONE.NAME "build_retinanet_timm_fpn_backbone" or
    # "build_retinanet_timm_panet_backbone"; needs `pip install retinanet_plugin[timm]`).
    _C.MODEL.TIMM = CN()
    # timm model name, e.g. "efficientnet_b0", "resnext50_32x4d".
    _C.MODEL.TIMM.NAME = "resnet50"
    # Indices of timm's feature levels (its `feature_info`) fed to the FPN. Each is named
    # "res<k>" after its stride 2^k, so that MODEL.FPN.IN_FEATURES can name them; (2, 3, 4) gives
    # res3..res5 (strides 8..32) on most CNNs.
    _C.MODEL.TIMM.OUT_INDICES = (2, 3, 4)
    # Local timm checkpoint (.pth/.bin/.safetensors of the whole timm model) to start from;
    # "" = random initialization. Nothing is ever downloaded.
    _C.MODEL.TIMM.WEIGHTS = ""
    # Batch norm of the timm model: "FrozenBN" (fixed statistics and affine, for fine-tuning
    # pretrained weights with few images per GPU, as detectron2's ResNets), "BN" (trained as is)
    # or "SyncBN" (synchronised across GPUs).
    _C.MODEL.TIMM.NORM = "FrozenBN"
    # Keyword arguments of the timm model's constructor, as timm.create_model(NAME, **MODEL_ARGS),
    # set in a config file: e.g. `MODEL_ARGS: {channels: [64, 128, 256, 256]}` gives a timm ResNet
    # a narrower last stage, `{drop_path_rate: 0.1}` stochastic depth. Empty: timm's model as is.
    _C.MODEL.TIMM.MODEL_ARGS = CN(new_allowed=True)

    # PANet bottom-up path augmentation on the FPN outputs (MODEL.BACKBONE.NAME
    # "build_retinanet_resnet_panet_backbone" / "build_retinanet_timm_panet_backbone"): norm of
    # its 3x3 convs ("" = none, "GN", "BN", ... as MODEL.FPN.NORM); each conv is followed by ReLU.
    _C.MODEL.PANET = CN()
    _C.MODEL.PANET.NORM = ""

    # COCO evaluation backend: "faster_coco_eval" (the faster-coco-eval package: same numbers as
    # pycocotools, several times faster) or "pycocotools" (the official implementation). Falls
    # back to pycocotools, with a warning, when faster-coco-eval is not installed.
    _C.TEST.COCO_EVAL_BACKEND = "faster_coco_eval"

    # With DATALOADER.SAMPLER_TRAIN "RepeatFactorTrainingSampler": an image is repeated
    # max(1, sqrt(t / f)) times per epoch if True (LVIS), max(1, t / f) if False, where t is
    # DATALOADER.REPEAT_THRESHOLD and f the fraction of training images holding the image's
    # rarest class. detectron2 main's key, added here for detectron2 0.6, which lacks it.
    if "REPEAT_SQRT" not in _C.DATALOADER:
        _C.DATALOADER.REPEAT_SQRT = True

    # An exponential moving average (EMA) of the weights, updated after every training step:
    # ema = DECAY * ema + (1 - DECAY) * weights (floating-point parameters and buffers). Each
    # evaluation then also evaluates the EMA (metrics "ema/bbox/AP", ...), checkpoints hold it
    # for --resume, and model_final_ema.pth holds its final weights. It starts from the weights
    # at the first iteration, whose share after n iterations is DECAY^n: choose DECAY with
    # DECAY^SOLVER.MAX_ITER small (0.999: 5e-5 after 10k iterations; 0.99 for ~1000 iterations).
    if "MODEL_EMA" not in _C:  # the section of d2go's EMA, which detectron2 lacks
        _C.MODEL_EMA = CN({"ENABLED": False, "DECAY": 0.999})
    # The evaluation metric (its name in metrics.json) that picks model_best.pth: after every
    # evaluation of TEST.EVAL_PERIOD > 0, the weights evaluated are written there if the metric
    # is the highest so far. "bbox/AP" with one test dataset, "<dataset>/bbox/AP" with several,
    # "ema/bbox/AP" for the EMA's weights, or another COCO metric (AP50, APs, "AP-<class>").
    # "" = no model_best.pth.
    _C.TEST.BEST_METRIC = "bbox/AP"
    # Early stopping: training ends after this many evaluations in a row without a new best
    # TEST.BEST_METRIC (writing model_final.pth and the final weights then). 0 = off.
    _C.TEST.EARLY_STOPPING_PATIENCE = 0

    # Training augmentations beyond detectron2's resize and flip (retinanet_plugin.data
    # .augmentations and .mixing), all off by default (the paper's setting). Each section has
    # ENABLED and PROB: the probability of applying it to an image.
    _C.INPUT.AUG = CN()
    # Rotation by an angle drawn uniformly in ANGLE (degrees, counter-clockwise), before the
    # resize; boxes become the boxes around their rotated corners. EXPAND: enlarge the image to
    # hold all of the rotated one (else keep its size and cut the corners off).
    _C.INPUT.AUG.ROTATION = CN({"ENABLED": False, "PROB": 0.5})
    _C.INPUT.AUG.ROTATION.ANGLE = (-10.0, 10.0)
    _C.INPUT.AUG.ROTATION.EXPAND = True
    # Scale-and-crop (detectron2's large-scale jitter) instead of the shortest-edge resize:
    # resize to fit SIZE (height, width) times a scale drawn uniformly in SCALE_RANGE, then crop
    # a random SIZE window (padding smaller images); boxes are clipped, emptied ones removed.
    _C.INPUT.AUG.SCALE_CROP = CN({"ENABLED": False, "PROB": 0.5})
    _C.INPUT.AUG.SCALE_CROP.SCALE_RANGE = (0.1, 2.0)
    _C.INPUT.AUG.SCALE_CROP.SIZE = (1024, 1024)
    # Color jitter: brightness, contrast and saturation factors drawn uniformly in these
    # (min, max) ranges (1 = unchanged), applied together with probability PROB.
    _C.INPUT.AUG.COLOR_JITTER = CN({"ENABLED": False, "PROB": 0.5})
    _C.INPUT.AUG.COLOR_JITTER.BRIGHTNESS = (0.8, 1.2)
    _C.INPUT.AUG.COLOR_JITTER.CONTRAST = (0.8, 1.2)
    _C.INPUT.AUG.COLOR_JITTER.SATURATION = (0.8, 1.2)
    # Mosaic: the image and 3 random others as a 2x2 grid around a center drawn uniformly in
    # CENTER_RANGE times the image's width and height; boxes cut to MIN_SIZE pixels or less in
    # width or height are dropped.
    _C.INPUT.AUG.MOSAIC = CN({"ENABLED": False, "PROB": 0.5})
    _C.INPUT.AUG.MOSAIC.CENTER_RANGE = (0.25, 0.75)
    _C.INPUT.AUG.MOSAIC.MIN_SIZE = 2.0
    # MixUp: lambda * image + (1 - lambda) * a random other image, lambda ~ Beta(ALPHA, ALPHA);
    # keeps the boxes of both, unweighted.
    _C.INPUT.AUG.MIXUP = CN({"ENABLED": False, "PROB": 0.5})
    _C.INPUT.AUG.MIXUP.ALPHA = 1.5
    # CutMix: a rectangle of about (1 - lambda) of the area, lambda ~ Beta(ALPHA, ALPHA), from
    # a random other image; boxes with less than MIN_VISIBLE of their area visible are dropped.
    _C.INPUT.AUG.CUTMIX = CN({"ENABLED": False, "PROB": 0.5})
    _C.INPUT.AUG.CUTMIX.ALPHA = 1.0
    _C.INPUT.AUG.CUTMIX.MIN_VISIBLE = 0.3

    if was_frozen:
        _C.freeze()


def get_cfg() -> CN:
    """detectron2's ``get_cfg()`` with the plugin's keys: a config that the plugin's YAML files
    merge into, for detectron2's tools and ``DefaultPredictor`` (docs/detectron2_tools.md)::

        from retinanet_plugin import get_cfg   # instead of: from detectron2.config import get_cfg

        cfg = get_cfg()
        cfg.merge_from_file("configs/retinanet_R50_FPN_1x.yaml")
    """
    cfg = get_detectron2_cfg()
    add_retinanet_config(cfg)
    return cfg


def get_config_file(name: str) -> str:
    """Path of one of the plugin's configs, e.g. ``get_config_file("retinanet_R50_FPN_1x.yaml")``.

    Works from a checkout and from an installed package (the configs ship as package data).
    """
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(package, "configs", name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"retinanet_plugin has no config {name!r} (looked for {path})")
    return path
