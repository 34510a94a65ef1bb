"""Shared fixtures: configs of the plugin and of detectron2, and a small generated dataset."""

import contextlib
import io
import logging
import os

import pytest
import torch

import retinanet_plugin  # noqa: F401  (registers the plugin's components)
from detectron2 import model_zoo
from detectron2.config import get_cfg
from retinanet_plugin import add_retinanet_config, get_config_file
from retinanet_plugin.data import make_shapes_dataset

# Overrides for a tiny end-to-end run of the tiny config: 3 iterations of 2 small images, and a
# score threshold of 0 so that the evaluation of the barely trained model computes a real AP.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "retinanet_R18_GN_tiny.yaml")
TINY_RUN = (
    "SOLVER.MAX_ITER 3 SOLVER.IMS_PER_BATCH 2 INPUT.MIN_SIZE_TRAIN (128,) INPUT.MIN_SIZE_TEST 128 "
    "MODEL.RETINANET.SCORE_THRESH_TEST 0.0"
).split()


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


def pycocotools_ap(annotation_file: str, results_file: str) -> float:
    """Box AP (in %) of a COCO results file, from the official pycocotools COCOeval: the
    reference the plugin's evaluation (faster-coco-eval by default) is checked against."""
    import json

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO(annotation_file)
        with open(results_file) as f:
            detections = ground_truth.loadRes(json.load(f))
        evaluation = COCOeval(ground_truth, detections, "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return 100.0 * float(evaluation.stats[0])


def _loggers():
    return [logging.getLogger()] + [
        logger
        for logger in logging.Logger.manager.loggerDict.values()
        if isinstance(logger, logging.Logger)
    ]


@contextlib.contextmanager
def log_handlers_restored():
    """Removes the log handlers added during the block (detectron2's setup_logger, called by an
    entry point run in the test process, writes to the output pytest captured for that test,
    which is closed after it) and clears setup_logger's cache, so they can be added again."""
    from detectron2.utils import logger as detectron2_logger

    handlers = {id(logger): list(logger.handlers) for logger in _loggers()}
    try:
        yield
    finally:
        for logger in _loggers():
            logger.handlers = [h for h in logger.handlers if h in handlers.get(id(logger), [])]
        detectron2_logger.setup_logger.cache_clear()


@pytest.fixture(autouse=True)
def _no_log_handlers_left_behind():
    """Every test: a handler a test leaves on a logger would make later tests' logging fail on
    its closed stream."""
    with log_handlers_restored():
        yield


@contextlib.contextmanager
def isolated_process_state():
    """Runs a block that sets up what a command line sets up (datasets in DatasetCatalog, log
    handlers on the current stdout/stderr, detectron2's setup_logger cache), then undoes it,
    so that in-process runs of entry points do not see or leave each other's state. Datasets
    registered before the block are hidden during it."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.utils import logger as detectron2_logger
    from retinanet_plugin.data import datasets
    from retinanet_plugin.engine.run_checks import _user_registered

    hidden = {name: DatasetCatalog[name] for name in _user_registered()}
    for name in hidden:
        DatasetCatalog.remove(name)
    registered = set(DatasetCatalog.list())
    detectron2_logger.setup_logger.cache_clear()
    try:
        with log_handlers_restored():
            yield
    finally:
        for name in set(DatasetCatalog.list()) - registered:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
            datasets._REGISTRATIONS.pop(name, None)
        for name, load in hidden.items():
            DatasetCatalog.register(name, load)


def run_main(main, argv):
    """Runs an entry point's ``main`` in this process as its command line runs it
    (``retinanet_plugin.cli.defaults.run``: exit status 2 and one error line for bad input), in
    :func:`isolated_process_state`. Saves the ~6 s a new Python process takes to import torch
    and detectron2.

    Returns:
        (exit status, everything it printed and logged).
    """
    from retinanet_plugin.cli import defaults as cli

    output = io.StringIO()
    # Warnings logged before the entry point sets up its loggers, which a new process would
    # print through logging's last-resort handler (the plugin's logger may not propagate to the
    # root logger after an earlier run here set it up).
    warnings_handler = logging.StreamHandler(output)
    warnings_handler.setLevel(logging.WARNING)
    with isolated_process_state(), contextlib.redirect_stdout(output), contextlib.redirect_stderr(
        output
    ):
        for name in ("", "retinanet_plugin"):
            logging.getLogger(name).addHandler(warnings_handler)
        status = cli.run(main, [str(a) for a in argv])
    return status, output.getvalue()


class _Messages(logging.Handler):
    def __init__(self, level):
        super().__init__(level)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def warnings_of(logger_name, level=logging.WARNING):
    """The messages of one logger at ``level`` or above (caplog misses loggers that do not
    propagate, as detectron2's setup_logger leaves them)."""
    logger, handler = logging.getLogger(logger_name), _Messages(level)
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(min(level, logger.getEffectiveLevel()))
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
