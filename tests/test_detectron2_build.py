"""The installed detectron2 works on its own, and importing the plugin changes nothing in it.

detectron2 0.6 as ``tools/install_detectron2.py`` builds it (with its source fixes) and upstream
main are both checked in fresh interpreters, so that nothing the test process imported earlier
can hide a difference.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

import detectron2
from conftest import REPO

DETECTRON2_DIR = os.path.dirname(detectron2.__file__)
BUILD_RECORD = os.path.join(DETECTRON2_DIR, "PURE_PYTHON_BUILD.json")


def _run_python(code: str) -> dict:
    """Runs ``code`` in a fresh interpreter (from the repository root); returns the JSON object
    it prints last."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _built_fixes():
    if not os.path.isfile(BUILD_RECORD):
        return []
    with open(BUILD_RECORD) as f:
        return json.load(f)["fixes"]


# ---------------------------------------------------------------------------------------------
# detectron2 without the plugin


_WITHOUT_THE_PLUGIN = r"""
import json, os, sys, tempfile
import numpy as np
import torch
from PIL import Image

import detectron2.checkpoint, detectron2.engine, detectron2.evaluation, detectron2.modeling
import detectron2.data.transforms as T
import detectron2.utils.visualizer
from detectron2.data.common import MapDataset
from detectron2.data.datasets.pascal_voc import load_voc_instances
from detectron2.layers import batched_nms

found = {"plugin_imported": any(m.startswith("retinanet_plugin") for m in sys.modules)}
# ExtentTransform's default filter (Image.LINEAR in 0.6, gone in Pillow 10).
transform = T.ExtentTransform(src_rect=(2, 3, 18, 13), output_size=(7, 9))
image = np.random.default_rng(0).integers(0, 256, size=(16, 20, 3), dtype=np.uint8)
reference = Image.fromarray(image).transform(
    size=(9, 7), method=Image.EXTENT, data=(2, 3, 18, 13), resample=Image.BILINEAR
)
found["extent_transform_is_bilinear"] = bool(
    np.array_equal(transform.apply_image(image), np.asarray(reference))
)
# MapDataset replaces an element its function rejects (random.sample on a set before the fix).
dataset = MapDataset(list(range(10)), lambda x: None if x == 3 else x * 10)
found["map_dataset_replacement"] = dataset[3]
# torchvision-based NMS: box 1 overlaps box 0 with IoU 0.81 in its class; box 2 is another class.
boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30.0]])
keep = batched_nms(boxes, torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([0, 0, 1, 0]), 0.5)
found["nms_keep"] = keep.tolist()
# A VOC split of one image (np.loadtxt gives a 0-d array without ndmin=1).
with tempfile.TemporaryDirectory() as voc:
    for sub in ("Annotations", "ImageSets/Main", "JPEGImages"):
        os.makedirs(os.path.join(voc, sub))
    with open(os.path.join(voc, "ImageSets/Main/one.txt"), "w") as f:
        f.write("a\n")
    with open(os.path.join(voc, "Annotations/a.xml"), "w") as f:
        f.write(
            "<annotation><size><width>20</width><height>10</height></size><object>"
            "<name>tree</name><difficult>0</difficult><bndbox><xmin>2</xmin><ymin>3</ymin>"
            "<xmax>8</xmax><ymax>9</ymax></bndbox></object></annotation>"
        )
    try:
        records = load_voc_instances(voc, "one", ["tree"])
        found["voc_one_id_boxes"] = [a["bbox"] for r in records for a in r["annotations"]]
    except Exception as e:
        found["voc_one_id_boxes"] = f"{type(e).__name__}: {e}"
try:  # detectron2's own deployment tools (caffe2 optional after the fix)
    from detectron2.export import TracingAdapter, scripting_with_instances

    found["export_imports"] = True
except ImportError as e:
    found["export_imports"] = f"{type(e).__name__}: {e}"
print(json.dumps(found))
"""


def test_detectron2_works_without_the_plugin():
    """In a fresh interpreter that never imports the plugin, detectron2's modules import and the
    parts its fixes touch give hand-computed results."""
    found = _run_python(_WITHOUT_THE_PLUGIN)
    assert found["plugin_imported"] is False
    assert found["extent_transform_is_bilinear"] is True
    assert found["map_dataset_replacement"] in {x * 10 for x in range(10) if x != 3}
    assert found["nms_keep"] == [0, 2, 3]
    if any("VOC split file with a single id" in fix for fix in _built_fixes()):
        # VOC boxes are 1-based: detectron2 subtracts 1 from xmin and ymin.
        assert found["voc_one_id_boxes"] == [[1.0, 2.0, 8.0, 9.0]]
    if any("detectron2.export imports without caffe2" in fix for fix in _built_fixes()):
        assert found["export_imports"] is True


_COCO_EVALUATION = r"""
import json, sys, tempfile
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Boxes, BoxMode, Instances

records = [
    {"file_name": "a.jpg", "image_id": 0, "height": 64, "width": 80, "annotations": [
        {"bbox": [4.0, 6.0, 20.0, 30.0], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0},
        {"bbox": [40.0, 10.0, 25.0, 15.0], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 1}]},
    {"file_name": "b.jpg", "image_id": 1, "height": 64, "width": 64, "annotations": [
        {"bbox": [10.0, 10.0, 30.0, 30.0], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 1}]},
]
DatasetCatalog.register("two", lambda: records)
MetadataCatalog.get("two").set(thing_classes=["circle", "square"])
with tempfile.TemporaryDirectory() as out:
    evaluator = COCOEvaluator("two", tasks=("bbox",), distributed=False, output_dir=out)
    evaluator.reset()
    for record in records:
        instances = Instances((record["height"], record["width"]))
        xywh = torch.tensor([a["bbox"] for a in record["annotations"]])
        instances.pred_boxes = Boxes(torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1))
        instances.scores = torch.ones(len(xywh))
        instances.pred_classes = torch.tensor([a["category_id"] for a in record["annotations"]])
        evaluator.process([{"image_id": record["image_id"]}], [{"instances": instances}])
    print(json.dumps(evaluator.evaluate()["bbox"]))
"""


def test_coco_evaluator_evaluates_with_its_defaults_without_the_plugin():
    """detectron2's COCOEvaluator with its default (fast) implementation, which a build without
    native ops must answer with pycocotools: perfect predictions give AP 100."""
    results = _run_python(_COCO_EVALUATION)
    assert results["AP"] == pytest.approx(100.0)
    assert results["AP-circle"] == pytest.approx(100.0)


_NATIVE_OP = r"""
import json, torch
from detectron2.layers.rotated_boxes import pairwise_iou_rotated

boxes = torch.tensor([[5.0, 5.0, 10.0, 10.0, 0.0], [10.0, 5.0, 10.0, 10.0, 0.0]])
try:
    found = {"iou": pairwise_iou_rotated(boxes, boxes)[0, 1].item()}
except Exception as e:
    found = {"error": type(e).__name__, "message": str(e)}
print(json.dumps(found))
"""


@pytest.mark.skipif(not os.path.isfile(BUILD_RECORD), reason="not a tools/install_detectron2 build")
def test_a_native_op_computes_or_raises_a_clear_error():
    """Rotated-box IoU (a native op): exact where the ops exist (two 10x10 boxes 5 apart: 50 /
    150), else an error that says the build lacks them and how to get them."""
    found = _run_python(_NATIVE_OP)
    if "iou" in found:
        assert found["iou"] == pytest.approx(1 / 3, abs=1e-6)
    else:
        assert found["error"] == "MissingNativeOpError", found
        assert "without its C++/CUDA extension" in found["message"]


# ---------------------------------------------------------------------------------------------
# The plugin's import changes nothing


_SNAPSHOT = r"""
import importlib, json, pkgutil, sys

import numpy, PIL.Image, torch
for module in (
    "detectron2.checkpoint", "detectron2.config", "detectron2.data", "detectron2.data.transforms",
    "detectron2.engine", "detectron2.evaluation", "detectron2.layers", "detectron2.modeling",
    "detectron2.structures", "detectron2.utils.visualizer", "fvcore.common.checkpoint",
):
    importlib.import_module(module)


def snapshot():
    # Every attribute of the loaded detectron2 modules and of the classes they define, and of
    # the libraries detectron2 0.6 needed fixes for, by identity.
    seen = {}
    names = [n for n in sys.modules if n.split(".")[0] in ("detectron2", "fvcore")]
    for name in sorted(names) + ["numpy", "PIL.Image", "torch"]:
        module = sys.modules[name]
        for attribute, value in list(vars(module).items()):
            seen[f"{name}:{attribute}"] = id(value)
            if isinstance(value, type) and value.__module__ == name:
                for member, member_value in list(vars(value).items()):
                    seen[f"{name}:{attribute}.{member}"] = id(member_value)
    return seen


before = snapshot()
modules_before = set(sys.modules)
import retinanet_plugin
for info in pkgutil.walk_packages(retinanet_plugin.__path__, "retinanet_plugin."):
    if not info.name.endswith("__main__"):
        importlib.import_module(info.name)
after = snapshot()
changed = sorted(key for key, value in before.items() if after.get(key) != value)
# New detectron2 modules are fine if they are detectron2's own files (the plugin imports more
# of detectron2); a module object that is not a file of it would be a stand-in.
package = sys.modules["detectron2"].__path__[0]
foreign = sorted(
    name
    for name in set(sys.modules) - modules_before
    if name.startswith("detectron2")
    and not (getattr(sys.modules[name], "__file__", "") or "").startswith(package)
)
print(json.dumps({"changed": changed, "foreign_modules": foreign}))
"""


def test_importing_the_plugin_changes_nothing_in_detectron2():
    """Every attribute of detectron2's engine, data, evaluation, modeling, checkpoint and
    visualizer modules (and of their classes), of fvcore's checkpointer, numpy, PIL.Image and
    torch is the same object after importing every module of the plugin; registries change only
    in their contents, which this does not look at."""
    found = _run_python(_SNAPSHOT)
    assert found["changed"] == [], found["changed"][:20]
    assert found["foreign_modules"] == []
