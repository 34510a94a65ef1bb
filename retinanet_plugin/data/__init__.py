"""Datasets: registration of users' COCO / VOC datasets and a generated demo dataset."""
from .datasets import (
    DatasetError,
    add_dataset_arguments,
    dataset_class_names,
    register_coco_dataset,
    register_datasets_from_args,
    register_voc_dataset,
    resolve_num_classes,
    voc_class_names,
)
from .synthetic_shapes import SHAPE_CLASSES, make_shapes_dataset

__all__ = [
    "DatasetError",
    "add_dataset_arguments",
    "register_datasets_from_args",
    "register_coco_dataset",
    "register_voc_dataset",
    "voc_class_names",
    "dataset_class_names",
    "resolve_num_classes",
    "make_shapes_dataset",
    "SHAPE_CLASSES",
]
