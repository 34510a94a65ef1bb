"""Registering datasets in detectron2's DatasetCatalog / MetadataCatalog."""
import logging
import os

from detectron2.data import DatasetCatalog
from detectron2.data.datasets import register_coco_instances

logger = logging.getLogger(__name__)


def register_coco_dataset(name: str, json_file: str, image_root: str) -> None:
    """Registers a COCO-format detection dataset under ``name`` (detectron2's COCO loader).

    Args:
        name: the name to use in ``DATASETS.TRAIN`` / ``DATASETS.TEST``.
        json_file: COCO instances annotation file.
        image_root: folder the annotation's ``file_name`` entries are relative to.
    """
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"dataset {name!r}: annotation file {json_file} does not exist")
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"dataset {name!r}: image root {image_root} is not a folder")
    if name in DatasetCatalog.list():
        raise ValueError(f"dataset {name!r} is already registered")
    register_coco_instances(name, {}, json_file, image_root)
    logger.info("Registered COCO dataset %r: %s, images in %s", name, json_file, image_root)
