"""The RetinaNet detector (Lin et al. 2017) with the paper's options, as detectron2's RetinaNet.

:class:`FocalLossRetinaNet` is detectron2's ``RetinaNet`` (anchor labeling, training forward,
pre-processing, visualization) with the plugin's registered head and anchor generator, and only
these parts of its own: the classification loss (a fused focal loss, the appendix's FL*, or
OHEM, Table 1d), the choice of loss normalizer, bfloat16 inference, a faster backbone and head at
inference (:mod:`retinanet_plugin.modeling.inference_optimization`), and a batched inference
post-processing that gives detectron2's detections faster. As detectron2's, the model scripts
(``detectron2.export.scripting_with_instances``) and traces (``TracingAdapter``, also for ONNX)
for inference; it then post-processes with a version whose candidate counts stay
data-dependent.
"""

import contextlib
import logging
from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.anchor_generator import build_anchor_generator
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.meta_arch.retinanet import RetinaNet
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import get_event_storage

from ..compat.private_api import dense_box_regression_loss, ema_update
from ..config.option_rules import META_ARCH_RULES, OHEM_NO_RATIO
from ..config.rules import OptionError, check_options
from ..config.trainer_keys import trainer_only_settings
from ..errors import UserError
from .head import build_retinanet_head
from .inference_optimization import INFERENCE_DTYPES, InferenceRunner, resolve_inference_dtype
from .losses.focal_loss import focal_loss_from_labels, sigmoid_focal_loss_star
from .losses.ohem import ohem_cross_entropy
from .postprocessing import batched_detections, image_detections
from .winograd import WinogradConvolutions, winograd_applies

__all__ = ["FocalLossRetinaNet"]

logger = logging.getLogger(__name__)


@META_ARCH_REGISTRY.register()
class FocalLossRetinaNet(RetinaNet):
    """RetinaNet with focal loss: detectron2's ``RetinaNet`` with the paper's loss options.

    Training (detectron2's): anchors are matched to ground truth by IoU (>= 0.5 foreground, < 0.4
    background, in between ignored; each ground-truth box also keeps its best anchors); here the
    classification loss is summed over all non-ignored anchors, the box loss over foreground
    anchors, and both are divided by the number of foreground anchors (an EMA of it, detectron2's
    normalizer, by default); with ``CLS_LOSS_TYPE`` "ohem" the classification loss is instead the
    mean cross-entropy over the online hard examples (:mod:`retinanet_plugin.modeling.losses.ohem`).
    Inference: per level the top-k candidates above a score threshold are decoded, then merged over
    levels, class-wise NMS, and the top detections per image are kept, all images of a batch at once
    (:mod:`retinanet_plugin.modeling.postprocessing`).

    Parameter and buffer names equal detectron2's ``RetinaNet`` for the same config, so
    checkpoints load in either direction.
    """

    @configurable
    def __init__(
        self,
        *,
        cls_loss_type: str = "focal",
        focal_loss_star_gamma: float = 4.0,
        focal_loss_star_beta: float = 0.0,
        ohem_batch_size_per_image: int = 128,
        ohem_positive_fraction: float = OHEM_NO_RATIO,
        ohem_nms_thresh: float = 0.5,
        loss_normalizer: str = "ema",
        loss_normalizer_momentum: float = 0.9,
        loss_normalizer_init: float = 100.0,
        inference_dtype: str = "float32",
        trainer_only_settings: Sequence[str] = (),
        fold_frozen_bn: bool = True,
        channels_last: bool = True,
        compile_backbone_and_head: bool = False,
        winograd: bool = True,
        training_channels_last: bool = False,
        training_winograd: bool = True,
        **retinanet_options,
    ):
        """
        Args:
            cls_loss_type: "focal", "focal_star" (the appendix's FL*) or "ohem" (sigmoid
                cross-entropy over the online hard examples only, Table 1d's baseline).
            focal_loss_star_gamma, focal_loss_star_beta: gamma* and beta of FL*.
            ohem_batch_size_per_image, ohem_positive_fraction, ohem_nms_thresh: of "ohem": B
                examples per image, the fraction of B positives may take (or ``NO_RATIO``),
                the IoU threshold of the NMS over the examples' predicted boxes.
            loss_normalizer: "ema" (moving average of foreground anchors per batch, as
                detectron2) or "batch" (this batch's count, as the paper).
            loss_normalizer_momentum, loss_normalizer_init: of the "ema" normalizer.
            inference_dtype: "float32", or "bfloat16" to run backbone and head under bfloat16
                autocast at inference (box decoding, scores and NMS stay float32), or "auto":
                bfloat16 where the model's device computes it natively, else float32.
            fold_frozen_bn, channels_last, compile_backbone_and_head, winograd: the inference
                speed-ups of
                :class:`~retinanet_plugin.modeling.inference_optimization.InferenceRunner`.
            training_channels_last: run backbone and head on channels-last tensors in training.
            training_winograd: on CPU, train with the eligible 3x3 convolutions computed by
                NNPACK's Winograd algorithm (:mod:`retinanet_plugin.modeling.winograd`).
            trainer_only_settings: "KEY = value" of the config's keys that only the plugin's
                Trainer honours (``config.trainer_keys``), warned about at the first training
                step unless the plugin's Trainer, which clears them, trains the model.
            retinanet_options: detectron2's ``RetinaNet`` arguments (backbone, head,
                head_in_features, anchor_generator, box2box_transform, anchor_matcher,
                num_classes, focal_loss_alpha, focal_loss_gamma, smooth_l1_beta,
                box_reg_loss_type, test_* thresholds, max_detections_per_image, pixel_mean,
                pixel_std, vis_period, input_format); the head maps per-level features to
                per-level (N, A*K, H, W) logits and (N, A*4, H, W) deltas.
        """
        options = dict(
            cls_loss_type=cls_loss_type,
            focal_loss_star_gamma=focal_loss_star_gamma,
            ohem_batch_size_per_image=ohem_batch_size_per_image,
            ohem_positive_fraction=ohem_positive_fraction,
            ohem_nms_thresh=ohem_nms_thresh,
            loss_normalizer=loss_normalizer,
            inference_dtype=inference_dtype,
        )
        check_options(META_ARCH_RULES, **options, **retinanet_options)
        super().__init__(**retinanet_options)
        self.cls_loss_type = cls_loss_type
        self.focal_loss_star_gamma = focal_loss_star_gamma
        self.focal_loss_star_beta = focal_loss_star_beta
        self.ohem_batch_size_per_image = ohem_batch_size_per_image
        self.ohem_positive_fraction = ohem_positive_fraction
        self.ohem_nms_thresh = ohem_nms_thresh
        self.loss_normalizer_type = loss_normalizer
        self.loss_normalizer_momentum = loss_normalizer_momentum
        self.loss_normalizer_init = loss_normalizer_init
        self.inference_dtype = INFERENCE_DTYPES[resolve_inference_dtype(inference_dtype, "cpu")]
        self.trainer_only_settings = list(trainer_only_settings)
        self.inference_runner = InferenceRunner(
            fold_frozen_bn, channels_last, compile_backbone_and_head, winograd
        )
        self.training_channels_last = training_channels_last
        self.training_winograd = training_winograd
        # Hooks, not an override of preprocess_image, so that the model stays scriptable.
        if self.inference_dtype != torch.float32:
            self.backbone.register_forward_pre_hook(_channels_last_at_inference)
        if training_channels_last:
            self.backbone.register_forward_pre_hook(_channels_last_in_training)

    @classmethod
    def from_config(cls, cfg):
        # detectron2's RetinaNet.from_config builds its own RetinaNetHead (which cannot use GN in
        # detectron2 0.6); this one builds the registered head, and adds the plugin's options.
        retinanet = cfg.MODEL.RETINANET
        backbone = build_backbone(cfg)
        backbone_shape = backbone.output_shape()
        missing = [f for f in retinanet.IN_FEATURES if f not in backbone_shape]
        if missing:
            raise OptionError(
                f"MODEL.RETINANET.IN_FEATURES names {missing}, which the backbone "
                f"{cfg.MODEL.BACKBONE.NAME} does not output (it has {sorted(backbone_shape)})"
            )
        feature_shapes = [backbone_shape[f] for f in retinanet.IN_FEATURES]
        return {
            "backbone": backbone,
            "head": build_retinanet_head(cfg, feature_shapes),
            "head_in_features": retinanet.IN_FEATURES,
            "anchor_generator": build_anchor_generator(cfg, feature_shapes),
            "box2box_transform": Box2BoxTransform(weights=retinanet.BBOX_REG_WEIGHTS),
            "anchor_matcher": Matcher(
                retinanet.IOU_THRESHOLDS, retinanet.IOU_LABELS, allow_low_quality_matches=True
            ),
            "num_classes": retinanet.NUM_CLASSES,
            "cls_loss_type": retinanet.CLS_LOSS_TYPE,
            "focal_loss_alpha": retinanet.FOCAL_LOSS_ALPHA,
            "focal_loss_gamma": retinanet.FOCAL_LOSS_GAMMA,
            "focal_loss_star_gamma": retinanet.FOCAL_LOSS_STAR_GAMMA,
            "focal_loss_star_beta": retinanet.FOCAL_LOSS_STAR_BETA,
            "ohem_batch_size_per_image": retinanet.OHEM_BATCH_SIZE_PER_IMAGE,
            "ohem_positive_fraction": retinanet.OHEM_POSITIVE_FRACTION,
            "ohem_nms_thresh": retinanet.OHEM_NMS_THRESH,
            "box_reg_loss_type": retinanet.BBOX_REG_LOSS_TYPE,
            "smooth_l1_beta": retinanet.SMOOTH_L1_LOSS_BETA,
            "loss_normalizer": retinanet.LOSS_NORMALIZER,
            "loss_normalizer_momentum": retinanet.LOSS_NORMALIZER_MOMENTUM,
            "loss_normalizer_init": retinanet.LOSS_NORMALIZER_INIT,
            "test_score_thresh": retinanet.SCORE_THRESH_TEST,
            "test_topk_candidates": retinanet.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": retinanet.NMS_THRESH_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "inference_dtype": resolve_inference_dtype(cfg.MODEL.INFERENCE_DTYPE, cfg.MODEL.DEVICE),
            "fold_frozen_bn": cfg.MODEL.INFERENCE_OPTIMIZATION.FOLD_FROZEN_BN,
            "channels_last": cfg.MODEL.INFERENCE_OPTIMIZATION.CHANNELS_LAST,
            "compile_backbone_and_head": cfg.MODEL.INFERENCE_OPTIMIZATION.COMPILE,
            "winograd": cfg.MODEL.INFERENCE_OPTIMIZATION.WINOGRAD,
            "training_channels_last": cfg.MODEL.TRAINING_OPTIMIZATION.CHANNELS_LAST,
            "training_winograd": cfg.MODEL.TRAINING_OPTIMIZATION.WINOGRAD,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "vis_period": cfg.VIS_PERIOD,
            "input_format": cfg.INPUT.FORMAT,
            "trainer_only_settings": trainer_only_settings(cfg),
        }

    @torch.jit.unused
    def _warn_trainer_only_settings(self):
        logger.warning(
            "Training with another trainer than retinanet_plugin's, which ignores %s: only "
            "the plugin's Trainer (train_net.py) honours these keys (docs/detectron2_tools.md)",
            ", ".join(self.trainer_only_settings),
        )
        self.trainer_only_settings = []  # once

    def forward(self, batched_inputs: List[Dict[str, Tensor]]):
        """detectron2's ``RetinaNet.forward``; at inference, backbone and head run through the
        :attr:`inference_runner` (when it is enabled), and with ``inference_dtype`` bfloat16
        under autocast.

        As detectron2's, it compiles with ``torch.jit.script`` for inference (after detectron2's
        ``scripting_with_instances``); the scripted model returns the ``Instances`` at the
        network's input size, not resized to the inputs' "height" and "width"."""
        if torch.jit.is_scripting():
            images = self.preprocess_image(batched_inputs)
            features = self.backbone(images.tensor)
            features = [features[f] for f in self.head_in_features]
            return self.forward_inference(images, features, self.head(features))
        channels = self.pixel_mean.shape[0]
        for i, item in enumerate(batched_inputs):
            _check_image_layout(i, item["image"], channels)
        if self.training:
            if self.trainer_only_settings:
                self._warn_trainer_only_settings()
            return self._training_forward(batched_inputs)
        if self.inference_runner.enabled and self.inference_runner.applies():
            forward = self._optimized_inference
        else:
            forward = super().forward
        if self.inference_dtype == torch.float32:
            return forward(batched_inputs)
        with torch.autocast(device_type=self.device.type, dtype=self.inference_dtype):
            return forward(batched_inputs)

    @torch.jit.unused
    def _training_forward(self, batched_inputs: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        """detectron2's training forward (``DenseDetector.forward``), with backbone and head
        under the Winograd convolutions where they apply (only there: the mode costs a Python
        call per operation), and not in channels-last training, whose inputs they never take."""
        winograd = self.training_winograd and not self.training_channels_last
        winograd = winograd and InferenceRunner.applies() and winograd_applies(self.device)
        images = self.preprocess_image(batched_inputs)
        with WinogradConvolutions() if winograd else contextlib.nullcontext():
            features = self.backbone(images.tensor)
            features = [features[f] for f in self.head_in_features]
            predictions = self.head(features)
        assert "instances" in batched_inputs[0], "Instance annotations are missing in training!"
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        return self.forward_training(images, features, predictions, gt_instances)

    @torch.jit.unused
    def _optimized_inference(self, batched_inputs: List[Dict[str, Tensor]]) -> List[dict]:
        """detectron2's inference forward with backbone and head run by the inference runner."""
        images = self.preprocess_image(batched_inputs)
        features, predictions = self.inference_runner(
            self.backbone, self.head, self.head_in_features, images.tensor
        )
        results = self.forward_inference(images, features, predictions)
        processed_results = []
        for results_per_image, inputs, image_size in zip(
            results, batched_inputs, images.image_sizes
        ):
            height = inputs.get("height", image_size[0])
            width = inputs.get("width", image_size[1])
            processed_results.append(
                {"instances": detector_postprocess(results_per_image, height, width)}
            )
        return processed_results

    def train(self, mode: bool = True):
        """``nn.Module.train``; entering training drops the inference runner's copies."""
        if mode:
            self.inference_runner.clear()
        return super().train(mode)

    # ---------------------------------------------------------------- training
    def losses(
        self,
        anchors: List[Boxes],
        pred_logits: List[Tensor],
        gt_labels: Sequence[Tensor],
        pred_anchor_deltas: List[Tensor],
        gt_boxes: Sequence[Tensor],
    ) -> Dict[str, Tensor]:
        """detectron2's ``RetinaNet.losses`` with the plugin's classification losses and
        normalizers.

        Args:
            anchors: per level, ``Boxes`` of Hi*Wi*A anchors.
            pred_logits: per level, (N, Hi*Wi*A, K).
            gt_labels: per image, (R,) labels from ``label_anchors``: a class in [0, K) for
                foreground, K for background, -1 for ignored anchors (R = sum_i Hi*Wi*A).
            pred_anchor_deltas: per level, (N, Hi*Wi*A, 4).
            gt_boxes: per image, (R, 4) matched ground-truth boxes.

        Returns:
            dict with scalar "loss_cls" and "loss_box_reg".
        """
        num_images = len(gt_labels)
        gt_labels = torch.stack(list(gt_labels))  # (N, R)
        pos_mask = (gt_labels >= 0) & (gt_labels != self.num_classes)
        num_pos_anchors = pos_mask.sum().item()
        get_event_storage().put_scalar("num_pos_anchors", num_pos_anchors / num_images)
        if self.loss_normalizer_type == "ema":
            normalizer = ema_update(
                self,
                "loss_normalizer",
                max(num_pos_anchors, 1),
                self.loss_normalizer_init,
                self.loss_normalizer_momentum,
            )
        else:
            normalizer = max(num_pos_anchors, 1)

        if self.cls_loss_type == "ohem":
            loss_cls = self.ohem_loss(anchors, pred_logits, gt_labels, pred_anchor_deltas)
        else:
            logits = cat(pred_logits, dim=1).view(-1, self.num_classes)
            loss_cls = self.classification_loss(logits, gt_labels.view(-1)) / normalizer
        loss_box_reg = dense_box_regression_loss()(
            anchors,
            self.box2box_transform,
            pred_anchor_deltas,
            list(gt_boxes),
            pos_mask,
            box_reg_loss_type=self.box_reg_loss_type,
            smooth_l1_beta=self.smooth_l1_beta,
        )
        return {"loss_cls": loss_cls, "loss_box_reg": loss_box_reg / normalizer}

    def classification_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Summed classification loss.

        Args:
            logits: (M, K) logits of all anchors of the batch.
            labels: (M,) anchor labels: class in [0, K), K = background, -1 = ignored (no
                loss).
        """
        if self.cls_loss_type == "focal_star":
            valid = labels >= 0
            targets = F.one_hot(labels[valid], num_classes=self.num_classes + 1)[:, :-1]
            return sigmoid_focal_loss_star(
                logits[valid],
                targets,
                gamma=self.focal_loss_star_gamma,
                beta=self.focal_loss_star_beta,
                alpha=self.focal_loss_alpha,
                reduction="sum",
            )
        # Fused: loss and gradient in one pass, no one-hot matrix, no copy of the valid rows.
        return focal_loss_from_labels(
            logits, labels, alpha=self.focal_loss_alpha, gamma=self.focal_loss_gamma
        )

    def ohem_loss(
        self,
        anchors: List[Boxes],
        pred_logits: List[Tensor],
        gt_labels: Tensor,
        pred_deltas: List[Tensor],
    ) -> Tensor:
        """Mean sigmoid cross-entropy over the online hard examples of every image (see
        :mod:`retinanet_plugin.modeling.losses.ohem`); the box loss stays on all foreground anchors.

        Divided by the number of selected anchors, as Fast R-CNN's OHEM averages over its
        minibatch: the minibatch has a fixed size (B per image) whatever the number of
        foreground anchors, so dividing by that number, as for FL, would scale the loss by
        B / #foreground from batch to batch.

        Args:
            anchors: per level, ``Boxes`` of Hi*Wi*A anchors.
            pred_logits: per level, (N, Hi*Wi*A, K).
            gt_labels: (N, R) anchor labels, see :meth:`losses`.
            pred_deltas: per level, (N, Hi*Wi*A, 4).
        """
        num_images = gt_labels.shape[0]
        with torch.no_grad():
            # OHEM's NMS runs on the examples' predicted boxes.
            boxes = self.box2box_transform.apply_deltas(
                cat(pred_deltas, dim=1).reshape(-1, 4).float(),
                Boxes.cat(anchors).tensor.repeat(num_images, 1),
            ).view(num_images, -1, 4)
        loss, num_selected = ohem_cross_entropy(
            cat(pred_logits, dim=1),
            gt_labels,
            boxes,
            self.ohem_batch_size_per_image,
            self.ohem_positive_fraction,
            self.ohem_nms_thresh,
        )
        get_event_storage().put_scalar("ohem_num_selected", num_selected / num_images)
        return loss / max(num_selected, 1)

    # --------------------------------------------------------------- inference
    def forward_inference(
        self,
        images: ImageList,
        features: List[Tensor],
        predictions: Tuple[List[Tensor], List[Tensor]],
    ) -> List[Instances]:
        """Detections of every image of the batch, all images and levels processed together
        (:func:`retinanet_plugin.modeling.postprocessing.batched_detections`; the same result as
        detectron2's per-image ``RetinaNet.inference_single_image``). When scripted or traced,
        image by image with :func:`~retinanet_plugin.modeling.postprocessing.image_detections`.

        Args:
            images: the batch; only ``image_sizes`` is used.
            features: per level, (N, C, Hi, Wi) features (for the anchors' grid sizes).
            predictions: per level, (N, A*K, Hi, Wi) logits and (N, A*4, Hi, Wi) deltas.

        Returns:
            per image, ``Instances`` with ``pred_boxes`` (D, 4) float32, ``scores`` (D,) and
            ``pred_classes`` (D,), sorted by decreasing score, D <= max_detections_per_image.
            Scores have the head's dtype under a caller's autocast (as detectron2's), float32
            with ``inference_dtype`` bfloat16.
        """
        logits, deltas = predictions
        if self.inference_dtype != torch.float32:
            # MODEL.INFERENCE_DTYPE: the detections of a float32 model given these head outputs
            # (under a caller's autocast the scores keep the head's dtype, as detectron2's).
            logits = [x.float() for x in logits]
        anchors = [anchors_i.tensor for anchors_i in self.anchor_generator(features)]
        if torch.jit.is_scripting():
            return self._traceable_inference(images.image_sizes, anchors, logits, deltas)
        if torch.jit.is_tracing():
            return self._traceable_inference(images.image_sizes, anchors, logits, deltas)
        # Without autocast: boxes are decoded in float32 even when the head ran under autocast.
        with torch.autocast(device_type=self.device.type, enabled=False):
            return batched_detections(
                anchors,
                logits,
                deltas,
                images.image_sizes,
                self.box2box_transform,
                num_classes=self.num_classes,
                score_thresh=self.test_score_thresh,
                topk_candidates=self.test_topk_candidates,
                nms_thresh=self.test_nms_thresh,
                max_detections_per_image=self.max_detections_per_image,
            )

    def _traceable_inference(
        self,
        image_sizes: List[Tuple[int, int]],
        anchors: List[Tensor],
        logits: List[Tensor],
        deltas: List[Tensor],
    ) -> List[Instances]:
        """:meth:`forward_inference` image by image with
        :func:`~retinanet_plugin.modeling.postprocessing.image_detections`, which scripts, and
        traces without fixing the candidate counts (the batched version's Python counts)."""
        results: List[Instances] = []
        for i, image_size in enumerate(image_sizes):
            boxes, scores, classes = image_detections(
                anchors,
                [x[i] for x in logits],
                [x[i] for x in deltas],
                self.box2box_transform,
                self.num_classes,
                self.test_score_thresh,
                self.test_topk_candidates,
                self.test_nms_thresh,
                self.max_detections_per_image,
            )
            result = Instances(image_size)
            result.pred_boxes = Boxes(boxes)
            result.scores = scores
            result.pred_classes = classes
            results.append(result)
        return results


def _channels_last_in_training(backbone: nn.Module, inputs: Tuple[Tensor]) -> Tuple[Tensor]:
    """Backbone pre-hook of ``training_channels_last``: backbone and head train on channels-last
    tensors (convolutions keep the layout of their input).

    Args:
        inputs: the backbone's (N, C, H, W) input.
    """
    if not backbone.training:
        return inputs
    return (inputs[0].contiguous(memory_format=torch.channels_last),)


def _channels_last_at_inference(backbone: nn.Module, inputs: Tuple[Tensor]) -> Tuple[Tensor]:
    """Backbone pre-hook of ``inference_dtype`` bfloat16: oneDNN's bfloat16 convolutions are
    fastest on channels-last tensors (measured in docs/performance.md), and convolutions keep
    the layout of their input. (A hook, not an override of ``preprocess_image``, so that the
    model stays scriptable.)

    Args:
        inputs: the backbone's (N, C, H, W) input.
    """
    if backbone.training:
        return inputs
    return (inputs[0].contiguous(memory_format=torch.channels_last),)


class ImageLayoutError(UserError, ValueError):
    """An input image that is not a (C, H, W) tensor with the model's channel count."""


def _check_image_layout(index: int, image: Tensor, channels: int) -> None:
    """Input ``index``'s "image" is a (C, H, W) tensor with C = ``channels`` (detectron2's
    layout); an (H, W, C) array would otherwise fail deep in the backbone, or, with a matching
    size, be normalized per row instead of per channel."""
    shape = tuple(getattr(image, "shape", ()))
    if not isinstance(image, Tensor) or len(shape) != 3 or shape[0] != channels:
        hint = ""
        if len(shape) == 3 and shape[-1] == channels:
            hint = " It looks like (H, W, C): pass image.permute(2, 0, 1)."
        raise ImageLayoutError(
            f'Input {index}: "image" must be a {channels}-channel (C, H, W) tensor as the model\'s '
            f"MODEL.PIXEL_MEAN has {channels} values, got a {type(image).__name__} of shape "
            f"{shape}.{hint}"
        )
