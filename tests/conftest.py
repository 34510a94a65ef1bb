"""Shared fixtures: configs of the plugin and of detectron2, and a small generated dataset."""
import os

import pytest
import torch

import retinanet_plugin  # noqa: F401  (compat patches before any detectron2 submodule)
from detectron2 import model_zoo
from detectron2.config import get_cfg
from retinanet_plugin import add_retinanet_config, get_config_file
from retinanet_plugin.data import make_shapes_dataset


def pytest_configure(config):
    """Under pytest-xdist (`make test` runs two workers on two cores) each worker, and each
    process a test starts, uses one thread: two threads per worker would oversubscribe the
    cores."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` are skipped on machines without a CUDA GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def plugin_cfg(config_name: str, *opts):
    """The plugin's config ``configs/<config_name>`` on CPU, without pretrained weights."""
    cfg = get_cfg()
    add_retinanet_config(cfg)
    cfg.merge_from_file(get_config_file(config_name))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", *opts])
    return cfg


def detectron2_cfg(model_zoo_name: str, *opts):
    """detectron2's own model-zoo config on CPU, without pretrained weights."""
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(model_zoo_name))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", *opts])
    return cfg


@pytest.fixture(scope="session")
def shapes_dataset(tmp_path_factory):
    """A small generated COCO dataset: {"train": (json, root), "val": (json, root)}."""
    root = tmp_path_factory.mktemp("shapes")
    return make_shapes_dataset(str(root), num_train=16, num_val=6, image_size=128, seed=0)


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for modules of many tiny ops: on 2 cores, thread hand-off costs
    milliseconds per op, far more than the op itself."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_voc_split(coco_json: str, image_root: str, voc_dir, split: str) -> None:
    """Writes a COCO-format split in Pascal VOC layout: JPEGImages/*.jpg, Annotations/*.xml with
    1-based pixel boxes, ImageSets/Main/<split>.txt."""
    import json
    import os

    import cv2

    with open(coco_json) as f:
        coco = json.load(f)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    for sub in ("JPEGImages", "Annotations", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(voc_dir, sub), exist_ok=True)
    ids = []
    for image in coco["images"]:
        file_id = f"{split}_{image['id']:05d}"
        ids.append(file_id)
        picture = cv2.imread(os.path.join(image_root, image["file_name"]))
        cv2.imwrite(os.path.join(voc_dir, "JPEGImages", file_id + ".jpg"), picture)
        objects = "".join(
            f"<object><name>{names[a['category_id']]}</name><difficult>0</difficult><bndbox>"
            f"<xmin>{a['bbox'][0] + 1}</xmin><ymin>{a['bbox'][1] + 1}</ymin>"
            f"<xmax>{a['bbox'][0] + a['bbox'][2]}</xmax><ymax>{a['bbox'][1] + a['bbox'][3]}</ymax>"
            "</bndbox></object>"
            for a in coco["annotations"]
            if a["image_id"] == image["id"]
        )
        xml = (
            f"<annotation><filename>{file_id}.jpg</filename><size><width>{image['width']}</width>"
            f"<height>{image['height']}</height><depth>3</depth></size>{objects}</annotation>"
        )
        with open(os.path.join(voc_dir, "Annotations", file_id + ".xml"), "w") as f:
            f.write(xml)
    with open(os.path.join(voc_dir, "ImageSets", "Main", split + ".txt"), "w") as f:
        f.write("\n".join(ids) + "\n")


def keep_classes(coco_json: str, output_json: str, category_ids) -> str:
    """Copy of a COCO annotation file with only the given categories (and their boxes)."""
    import json

    with open(coco_json) as f:
        coco = json.load(f)
    coco["categories"] = [c for c in coco["categories"] if c["id"] in category_ids]
    coco["annotations"] = [a for a in coco["annotations"] if a["category_id"] in category_ids]
    with open(output_json, "w") as f:
        json.dump(coco, f)
    return output_json


@pytest.fixture(scope="session")
def voc_dataset(shapes_dataset, tmp_path_factory):
    """The shapes dataset in VOC layout with "train" and "val" splits; returns its folder."""
    voc_dir = tmp_path_factory.mktemp("voc")
    for split in ("train", "val"):
        write_voc_split(*shapes_dataset[split], voc_dir, split)
    return str(voc_dir)
