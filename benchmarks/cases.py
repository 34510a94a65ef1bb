"""What each benchmark runs: per case, the implementations compared and how to build them.

A case maps implementation names to factories ``factory(args, device) -> fn``; ``fn()`` is one
timed call. Factories build only their own implementation, so a memory run (one process per
implementation) loads nothing else. An inference ``fn`` also carries ``fn.stages`` (per-stage
times and candidate counts, :mod:`benchmarks.stages`) and ``fn.setup_s`` (its first call, which
compiles where torch.compile is on).

Every R50-FPN model gets the same calibrated weights (:mod:`benchmarks.calibration`): activations
and score distribution as a trained model's, ``--calibrated-fraction`` of the (anchor, class)
scores above the 0.05 threshold.
"""

import contextlib
import io
import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List

import torch
from torch.nn import functional as F

import retinanet_plugin  # noqa: F401  (registers the plugin's components)
from benchmarks.calibration import calibrate
from benchmarks.stages import stage_timer
from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer as build_detectron2_optimizer
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import EventStorage
from retinanet_plugin import focal_loss_from_labels, get_config_file, sigmoid_focal_loss
from retinanet_plugin.config.loading import load_config
from retinanet_plugin.engine.solver import build_optimizer as build_plugin_optimizer
from retinanet_plugin.evaluation.coco_evaluation import coco_eval_class

DETECTRON2 = "detectron2 RetinaNet"
PLUGIN = "plugin"
PLUGIN_BF16 = "plugin, bfloat16"
# Each inference speed-up alone and together (the contributions cases): name -> config options.
_SPEEDUPS = "MODEL.INFERENCE_OPTIMIZATION."
_NO_SPEEDUPS = (
    _SPEEDUPS + "FOLD_FROZEN_BN",
    False,
    _SPEEDUPS + "CHANNELS_LAST",
    False,
    _SPEEDUPS + "WINOGRAD",
    False,
)
PLUGIN_PLAIN = "plugin, no speed-ups"
INFERENCE_VARIANTS = {
    PLUGIN_PLAIN: _NO_SPEEDUPS,
    "plugin + FrozenBN folding": (*_NO_SPEEDUPS, _SPEEDUPS + "FOLD_FROZEN_BN", True),
    "plugin + channels-last": (*_NO_SPEEDUPS, _SPEEDUPS + "CHANNELS_LAST", True),
    "plugin + Winograd": (*_NO_SPEEDUPS, _SPEEDUPS + "WINOGRAD", True),
    "plugin + folding + channels-last": (_SPEEDUPS + "WINOGRAD", False),
    "plugin + folding + Winograd": (_SPEEDUPS + "CHANNELS_LAST", False),
    "plugin + folding + channels-last + Winograd (default)": (),
    "plugin + compile": (*_NO_SPEEDUPS, _SPEEDUPS + "COMPILE", True),
    "plugin + folding + channels-last + compile": (_SPEEDUPS + "COMPILE", True),
}
_NO_TRAINING_WINOGRAD = ("MODEL.TRAINING_OPTIMIZATION.WINOGRAD", False)
TRAINING_VARIANTS = {
    PLUGIN_PLAIN: _NO_TRAINING_WINOGRAD,
    "plugin + channels-last": (
        *_NO_TRAINING_WINOGRAD,
        "MODEL.TRAINING_OPTIMIZATION.CHANNELS_LAST",
        True,
    ),
    "plugin + Winograd (default)": (),
}
STRIDES = (8, 16, 32, 64, 128)

Factory = Callable[[object, torch.device], Callable[[], object]]


@dataclass
class Case:
    """One benchmark figure.

    Attributes:
        description: what is measured, with the sizes (``format``-ed with the arguments).
        reference: the implementation the ratios are relative to.
        impls: implementation name -> factory.
        images_per_call: images one call processes (for throughput), from the arguments.
        slow: calls take many seconds at the default sizes: at most 3 timed repetitions, and
            one call (not two) for the peak memory.
        memory: whether peak memory is measured (one process per implementation).
    """

    description: str
    reference: str
    impls: Dict[str, Factory]
    images_per_call: Callable[[object], int] = field(default=lambda args: 1)
    slow: bool = False
    memory: bool = True


# ---------------------------------------------------------------------------- models
def _detectron2_cfg(args, device):
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("COCO-Detection/retinanet_R_50_FPN_1x.yaml"))
    return _common(cfg, args, device)


def _plugin_cfg(args, device, *opts):
    return _common(load_config(get_config_file("retinanet_R50_FPN_1x.yaml"), opts), args, device)


def _common(cfg, args, device):
    # No pretrained weights; a tiny LR keeps the from-scratch FrozenBN ResNet finite over the
    # timed steps (the speed of a step does not depend on the LR).
    cfg.merge_from_list(["MODEL.DEVICE", str(device), "MODEL.WEIGHTS", "", "SOLVER.BASE_LR", 1e-5])
    return cfg


def _build(cfg, args=None):
    """The model of ``cfg``; with ``args``, with the calibrated R50-FPN weights."""
    torch.manual_seed(0)
    model = build_model(cfg)
    if args is not None:
        model.load_state_dict(calibrated_weights(args, model.device))
    return model


_CALIBRATED: Dict[tuple, dict] = {}


def calibrated_weights(args, device) -> dict:
    """The R50-FPN state_dict calibrated on the inference image (see module docstring); the same
    for detectron2's model and the plugin's, computed once per process."""
    key = (str(device), args.infer_height, args.infer_width, args.calibrated_fraction)
    if key not in _CALIBRATED:
        model = _build(_detectron2_cfg(args, device))
        _CALIBRATED[key] = calibrate(
            model, _inference_images(args, device, 1), args.calibrated_fraction
        )
    return _CALIBRATED[key]


def _training_batch(args, device) -> List[dict]:
    g = torch.Generator().manual_seed(0)
    size = args.train_size
    batch = []
    for _ in range(args.train_batch):
        xy = torch.rand(5, 2, generator=g) * size * 0.6
        wh = torch.rand(5, 2, generator=g) * size * 0.4 + 16
        instances = Instances((size, size))
        instances.gt_boxes = Boxes(torch.cat([xy, (xy + wh).clamp(max=size - 1)], dim=1))
        instances.gt_classes = torch.randint(0, 80, (5,), generator=g)
        image = torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)
        batch.append({"image": image.to(device), "instances": instances.to(device)})
    return batch


def _train_step(model, optimizer, batch, amp: bool):
    scaler = torch.amp.GradScaler("cuda") if amp else None
    model.train()

    def step():
        with EventStorage(), torch.autocast("cuda", enabled=amp):
            losses = sum(model(batch).values())
        optimizer.zero_grad()
        if scaler is None:
            losses.backward()
            optimizer.step()
        else:
            scaler.scale(losses).backward()
            scaler.step(optimizer)
            scaler.update()

    return step


def _train_impl(build_cfg, build_optimizer, amp: bool, *opts) -> Factory:
    def factory(args, device):
        cfg = build_cfg(args, device, *opts)
        model = _build(cfg, args)
        return _train_step(model, build_optimizer(cfg, model), _training_batch(args, device), amp)

    return factory


def _inference_images(args, device, batch: int) -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    shape = (3, args.infer_height, args.infer_width)
    return [
        torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).to(device)
        for _ in range(batch)
    ]


def _detectron2_style_inference(model, images, device):
    """``model(inputs)`` under no_grad, as detectron2's predictor; its first call (compiling
    where compile is on) is made and timed here, as ``infer.setup_s``."""
    model.eval()
    inputs = [{"image": x, "height": x.shape[1], "width": x.shape[2]} for x in images]

    def infer():
        with torch.no_grad():
            return model(inputs)

    start = time.perf_counter()
    infer()
    infer.setup_s = time.perf_counter() - start
    infer.stages = stage_timer(model, inputs, device)
    return infer


def _plugin_inference_impl(batch_of, *opts) -> Factory:
    def factory(args, device):
        model = _build(_plugin_cfg(args, device, *opts), args)
        return _detectron2_style_inference(
            model, _inference_images(args, device, batch_of(args)), device
        )

    return factory


def _detectron2_inference_impl(batch_of) -> Factory:
    def factory(args, device):
        model = _build(_detectron2_cfg(args, device), args)
        return _detectron2_style_inference(
            model, _inference_images(args, device, batch_of(args)), device
        )

    return factory


def _inference_impls(batch_of: Callable[[object], int], device: torch.device) -> Dict[str, Factory]:
    def plugin_factory(dtype):
        return _plugin_inference_impl(batch_of, "MODEL.INFERENCE_DTYPE", dtype)

    impls = {
        DETECTRON2: _detectron2_inference_impl(batch_of),
        PLUGIN: plugin_factory("float32"),
    }
    if bf16_inference_supported(device):
        impls[PLUGIN_BF16] = plugin_factory("bfloat16")
    return impls


def bf16_inference_supported(device: torch.device) -> bool:
    """bfloat16 autocast is fast here: a CPU with native bf16 (avx512_bf16 / AMX) or a GPU."""
    return device.type == "cuda" or torch.ops.mkldnn._is_mkldnn_bf16_supported()


# ---------------------------------------------------------------------- focal loss
def focal_loss_inputs(args, device):
    """(logits (M, K), one-hot targets (M, K), labels (M,)) of 2 images' anchors: ~0.2% of the
    anchors foreground (a few hundred per image), logits around the prior -log(99)."""
    g = torch.Generator().manual_seed(2)
    rows = args.loss_images * args.loss_anchors
    logits = torch.randn(rows, args.num_classes, generator=g) * 1.5 - 4.6
    labels = torch.full((rows,), args.num_classes, dtype=torch.int64)
    foreground = torch.rand(rows, generator=g) < 0.002
    labels[foreground] = torch.randint(0, args.num_classes, (int(foreground.sum()),), generator=g)
    targets = F.one_hot(labels, args.num_classes + 1)[:, :-1].float()
    return logits.to(device).requires_grad_(True), targets.to(device), labels.to(device)


def _focal_loss_impl(loss_fn, uses_labels=False) -> Factory:
    def factory(args, device):
        logits, targets, labels = focal_loss_inputs(args, device)
        second = labels if uses_labels else targets

        def forward_backward():
            logits.grad = None
            loss_fn(logits, second, alpha=0.25, gamma=2.0, reduction="sum").backward()

        return forward_backward

    return factory


def _fvcore_jit(logits, targets, alpha, gamma, reduction):
    from fvcore.nn import sigmoid_focal_loss_jit

    return sigmoid_focal_loss_jit(logits, targets, alpha, gamma, reduction)


def _torchvision_focal_loss(logits, targets, alpha, gamma, reduction):
    from torchvision.ops import sigmoid_focal_loss as torchvision_sigmoid_focal_loss

    return torchvision_sigmoid_focal_loss(logits, targets, alpha, gamma, reduction)


# name: (loss function, whether it takes labels instead of one-hot targets)
FOCAL_LOSSES = {
    "fvcore sigmoid_focal_loss_jit": (_fvcore_jit, False),
    "torchvision sigmoid_focal_loss": (_torchvision_focal_loss, False),
    "plugin sigmoid_focal_loss": (sigmoid_focal_loss, False),
    "plugin focal_loss_from_labels": (focal_loss_from_labels, True),
}


# ------------------------------------------------------------------ post-processing
def head_outputs(args, device, batch: int):
    """Synthetic head outputs for ``batch`` images: per level (N, A*K, H, W) logits with
    ``args.candidate_fraction`` of them above the 0.05 score threshold, and (N, A*4, H, W)
    deltas. Returns (images, features, (logits, deltas)) for ``forward_inference``."""
    g = torch.Generator().manual_seed(3)
    height, width = args.infer_height, args.infer_width
    normal = torch.distributions.Normal(0.0, 1.0)
    z = float(normal.icdf(torch.tensor(1.0 - args.candidate_fraction)))
    mean = math.log(0.05 / 0.95) - z
    sizes = [(math.ceil(height / s), math.ceil(width / s)) for s in STRIDES]
    features = [torch.zeros(batch, 1, h, w, device=device) for h, w in sizes]
    logits = [torch.randn(batch, 9 * args.num_classes, h, w, generator=g) + mean for h, w in sizes]
    deltas = [torch.randn(batch, 9 * 4, h, w, generator=g) * 0.2 for h, w in sizes]
    images = ImageList(
        torch.zeros(batch, 3, height, width, device=device), [(height, width)] * batch
    )
    return images, features, ([x.to(device) for x in logits], [x.to(device) for x in deltas])


def _postprocess_impl(build_cfg, batch_of) -> Factory:
    def factory(args, device):
        model = _build(build_cfg(args, device)).eval()  # synthetic head outputs: any weights
        images, features, predictions = head_outputs(args, device, batch_of(args))

        def postprocess():
            with torch.no_grad():
                return model.forward_inference(images, features, predictions)

        return postprocess

    return factory


# ------------------------------------------------------------------- COCO evaluation
def synthetic_coco(num_images: int, num_classes: int = 80, seed: int = 4):
    """(ground-truth dict, detections list) in COCO format: 1-15 objects per image of all sizes,
    one jittered detection per object (some missed), false positives up to 100 per image."""
    rng = random.Random(seed)
    images, annotations, detections = [], [], []
    for image_id in range(1, num_images + 1):
        first_detection = len(detections)
        images.append({"id": image_id, "width": 640, "height": 480, "file_name": f"{image_id}.jpg"})
        for _ in range(rng.randint(1, 15)):
            w, h = rng.uniform(4, 300), rng.uniform(4, 300)
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            category = rng.randint(1, num_classes)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
            if rng.random() < 0.85:
                jitter = [rng.gauss(0, 0.1 * w), rng.gauss(0, 0.1 * h)]
                detections.append(
                    {
                        "image_id": image_id,
                        "category_id": category,
                        "score": rng.random(),
                        "bbox": [
                            x + jitter[0],
                            y + jitter[1],
                            w * rng.uniform(0.8, 1.2),
                            h * rng.uniform(0.8, 1.2),
                        ],
                    }
                )
        for _ in range(100 - (len(detections) - first_detection)):
            w, h = rng.uniform(4, 200), rng.uniform(4, 200)
            detections.append(
                {
                    "image_id": image_id,
                    "category_id": rng.randint(1, num_classes),
                    "score": rng.random() * 0.5,
                    "bbox": [rng.uniform(0, 640 - w), rng.uniform(0, 480 - h), w, h],
                }
            )
    categories = [{"id": i, "name": f"class{i}"} for i in range(1, num_classes + 1)]
    gt = {"images": images, "annotations": annotations, "categories": categories}
    return gt, detections


def _coco_eval_impl(backend: str) -> Factory:
    def factory(args, device):
        from pycocotools.coco import COCO

        gt, detections = synthetic_coco(args.eval_images)
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = COCO()
            coco_gt.dataset = gt
            coco_gt.createIndex()
            coco_dt = coco_gt.loadRes(detections)
        evaluator_class = coco_eval_class(backend)

        def evaluate():
            with contextlib.redirect_stdout(io.StringIO()):
                coco_eval = evaluator_class(coco_gt, coco_dt, "bbox")
                coco_eval.evaluate()
                coco_eval.accumulate()
                coco_eval.summarize()
            return coco_eval.stats

        return evaluate

    return factory


# --------------------------------------------------------------------------- cases
def build_cases(device: torch.device) -> Dict[str, Case]:
    """All cases for ``device``, in report order."""
    cuda = device.type == "cuda"
    train_impls = {}
    for amp in (False, True) if cuda else (False,):
        suffix = ", AMP" if amp else ""
        train_impls[DETECTRON2 + suffix] = _train_impl(
            _detectron2_cfg, build_detectron2_optimizer, amp
        )
        train_impls[PLUGIN + suffix] = _train_impl(_plugin_cfg, build_plugin_optimizer, amp)
    inference_impls = _inference_impls(lambda args: 1, device)
    throughput_impls = _inference_impls(lambda args: args.throughput_batch, device)
    one_image = lambda args: 1  # noqa: E731
    inference_variants = {DETECTRON2: _detectron2_inference_impl(one_image)}
    for name, opts in INFERENCE_VARIANTS.items():
        inference_variants[name] = _plugin_inference_impl(one_image, *opts)
    training_variants = {}
    for amp in (False, True) if cuda else (False,):
        suffix = ", AMP" if amp else ""
        training_variants[DETECTRON2 + suffix] = _train_impl(
            _detectron2_cfg, build_detectron2_optimizer, amp
        )
        for name, opts in TRAINING_VARIANTS.items():
            training_variants[name + suffix] = _train_impl(
                _plugin_cfg, build_plugin_optimizer, amp, *opts
            )
    return {
        "train_step": Case(
            "training step (forward, backward, SGD step), R50-FPN, batch {train_batch} at "
            "{train_size}x{train_size}",
            DETECTRON2,
            train_impls,
        ),
        "inference_latency": Case(
            "inference, R50-FPN, 1 image at {infer_height}x{infer_width}",
            DETECTRON2,
            inference_impls,
        ),
        "inference_throughput": Case(
            "inference, R50-FPN, batch {throughput_batch} at {infer_height}x{infer_width}",
            DETECTRON2,
            throughput_impls,
            images_per_call=lambda args: args.throughput_batch,
            slow=True,
        ),
        "inference_contributions": Case(
            "inference, R50-FPN, 1 image at {infer_height}x{infer_width}: each speed-up of "
            "MODEL.INFERENCE_OPTIMIZATION alone and together",
            DETECTRON2,
            inference_variants,
            slow=True,
            memory=False,
        ),
        "train_contributions": Case(
            "training step as train_step: each speed-up of MODEL.TRAINING_OPTIMIZATION alone",
            DETECTRON2,
            training_variants,
            slow=True,
            memory=False,
        ),
        "focal_loss": Case(
            "focal loss forward + backward, {loss_images} x {loss_anchors} anchors x "
            "{num_classes} classes",
            "fvcore sigmoid_focal_loss_jit",
            {
                name: _focal_loss_impl(loss_fn, uses_labels)
                for name, (loss_fn, uses_labels) in FOCAL_LOSSES.items()
            },
        ),
        "postprocess": Case(
            "post-processing (threshold, top-k, decode, NMS) of head outputs, 1 image at "
            "{infer_height}x{infer_width}, {candidate_fraction:g} of scores above 0.05",
            DETECTRON2,
            {
                DETECTRON2: _postprocess_impl(_detectron2_cfg, lambda args: 1),
                PLUGIN: _postprocess_impl(_plugin_cfg, lambda args: 1),
            },
        ),
        "postprocess_batch": Case(
            "post-processing as above, batch {throughput_batch}",
            DETECTRON2,
            {
                DETECTRON2: _postprocess_impl(_detectron2_cfg, lambda a: a.throughput_batch),
                PLUGIN: _postprocess_impl(_plugin_cfg, lambda a: a.throughput_batch),
            },
            images_per_call=lambda args: args.throughput_batch,
        ),
        "coco_eval": Case(
            "COCO bbox evaluation (evaluate, accumulate, summarize), {eval_images} images, "
            "100 detections each",
            "pycocotools",
            {
                "pycocotools": _coco_eval_impl("pycocotools"),
                "faster-coco-eval": _coco_eval_impl("faster_coco_eval"),
            },
            slow=True,
        ),
    }
