"""The deployable graph: a whole :class:`FocalLossRetinaNet`, from a decoded image to its
detections, as one traceable module, so that an exported file runs in onnxruntime (or
``torch.jit.load``) with no plugin code.

:class:`DeployableRetinaNet` computes what detectron2's test loader and the model compute:

* **Input** ``image``: (H, W, C) uint8, the decoded image in ``cfg.INPUT.FORMAT`` channel order
  (C = ``len(MODEL.PIXEL_MEAN)``; e.g. ``cv2.imread``'s BGR for the BGR configs), any size.
* **Resize** to the test size of detectron2's ``ResizeShortestEdge`` (shortest edge
  ``INPUT.MIN_SIZE_TEST``, longest at most ``INPUT.MAX_SIZE_TEST``) with PIL's antialiased
  bilinear filter, the one the test loader applies (:func:`resize_to_test_size`); the values are
  not rounded to uint8 as PIL's are (< 1 grey level apart). An image already at its test size
  is left as it is.
* **Network**: the model's normalization and padding, backbone, FPN and head.
* **Post-processing**, the model's inference steps: per level, the ``TEST.TOPK_CANDIDATES``
  highest scores above ``SCORE_THRESH_TEST``, box decoding (detectron2's ``Box2BoxTransform``),
  class-wise NMS (torchvision's ``nms``, ONNX ``NonMaxSuppression``), the
  ``DETECTIONS_PER_IMAGE`` best; then detectron2's ``detector_postprocess``: boxes scaled to the
  input image, clipped to it, empty boxes dropped.
* **Outputs** ``boxes`` (N, 4) float32 (x1, y1, x2, y2) in input-image pixels, ``scores`` (N,)
  float32 in decreasing order, ``classes`` (N,) int64 indices into the class names.

Everything is written with tensor operations on the input's shape, so one trace serves every
image size: the export checks it at a second size (``exporter._check_outputs``).
"""

from typing import Tuple

import torch
from torch import Tensor, nn
from torchvision.ops import nms

from ..modeling.meta_arch import FocalLossRetinaNet

__all__ = ["DeployableRetinaNet", "resize_to_test_size", "resized_size"]

INPUT_NAMES = ["image"]
OUTPUT_NAMES = ["boxes", "scores", "classes"]


def resized_size(height: Tensor, width: Tensor, min_size: int, max_size: int) -> Tensor:
    """detectron2's ``ResizeShortestEdge.get_output_shape`` with tensor operations.

    Args:
        height, width: 0-dim tensors, the input image's size.
        min_size, max_size: ``INPUT.MIN_SIZE_TEST`` and ``INPUT.MAX_SIZE_TEST``.

    Returns:
        (2,) int64 (height, width) of the resized image.
    """
    # float64 as detectron2's Python floats, so that int(x + 0.5) rounds the same.
    size = torch.stack([height, width]).to(torch.float64)
    scaled = size * (min_size / size.min())
    scaled = scaled * torch.clamp(max_size / scaled.max(), max=1.0)
    return torch.floor(scaled + 0.5).to(torch.int64)


def _bilinear_weights(in_size: Tensor, out_size: Tensor) -> Tensor:
    """PIL's antialiased bilinear resampling along one axis as an (out, in) matrix.

    PIL's filter is a triangle of half-width 1 input pixel, widened by the downscaling factor
    (antialiasing), centred on each output pixel's centre, normalized to sum 1 per output pixel.
    At scale 1 the matrix is the identity.
    """
    scale = in_size.to(torch.float32) / out_size.to(torch.float32)
    support = torch.clamp(scale, min=1.0)
    centers = (torch.arange(out_size, dtype=torch.float32) + 0.5) * scale
    inputs = torch.arange(in_size, dtype=torch.float32) + 0.5
    weights = torch.clamp(1.0 - (inputs[None, :] - centers[:, None]).abs() / support, min=0.0)
    return weights / weights.sum(dim=1, keepdim=True)


def resize_to_test_size(image: Tensor, min_size: int, max_size: int) -> Tensor:
    """The image the test loader gives the model, up to rounding to uint8.

    Two matrix products (one per axis), which trace to ONNX ``MatMul``: torch's antialiased
    ``interpolate`` has no ONNX export, and onnxruntime's antialiased ``Resize`` differs from it.

    Args:
        image: (H, W, C) uint8.
        min_size, max_size: ``INPUT.MIN_SIZE_TEST`` and ``INPUT.MAX_SIZE_TEST``.

    Returns:
        (C, H', W') float32, (H', W') = :func:`resized_size`.
    """
    shape = torch._shape_as_tensor(image)  # a tensor in a trace, not the sample's numbers
    out = resized_size(shape[0], shape[1], min_size, max_size)
    rows = _bilinear_weights(shape[0], out[0])  # (H', H)
    columns = _bilinear_weights(shape[1], out[1])  # (W', W)
    pixels = image.permute(2, 0, 1).to(torch.float32)  # (C, H, W)
    return rows @ pixels @ columns.t()


class DeployableRetinaNet(nn.Module):
    """A :class:`FocalLossRetinaNet` from decoded image to detections (see the module docstring).

    Args:
        model: the model, in eval mode, with its weights; its test thresholds and
            ``inference_dtype`` are the ones exported.
        min_size, max_size: ``INPUT.MIN_SIZE_TEST`` and ``INPUT.MAX_SIZE_TEST``.
    """

    def __init__(self, model: FocalLossRetinaNet, min_size: int, max_size: int):
        super().__init__()
        self.model = model
        self.min_size = min_size
        self.max_size = max_size

    @property
    def output_names(self):
        return OUTPUT_NAMES

    def forward(self, image: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """
        Args:
            image: (H, W, C) uint8 in the model's input format.

        Returns:
            boxes (N, 4) float32 in the input's pixels, scores (N,) float32, classes (N,) int64.
        """
        model = self.model
        resized = resize_to_test_size(image, self.min_size, self.max_size)
        with self.inference_context():
            images = model.preprocess_image([{"image": resized}])
            features = model.backbone(images.tensor)
            features = [features[f] for f in model.head_in_features]
            logits, deltas = model.head(features)
        anchors = [a.tensor for a in model.anchor_generator(features)]
        boxes, scores, classes = self._detections(anchors, logits, deltas)
        in_size = torch._shape_as_tensor(image)[:2].to(torch.float32)
        out_size = torch._shape_as_tensor(resized)[1:].to(torch.float32)
        return _to_input_pixels(boxes, scores, classes, in_size / out_size, in_size)

    def inference_context(self):
        """The autocast of ``MODEL.INFERENCE_DTYPE`` (none for float32); without the weight
        cache, so that a trace records the casts instead of storing cast weights."""
        dtype = self.model.inference_dtype
        return torch.autocast(
            "cpu", dtype=dtype, enabled=dtype != torch.float32, cache_enabled=False
        )

    def _detections(self, anchors, logits, deltas) -> Tuple[Tensor, Tensor, Tensor]:
        """The model's ``forward_inference`` for one image, in traceable form: the threshold is
        applied after the top-k (the same candidates), k is clamped to the level's size with
        tensor operations, and the class-wise NMS is one ``nms`` of shifted boxes (no Python
        branch on the number of boxes, as in torchvision's ``batched_nms``).

        Args:
            anchors: per level, (Hi*Wi*A, 4), location-major.
            logits: per level, (1, A*K, Hi, Wi).
            deltas: per level, (1, A*4, Hi, Wi).

        Returns:
            boxes (D, 4) in the resized image's pixels, scores (D,), classes (D,) int64, by
            decreasing score, D <= ``DETECTIONS_PER_IMAGE``.
        """
        model = self.model
        num_classes = model.num_classes
        candidates = []
        for anchors_i, logits_i, deltas_i in zip(anchors, logits, deltas):
            # detectron2's (Hi*Wi*A, K) / (Hi*Wi*A, 4) order: location, anchor, class.
            scores = logits_i.float().permute(0, 2, 3, 1).reshape(-1).sigmoid()
            deltas_i = deltas_i.float().permute(0, 2, 3, 1).reshape(-1, 4)
            k = torch.clamp(torch._shape_as_tensor(scores)[0], max=model.test_topk_candidates)
            scores, indices = scores.topk(k)
            keep = scores > model.test_score_thresh
            scores, indices = scores[keep], indices[keep]
            anchor_ids = torch.div(indices, num_classes, rounding_mode="floor")
            boxes = model.box2box_transform.apply_deltas(
                deltas_i[anchor_ids], anchors_i[anchor_ids]
            )
            candidates.append((boxes, scores, indices % num_classes))
        boxes, scores, classes = (torch.cat(list(x)) for x in zip(*candidates))
        # Class-wise NMS: each class's boxes shifted by class * (span of all coordinates + 1),
        # so that boxes of different classes never overlap (the span, not torchvision's maximum
        # coordinate: decoded boxes may reach past the image's top-left). The zero keeps the
        # span defined when there is no candidate.
        coordinates = torch.cat([boxes.reshape(-1), boxes.new_zeros(1)])
        extent = coordinates.max() - coordinates.min() + 1
        shifted = boxes + (classes.to(boxes.dtype) * extent)[:, None]
        keep = nms(shifted, scores, model.test_nms_thresh)[: model.max_detections_per_image]
        return boxes[keep], scores[keep], classes[keep]


def _to_input_pixels(
    boxes: Tensor, scores: Tensor, classes: Tensor, scale: Tensor, size: Tensor
) -> Tuple[Tensor, Tensor, Tensor]:
    """detectron2's ``detector_postprocess``: boxes scaled by ``scale`` (y, x), clipped to
    ``size`` (height, width), empty ones dropped."""
    boxes = boxes * scale.flip(0).repeat(2)
    boxes = torch.minimum(boxes.clamp(min=0), size.flip(0).repeat(2))
    nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes[nonempty], scores[nonempty], classes[nonempty]
