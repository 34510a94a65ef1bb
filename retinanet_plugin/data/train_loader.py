"""The training data loader: detectron2's, with the mapper that ``INPUT.AUG`` asks for, made to
resume exactly (:mod:`.resumable`), reading images as prediction does (:mod:`.images`)."""

from typing import Optional, Sequence

from detectron2.data import (
    DatasetFromList,
    DatasetMapper,
    build_detection_test_loader,
    get_detection_dataset_dicts,
)

from .augmentations import add_train_augmentations
from .images import ImageMapper
from .mixing import MIXING_AUGMENTATIONS, MixingDatasetMapper
from .resumable import ResumableTrainLoader, build_resumable_train_loader

__all__ = ["build_test_loader", "build_train_loader", "build_train_mapper", "mixing_enabled"]


def mixing_enabled(cfg) -> bool:
    """Whether any of INPUT.AUG.{MOSAIC,MIXUP,CUTMIX} is enabled."""
    return any(cfg.INPUT.AUG[name].ENABLED for name in MIXING_AUGMENTATIONS)


def build_train_mapper(cfg, dataset: Optional[Sequence[dict]] = None) -> DatasetMapper:
    """The training :class:`ImageMapper` with the per-image augmentations of INPUT.AUG, or a
    :class:`MixingDatasetMapper` drawing from ``dataset`` when a mixing one is enabled.

    With nothing in INPUT.AUG enabled this maps as ``DatasetMapper(cfg, is_train=True)`` does,
    with the plugin's image reader.
    """
    if mixing_enabled(cfg):
        if dataset is None:
            raise ValueError("INPUT.AUG mixing augmentations need the training dataset")
        return MixingDatasetMapper(cfg, dataset)
    kwargs = DatasetMapper.from_config(cfg, is_train=True)
    kwargs["augmentations"] = add_train_augmentations(cfg, kwargs["augmentations"])
    return ImageMapper(**kwargs)


def build_train_loader(cfg) -> ResumableTrainLoader:
    """detectron2's ``build_detection_train_loader`` with :func:`build_train_mapper`'s mapper, as
    a :class:`ResumableTrainLoader` (a resumed run continues with the same batches).

    The mixing mapper and the loader share one serialized copy of the records of
    DATASETS.TRAIN, loaded as detectron2's loader does (keypoints and proposals aside, which
    mixing refuses).
    """
    if not mixing_enabled(cfg):
        return build_resumable_train_loader(cfg, mapper=build_train_mapper(cfg))
    dataset = DatasetFromList(
        get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
        ),
        copy=False,
    )
    return build_resumable_train_loader(
        cfg, mapper=build_train_mapper(cfg, dataset), dataset=dataset
    )


def build_test_loader(cfg, dataset_name: str):
    """detectron2's ``build_detection_test_loader`` for ``dataset_name``, its images read by
    :class:`ImageMapper` (as training and ``predict`` read them)."""
    return build_detection_test_loader(cfg, dataset_name, mapper=ImageMapper(cfg, is_train=False))
