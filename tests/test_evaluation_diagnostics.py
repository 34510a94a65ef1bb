"""retinanet_plugin.evaluation.diagnostics: the per-class files the evaluator writes, checked
against counts made by hand on a tiny dataset and against detectron2's own per-class AP.

The dataset (100 x 100 images; boxes XYWH; classes cat = id 1, dog = id 5, non-contiguous so the
evaluator's id mapping is exercised):

    image 1: cat A [10,10,30,30], dog B [60,10,30,30], cat C [10,60,30,30]
    image 2: dog D [10,10,40,40], dog E [60,60,30,30]
    image 3: cat F [20,20,40,40]

Detections (class, score, where):

    image 1: d1 cat 0.9 on A; d2 cat 0.8 on B; d3 dog 0.3 on B shifted by 2 (IoU 0.77);
             d4 cat 0.6 on nothing [70,70,20,20]
    image 2: d5 dog 0.95 on D; d6 dog 0.7 on D shifted by 2 (a duplicate); d7 dog 0.4 on E
    image 3: d8 cat 0.55 on F; d9 dog 0.2 on F

COCO matching at IoU 0.5 (greedy by score): cat TP d1, d8, FP d2, d4; dog TP d5, d7, d3, FP d6,
d9; 3 ground-truth boxes per class.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import retinanet_plugin  # noqa: F401  (registers the plugin's components)
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.structures import Boxes, Instances
from retinanet_plugin.cli.plot_metrics import class_ap_series, plot_metrics
from retinanet_plugin.evaluation import diagnostics
from retinanet_plugin.evaluation.coco_evaluation import BACKENDS, RetinaNetCOCOEvaluator

pytest.importorskip("faster_coco_eval")

GROUND_TRUTH = {  # image: [(category id, XYWH)]
    1: [(1, [10, 10, 30, 30]), (5, [60, 10, 30, 30]), (1, [10, 60, 30, 30])],
    2: [(5, [10, 10, 40, 40]), (5, [60, 60, 30, 30])],
    3: [(1, [20, 20, 40, 40])],
}
DETECTIONS = {  # image: [(contiguous class: 0 cat, 1 dog), score, XYWH)]
    1: [
        (0, 0.9, [10, 10, 30, 30]),
        (0, 0.8, [60, 10, 30, 30]),
        (1, 0.3, [62, 12, 30, 30]),
        (0, 0.6, [70, 70, 20, 20]),
    ],
    2: [(1, 0.95, [10, 10, 40, 40]), (1, 0.7, [12, 12, 40, 40]), (1, 0.4, [60, 60, 30, 30])],
    3: [(0, 0.55, [20, 20, 40, 40]), (1, 0.2, [20, 20, 40, 40])],
}
CATEGORIES = {1: "cat", 5: "dog"}

# Hand-counted at score >= 0.5: cat d1, d2, d4, d8 (TP d1, d8); dog d5, d6 (TP d5).
AT_HALF = {
    "cat": (2, 2, 1),  # TP, FP, FN
    "dog": (1, 1, 2),
}
# Best F1 per class, over the thresholds of its detections (hand-counted):
#   cat: 0.9 -> 2/4, 0.8 -> 2/5, 0.6 -> 2/6, 0.55 -> 4/7 (TP 2, FP 2, FN 1)
#   dog: 0.95 -> 2/4, 0.7 -> 2/5, 0.4 -> 4/6, 0.3 -> 6/7 (TP 3, FP 1, FN 0), 0.2 -> 6/8
BEST = {"cat": (0.55, 2, 2, 1, 4 / 7), "dog": (0.3, 3, 1, 0, 6 / 7)}
# Rows ground truth (cat, dog, background), columns prediction (cat, dog, background):
CONFUSION = {
    # d2 (cat) on B, whose dog d3 is below 0.5: a dog seen as cat; d4 and the duplicate d6 are
    # background; C and E (its dog d7 is below 0.5) are missed.
    0.5: [[2, 0, 1], [1, 1, 1], [1, 1, 0]],
    # d3 takes B, d7 takes E: d2 is background now.
    0.25: [[2, 0, 1], [0, 3, 0], [2, 1, 0]],
}


def _register(name, tmp_path, categories):
    images = [{"id": i, "width": 100, "height": 100, "file_name": f"{i}.jpg"} for i in (1, 2, 3)]
    annotations = []
    for image_id, boxes in GROUND_TRUTH.items():
        for category, box in boxes:
            if category in categories:
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": category,
                        "bbox": box,
                        "area": box[2] * box[3],
                        "iscrowd": 0,
                    }
                )
    json_file = tmp_path / f"{name}.json"
    json_file.write_text(
        json.dumps(
            {
                "images": images,
                "annotations": annotations,
                "categories": [{"id": i, "name": n} for i, n in categories.items()],
            }
        )
    )
    register_coco_instances(name, {}, str(json_file), str(tmp_path))
    DatasetCatalog.get(name)  # sets thing_classes and the id mapping, as the test loader does


def _process(evaluator, classes=(0, 1), extra=()):
    """Gives ``evaluator`` the hand-placed detections (of ``classes``) and ``extra`` ones
    ([(image id, class, score, XYWH)])."""
    evaluator.reset()
    for image_id, detections in DETECTIONS.items():
        kept = [d for d in detections if d[0] in classes]
        kept += [d for i, *d in extra if i == image_id]
        boxes = [[x, y, x + w, y + h] for _, _, (x, y, w, h) in kept]
        instances = Instances(
            (100, 100),
            pred_boxes=Boxes(torch.tensor(boxes, dtype=torch.float32)),
            scores=torch.tensor([s for _, s, _ in kept]),
            pred_classes=torch.tensor([c for c, _, _ in kept]),
        )
        evaluator.process([{"image_id": image_id}], [{"instances": instances}])


def _evaluate(name, output_dir, backend, score_threshold, classes=(0, 1), extra=()):
    """detectron2's results dict of the evaluator on the detections of :func:`_process`."""
    evaluator = RetinaNetCOCOEvaluator(
        name,
        distributed=False,
        output_dir=str(output_dir),
        backend=backend,
        score_threshold=score_threshold,
    )
    _process(evaluator, classes, extra)
    return evaluator.evaluate()["bbox"]


@pytest.fixture(scope="module")
def two_classes(tmp_path_factory):
    name = "diagnostics_two_classes"
    _register(name, tmp_path_factory.mktemp("data"), CATEGORIES)
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def _read(folder, key):
    return json.loads((folder / diagnostics.FILES[key][0]).read_text())


@pytest.mark.parametrize("backend", BACKENDS)
def test_counts_precision_recall_f1_and_best_threshold_are_the_hand_counted(
    two_classes, tmp_path, backend
):
    results = _evaluate(two_classes, tmp_path, backend, 0.5)
    metrics = _read(tmp_path, "class_metrics")
    assert metrics["score_threshold"] == 0.5 and metrics["iou_threshold"] == 0.5
    by_name = {c["name"]: c for c in metrics["classes"]}
    assert list(by_name) == ["cat", "dog"]
    assert [by_name[n]["category_id"] for n in by_name] == [1, 5]
    for name, (tp, fp, fn) in AT_HALF.items():
        c = by_name[name]
        assert (c["true_positives"], c["false_positives"], c["false_negatives"]) == (tp, fp, fn)
        assert c["ground_truth"] == 3
        assert c["precision"] == pytest.approx(tp / (tp + fp))
        assert c["recall"] == pytest.approx(tp / (tp + fn))
        assert c["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
        score, tp, fp, fn, f1 = BEST[name]
        best = c["best_threshold"]
        assert best["score"] == pytest.approx(score)
        assert (best["true_positives"], best["false_positives"], best["false_negatives"]) == (
            tp,
            fp,
            fn,
        )
        assert best["f1"] == pytest.approx(f1)
        # The per-class AP is detectron2's own.
        assert c["AP"] == pytest.approx(results[f"AP-{name}"], abs=1e-9)
    overall = metrics["overall"]
    assert (overall["true_positives"], overall["false_positives"]) == (3, 3)
    assert overall["false_negatives"] == 3 and overall["f1"] == pytest.approx(0.5)


@pytest.mark.parametrize("threshold", sorted(CONFUSION))
@pytest.mark.parametrize("backend", BACKENDS)
def test_confusion_matrix_is_the_hand_counted(two_classes, tmp_path, backend, threshold):
    _evaluate(two_classes, tmp_path, backend, threshold)
    confusion = _read(tmp_path, "confusion_matrix")
    assert confusion["labels"] == ["cat", "dog", "background"]
    assert confusion["rows"] == "ground truth" and confusion["columns"] == "prediction"
    assert confusion["matrix"] == CONFUSION[threshold]
    # Consistent with the counts: the diagonal holds the true positives.
    classes = _read(tmp_path, "class_metrics")["classes"]
    assert [c["true_positives"] for c in classes] == np.diag(confusion["matrix"])[:2].tolist()


def test_precision_recall_curves_are_cocoevals_arrays(two_classes, tmp_path):
    """The curve of each class is COCOeval's interpolated precision at IoU 0.5 (area all, 100
    detections), checked against pycocotools run here on the same detections."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    _evaluate(two_classes, tmp_path, "faster_coco_eval", 0.5)
    curves = _read(tmp_path, "precision_recall")
    coco_gt = COCO(MetadataCatalog.get(two_classes).json_file)
    inverse = {0: 1, 1: 5}
    coco_dt = coco_gt.loadRes(
        [
            {"image_id": i, "category_id": inverse[c], "bbox": box, "score": s}
            for i, detections in DETECTIONS.items()
            for c, s, box in detections
        ]
    )
    reference = COCOeval(coco_gt, coco_dt, "bbox")
    reference.evaluate()
    reference.accumulate()
    np.testing.assert_allclose(curves["recall"], reference.params.recThrs)
    for k, curve in enumerate(curves["classes"]):
        np.testing.assert_allclose(
            curve["precision"], reference.eval["precision"][0, :, k, 0, -1], atol=1e-6
        )
        np.testing.assert_allclose(
            curve["scores"], reference.eval["scores"][0, :, k, 0, -1], atol=1e-6
        )


def _leaves(tree, path=""):
    """[(path, value)] of the numbers, strings and Nones of nested dicts and lists."""
    if isinstance(tree, dict):
        return [leaf for key, value in tree.items() for leaf in _leaves(value, f"{path}/{key}")]
    if isinstance(tree, list):
        return [leaf for i, value in enumerate(tree) for leaf in _leaves(value, f"{path}[{i}]")]
    return [(path, tree)]


def test_backends_give_the_same_diagnostics(two_classes, tmp_path):
    """faster-coco-eval keeps no per-image matches; its diagnostics are pycocotools' anyway:
    the same counts, thresholds and matrix, and the same AP and precision up to the float
    rounding in which the backends' precision arrays differ (1e-12)."""
    leaves = {}
    for backend in BACKENDS:
        _evaluate(two_classes, tmp_path / backend, backend, 0.25)
        leaves[backend] = _leaves(
            {key: _read(tmp_path / backend, key) for key in diagnostics.FILES}
        )
    assert [p for p, _ in leaves["faster_coco_eval"]] == [p for p, _ in leaves["pycocotools"]]
    for (path, faster), (_, reference) in zip(leaves["faster_coco_eval"], leaves["pycocotools"]):
        if isinstance(reference, float):
            assert faster == pytest.approx(reference, rel=0, abs=1e-12), path
        else:
            assert faster == reference, path


def test_files_are_written_and_pictures_open(two_classes, tmp_path):
    _evaluate(two_classes, tmp_path, "pycocotools", 0.5)
    for json_name, png_name in diagnostics.FILES.values():
        json.loads((tmp_path / json_name).read_text())
        with Image.open(tmp_path / png_name) as image:
            image.verify()
            assert image.format == "PNG"


def test_one_class_dataset(tmp_path):
    """Only cats (the dogs' boxes removed from ground truth and detections): detectron2 logs no
    per-class AP for one class, the diagnostics' AP is its overall AP."""
    name = "diagnostics_one_class"
    _register(name, tmp_path, {1: "cat"})
    try:
        results = _evaluate(name, tmp_path, "faster_coco_eval", 0.5, classes=(0,))
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    (cat,) = _read(tmp_path, "class_metrics")["classes"]
    assert cat["AP"] == pytest.approx(results["AP"], abs=1e-9)
    assert (cat["true_positives"], cat["false_positives"], cat["false_negatives"]) == (2, 2, 1)
    assert cat["best_threshold"]["score"] == pytest.approx(0.55)
    # d2 (on the now unannotated dog B) and d4 are background; C is missed.
    assert _read(tmp_path, "confusion_matrix")["matrix"] == [[2, 1], [2, 0]]
    for _, png_name in diagnostics.FILES.values():
        with Image.open(tmp_path / png_name) as image:
            assert image.format == "PNG"


def test_a_class_without_ground_truth(tmp_path):
    """A third class with no box and one detection (0.7, image 1, on nothing): no AP (detectron2:
    NaN), precision 0, recall and best threshold undefined; a background false positive."""
    name = "diagnostics_unannotated_class"
    _register(name, tmp_path, {**CATEGORIES, 9: "unicorn"})
    try:
        results = _evaluate(
            name, tmp_path, "faster_coco_eval", 0.5, extra=[(1, 2, 0.7, [40, 40, 10, 10])]
        )
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    assert np.isnan(results["AP-unicorn"])
    cat, dog, unicorn = _read(tmp_path, "class_metrics")["classes"]
    assert unicorn["AP"] is None and unicorn["AP50"] is None and unicorn["ground_truth"] == 0
    assert (unicorn["true_positives"], unicorn["false_positives"]) == (0, 1)
    assert unicorn["precision"] == 0 and unicorn["recall"] is None and unicorn["f1"] == 0
    assert unicorn["best_threshold"] is None
    # The other classes are counted as before.
    assert [cat["true_positives"], cat["false_positives"], cat["false_negatives"]] == [2, 2, 1]
    matrix = _read(tmp_path, "confusion_matrix")["matrix"]
    assert matrix == [[2, 0, 0, 1], [1, 1, 0, 1], [0, 0, 0, 0], [1, 1, 1, 0]]
    curves = _read(tmp_path, "precision_recall")["classes"]
    assert curves[2]["precision"] == [None] * 101
    for _, png_name in diagnostics.FILES.values():
        with Image.open(tmp_path / png_name) as image:
            assert image.format == "PNG"


def test_no_output_folder_writes_nothing(two_classes, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evaluator = RetinaNetCOCOEvaluator(two_classes, distributed=False, backend="pycocotools")
    evaluator.reset()
    box = Boxes(torch.tensor([[10.0, 10.0, 40.0, 40.0]]))
    instances = Instances((100, 100), pred_boxes=box, scores=torch.tensor([0.9]))
    instances.pred_classes = torch.tensor([0])
    evaluator.process([{"image_id": 1}], [{"instances": instances}])
    assert np.isfinite(evaluator.evaluate()["bbox"]["AP"])
    assert list(tmp_path.iterdir()) == []


def test_plot_metrics_draws_the_per_class_ap(tmp_path):
    """detectron2 logs bbox/AP-<class> at each evaluation: one curve per class."""
    records = [{"iteration": i, "total_loss": 1.0, "lr": 0.01} for i in range(10)]
    records += [
        {"iteration": 4, "bbox/AP": 10.0, "bbox/AP-cat": 12.0, "bbox/AP-dog": 8.0},
        {"iteration": 9, "bbox/AP": 20.0, "bbox/AP-cat": 25.0, "bbox/AP-dog": 15.0},
    ]
    metrics = tmp_path / "metrics.json"
    metrics.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    from retinanet_plugin.cli.plot_metrics import read_metrics

    assert class_ap_series(read_metrics(str(metrics))) == {
        "cat": ([4, 9], [12.0, 25.0]),
        "dog": ([4, 9], [8.0, 15.0]),
    }
    output = plot_metrics(str(metrics), str(tmp_path / "curves.png"))
    assert Image.open(output).size == (2000, 400)  # losses, lr, AP, AP per class


def test_operating_threshold_is_the_configs_test_threshold(two_classes, tmp_path):
    """build_coco_evaluator counts at MODEL.RETINANET.SCORE_THRESH_TEST: at 0.25 the counts of
    CONFUSION[0.25] (dog: d5, d7, d3 true, d6 false)."""
    from detectron2.config import get_cfg
    from retinanet_plugin import add_retinanet_config
    from retinanet_plugin.evaluation import build_coco_evaluator

    cfg = get_cfg()
    add_retinanet_config(cfg)
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.25
    evaluator = build_coco_evaluator(cfg, two_classes, str(tmp_path), distributed=False)
    assert evaluator.score_threshold == 0.25
    _process(evaluator)
    evaluator.evaluate()
    metrics = _read(tmp_path, "class_metrics")
    assert metrics["score_threshold"] == 0.25
    dog = metrics["classes"][1]
    assert (dog["true_positives"], dog["false_positives"], dog["false_negatives"]) == (3, 1, 0)
