"""RetinaNet's anchors: several octave scales and aspect ratios per pyramid level."""

from collections import abc
from typing import List, Sequence

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.anchor_generator import (
    ANCHOR_GENERATOR_REGISTRY,
    DefaultAnchorGenerator,
)

from ..config.option_rules import ANCHOR_GENERATOR_RULES
from ..config.rules import OptionError, check_options

__all__ = ["RetinaNetAnchorGenerator", "octave_scaled_sizes"]


def octave_scaled_sizes(
    base_sizes: Sequence[Sequence[float]], scales_per_octave: int
) -> List[List[float]]:
    """Expands each base size s to s * 2^(i / scales_per_octave), i = 0 .. scales_per_octave - 1.

    Args:
        base_sizes: per feature level, a list of anchor sizes (sqrt of the anchor area, in input
            pixels), e.g. [[32], [64], [128], [256], [512]] for P3..P7; a flat list (or a single
            level) is used for every level, as in detectron2.
        scales_per_octave: number of scales per octave (the paper: 3).

    Returns:
        Per level, ``len(base_sizes[level]) * scales_per_octave`` sizes, grouped by base size
        (a single level when ``base_sizes`` is flat or has one level).
    """
    check_options(ANCHOR_GENERATOR_RULES, scales_per_octave=scales_per_octave)
    return [
        [size * 2 ** (i / scales_per_octave) for size in level for i in range(scales_per_octave)]
        for level in _levels(base_sizes)
    ]


@ANCHOR_GENERATOR_REGISTRY.register()
class RetinaNetAnchorGenerator(DefaultAnchorGenerator):
    """Anchors of the paper (Sec. 4): on P3..P7, base sizes 32^2..512^2, each at
    ``scales_per_octave`` octave scales (2^0, 2^(1/3), 2^(2/3)) and 3 aspect ratios (1:2, 1:1,
    2:1), so 9 anchors per location.

    The anchors are those of detectron2's ``DefaultAnchorGenerator`` given the expanded sizes
    (element for element), so models and checkpoints stay interchangeable; the difference is that
    the scales are plain config keys (``SIZES: [[32], [64], ...]``, ``SCALES_PER_OCTAVE: 3``)
    rather than a Python expression evaluated from YAML.

    forward(features: list of (N, C, Hi, Wi) tensors) returns a list of ``Boxes`` with
    Hi * Wi * A anchors each, in XYXY input-image coordinates, location-major (see
    ``DefaultAnchorGenerator``).
    """

    @configurable
    def __init__(
        self,
        *,
        sizes: Sequence[Sequence[float]],
        aspect_ratios: Sequence[Sequence[float]],
        strides: Sequence[int],
        scales_per_octave: int = 1,
        offset: float = 0.5,
    ):
        """
        Args:
            sizes: base anchor sizes per level (or one list broadcast to all levels), each
                expanded by :func:`octave_scaled_sizes`. With several octave scales, one base
                size per level.
            aspect_ratios: aspect ratios (height / width) per level, or one list for all.
            strides: stride of each input feature map.
            scales_per_octave: number of octave scales per base size (1: ``sizes`` as they
                are, as detectron2's ``DefaultAnchorGenerator``).
            offset: relative offset of the first anchor center from the top-left corner, in
                [0, 1). The defaults are ``DefaultAnchorGenerator``'s, so the same arguments
                give the same anchors; a config gives ``MODEL.ANCHOR_GENERATOR.OFFSET``
                (detectron2's RetinaNet: 0.0) and ``SCALES_PER_OCTAVE`` (the paper: 3).
        """
        _check_one_base_size_per_level(sizes, scales_per_octave, aspect_ratios)
        super().__init__(
            sizes=octave_scaled_sizes(sizes, scales_per_octave),
            aspect_ratios=aspect_ratios,
            strides=strides,
            offset=offset,
        )
        self.scales_per_octave = scales_per_octave

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        return {
            "sizes": cfg.MODEL.ANCHOR_GENERATOR.SIZES,
            # A detectron2 config without the plugin's keys: its SIZES as they are.
            "scales_per_octave": cfg.MODEL.ANCHOR_GENERATOR.get("SCALES_PER_OCTAVE", 1),
            "aspect_ratios": cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS,
            "strides": [x.stride for x in input_shape],
            "offset": cfg.MODEL.ANCHOR_GENERATOR.OFFSET,
        }


def _check_one_base_size_per_level(
    sizes: Sequence[Sequence[float]], scales_per_octave: int, aspect_ratios: Sequence
) -> None:
    """Refuses several base sizes per level with several octave scales: sizes listed per scale
    already (detectron2's model-zoo RetinaNet lists 3 per level) would each be expanded again,
    silently giving ``scales_per_octave`` times the anchors that SIZES and ASPECT_RATIOS imply
    (27 instead of 9 per location)."""
    sizes_per_level = max(len(level) for level in _levels(sizes))
    if scales_per_octave <= 1 or sizes_per_level <= 1:
        return
    implied = sizes_per_level * max(len(level) for level in _levels(aspect_ratios))
    raise OptionError(
        f"MODEL.ANCHOR_GENERATOR.SIZES has {sizes_per_level} sizes per level ({implied} anchors "
        f"per location with ASPECT_RATIOS), but MODEL.ANCHOR_GENERATOR.SCALES_PER_OCTAVE "
        f"{scales_per_octave} expands each to {scales_per_octave} octave scales "
        f"({implied * scales_per_octave} anchors per location): set SCALES_PER_OCTAVE 1 to use "
        "SIZES as they are, or give one base size per level, e.g. [[32], [64], [128], [256], "
        "[512]], to expand"
    )


def _levels(values: Sequence) -> List[Sequence]:
    """detectron2's per-level lists: a list of lists, or one flat list for every level. Any
    sequence counts as a list, e.g. the omegaconf ListConfig a LazyConfig passes."""
    if values and isinstance(values[0], abc.Sequence):
        return list(values)
    return [values]
