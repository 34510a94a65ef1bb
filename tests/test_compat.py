"""Tests for retinanet_plugin.compat: each test asserts what the installed detectron2 needs
(0.6 or upstream main, with or without native ops), against a reference independent of the
patch: a fresh interpreter without the plugin, Pillow's version, hand-computed values."""

import functools
import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Dict

import numpy as np
import PIL
import pytest
import torch
from PIL import Image

import detectron2
import retinanet_plugin  # noqa: F401  (compat patches before any detectron2 submodule)
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, BoxMode, Instances
from retinanet_plugin import compat
from retinanet_plugin.compat.native_ops import _MissingNativeOps, _TorchWithNativeOpsStandIn

pytestmark = pytest.mark.usefixtures("single_thread")


NATIVE_OPS = compat.NATIVE_OPS_ERROR is None
DETECTRON2_DIR = Path(detectron2.__file__).parent


_PROBED = ("detectron2._C", "detectron2.layers", "detectron2.evaluation")


@functools.lru_cache(maxsize=None)
def _imports_without_the_plugin() -> Dict[str, bool]:
    """Which of :data:`_PROBED` import in a fresh interpreter without retinanet_plugin (the
    reference for which stand-ins the installed detectron2 needs)."""
    probe = (
        "import importlib, json\n"
        "found = {}\n"
        f"for module in {_PROBED!r}:\n"
        "    try:\n"
        "        importlib.import_module(module)\n"
        "        found[module] = True\n"
        "    except Exception:  # ImportError, or what a half-imported package raises next\n"
        "        found[module] = False\n"
        "print(json.dumps(found))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Native ops: present (a full build) or stood in for with clear errors
# ---------------------------------------------------------------------------------------------


def test_native_ops_error_says_whether_detectron2_c_loads():
    """NATIVE_OPS_ERROR is None exactly when detectron2._C is a compiled module that loads."""
    compiled = list(DETECTRON2_DIR.glob("_C*.so")) + list(DETECTRON2_DIR.glob("_C*.pyd"))
    loads = bool(compiled) and _imports_without_the_plugin()["detectron2._C"]
    assert NATIVE_OPS == loads
    if loads:
        assert hasattr(sys.modules["detectron2._C"], "__file__")  # the real extension
    else:
        assert "detectron2._C" in compat.NATIVE_OPS_ERROR


def test_c_stand_in_only_where_detectron2_fails_to_import_without_it():
    """The detectron2._C stand-in is installed exactly when the native ops are missing and
    detectron2.layers or detectron2.evaluation cannot be imported without it (detectron2 0.6);
    upstream main imports without _C by itself and gets no stand-in."""
    probed = _imports_without_the_plugin()
    imports = probed["detectron2.layers"] and probed["detectron2.evaluation"]
    needed = not NATIVE_OPS and not imports
    is_stand_in = isinstance(sys.modules.get("detectron2._C"), _MissingNativeOps)
    assert is_stand_in == needed
    assert any("detectron2._C stand-in" in patch for patch in compat.APPLIED) == needed
    if needed:
        from detectron2 import _C

        assert _C is sys.modules["detectron2._C"] is detectron2._C


def _iou_boxes():
    # (x_ctr, y_ctr, w, h, angle): a 4x6 box, the same box shifted by 1 in x (intersection 3x6,
    # union 30: IoU 0.6), and a 4x4 square given as itself rotated by 90 degrees.
    return torch.tensor(
        [[10.0, 10.0, 4.0, 6.0, 0.0], [11.0, 10.0, 4.0, 6.0, 0.0], [30.0, 30.0, 4.0, 4.0, 90.0]]
    )


def test_rotated_iou_is_exact_or_a_missing_native_op_error():
    """detectron2's rotated IoU (a native op) gives the hand-computed IoUs with native ops, and
    MissingNativeOpError naming the op without them (0.6 reaches it through detectron2._C,
    upstream main through torch.ops.detectron2)."""
    from detectron2.layers.rotated_boxes import pairwise_iou_rotated

    boxes = _iou_boxes()
    square = torch.tensor([[30.0, 30.0, 4.0, 4.0, 0.0]])
    if NATIVE_OPS:
        iou = pairwise_iou_rotated(boxes, torch.cat([boxes[:1], square]))
        expected = torch.tensor([[1.0, 0.0], [0.6, 0.0], [0.0, 1.0]])
        torch.testing.assert_close(iou, expected, atol=1e-5, rtol=0)
    else:
        with pytest.raises(compat.MissingNativeOpError, match="box_iou_rotated") as info:
            pairwise_iou_rotated(boxes, square)
        assert compat.NATIVE_OPS_ERROR in str(info.value)
        assert "build detectron2 from source" in str(info.value)


def test_rotated_nms_keeps_the_hand_computed_boxes_or_raises_missing_native_op_error():
    """nms_rotated (torch.ops.detectron2 in 0.6 and main) suppresses the shifted box (IoU 0.6 >
    0.5) with native ops, and raises MissingNativeOpError without them."""
    from detectron2.layers import nms_rotated

    scores = torch.tensor([0.9, 0.8, 0.7])
    if NATIVE_OPS:
        assert nms_rotated(_iou_boxes(), scores, 0.5).tolist() == [0, 2]
    else:
        with pytest.raises(compat.MissingNativeOpError, match="nms_rotated"):
            nms_rotated(_iou_boxes(), scores, 0.5)


def test_rotated_roi_align_computes_or_raises_missing_native_op_error():
    """ROIAlignRotated of a constant feature map is that constant with native ops; without them
    it raises MissingNativeOpError naming the op."""
    from detectron2.layers import ROIAlignRotated

    pooler = ROIAlignRotated((2, 2), spatial_scale=1.0, sampling_ratio=2)
    features = torch.full((1, 1, 8, 8), 3.0)
    rois = torch.tensor([[0.0, 4.0, 4.0, 2.0, 2.0, 30.0]])  # (batch, x, y, w, h, angle)
    if NATIVE_OPS:
        torch.testing.assert_close(pooler(features, rois), torch.full((1, 1, 2, 2), 3.0))
    else:
        with pytest.raises(compat.MissingNativeOpError, match="roi_align_rotated"):
            pooler(features, rois)


def test_stand_in_raises_for_every_op_and_hides_dunders():
    """The stand-in namespace: any op name is a callable raising MissingNativeOpError (never a
    fake result); dunder lookups raise AttributeError, so hasattr/introspection behave."""
    stand_in = _MissingNativeOps("detectron2._C", "reason given")
    assert callable(stand_in.some_op_that_does_not_exist)
    with pytest.raises(compat.MissingNativeOpError, match="'deform_conv_forward'.*reason given"):
        stand_in.deform_conv_forward(torch.zeros(1))
    assert issubclass(compat.MissingNativeOpError, RuntimeError)
    assert not hasattr(stand_in, "__file__")
    assert not hasattr(stand_in, "__path__")
    with pytest.raises(AttributeError):
        stand_in.__wrapped__


def test_stand_in_answers_build_info_queries_truthfully():
    """Only collect_env's build-information queries answer, and they say "not built"."""
    stand_in = _MissingNativeOps("detectron2._C", "reason")
    assert stand_in.has_cuda() is False
    assert "not built" in stand_in.get_compiler_version()
    assert "not built" in stand_in.get_cuda_version()


def test_torch_ops_stand_in_passes_registered_ops_through():
    """A module's torch.ops.detectron2 stand-in returns ops that are registered (here one of
    torchvision's, through its namespace) and raises for the others; the rest of torch is
    torch's own."""
    stand_in = _TorchWithNativeOpsStandIn("reason")
    assert stand_in.zeros is torch.zeros and stand_in.Tensor is torch.Tensor
    assert stand_in.ops.torchvision.nms is torch.ops.torchvision.nms
    with pytest.raises(compat.MissingNativeOpError, match="no_such_op"):
        stand_in.ops.detectron2.no_such_op()


def test_collect_env_info_reports_the_native_ops():
    """detectron2's environment report runs; it says "not built" without native ops."""
    from detectron2.utils.collect_env import collect_env_info

    text = collect_env_info()
    assert "detectron2" in text
    assert ("not built" in text) == (not NATIVE_OPS)


def test_torchvision_ops_used_by_retinanet_still_work():
    """RetinaNet's inference NMS (detectron2.layers.batched_nms, torchvision-based) works without
    native ops, checked on hand-made boxes."""
    from detectron2.layers import batched_nms

    boxes = torch.tensor(
        [[0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]], dtype=torch.float32
    )
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    classes = torch.tensor([0, 0, 1, 0])
    # Box 1 overlaps box 0 with IoU 81/100 in the same class -> suppressed; box 2 is another class.
    keep = batched_nms(boxes, scores, classes, 0.5)
    assert keep.tolist() == [0, 2, 3]


# ---------------------------------------------------------------------------------------------
# Pillow
# ---------------------------------------------------------------------------------------------

USES_PIL_LINEAR = (
    "Image.LINEAR" in (DETECTRON2_DIR / "data" / "transforms" / "transform.py").read_text()
)
PILLOW_HAS_LINEAR = int(PIL.__version__.split(".")[0]) < 10  # removed in Pillow 10


def test_pil_linear_alias_only_where_detectron2_uses_it():
    """PIL.Image.LINEAR is aliased to BILINEAR exactly when detectron2 uses it (0.6) and Pillow
    dropped it (>= 10); otherwise Pillow is left as it is."""
    patched = USES_PIL_LINEAR and not PILLOW_HAS_LINEAR
    assert any("PIL.Image.LINEAR" in patch for patch in compat.APPLIED) == patched
    if patched or PILLOW_HAS_LINEAR:
        assert Image.LINEAR == Image.BILINEAR
    else:
        assert not hasattr(Image, "LINEAR")


def test_detectron2_transforms_import_and_extent_transform_is_bilinear():
    """detectron2.data.transforms imports; ExtentTransform's default filter is bilinear and
    gives the same image as PIL's bilinear EXTENT transform."""
    import detectron2.data.transforms as T

    transform = T.ExtentTransform(src_rect=(2, 3, 18, 13), output_size=(7, 9))
    assert transform.interp == Image.BILINEAR
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(16, 20, 3), dtype=np.uint8)
    out = transform.apply_image(img)
    ref = np.asarray(
        Image.fromarray(img).transform(
            size=(9, 7), method=Image.EXTENT, data=(2, 3, 18, 13), resample=Image.BILINEAR
        )
    )
    assert out.shape == (7, 9, 3)
    np.testing.assert_array_equal(out, ref)


# ---------------------------------------------------------------------------------------------
# COCOEvaluator
# ---------------------------------------------------------------------------------------------

_DICTS = [
    {
        "file_name": "img0.jpg",
        "image_id": 0,
        "height": 64,
        "width": 80,
        "annotations": [
            {"bbox": [4.0, 6.0, 20.0, 30.0], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0},
            {"bbox": [40.0, 10.0, 25.0, 15.0], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 1},
        ],
    },
    {
        "file_name": "img1.jpg",
        "image_id": 1,
        "height": 64,
        "width": 64,
        "annotations": [
            {"bbox": [10.0, 10.0, 30.0, 30.0], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 1},
        ],
    },
]


@pytest.fixture
def tiny_coco_dataset(request):
    """A two-image dataset registered in DatasetCatalog / MetadataCatalog (removed afterwards)."""
    name = f"retinanet_plugin_test_compat_{request.node.name}"
    DatasetCatalog.register(name, lambda: [dict(d) for d in _DICTS])
    MetadataCatalog.get(name).set(thing_classes=["circle", "square"])
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


@pytest.mark.parametrize("use_fast_impl", [True, False])
def test_coco_evaluator_uses_pycocotools_without_native_ops(
    tiny_coco_dataset, tmp_path, use_fast_impl
):
    """COCOEvaluator's fast path needs native ops: without them it evaluates with pycocotools'
    COCOeval even when asked for the fast one (0.6 through the patch, main by itself)."""
    from pycocotools.cocoeval import COCOeval

    from detectron2.evaluation import COCOEvaluator, coco_evaluation

    evaluator = COCOEvaluator(
        tiny_coco_dataset,
        tasks=("bbox",),
        distributed=False,
        output_dir=str(tmp_path),
        use_fast_impl=use_fast_impl,
    )
    # The class detectron2 evaluates with (both versions choose it this way).
    used = coco_evaluation.COCOeval_opt if evaluator._use_fast_impl else COCOeval
    assert (used is COCOeval) == (not NATIVE_OPS or not use_fast_impl)


def test_coco_evaluator_evaluates_perfect_predictions(tiny_coco_dataset, tmp_path):
    """With the pycocotools fallback, predictions equal to the ground truth score 100 AP."""
    from detectron2.evaluation import COCOEvaluator

    evaluator = COCOEvaluator(
        tiny_coco_dataset, tasks=("bbox",), distributed=False, output_dir=str(tmp_path)
    )
    evaluator.reset()
    for d in _DICTS:
        instances = Instances((d["height"], d["width"]))
        xyxy = [
            BoxMode.convert(a["bbox"], BoxMode.XYWH_ABS, BoxMode.XYXY_ABS) for a in d["annotations"]
        ]
        instances.pred_boxes = Boxes(torch.tensor(xyxy, dtype=torch.float32))
        instances.scores = torch.full((len(xyxy),), 0.9)
        instances.pred_classes = torch.tensor([a["category_id"] for a in d["annotations"]])
        evaluator.process([{"image_id": d["image_id"]}], [{"instances": instances}])
    results = evaluator.evaluate()
    assert results["bbox"]["AP"] == pytest.approx(100.0)
    assert results["bbox"]["AP50"] == pytest.approx(100.0)


# ---------------------------------------------------------------------------------------------
# apply()
# ---------------------------------------------------------------------------------------------


def test_apply_is_idempotent():
    """Calling apply() again changes nothing: same patch list, same stand-in, no double wrapping."""
    from detectron2.evaluation import COCOEvaluator

    stand_in = sys.modules.get("detectron2._C")
    init = COCOEvaluator.__init__
    linear = getattr(Image, "LINEAR", None)
    patches_before = list(compat.APPLIED)

    first = compat.apply()
    second = compat.apply()

    assert first == second
    assert first["patches"] == patches_before == compat.APPLIED
    assert first["native_ops_error"] == compat.NATIVE_OPS_ERROR
    assert len(set(compat.APPLIED)) == len(compat.APPLIED)
    assert sys.modules.get("detectron2._C") is stand_in
    assert COCOEvaluator.__init__ is init
    assert getattr(Image, "LINEAR", None) == linear
    # The returned list is a copy: mutating it does not change the record.
    first["patches"].append("bogus")
    assert "bogus" not in compat.apply()["patches"]


@pytest.mark.parametrize(
    "module_name, alias",
    [("detectron2.data.datasets.pascal_voc", "str"), ("detectron2.data.build", "int")],
)
def test_numpy_aliases_only_inside_detectron2_modules_that_use_them(module_name, alias):
    """A detectron2 module whose source uses np.<alias> (0.6's VOC loader and class histogram)
    sees it; numpy itself never gets the alias, and modules that do not use it (main) keep
    numpy's own np."""
    import importlib
    import re

    import numpy

    module = importlib.import_module(module_name)
    source = Path(module.__file__).read_text()
    uses_alias = re.search(rf"\bnp\.{alias}\b", source) is not None
    if uses_alias:
        assert getattr(module.np, alias) is {"str": str, "int": int}[alias]
        assert module.np.zeros is numpy.zeros  # everything else is numpy's own
    else:
        assert not _has(module.np, alias)
    assert not _has(numpy, alias)


def _has(namespace, name: str) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # numpy 2's hasattr(np, "str") warns
        return hasattr(namespace, name)


def test_ddp_of_a_cpu_model_gets_no_device_ids(monkeypatch):
    """create_ddp_model wraps CPU models without device_ids (DDP rejects them on CPU)."""
    from detectron2.engine import defaults

    captured = {}

    class FakeDDP:
        def __init__(self, model, **kwargs):
            captured.update(kwargs)

    monkeypatch.setattr(defaults.comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(defaults, "DistributedDataParallel", FakeDDP)
    defaults.create_ddp_model(torch.nn.Linear(2, 2), broadcast_buffers=False)
    assert captured == {"device_ids": None, "broadcast_buffers": False}


def test_map_dataset_retries_an_element_its_mapper_rejects():
    """detectron2's MapDataset answers a None from the mapper with another element (0.6's
    random.sample on a set raised TypeError on Python >= 3.11; the patch fixes only that)."""
    from detectron2.data.common import MapDataset

    dataset = MapDataset(list(range(10)), lambda x: None if x == 3 else x * 10)
    assert dataset[2] == 20
    replacement = dataset[3]
    assert replacement in {x * 10 for x in range(10) if x != 3}
    assert any(p.startswith("MapDataset") for p in compat.APPLIED) == (
        "sample(self._fallback_candidates" in open(DETECTRON2_DIR / "data" / "common.py").read()
    )
