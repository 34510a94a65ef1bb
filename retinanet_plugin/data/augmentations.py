"""Per-image training augmentations selected by ``INPUT.AUG.*``: rotation, scale-and-crop and
color jitter, all detectron2's own, added to detectron2's default list.

Boxes follow the image through detectron2's ``DatasetMapper``: each transform's ``apply_box``
maps the four corners of a box and takes their bounding box (for a rotation, the box around the
rotated box), ``transform_instance_annotations`` clips boxes to the image and
``filter_empty_instances`` removes those left empty (e.g. cropped away).
"""

from typing import List, Union

from detectron2.data import transforms as T

__all__ = ["RandomChoice", "add_train_augmentations"]


class RandomChoice(T.Augmentation):
    """Applies ``chosen`` with probability ``prob``, else ``otherwise`` (detectron2 0.6 has
    ``RandomApply`` for "``chosen`` or nothing", but not this)."""

    def __init__(self, chosen: T.Augmentation, otherwise: T.Augmentation, prob: float):
        super().__init__()
        self.chosen, self.otherwise, self.prob = chosen, otherwise, prob

    def __call__(self, aug_input) -> T.Transform:
        return (self.chosen if self._rand_range() < self.prob else self.otherwise)(aug_input)


def add_train_augmentations(
    cfg, augmentations: List[Union[T.Augmentation, T.Transform]]
) -> List[Union[T.Augmentation, T.Transform]]:
    """detectron2's training augmentations with the ones enabled in ``INPUT.AUG`` added.

    Order: [INPUT.CROP], rotation, resize (detectron2's ``ResizeShortestEdge``, or with
    probability SCALE_CROP.PROB the scale-and-crop instead), flip, color jitter. Rotating before
    resizing keeps the output within INPUT.MAX_SIZE_TRAIN even when the rotation expands the
    image.

    Args:
        cfg: the config.
        augmentations: detectron2's list, e.g. ``DatasetMapper.from_config(cfg, True)
            ["augmentations"]``; it must contain a ``ResizeShortestEdge`` if rotation or
            scale-and-crop is enabled.

    Returns:
        A new list; equal to ``augmentations`` when nothing in INPUT.AUG is enabled with a
        PROB above 0 (so that the random sequence, too, is detectron2's).
    """
    aug = cfg.INPUT.AUG
    rotation, scale_crop, jitter = (
        aug[name] if aug[name].ENABLED and aug[name].PROB > 0 else None
        for name in ("ROTATION", "SCALE_CROP", "COLOR_JITTER")
    )
    augmentations = list(augmentations)
    if rotation is not None or scale_crop is not None:
        resize = next(
            (i for i, a in enumerate(augmentations) if isinstance(a, T.ResizeShortestEdge)), None
        )
        if resize is None:
            raise ValueError(
                "INPUT.AUG.ROTATION / SCALE_CROP: the training augmentations have no "
                f"ResizeShortestEdge to place them at: {augmentations}"
            )
        if scale_crop is not None:
            # detectron2's large-scale jitter: resize to fit SIZE times a random scale, then
            # crop (or pad) to SIZE. Boxes are clipped to the crop; empty ones are removed.
            height, width = scale_crop.SIZE
            low, high = scale_crop.SCALE_RANGE
            resize_and_crop = T.AugmentationList(
                [T.ResizeScale(low, high, height, width), T.FixedSizeCrop((height, width))]
            )
            augmentations[resize] = RandomChoice(
                resize_and_crop, augmentations[resize], scale_crop.PROB
            )
        if rotation is not None:
            rotate = T.RandomRotation(list(rotation.ANGLE), expand=rotation.EXPAND)
            augmentations.insert(resize, T.RandomApply(rotate, rotation.PROB))
    if jitter is not None:
        # Note: RandomSaturation's grey uses RGB weights whatever INPUT.FORMAT is.
        color = T.AugmentationList(
            [
                T.RandomBrightness(*jitter.BRIGHTNESS),
                T.RandomContrast(*jitter.CONTRAST),
                T.RandomSaturation(*jitter.SATURATION),
            ]
        )
        augmentations.append(T.RandomApply(color, jitter.PROB))
    return augmentations
