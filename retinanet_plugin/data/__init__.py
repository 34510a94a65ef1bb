"""Datasets (registration of users' COCO / VOC datasets and a generated demo dataset) and the
training data loader with its augmentations."""

from .augmentations import RandomChoice, add_train_augmentations
from .datasets import (
    DatasetError,
    add_dataset_arguments,
    check_datasets_before_training,
    dataset_class_names,
    register_coco_dataset,
    register_datasets_from_args,
    register_voc_dataset,
    resolve_num_classes,
    voc_class_names,
)
from .images import ImageMapper, ImageReadError, read_image
from .mixing import MIXING_AUGMENTATIONS, MixingDatasetMapper, cutmix, mixup, mosaic
from .synthetic_shapes import (
    DEMO_TRAIN,
    DEMO_VAL,
    SHAPE_CLASSES,
    make_demo_dataset_args,
    make_shapes_dataset,
)
from .train_loader import build_test_loader, build_train_loader, build_train_mapper, mixing_enabled

__all__ = [
    "DatasetError",
    "add_dataset_arguments",
    "register_datasets_from_args",
    "check_datasets_before_training",
    "ImageMapper",
    "ImageReadError",
    "read_image",
    "register_coco_dataset",
    "register_voc_dataset",
    "voc_class_names",
    "dataset_class_names",
    "resolve_num_classes",
    "make_shapes_dataset",
    "make_demo_dataset_args",
    "DEMO_TRAIN",
    "DEMO_VAL",
    "SHAPE_CLASSES",
    "add_train_augmentations",
    "RandomChoice",
    "MixingDatasetMapper",
    "MIXING_AUGMENTATIONS",
    "mosaic",
    "mixup",
    "cutmix",
    "build_train_mapper",
    "build_train_loader",
    "build_test_loader",
    "mixing_enabled",
]
