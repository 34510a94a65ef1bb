"""Shared fixtures: configs of the plugin and of detectron2, and a small generated dataset."""
import pytest
import torch

import retinanet_plugin  # noqa: F401  (compat patches before any detectron2 submodule)
from detectron2 import model_zoo
from detectron2.config import get_cfg
from retinanet_plugin import add_retinanet_config, get_config_file
from retinanet_plugin.data import make_shapes_dataset


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
