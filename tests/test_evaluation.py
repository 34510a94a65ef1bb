"""Tests for retinanet_plugin.evaluation.coco_evaluation: the faster-coco-eval backend gives
pycocotools' numbers.

Tolerance: COCOeval numbers (``stats``, ``eval["precision"]``/``["recall"]``) are compared on
their 0-1 scale with an absolute tolerance of 1e-4; detectron2's results dicts are on a 0-100
scale and are divided by 100 first, so the same 1e-4 applies.
"""

import json
import logging
import sys

import numpy as np
import pytest
import torch
from pycocotools.cocoeval import COCOeval

import retinanet_plugin  # noqa: F401  (registers the plugin's components)
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.evaluation import COCOEvaluator, coco_evaluation
from detectron2.structures import Boxes, Instances
from retinanet_plugin import add_retinanet_config
from retinanet_plugin.evaluation import coco_evaluation as evaluation
from retinanet_plugin.evaluation.coco_evaluation import (
    BACKENDS,
    RetinaNetCOCOEvaluator,
    build_coco_evaluator,
    coco_eval_class,
)

faster_coco_eval = pytest.importorskip("faster_coco_eval")

DATASET = "evaluation_test_synthetic"
TOL = 1e-4
WIDTH, HEIGHT = 640, 480
# Non-contiguous ids, so that the evaluator's contiguous -> dataset id mapping is exercised.
# "unicorn" has no ground truth (only false positives): per-category AP NaN, -1 in precision.
CATEGORIES = {1: "person", 3: "car", 7: "dog", 8: "kite", 12: "unicorn"}
GT_CATEGORIES = [1, 3, 7, 8]
# COCO's area ranges are small < 32^2 <= medium < 96^2 <= large: sides drawn on either side.
SIDES = {"small": (4, 30), "medium": (34, 90), "large": (100, 300)}


def make_ground_truth(rng, num_images=300):
    """COCO ground truth: boxes of every size and category; a few crowd regions and images
    without objects."""
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "width": WIDTH, "height": HEIGHT, "file_name": "x.jpg"})
        num_objects = 0 if image_id % 25 == 0 else int(rng.integers(1, 12))
        for _ in range(num_objects):
            low, high = SIDES[rng.choice(list(SIDES))]
            w, h = rng.uniform(low, high, size=2)
            x, y = rng.uniform(0, WIDTH - w), rng.uniform(0, HEIGHT - h)
            crowd = int(rng.random() < 0.03)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(rng.choice(GT_CATEGORIES)),
                    "bbox": [float(x), float(y), float(w), float(h)],
                    "area": float(w * h),
                    "iscrowd": crowd,
                }
            )
    categories = [{"id": i, "name": name} for i, name in CATEGORIES.items()]
    return {"images": images, "annotations": annotations, "categories": categories}


def make_outputs(rng, ground_truth):
    """Model outputs per image, as detectron2 models give them (Instances with XYXY boxes and
    contiguous classes): jittered ground truth (some with the wrong class), false positives,
    coarse scores (ties), and a few images with more than the 100 detections COCO keeps."""
    contiguous = {dataset_id: i for i, dataset_id in enumerate(sorted(CATEGORIES))}
    by_image = {image["id"]: [] for image in ground_truth["images"]}
    for annotation in ground_truth["annotations"]:
        by_image[annotation["image_id"]].append(annotation)
    inputs, outputs = [], []
    for image_id, annotations in by_image.items():
        boxes, classes = [], []
        for annotation in annotations:
            if rng.random() < 0.15:  # missed
                continue
            x, y, w, h = annotation["bbox"]
            dx, dy, dw, dh = rng.normal(0, 0.05, size=4) * [w, h, w, h]
            boxes.append([x + dx, y + dy, x + dx + w + dw, y + dy + h + dh])
            category = annotation["category_id"]
            if rng.random() < 0.1:
                category = int(rng.choice(list(CATEGORIES)))
            classes.append(contiguous[category])
        num_false = 130 if image_id % 50 == 7 else int(rng.integers(0, 6))
        for _ in range(num_false):
            w, h = rng.uniform(4, 250, size=2)
            x, y = rng.uniform(0, WIDTH - w), rng.uniform(0, HEIGHT - h)
            boxes.append([x, y, x + w, y + h])
            classes.append(int(rng.integers(0, len(CATEGORIES))))
        scores = rng.uniform(0.05, 1.0, size=len(boxes))
        if image_id % 3 == 0:
            scores = np.round(scores, 2)  # ties, within and across images
        instances = Instances((HEIGHT, WIDTH))
        instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        instances.scores = torch.tensor(scores, dtype=torch.float32)
        instances.pred_classes = torch.tensor(classes, dtype=torch.int64)
        inputs.append({"image_id": image_id, "height": HEIGHT, "width": WIDTH})
        outputs.append({"instances": instances})
    return inputs, outputs


class CapturingEvaluator(RetinaNetCOCOEvaluator):
    """Keeps the COCOeval objects detectron2 derives its results from, by task."""

    def _derive_coco_results(self, coco_eval, iou_type, class_names=None):
        self.coco_evals[iou_type] = coco_eval
        return super()._derive_coco_results(coco_eval, iou_type, class_names=class_names)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """The registered synthetic dataset and model outputs for it: (name, inputs, outputs)."""
    rng = np.random.default_rng(0)
    ground_truth = make_ground_truth(rng)
    json_file = tmp_path_factory.mktemp("evaluation") / "instances.json"
    json_file.write_text(json.dumps(ground_truth))
    register_coco_instances(DATASET, {}, str(json_file), str(json_file.parent))
    # As the test data loader does: loading sets thing_classes and the category id mapping.
    DatasetCatalog.get(DATASET)
    inputs, outputs = make_outputs(rng, ground_truth)
    yield DATASET, inputs, outputs
    DatasetCatalog.remove(DATASET)
    MetadataCatalog.remove(DATASET)


def evaluate(dataset, backend, img_ids=None, **kwargs):
    """(results dict, COCOeval) of the backend on the whole synthetic dataset."""
    name, inputs, outputs = dataset
    evaluator = CapturingEvaluator(name, distributed=False, backend=backend, **kwargs)
    evaluator.coco_evals = {}
    evaluator.reset()
    for start in range(0, len(inputs), 8):  # batches, as in inference_on_dataset
        evaluator.process(inputs[start : start + 8], outputs[start : start + 8])
    results = evaluator.evaluate(img_ids=img_ids)
    return results, evaluator.coco_evals.get("bbox")


@pytest.fixture(scope="module")
def results(dataset):
    """{backend: (results dict, COCOeval)} on the whole dataset."""
    return {backend: evaluate(dataset, backend) for backend in BACKENDS}


def assert_same_numbers(results_a, results_b):
    (metrics_a, coco_eval_a), (metrics_b, coco_eval_b) = results_a, results_b
    assert metrics_a.keys() == metrics_b.keys() == {"bbox"}
    names = list(metrics_a["bbox"])
    expected = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    assert names[:6] == expected
    assert sorted(names[6:]) == sorted("AP-" + name for name in CATEGORIES.values())
    np.testing.assert_allclose(
        np.array([metrics_a["bbox"][n] for n in names]) / 100,
        np.array([metrics_b["bbox"][n] for n in names]) / 100,
        rtol=0,
        atol=TOL,
        equal_nan=True,
        err_msg=f"metrics {names}",
    )
    assert len(coco_eval_a.stats) == len(coco_eval_b.stats) == 12
    np.testing.assert_allclose(coco_eval_a.stats, coco_eval_b.stats, rtol=0, atol=TOL)
    for key in ("precision", "recall"):
        assert coco_eval_a.eval[key].shape == coco_eval_b.eval[key].shape
        np.testing.assert_allclose(coco_eval_a.eval[key], coco_eval_b.eval[key], rtol=0, atol=TOL)


def test_each_backend_evaluates_with_its_own_cocoeval(results):
    """The comparison below is not of pycocotools with itself."""
    assert type(results["pycocotools"][1]) is COCOeval
    assert isinstance(results["faster_coco_eval"][1], faster_coco_eval.COCOeval_faster)


def test_faster_coco_eval_gives_the_numbers_of_pycocotools(results):
    """AP, AP50, AP75, APs/m/l, per-category AP, the 12 stats, precision and recall agree."""
    assert_same_numbers(results["faster_coco_eval"], results["pycocotools"])
    metrics = results["pycocotools"][0]["bbox"]
    # The data exercises what it should: every area range scored, a category without ground
    # truth (NaN), and no trivial result.
    assert all(np.isfinite(metrics[name]) for name in ("APs", "APm", "APl"))
    assert 10 < metrics["AP"] < 90
    assert np.isnan(metrics["AP-unicorn"])
    assert results["pycocotools"][1].eval["precision"].shape == (10, 101, len(CATEGORIES), 4, 3)


def test_backends_agree_on_a_subset_of_images(dataset, results):
    """evaluate(img_ids=...) restricts both backends to the same images."""
    img_ids = list(range(1, 120, 2))
    subset = {backend: evaluate(dataset, backend, img_ids=img_ids) for backend in BACKENDS}
    assert_same_numbers(subset["faster_coco_eval"], subset["pycocotools"])
    assert subset["faster_coco_eval"][1].params.imgIds == img_ids
    assert subset["pycocotools"][0]["bbox"]["AP"] != results["pycocotools"][0]["bbox"]["AP"]


# detectron2 0.6 logs "No predictions from the model!" with the deprecated Logger.warn.
@pytest.mark.filterwarnings("ignore:The 'warn' method is deprecated:DeprecationWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_detections_gives_nan_metrics(dataset, backend):
    """Images processed but nothing detected: detectron2 reports NaN, without a COCOeval."""
    name, inputs, _ = dataset
    evaluator = RetinaNetCOCOEvaluator(name, distributed=False, backend=backend)
    evaluator.reset()
    empty = Instances(
        (HEIGHT, WIDTH),
        pred_boxes=Boxes(torch.zeros(0, 4)),
        scores=torch.zeros(0),
        pred_classes=torch.zeros(0, dtype=torch.int64),
    )
    evaluator.process(inputs[:4], [{"instances": empty}] * 4)
    original = coco_evaluation.COCOeval_opt
    results = evaluator.evaluate()
    assert set(results["bbox"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert all(np.isnan(value) for value in results["bbox"].values())
    assert coco_evaluation.COCOeval_opt is original


def test_no_predictions_gives_empty_results(dataset):
    evaluator = RetinaNetCOCOEvaluator(dataset[0], distributed=False)
    evaluator.reset()
    assert evaluator.evaluate() == {}


def test_faster_backend_evaluates_with_its_class_and_changes_no_global(dataset):
    """The faster backend's COCOeval is what computes the AP, and no module global of
    detectron2's evaluation changes (so evaluators may run in threads at once)."""
    seen = []

    class RecordingEvaluator(RetinaNetCOCOEvaluator):
        def _derive_coco_results(self, coco_eval, iou_type, class_names=None):
            seen.append(type(coco_eval))
            return super()._derive_coco_results(coco_eval, iou_type, class_names=class_names)

    name, inputs, outputs = dataset
    evaluator = RecordingEvaluator(name, distributed=False, backend="faster_coco_eval")
    evaluator.reset()
    evaluator.process(inputs[:10], outputs[:10])
    globals_before = dict(vars(coco_evaluation))
    evaluator.evaluate()
    assert vars(coco_evaluation) == globals_before
    assert seen == [coco_eval_class("faster_coco_eval")]


def test_config_selects_the_backend(dataset):
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_retinanet_config(cfg)
    assert cfg.TEST.COCO_EVAL_BACKEND == "faster_coco_eval"
    evaluator = build_coco_evaluator(cfg, dataset[0], None)
    assert isinstance(evaluator, COCOEvaluator) and evaluator.backend == "faster_coco_eval"
    cfg.TEST.COCO_EVAL_BACKEND = "pycocotools"
    assert build_coco_evaluator(cfg, dataset[0], None).backend == "pycocotools"


def test_unknown_backend_is_a_value_error_naming_key_value_and_choices(dataset):
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_retinanet_config(cfg)
    cfg.TEST.COCO_EVAL_BACKEND = "fast"
    with pytest.raises(ValueError) as info:
        build_coco_evaluator(cfg, dataset[0], None)
    message = str(info.value)
    assert "TEST.COCO_EVAL_BACKEND" in message and "'fast'" in message
    assert "'faster_coco_eval'" in message and "'pycocotools'" in message
    with pytest.raises(ValueError, match=r"backend \(TEST.COCO_EVAL_BACKEND\) = 'fast'"):
        RetinaNetCOCOEvaluator(dataset[0], backend="fast")
    with pytest.raises(ValueError, match="'fast'"):
        coco_eval_class("fast")


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_falls_back_to_pycocotools_with_one_warning(dataset, monkeypatch):
    """Without faster-coco-eval the default backend evaluates with pycocotools, and says so
    once, however many evaluators are built."""
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # makes the import fail
    monkeypatch.setattr(evaluation, "_warnings_logged", set())
    # On the module's logger itself: detectron2's setup_logger may stop propagation to root.
    records = _Records()
    module_logger = logging.getLogger(evaluation.__name__)
    module_logger.addHandler(records)
    monkeypatch.setattr(module_logger, "level", logging.DEBUG)
    try:
        evaluators = [
            RetinaNetCOCOEvaluator(dataset[0], distributed=False, backend="faster_coco_eval")
            for _ in range(2)
        ]
    finally:
        module_logger.removeHandler(records)
    assert [e.backend for e in evaluators] == ["pycocotools", "pycocotools"]
    warnings = [r for r in records.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "faster-coco-eval" in warnings[0].getMessage()
    assert "pycocotools" in warnings[0].getMessage()
    # The bare class does not fall back: a benchmark must not time pycocotools twice.
    with pytest.raises(ImportError, match="faster-coco-eval"):
        coco_eval_class("faster_coco_eval")

    name, inputs, outputs = dataset
    evaluator = CapturingEvaluator(name, distributed=False, backend="faster_coco_eval")
    evaluator.coco_evals = {}
    evaluator.reset()
    evaluator.process(inputs[:20], outputs[:20])
    assert np.isfinite(evaluator.evaluate()["bbox"]["AP"])
    assert type(evaluator.coco_evals["bbox"]) is COCOeval


def test_dataset_with_string_image_ids_is_evaluated_with_pycocotools(tmp_path, monkeypatch):
    """faster-coco-eval only indexes numeric ids; detectron2's COCO conversion of e.g. Pascal VOC
    keeps file names as image ids."""
    from detectron2.structures import BoxMode

    name = "evaluation_test_string_ids"
    dicts = [
        {
            "file_name": f"{i}.jpg",
            "image_id": f"image_{i:03d}",
            "height": HEIGHT,
            "width": WIDTH,
            "annotations": [
                {
                    "bbox": [10.0 * i, 20.0, 60.0, 80.0],
                    "bbox_mode": BoxMode.XYWH_ABS,
                    "category_id": 0,
                }
            ],
        }
        for i in range(1, 6)
    ]
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).thing_classes = ["thing"]
    monkeypatch.setattr(evaluation, "_warnings_logged", set())
    records = _Records()
    module_logger = logging.getLogger(evaluation.__name__)
    module_logger.addHandler(records)
    try:
        evaluators = [
            RetinaNetCOCOEvaluator(name, distributed=False, output_dir=str(tmp_path))
            for _ in range(2)
        ]
    finally:
        module_logger.removeHandler(records)
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    assert [e.backend for e in evaluators] == ["pycocotools", "pycocotools"]
    warnings = [r.getMessage() for r in records.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and name in warnings[0] and "pycocotools" in warnings[0]

    evaluator = evaluators[0]
    evaluator.reset()
    for d in dicts:
        x, y, w, h = d["annotations"][0]["bbox"]
        instances = Instances(
            (HEIGHT, WIDTH),
            pred_boxes=Boxes(torch.tensor([[x, y, x + w, y + h]])),
            scores=torch.tensor([0.9]),
            pred_classes=torch.tensor([0]),
        )
        evaluator.process([{"image_id": d["image_id"]}], [{"instances": instances}])
    assert evaluator.evaluate()["bbox"]["AP"] == pytest.approx(100.0)


def test_use_fast_impl_is_replaced_by_backend(dataset):
    with pytest.raises(TypeError, match="backend"):
        RetinaNetCOCOEvaluator(dataset[0], use_fast_impl=True)


def test_coco_eval_class_runs_standalone(dataset, results):
    """coco_eval_class(backend)(coco_gt, coco_dt, "bbox") as a benchmark would use it."""
    from pycocotools.coco import COCO

    coco_gt = COCO(MetadataCatalog.get(dataset[0]).json_file)
    coco_dt = coco_gt.loadRes(
        [
            {"image_id": 1, "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
            for a in coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=[1]))
        ]
    )
    stats = []
    for backend in BACKENDS:
        coco_eval = coco_eval_class(backend)(coco_gt, coco_dt, "bbox")
        coco_eval.params.imgIds = [1]
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
        stats.append(coco_eval.stats)
    np.testing.assert_allclose(stats[0], stats[1], rtol=0, atol=TOL)
    assert stats[0][0] == pytest.approx(1.0)  # perfect detections
