"""Deployment export of the raw-head graph (and what both graphs share): TorchScript and ONNX
files give the PyTorch model's detections. The deployable graph: test_export_deployable.py."""

import importlib.util
import os
import re
import sys

import cv2
import pytest
import torch
from torch import nn

from conftest import plugin_cfg
from detectron2.modeling import build_model
from retinanet_plugin.checkpoint.checkpointer import RetinaNetCheckpointer
from retinanet_plugin.cli import defaults as retinanet_cli
from retinanet_plugin.export.exporter import (
    ExportableNetwork,
    ExportError,
    check_export_options,
    export_model,
    is_exported_model,
    load_exported,
    synthetic_test_image,
)

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
# On 2 shared cores, two intra-op threads of small convolutions mostly wait for each other.
pytestmark = pytest.mark.usefixtures("single_thread")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small test images; FPN and head narrow so that every export takes about a second.
OPTS = (
    "MODEL.FPN.OUT_CHANNELS 64 MODEL.RETINANET.NUM_CLASSES 4 "
    "INPUT.MIN_SIZE_TEST 96 INPUT.MAX_SIZE_TEST 160".split()
)
# (H, W) of the test inputs, both different from the traced sample's (96, 128).
INPUT_SIZES = ((96, 96), (80, 136))
MIN_DETECTIONS = 20


def tiny_cfg(*opts):
    return plugin_cfg("retinanet_R18_GN_tiny.yaml", *OPTS, *opts)


def build_tiny_model(cfg):
    """A randomly initialized model whose scores and boxes spread out, so that there are many
    detections and few near-ties (the prior-probability init gives every anchor ~0.01)."""
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        nn.init.normal_(model.head.cls_score.weight, std=0.1)
        nn.init.zeros_(model.head.cls_score.bias)
        nn.init.normal_(model.head.bbox_pred.weight, std=0.05)
    return model


@pytest.fixture(scope="module")
def inputs(shapes_dataset):
    """Validation images at two sizes, with their original size for the output coordinates."""
    _, image_root = shapes_dataset["val"]
    names = sorted(os.listdir(image_root))[:2]
    result = []
    for name, (height, width) in zip(names, INPUT_SIZES):
        image = cv2.imread(os.path.join(image_root, name))  # BGR, the config's INPUT.FORMAT
        resized = cv2.resize(image, (width, height)).transpose(2, 0, 1)
        result.append(
            {"image": torch.as_tensor(resized), "height": image.shape[0], "width": image.shape[1]}
        )
    return result


def detections(model, inputs):
    """Detections of every input run alone (as the test loader feeds them)."""
    with torch.no_grad():
        return [model([x])[0]["instances"] for x in inputs]


def assert_same_detections(actual, expected):
    for a, e in zip(actual, expected):
        assert len(e) >= MIN_DETECTIONS
        assert len(a) == len(e)
        assert torch.equal(a.pred_classes, e.pred_classes)
        # Pixels: kernels differ in summation order, and a delta's rounding error grows with
        # the anchor's size when decoded (exp(dw) * width).
        torch.testing.assert_close(a.pred_boxes.tensor, e.pred_boxes.tensor, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(a.scores, e.scores, rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def fp32_model():
    cfg = tiny_cfg()
    return cfg, build_tiny_model(cfg)


@pytest.mark.parametrize("export_format,suffix", [("torchscript", ".ts"), ("onnx", ".onnx")])
def test_export_gives_the_models_detections(fp32_model, inputs, tmp_path, export_format, suffix):
    cfg, model = fp32_model
    path = str(tmp_path / f"model{suffix}")
    export_model(cfg, model, export_format, path, synthetic_test_image(cfg), graph="raw-head")
    exported = load_exported(path)
    assert exported.format == export_format
    # Traced at (96, 128), run at two other sizes.
    assert_same_detections(detections(exported, inputs), detections(model, inputs))


def test_exported_file_names_no_weight_file_of_the_exporting_machine(fp32_model, inputs, tmp_path):
    """A config naming local weight files (here a timm backbone's MODEL.TIMM.WEIGHTS) exports
    without them, so the file loads on a machine that lacks those paths."""
    cfg, model = fp32_model
    timm_weights = tmp_path / "backbone.safetensors"
    timm_weights.write_bytes(b"weights of the exporting machine")
    cfg = cfg.clone()
    cfg.MODEL.TIMM.WEIGHTS = str(timm_weights)
    path = str(tmp_path / "model.ts")
    export_model(cfg, model, "torchscript", path, synthetic_test_image(cfg), graph="raw-head")
    timm_weights.unlink()  # elsewhere
    exported = load_exported(path)
    assert exported.cfg.MODEL.TIMM.WEIGHTS == "" and exported.cfg.MODEL.WEIGHTS == ""
    assert_same_detections(detections(exported, inputs), detections(model, inputs))


def test_bfloat16_torchscript_computes_in_bfloat16(inputs, tmp_path):
    cfg = tiny_cfg("MODEL.INFERENCE_DTYPE", "bfloat16")
    model = build_tiny_model(cfg)
    path = str(tmp_path / "model_bf16.ts")
    export_model(cfg, model, "torchscript", path, synthetic_test_image(cfg), graph="raw-head")
    image = inputs[1]["image"].float()
    network = ExportableNetwork(model).eval()
    exported = load_exported(path)
    with torch.no_grad():
        outputs = exported.graph(image)
        float32 = network(image)
        with network.inference_context():  # the model's MODEL.INFERENCE_DTYPE bfloat16 path
            bfloat16 = network(image)
    for e, b in zip(outputs, bfloat16):
        torch.testing.assert_close(e, b, rtol=1e-3, atol=1e-3)
    # bfloat16 rounding, far above float32's, shows that the casts are in the file.
    assert max((e - f).abs().max() for e, f in zip(outputs, float32)) > 1e-2
    assert len(detections(exported, inputs[1:])[0]) >= MIN_DETECTIONS


def conv_count(module: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in module.modules())


def run_cli(model, tmp_path, *args) -> int:
    """tools/export.py's main() on a checkpoint of ``model`` with the tiny config."""
    RetinaNetCheckpointer(model, save_dir=str(tmp_path)).save("model")
    spec = importlib.util.spec_from_file_location("export_cli", f"{REPO}/tools/export.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    config_file = f"{REPO}/configs/retinanet_R18_GN_tiny.yaml"
    weights = str(tmp_path / "model.pth")
    argv = ["--config-file", config_file, "--weights", weights, *args, *OPTS]
    return retinanet_cli.run(cli.main, argv)


def test_cli_exports_an_int8_onnx_model(fp32_model, inputs, shapes_dataset, tmp_path):
    """End to end: checkpoint in, int8 file out, whose every convolution is quantized and whose
    detections stay close to the float32 model's."""
    _, model = fp32_model
    train_root, val_root = shapes_dataset["train"][1], shapes_dataset["val"][1]
    sample_image = os.path.join(val_root, sorted(os.listdir(val_root))[0])
    output = str(tmp_path / "model_int8.onnx")
    options = "--format onnx --graph raw-head --quantize int8 --num-calibration-images 2".split()
    options += ["--calibration-images", train_root, "--sample-image", sample_image]
    assert run_cli(model, tmp_path, *options, "--output", output) == 0

    graph = onnx.load(output).graph
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    # The head's convolutions run once per level.
    num_convs = conv_count(model.backbone) + len(model.head_in_features) * conv_count(model.head)
    assert len(convs) == num_convs
    # Every convolution reads int8 (dequantized) weights and activations.
    assert all(n.input[0] in dequantized and n.input[1] in dequantized for n in convs)
    exported = load_exported(output)
    assert exported.quantize == "int8"
    for q, f in zip(detections(exported, inputs), detections(model, inputs)):
        assert len(q) >= MIN_DETECTIONS
        # Quantized, so not equal; the best scores stay close to float32's.
        torch.testing.assert_close(q.scores[:5], f.scores[:5], rtol=0, atol=0.1)


def test_cli_refuses_bfloat16_onnx(fp32_model, tmp_path, capsys):
    _, model = fp32_model
    output = str(tmp_path / "model.onnx")
    status = run_cli(model, tmp_path, "--format", "onnx", "--dtype", "bfloat16", "--output", output)
    assert status == 2
    assert "error: ONNX export is float32 only" in capsys.readouterr().err
    assert not os.path.exists(output)


def test_torch_dynamic_quantization_has_nothing_to_quantize(fp32_model):
    _, model = fp32_model
    assert not any(isinstance(m, (nn.Linear, nn.LSTM)) for m in model.modules())
    quantized = torch.ao.quantization.quantize_dynamic(model, dtype=torch.qint8)
    assert not any("quantized" in type(m).__module__ for m in quantized.modules())


@pytest.mark.parametrize(
    "name, content",
    [("weights.pth", None), ("notes.onnx", b"not a model"), ("missing.onnx", "")],
)
def test_load_exported_on_a_file_that_is_no_exported_model(tmp_path, name, content):
    """A checkpoint (a zip archive, as TorchScript files are), junk, or no file at all: one
    ExportError naming the file, not torch.jit's or onnxruntime's own error."""
    path = tmp_path / name
    if content is None:
        torch.save({"model": {"w": torch.zeros(1)}}, path)
    elif content:
        path.write_bytes(content)
    with pytest.raises(ExportError, match=re.escape(str(path))):
        load_exported(str(path))


def test_refused_options(fp32_model, tmp_path):
    cfg, model = fp32_model
    sample = synthetic_test_image(cfg)
    with pytest.raises(ExportError, match="int8 quantization is for float32 ONNX"):
        export_model(cfg, model, "torchscript", str(tmp_path / "m.ts"), sample, quantize="int8")
    with pytest.raises(ExportError, match="needs calibration images"):
        export_model(cfg, model, "onnx", str(tmp_path / "m.onnx"), sample, quantize="int8")


def test_trace_that_fixes_the_image_size_is_rejected(fp32_model, tmp_path):
    cfg, model = fp32_model

    class CroppingHead(nn.Module):
        """Crops with Python ints taken from a shape: a trace keeps the sample's numbers."""

        def __init__(self, head):
            super().__init__()
            self.head = head

        def forward(self, features):
            logits, deltas = self.head(features)
            return [x[..., : int(x.shape[-1])] for x in logits], deltas

    baked = build_tiny_model(cfg)
    baked.head = CroppingHead(baked.head)
    for export_format, name in (("torchscript", "m.ts"), ("onnx", "m.onnx")):
        with pytest.raises(ExportError, match="does not reproduce the model at other sizes"):
            sample = synthetic_test_image(cfg)
            export_model(cfg, baked, export_format, str(tmp_path / name), sample, graph="raw-head")
    assert os.listdir(tmp_path) == []  # no file that does not reproduce the model


def test_overwrite_replaces_an_earlier_export_only(fp32_model, tmp_path, capsys):
    """An earlier export is replaced with --overwrite; the weights, a checkpoint (a zip file
    too) and other files are recognized as no export."""
    _, model = fp32_model
    output = tmp_path / "model.ts"
    assert run_cli(model, tmp_path, "--format", "torchscript", "--output", str(output)) == 0
    assert is_exported_model(str(output))
    assert not is_exported_model(str(tmp_path / "model.pth"))  # the checkpoint run_cli saved
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    assert not is_exported_model(str(tmp_path / "junk.onnx"))
    first = output.read_bytes()
    argv = ["--format", "torchscript", "--output", str(output)]
    assert run_cli(model, tmp_path, *argv) == 2
    assert "holds an earlier export; pass --overwrite" in capsys.readouterr().err
    assert output.read_bytes() == first
    extra = ["MODEL.RETINANET.SCORE_THRESH_TEST", "0.3"]  # stored in the file
    assert run_cli(model, tmp_path, *argv, "--overwrite", *extra) == 0
    assert load_exported(str(output)).cfg.MODEL.RETINANET.SCORE_THRESH_TEST == 0.3


@pytest.mark.parametrize(
    "export_format, dtype, quantize, output, message",
    [
        ("onnx", "float32", None, "m.ts", "--format onnx writes .onnx files, not .ts"),
        ("torchscript", "float32", None, "m.ONNX", "writes .ts or .pt files, not .ONNX"),
        ("onnx", "bfloat16", None, "m.onnx", "ONNX export is float32 only"),
        ("torchscript", "float32", "int8", "m.ts", "int8 quantization is for float32 ONNX"),
        ("onnx", "float32", "int4", "m.onnx", "quantize 'int4' is not one of"),
    ],
)
def test_check_export_options(export_format, dtype, quantize, output, message):
    with pytest.raises(ExportError, match=re.escape(message)):
        check_export_options(export_format, dtype, quantize, output)
    for fine in ("m.ts", "m.pt", "M.TS") if export_format == "torchscript" else ("m.onnx",):
        if quantize is None and dtype == "float32":
            check_export_options(export_format, dtype, quantize, fine)


def test_missing_onnxruntime_is_explained(fp32_model, tmp_path, monkeypatch):
    cfg, model = fp32_model
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails
    with pytest.raises(ImportError, match=r"retinanet_plugin\[export\]"):
        export_model(cfg, model, "onnx", str(tmp_path / "m.onnx"), synthetic_test_image(cfg))
