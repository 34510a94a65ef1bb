"""Tests for retinanet_plugin.compat: detectron2 0.6 without native ops on current libraries."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import retinanet_plugin  # noqa: F401  (compat patches before any detectron2 submodule)
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, BoxMode, Instances
from retinanet_plugin import compat


pytestmark = pytest.mark.usefixtures("single_thread")


def _rotated_boxes():
    # (x_ctr, y_ctr, w, h, angle)
    return torch.tensor([[10.0, 10.0, 4.0, 6.0, 0.0], [20.0, 20.0, 8.0, 2.0, 30.0]])


# ---------------------------------------------------------------------------------------------
# Native ops stand-in
# ---------------------------------------------------------------------------------------------


def test_native_ops_are_absent_here():
    """On this machine detectron2 has no compiled _C, and compat records why."""
    import detectron2

    package_dir = Path(detectron2.__file__).parent
    assert not list(package_dir.glob("_C*")), "this test expects detectron2 without native ops"
    assert isinstance(sys.modules["detectron2._C"], compat._MissingNativeOps)
    assert isinstance(compat.NATIVE_OPS_ERROR, str) and compat.NATIVE_OPS_ERROR
    assert "detectron2._C" in compat.NATIVE_OPS_ERROR


def test_stand_in_is_installed_as_detectron2_c():
    """`from detectron2 import _C` gives the stand-in, also registered in sys.modules."""
    import detectron2
    from detectron2 import _C

    assert _C is sys.modules["detectron2._C"] is detectron2._C
    assert _C.__name__ == "detectron2._C"
    assert any("detectron2._C" in patch for patch in compat.APPLIED)


def test_calling_a_native_op_raises_missing_native_op_error():
    """Any native op raises MissingNativeOpError naming the op and the reason."""
    from detectron2 import _C

    boxes = _rotated_boxes()
    with pytest.raises(compat.MissingNativeOpError, match="box_iou_rotated") as info:
        _C.box_iou_rotated(boxes, boxes)
    assert compat.NATIVE_OPS_ERROR in str(info.value)
    assert issubclass(compat.MissingNativeOpError, RuntimeError)
    with pytest.raises(compat.MissingNativeOpError, match="nms_rotated"):
        _C.nms_rotated(boxes, torch.ones(2), 0.5)


def test_pairwise_iou_rotated_raises_missing_native_op_error():
    """detectron2's rotated-box IoU (a native op) fails loudly instead of returning a fake value."""
    from detectron2.layers.rotated_boxes import pairwise_iou_rotated

    boxes = _rotated_boxes()
    with pytest.raises(compat.MissingNativeOpError, match="box_iou_rotated"):
        pairwise_iou_rotated(boxes, boxes[:1])


def test_dunder_attributes_are_absent_on_the_stand_in():
    """Dunder lookups raise AttributeError (so hasattr/introspection behave), not a fake op."""
    from detectron2 import _C

    assert not hasattr(_C, "__file__")
    assert not hasattr(_C, "__path__")
    with pytest.raises(AttributeError):
        _C.__wrapped__
    # Ordinary names are (raising) callables.
    assert callable(_C.some_op_that_does_not_exist)


def test_build_info_queries_are_answered_truthfully():
    """Only collect_env's build-information queries answer, and they say "not built"."""
    from detectron2 import _C

    assert _C.has_cuda() is False
    assert "not built" in _C.get_compiler_version()
    assert "not built" in _C.get_cuda_version()


def test_collect_env_info_says_native_ops_are_not_built():
    """detectron2's environment report runs and reports the missing native ops."""
    from detectron2.utils.collect_env import collect_env_info

    text = collect_env_info()
    assert isinstance(text, str)
    compiler_lines = [line for line in text.splitlines() if line.startswith("Compiler")]
    assert compiler_lines and "not built" in compiler_lines[0]
    assert "detectron2" in text


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


def test_pil_linear_alias():
    """PIL.Image.LINEAR exists again and is the bilinear filter."""
    assert hasattr(Image, "LINEAR")
    assert Image.LINEAR == Image.BILINEAR


def test_detectron2_transforms_import_and_extent_transform_is_bilinear():
    """detectron2.data.transforms imports; ExtentTransform's default filter (Image.LINEAR) is
    bilinear and gives the same image as PIL's bilinear EXTENT transform."""
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
    """COCOEvaluator's fast path needs native ops, so it is turned off even when requested."""
    from detectron2.evaluation import COCOEvaluator

    evaluator = COCOEvaluator(
        tiny_coco_dataset,
        tasks=("bbox",),
        distributed=False,
        output_dir=str(tmp_path),
        use_fast_impl=use_fast_impl,
    )
    assert evaluator._use_fast_impl is False
    assert hasattr(COCOEvaluator.__init__, "__wrapped__")


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

    stand_in = sys.modules["detectron2._C"]
    init = COCOEvaluator.__init__
    patches_before = list(compat.APPLIED)

    first = compat.apply()
    second = compat.apply()

    assert first == second
    assert first["patches"] == patches_before == compat.APPLIED
    assert first["native_ops_error"] == compat.NATIVE_OPS_ERROR
    assert len(set(compat.APPLIED)) == len(compat.APPLIED)
    assert sys.modules["detectron2._C"] is stand_in
    assert COCOEvaluator.__init__ is init
    assert Image.LINEAR == Image.BILINEAR
    # The returned list is a copy: mutating it does not change the record.
    first["patches"].append("bogus")
    assert "bogus" not in compat.apply()["patches"]


def test_numpy_aliases_only_inside_patched_detectron2_modules():
    """detectron2 0.6's VOC loader and class histogram see np.int/np.str; numpy itself does not."""
    import numpy

    from detectron2.data import build
    from detectron2.data.datasets import pascal_voc

    assert pascal_voc.np.str is str and build.np.int is int
    assert pascal_voc.np.zeros is numpy.zeros  # everything else is numpy's own
    assert not hasattr(numpy, "int")


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
