"""The plugin's RetinaNet does what detectron2's own RetinaNet tests ask of detectron2's model
(tests/modeling/test_model_e2e.py, test_anchor_generator.py, test_export_torchscript.py and
test_export_onnx.py upstream): it scripts and traces for deployment with the detections of eager
mode, exports to ONNX through detectron2's ``TracingAdapter``, takes empty annotations, returns
detectron2's dtypes under autocast, and its anchor generator has detectron2's constructor
defaults. The references are the eager model (itself equal to detectron2's RetinaNet, see
test_equality_with_detectron2.py), detectron2's model and hand-computed anchors."""

import io

import pytest
import torch
from detectron2_pairs import build_pair
from torch import Tensor

import retinanet_plugin  # noqa: F401  (registers the plugin's components)
from conftest import detectron2_cfg, plugin_cfg
from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator, build_anchor_generator
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from detectron2.utils.testing import convert_scripted_instances
from retinanet_plugin import RetinaNetAnchorGenerator, add_retinanet_config
from retinanet_plugin.config.rules import OptionError

pytestmark = pytest.mark.usefixtures("single_thread")

try:  # detectron2 0.6's export package needs caffe2 unless built by tools/install_detectron2.py
    from detectron2.export import TracingAdapter, scripting_with_instances

    EXPORT_ERROR = None
except ImportError as e:
    EXPORT_ERROR = (
        f"detectron2.export does not import here ({e}); tools/install_detectron2.py fixes it"
    )
needs_export = pytest.mark.skipif(EXPORT_ERROR is not None, reason=str(EXPORT_ERROR))

ZOO_CONFIG = "COCO-Detection/retinanet_R_50_FPN_1x.yaml"


@pytest.fixture(scope="module")
def pair():
    """(plugin, detectron2) tiny RetinaNets with the same random weights, giving detections."""
    plugin, reference = build_pair("R18_GN_tiny", "MODEL.RETINANET.NUM_CLASSES", "3")
    for model in (plugin, reference):
        model.eval()
        with torch.no_grad():
            # Random weights with the prior bias score below 0.05 detect nothing.
            model.head.cls_score.bias.fill_(-1.0)
    return plugin, reference


def _image(height, width, seed):
    return torch.rand(3, height, width, generator=torch.Generator().manual_seed(seed)) * 255


def _detections(model, *images):
    with torch.no_grad():
        return [out["instances"] for out in model([{"image": image} for image in images])]


def _assert_same_detections(
    actual: Instances, expected: Instances, atol=1e-4, some=True, box_atol=None
):
    """Equal detections (scores within ``atol``, boxes within ``box_atol`` pixels, by default
    ``atol``); with ``some``, at least one (so that the comparison compares)."""
    assert actual.image_size == expected.image_size
    assert len(actual) == len(expected) >= int(some)
    assert torch.equal(actual.pred_classes, expected.pred_classes)
    torch.testing.assert_close(actual.scores, expected.scores, rtol=0, atol=atol)
    torch.testing.assert_close(
        actual.pred_boxes.tensor,
        expected.pred_boxes.tensor,
        rtol=0,
        atol=atol if box_atol is None else box_atol,
    )


def _sized(instances: Instances) -> Instances:
    """Traced or exported ``Instances``, whose image size is a tensor, with a tuple size."""
    height, width = (int(x) for x in instances.image_size)
    return Instances((height, width), **instances.get_fields())


# ---------------------------------------------------------------------------------------------
# Scripting, tracing, ONNX (upstream test_export_torchscript.py, test_export_onnx.py)
# ---------------------------------------------------------------------------------------------


@needs_export
def test_scripted_model_gives_eager_detections(pair):
    """detectron2's ``scripting_with_instances`` compiles the model; on a batch of two sizes its
    detections (at the input size, as detectron2's scripted RetinaNet) equal eager mode's, which
    equal detectron2's RetinaNet."""
    plugin, reference = pair
    images = [_image(160, 224, 0), _image(128, 192, 1)]
    fields = {"pred_boxes": Boxes, "scores": Tensor, "pred_classes": Tensor}
    scripted = scripting_with_instances(plugin, fields)
    with torch.no_grad():
        scripted_out = scripted([{"image": image} for image in images])
    eager, theirs = _detections(plugin, *images), _detections(reference, *images)
    for image, ours_scripted, ours, d2 in zip(images, scripted_out, eager, theirs):
        resized = detector_postprocess(convert_scripted_instances(ours_scripted), *image.shape[1:])
        _assert_same_detections(resized, ours)
        # Eager inference folds FrozenBN and runs channels-last (on by default), which changes
        # the rounding: the tolerances of tests/test_inference_optimization.py.
        _assert_same_detections(ours, d2, atol=1e-4, box_atol=5e-3)


def _trace(model, sample_images):
    """``TracingAdapter`` of the model's forward (upstream's inference function for RetinaNet),
    traced on ``sample_images``."""

    def inference(model, *images):
        return [out["instances"] for out in model.forward([{"image": x} for x in images])]

    adapter = TracingAdapter(model, tuple(sample_images), inference)
    adapter.eval()
    with torch.no_grad():
        return adapter, torch.jit.trace(adapter, tuple(sample_images), check_trace=False)


@needs_export
def test_trace_gives_eager_detections_for_other_sizes_and_candidate_counts(pair, tmp_path):
    """Traced on a batch of small images, saved and loaded, the trace gives eager mode's
    detections for larger images: their candidate counts differ from the traced ones, which a
    trace of data-dependent Python counts would have frozen."""
    plugin, _ = pair
    adapter, traced = _trace(plugin, [_image(96, 128, 2), _image(64, 96, 3)])
    torch.jit.save(traced, str(tmp_path / "model.ts"))
    traced = torch.jit.load(str(tmp_path / "model.ts"))
    images = [_image(160, 224, 0), _image(192, 160, 1)]
    with torch.no_grad():
        outputs = adapter.outputs_schema(traced(*images))
    for ours_traced, ours in zip(outputs, _detections(plugin, *images)):
        _assert_same_detections(_sized(ours_traced), ours)


@needs_export
def test_onnx_export_through_tracing_adapter_gives_eager_detections(pair):
    """The ``TracingAdapter`` exports with ``torch.onnx.export`` (at detectron2's opset 11), and
    onnxruntime runs the graph at another image size with eager mode's detections."""
    ort = pytest.importorskip("onnxruntime")
    plugin, _ = pair
    sample = _image(96, 128, 2)
    image = _image(160, 224, 0)
    (expected,) = _detections(plugin, image)
    adapter = TracingAdapter(plugin, (sample,), lambda m, x: m.forward([{"image": x}])[0])
    adapter.eval()
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(
            adapter,
            (sample,),
            buffer,
            opset_version=11,
            dynamo=False,
            input_names=["image"],
            dynamic_axes={"image": [1, 2]},
        )
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"image": image.numpy()})
    exported = adapter.outputs_schema([torch.from_numpy(x) for x in outputs])["instances"]
    _assert_same_detections(_sized(exported), expected)


# ---------------------------------------------------------------------------------------------
# Model tests (upstream test_model_e2e.py)
# ---------------------------------------------------------------------------------------------


def _zoo_config_with_plugin_model(*opts):
    """detectron2's model-zoo RetinaNet config building the plugin's model, head and anchors
    (its SIZES list the 3 octave scales already: SCALES_PER_OCTAVE 1)."""
    cfg = get_cfg()
    add_retinanet_config(cfg)
    cfg.merge_from_file(model_zoo.get_config_file(ZOO_CONFIG))
    cfg.merge_from_list(
        [
            "MODEL.DEVICE",
            "cpu",
            "MODEL.WEIGHTS",
            "",
            "MODEL.META_ARCHITECTURE",
            "FocalLossRetinaNet",
            "MODEL.ANCHOR_GENERATOR.NAME",
            "RetinaNetAnchorGenerator",
            "MODEL.ANCHOR_GENERATOR.SCALES_PER_OCTAVE",
            "1",
            *opts,
        ]
    )
    return cfg


def test_empty_data():
    """upstream's test_empty_data: images without annotations, at two sizes, through inference
    and a training step, give detectron2's RetinaNet's detections and losses with the same
    weights (no foreground: only the classification loss of all-background anchors)."""
    models = build_pair("R18_GN_tiny", "MODEL.RETINANET.NUM_CLASSES", "3")
    sizes = [(200, 250), (200, 249)]
    images = [_image(h, w, i) for i, (h, w) in enumerate(sizes)]
    losses, detections = [], []
    for model in models:
        model.eval()
        detections.append(_detections(model, *images))
        batch = []
        for image, (h, w) in zip(images, sizes):
            empty = Instances((h, w), gt_boxes=Boxes(torch.zeros(0, 4)))
            empty.gt_classes = torch.zeros(0, dtype=torch.int64)
            batch.append({"image": image, "instances": empty})
        model.train()
        with EventStorage():
            loss = model(batch)
            sum(loss.values()).backward()
        losses.append(loss)
    for ours, theirs in zip(*detections):
        _assert_same_detections(ours, theirs, atol=1e-4, some=False, box_atol=5e-3)
    ours, theirs = losses
    assert ours.keys() == theirs.keys()
    assert ours["loss_box_reg"] == theirs["loss_box_reg"] == 0
    torch.testing.assert_close(ours["loss_cls"], theirs["loss_cls"], rtol=1e-5, atol=0)
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7, msg=name)


def _record_dtypes(module, seen):
    """A forward hook recording the dtypes of ``module``'s tensor inputs and outputs."""

    def flat(x):
        if isinstance(x, Tensor):
            return [x]
        if isinstance(x, dict):
            x = list(x.values())
        return [t for item in x for t in flat(item)] if isinstance(x, (list, tuple)) else []

    def hook(module, inputs, outputs):
        seen.append(({t.dtype for t in flat(inputs)}, {t.dtype for t in flat(outputs)}))

    return module.register_forward_hook(hook)


@pytest.mark.parametrize(
    "device, dtype",
    [
        ("cpu", torch.bfloat16),
        pytest.param("cuda", torch.float16, marks=pytest.mark.cuda),  # upstream's test_autocast
    ],
)
def test_autocast_dtypes_are_detectron2s(pair, device, dtype):
    """Under a caller's autocast, backbone and head compute in the autocast dtype (the head's
    inputs are the backbone's outputs; the plugin's backbone at inference is a folded copy, which
    a hook on ``model.backbone`` would not see), boxes are float32 and scores have the autocast
    dtype: what detectron2's RetinaNet returns."""
    image = _image(64, 64, 0).to(device)
    results = {}
    for model in pair:
        model.to(device)
        seen = []
        hooks = [_record_dtypes(model.head, seen)]
        try:
            with torch.autocast(device, dtype=dtype):
                (out,) = _detections(model, image)
        finally:
            for hook in hooks:
                hook.remove()
            model.to("cpu")
        assert seen == [({dtype}, {dtype})]
        assert len(out) > 0
        results[type(model).__name__] = (out.pred_boxes.tensor.dtype, out.scores.dtype)
    assert results["FocalLossRetinaNet"] == results["RetinaNet"] == (torch.float32, dtype)


# ---------------------------------------------------------------------------------------------
# Anchor generator (upstream test_anchor_generator.py)
# ---------------------------------------------------------------------------------------------


def test_anchor_generator_constructor_defaults_are_detectron2s():
    """Built with only DefaultAnchorGenerator's required arguments, RetinaNetAnchorGenerator
    gives its anchors: one scale per size and centered anchors (offset 0.5); hand-computed rows
    of upstream's test_default_anchor_generator_centered; it also scripts, as detectron2's."""
    args = dict(sizes=[32, 64], aspect_ratios=[0.25, 1, 4], strides=[4])
    ours = RetinaNetAnchorGenerator(**args)
    theirs = DefaultAnchorGenerator(**args)
    assert (ours.offset, ours.scales_per_octave) == (theirs.offset, 1) == (0.5, 1)
    feature = torch.zeros(2, 8, 1, 2)
    anchors = ours([feature])[0].tensor
    assert torch.equal(anchors, theirs([feature])[0].tensor)
    # Center (2, 2) (offset 0.5 x stride 4); size 32 at ratio h/w 0.25: w 64, h 16.
    assert anchors[0].tolist() == [-30.0, -6.0, 34.0, 10.0]
    assert anchors[4].tolist() == [-30.0, -30.0, 34.0, 34.0]  # size 64, ratio 1
    assert anchors[6].tolist() == [-26.0, -6.0, 38.0, 10.0]  # next location: x + 4
    assert torch.equal(torch.jit.script(ours)([feature])[0].tensor, anchors)


def test_anchor_generator_from_a_detectron2_config_is_detectron2s():
    """Built from a detectron2 config without the plugin's keys (upstream's
    test_default_anchor_generator), the sizes are used as they are: detectron2's anchors, with
    the config's offset 0.0; hand-computed rows of that test."""
    cfg = get_cfg()
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[32, 64]]
    cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [[0.25, 1, 4]]
    feature = torch.zeros(2, 8, 1, 2)
    anchors = RetinaNetAnchorGenerator(cfg, [ShapeSpec(stride=4)])([feature])[0].tensor
    expected = DefaultAnchorGenerator(cfg, [ShapeSpec(stride=4)])([feature])[0].tensor
    assert torch.equal(anchors, expected)
    assert anchors[0].tolist() == [-32.0, -8.0, 32.0, 8.0]  # center (0, 0): w 64, h 16
    assert anchors[6].tolist() == [-28.0, -8.0, 36.0, 8.0]  # next location: x + 4


def test_model_zoo_sizes_with_octave_scales_are_refused():
    """detectron2's model-zoo config lists 3 sizes per level (the octave scales); switched to
    RetinaNetAnchorGenerator with the plugin's default SCALES_PER_OCTAVE 3 it would build 27
    anchors per location instead of 9: refused, naming both keys. With SCALES_PER_OCTAVE 1 the
    anchors are detectron2's."""
    shapes = [ShapeSpec(channels=256, stride=s) for s in (8, 16, 32, 64, 128)]
    cfg = _zoo_config_with_plugin_model("MODEL.ANCHOR_GENERATOR.SCALES_PER_OCTAVE", "3")
    with pytest.raises(OptionError) as error:
        build_anchor_generator(cfg, shapes)
    message = str(error.value)
    for fragment in ("MODEL.ANCHOR_GENERATOR.SIZES has 3 sizes per level (9 anchors", "27 anchors"):
        assert fragment in message
    assert "SCALES_PER_OCTAVE 3" in message and "SCALES_PER_OCTAVE 1" in message
    ours = build_anchor_generator(_zoo_config_with_plugin_model(), shapes)
    theirs = build_anchor_generator(detectron2_cfg(ZOO_CONFIG), shapes)
    assert type(ours) is RetinaNetAnchorGenerator and ours.num_cell_anchors == [9] * 5
    features = [torch.zeros(1, 1, 64 // s, 96 // s) for s in (8, 16, 32, 64, 128)]
    for a, b in zip(ours(features), theirs(features)):
        assert torch.equal(a.tensor, b.tensor)
    # The plugin's own configs (one base size per level) are unaffected.
    plugin = build_anchor_generator(plugin_cfg("retinanet_R50_FPN_1x.yaml"), shapes)
    assert plugin.num_cell_anchors == [9] * 5
