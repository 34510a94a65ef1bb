"""Datasets: registration of users' COCO-format datasets and a generated demo dataset."""
from .datasets import register_coco_dataset
from .synthetic_shapes import SHAPE_CLASSES, make_shapes_dataset

__all__ = ["register_coco_dataset", "make_shapes_dataset", "SHAPE_CLASSES"]
