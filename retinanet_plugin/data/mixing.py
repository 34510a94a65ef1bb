"""MixUp, CutMix and Mosaic: training augmentations that combine several images of the dataset.

:class:`MixingDatasetMapper` is detectron2's ``DatasetMapper`` that also draws random records of
the training set. Every image (its own record's and the drawn ones) first goes through the
per-image augmentations, then, each with its own probability and in this order:

- Mosaic (YOLOv4): the image and 3 random others tile a canvas of the image's size as a 2x2 grid
  around a random center, each with one corner at the center; boxes are shifted and clipped to
  the visible part, and those then at most MIN_SIZE pixels wide or high are dropped.
- MixUp (Zhang et al. 2019, "Bag of Freebies for Training Object Detection Neural Networks"):
  ``lambda * A + (1 - lambda) * B`` with ``lambda ~ Beta(ALPHA, ALPHA)`` and a random image B,
  both top-left on a canvas of their larger height and width; the boxes of both are kept. The
  paper weights each image's losses by its blending ratio; RetinaNet's losses have no per-box
  weights, so every box of both images counts fully (as in YOLOX).
- CutMix (Yun et al. 2019): the pixels of a random rectangle, of about ``1 - lambda`` of the
  image's area with ``lambda ~ Beta(ALPHA, ALPHA)``, are replaced by those of a random image B at
  the same place. A box of A becomes the tight box of its part outside the rectangle, a box of B
  its part inside; a box is dropped when less than MIN_VISIBLE of its area is left.

Where no image is, the canvas holds MODEL.PIXEL_MEAN, which the model's normalization turns into
the zeros it pads batches with. Random numbers come from numpy's global generator, as in
detectron2's own augmentations: detectron2 seeds it in every data-loader worker (and
``default_setup`` in the main process), so mixing is reproducible for a given SEED.
"""

import logging
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from detectron2.config import configurable
from detectron2.structures import Boxes, Instances
from detectron2.structures.boxes import pairwise_intersection

from .augmentations import add_train_augmentations
from .images import ImageMapper

__all__ = ["MIXING_AUGMENTATIONS", "MixingDatasetMapper", "cutmix", "mixup", "mosaic"]

# The INPUT.AUG sections of the augmentations that mix images.
MIXING_AUGMENTATIONS = ("MOSAIC", "MIXUP", "CUTMIX")

Rectangle = Tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, end exclusive


def _canvas(channels: int, height: int, width: int, fill: Sequence[float]) -> torch.Tensor:
    """A (channels, height, width) uint8 image filled with ``fill`` (one value per channel)."""
    value = torch.tensor(fill, dtype=torch.float32).round().clamp(0, 255).to(torch.uint8)
    return value.view(-1, 1, 1).expand(channels, height, width).clone()


def _instances(sample: dict) -> Instances:
    """The instances of a mapped sample; empty ones if its record had no annotations."""
    if "instances" in sample:
        return sample["instances"]
    return Instances(
        tuple(sample["image"].shape[-2:]),
        gt_boxes=Boxes(torch.zeros(0, 4)),
        gt_classes=torch.zeros(0, dtype=torch.int64),
    )


def _on_canvas(
    instances: Instances,
    image_size: Tuple[int, int],
    boxes: Optional[torch.Tensor] = None,
    keep: Optional[torch.Tensor] = None,
) -> Instances:
    """``instances`` (those in ``keep``; all if None) on an image of ``image_size`` (h, w), with
    their boxes replaced by ``boxes`` (N, 4) XYXY if given."""
    boxes = instances.gt_boxes.tensor if boxes is None else boxes
    if keep is None:
        keep = torch.ones(len(instances), dtype=torch.bool)
    fields = {name: value[keep] for name, value in instances.get_fields().items()}
    fields["gt_boxes"] = Boxes(boxes[keep])
    return Instances(image_size, **fields)


def mosaic(
    images: Sequence[torch.Tensor],
    instances: Sequence[Instances],
    center: Tuple[int, int],
    fill: Sequence[float],
    min_size: float,
) -> Tuple[torch.Tensor, Instances]:
    """Four images as a 2x2 grid around ``center`` on a canvas the size of the first.

    Args:
        images: 4 (C, H_i, W_i) uint8 images for the top-left, top-right, bottom-left and
            bottom-right tiles; each is placed with its bottom-right, bottom-left, top-right or
            top-left corner at ``center`` and cut off at the canvas border.
        instances: their instances (``gt_boxes`` in each image's pixels).
        center: (x, y) in pixels of the canvas.
        fill: canvas value per channel where no image is.
        min_size: boxes at most this wide or high after clipping to the canvas are dropped.

    Returns:
        The (C, H_0, W_0) uint8 image and the instances of all tiles on it.
    """
    channels, height, width = images[0].shape
    canvas = _canvas(channels, height, width, fill)
    center_x, center_y = center
    tiles = []
    for index, (image, tile_instances) in enumerate(zip(images, instances)):
        tile_height, tile_width = image.shape[-2:]
        left = center_x - tile_width if index in (0, 2) else center_x
        top = center_y - tile_height if index in (0, 1) else center_y
        x0, y0 = max(left, 0), max(top, 0)
        x1, y1 = min(left + tile_width, width), min(top + tile_height, height)
        if x1 > x0 and y1 > y0:
            canvas[:, y0:y1, x0:x1] = image[:, y0 - top : y1 - top, x0 - left : x1 - left]
        boxes = Boxes(tile_instances.gt_boxes.tensor + torch.tensor([left, top, left, top]))
        boxes.clip((height, width))
        keep = boxes.nonempty(threshold=min_size)
        tiles.append(_on_canvas(tile_instances, (height, width), boxes.tensor, keep))
    return canvas, Instances.cat(tiles)


def mixup(
    image_a: torch.Tensor,
    instances_a: Instances,
    image_b: torch.Tensor,
    instances_b: Instances,
    blend: float,
    fill: Sequence[float],
) -> Tuple[torch.Tensor, Instances]:
    """``blend * A + (1 - blend) * B``, both top-left on a canvas of their larger height and
    width, rounded to uint8; the instances of both (boxes unchanged).

    Args:
        image_a, image_b: (C, H, W) uint8 images, of any sizes.
        instances_a, instances_b: their instances.
        blend: the weight of A, in [0, 1].
        fill: canvas value per channel where an image does not reach.
    """
    channels = image_a.shape[0]
    height = max(image_a.shape[1], image_b.shape[1])
    width = max(image_a.shape[2], image_b.shape[2])
    mixed = torch.zeros(channels, height, width)
    for image, weight in ((image_a, blend), (image_b, 1.0 - blend)):
        canvas = _canvas(channels, height, width, fill)
        canvas[:, : image.shape[1], : image.shape[2]] = image
        mixed += weight * canvas.float()
    instances = Instances.cat([_on_canvas(i, (height, width)) for i in (instances_a, instances_b)])
    return mixed.round().clamp(0, 255).to(torch.uint8), instances


def _visible_outside(boxes: torch.Tensor, rect: Rectangle) -> torch.Tensor:
    """The tight box of the part of each box (N, 4) outside ``rect``: a box shrinks only where
    the rectangle hides whole rows or columns of it at one end (else its visible part still
    reaches all four sides); fully hidden boxes come out with negative width or height."""
    x0, y0, x1, y1 = boxes.unbind(1)
    rx0, ry0, rx1, ry1 = (float(v) for v in rect)
    spans_height = (ry0 <= y0) & (y1 <= ry1)  # hides whole columns of the box
    spans_width = (rx0 <= x0) & (x1 <= rx1)  # hides whole rows
    return torch.stack(
        [
            torch.where(spans_height & (rx0 <= x0), x0.clamp(min=rx1), x0),
            torch.where(spans_width & (ry0 <= y0), y0.clamp(min=ry1), y0),
            torch.where(spans_height & (x1 <= rx1), x1.clamp(max=rx0), x1),
            torch.where(spans_width & (y1 <= ry1), y1.clamp(max=ry0), y1),
        ],
        dim=1,
    )


def cutmix(
    image_a: torch.Tensor,
    instances_a: Instances,
    image_b: torch.Tensor,
    instances_b: Instances,
    rect: Rectangle,
    min_visible: float,
) -> Tuple[torch.Tensor, Instances]:
    """A with the pixels of ``rect`` from B; the instances of both that stay visible enough.

    Args:
        image_a, image_b: (C, H, W) uint8 images; ``rect`` must lie inside both.
        instances_a, instances_b: their instances.
        rect: (x0, y0, x1, y1) in pixels, end exclusive.
        min_visible: boxes with less than this fraction of their area left visible (outside
            ``rect`` for A, inside for B) are dropped.

    Returns:
        The image (the size of A) and the instances: A's as the tight boxes of their parts
        outside ``rect``, then B's clipped to ``rect``.
    """
    x0, y0, x1, y1 = rect
    mixed = image_a.clone()
    mixed[:, y0:y1, x0:x1] = image_b[:, y0:y1, x0:x1]
    image_size = tuple(image_a.shape[-2:])
    rect_box = Boxes(torch.tensor([rect], dtype=torch.float32))

    boxes_a = instances_a.gt_boxes
    hidden = pairwise_intersection(boxes_a, rect_box)[:, 0]
    visible_a = 1 - hidden / boxes_a.area().clamp(min=1e-6)
    visible_boxes_a = Boxes(_visible_outside(boxes_a.tensor, rect))
    keep_a = (visible_a >= min_visible) & visible_boxes_a.nonempty()

    boxes_b = instances_b.gt_boxes
    inside = boxes_b.tensor.clone()
    inside[:, 0::2] = inside[:, 0::2].clamp(x0, x1)
    inside[:, 1::2] = inside[:, 1::2].clamp(y0, y1)
    inside_boxes = Boxes(inside)
    visible_b = inside_boxes.area() / boxes_b.area().clamp(min=1e-6)
    keep_b = (visible_b >= min_visible) & inside_boxes.nonempty()

    instances = Instances.cat(
        [
            _on_canvas(instances_a, image_size, visible_boxes_a.tensor, keep_a),
            _on_canvas(instances_b, image_size, inside, keep_b),
        ]
    )
    return mixed, instances


class MixingDatasetMapper(ImageMapper):
    """detectron2's training ``DatasetMapper`` (the plugin's :class:`.ImageMapper`, reading
    images as prediction does) with Mosaic, MixUp and CutMix (see the module).

    Args:
        dataset: the training records (a list, or detectron2's ``DatasetFromList``) from which
            the other images are drawn, uniformly.
        fill: canvas value per channel where no image is, in INPUT.FORMAT's channel order.
        mosaic_prob, mixup_prob, cutmix_prob: probability of each per image; 0 turns it off and
            draws no random number, so that the rest follows the same random sequence.
        mosaic_center_range: (low, high): the center is drawn uniformly in [low, high] times the
            canvas width and height.
        mosaic_min_size: boxes at most this many pixels wide or high after clipping are dropped.
        mixup_alpha, cutmix_alpha: lambda ~ Beta(alpha, alpha).
        cutmix_min_visible: boxes with less of their area visible are dropped.
        **kwargs: the arguments of ``DatasetMapper`` (without ``is_train``: this one is for
            training only). Boxes are the only annotations it mixes: instance masks, keypoints
            and precomputed proposals are refused.
    """

    @configurable
    def __init__(
        self,
        *,
        dataset: Sequence[dict],
        fill: Sequence[float],
        mosaic_prob: float = 0.0,
        mosaic_center_range: Tuple[float, float] = (0.25, 0.75),
        mosaic_min_size: float = 2.0,
        mixup_prob: float = 0.0,
        mixup_alpha: float = 1.5,
        cutmix_prob: float = 0.0,
        cutmix_alpha: float = 1.0,
        cutmix_min_visible: float = 0.3,
        **kwargs,
    ):
        unsupported = [
            name
            for name in ("use_instance_mask", "use_keypoint", "precomputed_proposal_topk")
            if kwargs.get(name)
        ]
        if unsupported:
            raise ValueError(
                f"INPUT.AUG.{{{','.join(MIXING_AUGMENTATIONS)}}} mix boxes only, but {unsupported} "
                "is set (MODEL.MASK_ON / MODEL.KEYPOINT_ON / MODEL.LOAD_PROPOSALS)"
            )
        super().__init__(True, **kwargs)
        self.dataset = dataset
        self.fill = list(fill)
        self.mosaic_prob, self.mixup_prob, self.cutmix_prob = mosaic_prob, mixup_prob, cutmix_prob
        self.mosaic_center_range = tuple(mosaic_center_range)
        self.mosaic_min_size = mosaic_min_size
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.cutmix_min_visible = cutmix_min_visible
        logging.getLogger(__name__).info(
            f"[MixingDatasetMapper] mosaic p={mosaic_prob} center in {self.mosaic_center_range} "
            f"min size {mosaic_min_size}; mixup p={mixup_prob} alpha={mixup_alpha}; "
            f"cutmix p={cutmix_prob} alpha={cutmix_alpha} min visible {cutmix_min_visible}"
        )

    @classmethod
    def from_config(cls, cfg, dataset: Sequence[dict]):
        ret = super().from_config(cfg, is_train=True)
        del ret["is_train"]
        ret["augmentations"] = add_train_augmentations(cfg, ret["augmentations"])
        aug = cfg.INPUT.AUG
        probs = {
            name: aug[name].PROB if aug[name].ENABLED else 0.0 for name in MIXING_AUGMENTATIONS
        }
        ret.update(
            dataset=dataset,
            fill=list(cfg.MODEL.PIXEL_MEAN),
            mosaic_prob=probs["MOSAIC"],
            mosaic_center_range=tuple(aug.MOSAIC.CENTER_RANGE),
            mosaic_min_size=aug.MOSAIC.MIN_SIZE,
            mixup_prob=probs["MIXUP"],
            mixup_alpha=aug.MIXUP.ALPHA,
            cutmix_prob=probs["CUTMIX"],
            cutmix_alpha=aug.CUTMIX.ALPHA,
            cutmix_min_visible=aug.CUTMIX.MIN_VISIBLE,
        )
        return ret

    @staticmethod
    def _happens(prob: float) -> bool:
        return prob > 0 and np.random.uniform() < prob

    def _random_sample(self) -> dict:
        """A random record of the dataset, mapped with the per-image augmentations."""
        return super().__call__(self.dataset[np.random.randint(len(self.dataset))])

    def __call__(self, dataset_dict: dict) -> dict:
        """Maps one record as ``DatasetMapper`` does, then mixes in others (see the module).

        Returns:
            dict: "image" (C, H, W) uint8 and "instances" (``gt_boxes``, ``gt_classes``) of the
            result; the other keys are those of ``dataset_dict``.
        """
        if self._happens(self.mosaic_prob):
            tiles = [super().__call__(dataset_dict)] + [self._random_sample() for _ in range(3)]
            sample = tiles[0]
            height, width = sample["image"].shape[-2:]
            low, high = self.mosaic_center_range
            center = (
                int(np.random.uniform(low, high) * width),
                int(np.random.uniform(low, high) * height),
            )
            image, instances = mosaic(
                [t["image"] for t in tiles],
                [_instances(t) for t in tiles],
                center,
                self.fill,
                self.mosaic_min_size,
            )
            mixed = True
        else:
            sample = super().__call__(dataset_dict)
            image, instances, mixed = sample["image"], _instances(sample), False
        if self._happens(self.mixup_prob):
            other = self._random_sample()
            blend = float(np.random.beta(self.mixup_alpha, self.mixup_alpha))
            image, instances = mixup(
                image, instances, other["image"], _instances(other), blend, self.fill
            )
            mixed = True
        if self._happens(self.cutmix_prob):
            other = self._random_sample()
            rect = self._cutmix_rectangle(image, other["image"])
            image, instances = cutmix(
                image, instances, other["image"], _instances(other), rect, self.cutmix_min_visible
            )
            mixed = True
        if mixed:
            sample["image"], sample["instances"] = image, instances
            sample.pop("sem_seg", None)  # not mixed (RetinaNet has no use for it)
        return sample

    def _cutmix_rectangle(self, image_a: torch.Tensor, image_b: torch.Tensor) -> Rectangle:
        """A random rectangle of about ``1 - lambda`` of the area both images cover (top-left
        aligned): a uniform center and sides ``sqrt(1 - lambda)`` times the area's, cut at its
        border (CutMix's sampling)."""
        height = min(image_a.shape[1], image_b.shape[1])
        width = min(image_a.shape[2], image_b.shape[2])
        side = np.sqrt(1.0 - np.random.beta(self.cutmix_alpha, self.cutmix_alpha))
        half_w, half_h = int(width * side) // 2, int(height * side) // 2
        center_x, center_y = np.random.randint(width), np.random.randint(height)
        return (
            int(np.clip(center_x - half_w, 0, width)),
            int(np.clip(center_y - half_h, 0, height)),
            int(np.clip(center_x + half_w, 0, width)),
            int(np.clip(center_y + half_h, 0, height)),
        )
