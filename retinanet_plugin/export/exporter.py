"""Deployment export: a :class:`FocalLossRetinaNet` as TorchScript or ONNX. The runtime that
turns an exported file's outputs into detectron2 ``Instances`` is
:mod:`retinanet_plugin.export.runtime` (``load_exported``, also importable from here).

Two graphs (``graph``, :data:`GRAPHS`):

* ``"deployable"`` (the default): the whole model, decoded image in, detections out, including
  the test resize, decoding and NMS (:mod:`retinanet_plugin.export.deployable`), so that the
  file runs in a bare onnxruntime session (or ``torch.jit.load``) with no plugin code; the
  thresholds are fixed in the file. Besides the config, the file's metadata holds the class
  names (:data:`CLASS_NAMES_KEY`, a JSON list) and the input's channel order
  (:data:`INPUT_FORMAT_KEY`).
* ``"raw-head"``: the network only, described below; post-processing runs in Python.

What the raw-head graph exports and what stays in Python:

* **Exported** (:class:`ExportableNetwork`): input normalization, padding to the backbone's size
  divisibility, backbone + FPN and head. Input: one image, a (3, H, W) float32 tensor of pixel
  values in ``cfg.INPUT.FORMAT`` channel order, already resized as the test loader resizes
  (``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``; :func:`load_test_input`); H and W are dynamic.
  Outputs, flat: per level (p3..p7) the class logits (1, A*K, Hi, Wi), then per level the box
  deltas (1, A*4, Hi, Wi), all float32.
* **Python** (:class:`ExportedRetinaNet`): anchors, score threshold, top-k per level, box
  decoding, class-wise NMS and the top detections, i.e. the model's own
  ``retinanet_plugin.modeling.postprocessing.batched_detections``, then detectron2's
  ``detector_postprocess`` to the original image size. In Python they are the same code as the
  PyTorch model's, so detections match it and the thresholds can be changed without
  re-exporting.

Formats and options (:func:`export_model`):

* ``"torchscript"``: ``torch.jit.trace``. detectron2's padding (``ImageList.from_tensors``)
  traces with symbolic sizes, so one trace serves all image sizes; every export checks this by
  running the trace at a second size and comparing with the model (:class:`ExportError` if the
  trace baked a size in, e.g. with a custom backbone). With ``MODEL.INFERENCE_DTYPE
  bfloat16`` the trace runs under bfloat16 autocast, so the file holds the casts and computes
  in bfloat16 like the PyTorch model does with that setting. (torch 2.14 marks TorchScript
  deprecated and warns so; ONNX is the longer-lived format.)
* ``"onnx"``: ``torch.onnx.export(dynamo=False)`` (opset 17) with dynamic H and W, run with
  onnxruntime's CPU provider; needs ``onnx`` and ``onnxruntime``, not ``onnxscript``. The dynamo
  exporter fails on detectron2's data-dependent checks (``x.numel() == 0 and self.training``
  in its ``Conv2d``). bfloat16 is refused: ONNX's ``Conv`` has no bfloat16 type, so
  onnxruntime cannot load such a graph.
* ``quantize="int8"`` (ONNX only): onnxruntime's static quantization (QDQ, per-channel int8
  weights, uint8 activations calibrated on images you give), which onnxruntime runs as
  ``QLinearConv``. torch's ``quantize_dynamic`` covers only Linear/LSTM layers, of which
  RetinaNet has none, so it would change nothing; TorchScript int8 is refused.

The exported file carries the model's config and class names (ONNX ``metadata_props`` / a
TorchScript extra file), so :func:`load_exported` needs nothing else. Exports run on the CPU.
"""

import contextlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from detectron2.config import CfgNode

from ..checkpoint.atomic_io import atomic_write
from ..modeling.meta_arch import FocalLossRetinaNet
from .deployable import INPUT_NAMES, DeployableRetinaNet
from .runtime import (
    CLASS_NAMES_KEY,
    GRAPHS,
    INPUT_FORMAT_KEY,
    METADATA_KEY,
    ExportedRetinaNet,
    ExportError,
    OnnxGraph,
    is_exported_model,
    load_exported,
    load_test_input,
    onnx_modules,
    without_weight_files,
)

__all__ = [
    "EXTENSIONS",
    "FORMATS",
    "GRAPHS",
    "QUANTIZATIONS",
    "ExportError",
    "ExportableNetwork",
    "ExportedRetinaNet",
    "check_export_options",
    "export_model",
    "is_exported_model",
    "load_exported",
    "quantize_onnx_int8",
    "load_test_input",
    "synthetic_test_image",
]

logger = logging.getLogger(__name__)

FORMATS = ("torchscript", "onnx")
# The file extensions of each format ("pt" as torch.jit.save's documentation names them).
EXTENSIONS = {"torchscript": (".ts", ".pt"), "onnx": (".onnx",)}
QUANTIZATIONS = ("int8",)
ONNX_OPSET = 17
# The ONNX node names of the network's modules (the exporter names nodes after their module).
NETWORK_SCOPES = ("/backbone/", "/head/")
# Exported outputs must equal the model's within these (float32 graphs differ by rounding only).
OUTPUT_RTOL = OUTPUT_ATOL = 1e-3


class ExportableNetwork(nn.Module):
    """The exported part of a :class:`FocalLossRetinaNet`: one image in, raw head outputs out.

    Calls the model's own ``preprocess_image`` (normalization, padding), backbone and head.
    """

    def __init__(self, model: FocalLossRetinaNet):
        super().__init__()
        self.model = model

    @property
    def output_names(self) -> List[str]:
        levels = self.model.head_in_features
        return [f"logits_{f}" for f in levels] + [f"deltas_{f}" for f in levels]

    def forward(self, image: Tensor) -> Tuple[Tensor, ...]:
        """
        Args:
            image: (3, H, W) pixel values in the model's input format.

        Returns:
            L logits (1, A*K, Hi, Wi), then L deltas (1, A*4, Hi, Wi), float32.
        """
        images = self.model.preprocess_image([{"image": image}])
        features = self.model.backbone(images.tensor)
        logits, deltas = self.model.head([features[f] for f in self.model.head_in_features])
        # float32 whatever the compute dtype, so that consumers see one output type.
        return tuple(x.float() for x in (*logits, *deltas))

    def inference_context(self):
        """The autocast the model runs under at inference (``MODEL.INFERENCE_DTYPE``)."""
        if self.model.inference_dtype == torch.float32:
            return contextlib.nullcontext()
        # Without the weight cache: with it the trace would store the cast weights as constants
        # (and refuses to, as they require grad) instead of recording the casts.
        return torch.autocast("cpu", dtype=self.model.inference_dtype, cache_enabled=False)


def synthetic_test_image(cfg: CfgNode, seed: int = 0) -> Tensor:
    """A random (3, MIN_SIZE_TEST, 4/3 * MIN_SIZE_TEST or MAX_SIZE_TEST) image for tracing."""
    height = cfg.INPUT.MIN_SIZE_TEST
    width = min(height * 4 // 3, cfg.INPUT.MAX_SIZE_TEST)
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), generator=generator).float()


def _second_size_image(sample: Tensor) -> Tensor:
    """A random image 37 px higher and 53 px wider than ``sample`` (so also padded differently)."""
    _, height, width = sample.shape
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (3, height + 37, width + 53), generator=generator).float()


def _graph_input(network: nn.Module, image: Tensor) -> Tensor:
    """The exported graph's input for a (3, H, W) float32 image of pixel values: the image, or
    for the deployable graph the decoded image it stands for, (H, W, 3) uint8."""
    if isinstance(network, DeployableRetinaNet):
        return image.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous()
    return image


def _trace_context(network: nn.Module):
    """The raw-head network traces under the model's autocast; the deployable graph enters it
    itself, around the network only."""
    if isinstance(network, ExportableNetwork):
        return network.inference_context()
    return contextlib.nullcontext()


def _check_outputs(network: nn.Module, run_exported, sample: Tensor, what: str) -> None:
    """Raises ExportError unless the exported graph gives the model's outputs at a second size.

    Args:
        sample: the (3, H, W) float32 image traced with.
    """
    image = _second_size_image(sample)
    with torch.no_grad(), _trace_context(network):
        expected = network(_graph_input(network, image))
    actual = run_exported(_graph_input(network, image))
    for name, e, a in zip(network.output_names, expected, actual):
        if e.shape != a.shape:
            detail = f"shape {tuple(a.shape)} instead of {tuple(e.shape)}"
        elif not torch.allclose(a, e, rtol=OUTPUT_RTOL, atol=OUTPUT_ATOL):
            detail = f"max difference {(a - e).abs().max().item():.3g}"
        else:
            continue
        raise ExportError(
            f"{what}: at image size {tuple(image.shape[1:])} (traced at "
            f"{tuple(sample.shape[1:])}), output {name} differs from the model's ({detail}): the "
            "export does not reproduce the model at other sizes, e.g. because the model turns a "
            "tensor shape into a Python number, which the trace fixes to the sample's"
        )


def _export_torchscript(
    network: nn.Module, sample: Tensor, path: str, metadata: Dict[str, str]
) -> None:
    with torch.no_grad(), _trace_context(network), warnings.catch_warnings():
        # Warnings about detectron2's shape assertions turning into constants; whether the trace
        # generalises is checked below at another size.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(network, _graph_input(network, sample), check_trace=False)
    _check_outputs(network, traced, sample, "TorchScript export")
    torch.jit.save(traced, path, _extra_files=metadata)


def _export_onnx(network: nn.Module, sample: Tensor, path: str, metadata: Dict[str, str]) -> None:
    onnx, _ = onnx_modules("ONNX export")
    names = network.output_names
    if isinstance(network, DeployableRetinaNet):
        dynamic_axes = {"image": {0: "height", 1: "width"}}
        dynamic_axes.update({n: {0: "detections"} for n in names})
    else:
        # Every output's grid follows the input's size.
        dynamic_axes = {"image": {1: "height", 2: "width"}}
        dynamic_axes.update({n: {2: f"{n}_height", 3: f"{n}_width"} for n in names})
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            network,
            (_graph_input(network, sample),),
            path,
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=INPUT_NAMES,
            output_names=names,
            dynamic_axes=dynamic_axes,
        )
    _set_onnx_metadata(onnx, path, metadata)
    _check_outputs(network, OnnxGraph(path), sample, "ONNX export")


def _set_onnx_metadata(onnx, path: str, metadata: Dict[str, str]) -> None:
    proto = onnx.load(path)
    del proto.metadata_props[:]
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, path)


def quantize_onnx_int8(
    fp32_path: str,
    int8_path: str,
    calibration_images: Sequence[Tensor],
    scopes: Sequence[str] = (),
):
    """Static int8 quantization of an exported float32 ONNX file with onnxruntime.

    QDQ format: per-channel int8 weights and uint8 activations with ranges (min/max) collected on
    ``calibration_images``; onnxruntime's CPU provider fuses them into ``QLinearConv`` (and
    quantized Add/Mul). The metadata of ``fp32_path`` is kept.

    Args:
        fp32_path: an ONNX file written by :func:`export_model`.
        int8_path: where to write the quantized model.
        calibration_images: at least one input of the graph, e.g. a (3, H, W) float32 image as
            in :func:`load_test_input` for the raw-head graph, preferably from the training set
            (32 cost the demo model 0.13 AP against float32).
        scopes: quantize only the nodes whose names start with one of these (the exporter names
            nodes after the module that ran them, e.g. "/backbone/..."); empty: all nodes.
    """
    onnx, _ = onnx_modules("int8 quantization")
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class ImageReader(CalibrationDataReader):
        def __init__(self):
            self.images = iter(calibration_images)

        def get_next(self) -> Optional[Dict]:
            image = next(self.images, None)
            return None if image is None else {"image": image.numpy()}

    metadata = {p.key: p.value for p in onnx.load(fp32_path).metadata_props}
    with tempfile.TemporaryDirectory(prefix="retinanet_quant_") as tmp:
        prepared = os.path.join(tmp, "prepared.onnx")
        # Symbolic shape inference cannot follow the size-dependent padding; ONNX's own shape
        # inference and onnxruntime's graph optimizations, the rest of the preparation, still run.
        quant_pre_process(fp32_path, prepared, skip_symbolic_shape=True)
        nodes = [n.name for n in onnx.load(prepared).graph.node]
        quantize_static(
            prepared,
            int8_path,
            ImageReader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=[n for n in nodes if n.startswith(tuple(scopes))] if scopes else None,
            # GroupNorm exports as InstanceNormalization over the groups with a rank-1 scale (of
            # ones), whose only axis is 0 (the default axis 1 gets a warning per layer).
            extra_options={"QDQOpTypePerChannelSupportToAxis": {"InstanceNormalization": 0}},
        )
    _set_onnx_metadata(onnx, int8_path, metadata)


def check_export_options(
    export_format: str,
    dtype: str,
    quantize: Optional[str],
    output: Optional[str] = None,
    graph: str = "deployable",
) -> None:
    """Refuses a combination of options that :func:`export_model` cannot export.

    Args:
        export_format: one of :data:`FORMATS`.
        graph: one of :data:`GRAPHS`.
        dtype: the compute dtype, "float32" or "bfloat16" (``MODEL.INFERENCE_DTYPE``).
        quantize: None, or one of :data:`QUANTIZATIONS`.
        output: the file to write, whose extension must be one of the format's
            (:data:`EXTENSIONS`); None: not checked.

    Raises:
        ExportError: naming the option and what fits.
    """
    if export_format not in FORMATS:
        raise ExportError(f"format {export_format!r} is not one of {FORMATS}")
    if graph not in GRAPHS:
        raise ExportError(f"graph {graph!r} is not one of {GRAPHS}")
    if quantize not in (None, *QUANTIZATIONS):
        raise ExportError(f"quantize {quantize!r} is not one of {QUANTIZATIONS}")
    if export_format == "onnx" and dtype != "float32":
        raise ExportError(
            f"ONNX export is float32 only, got dtype {dtype} (MODEL.INFERENCE_DTYPE): ONNX's Conv "
            "has no bfloat16 type, so onnxruntime cannot load such a graph. Use --format "
            "torchscript for bfloat16"
        )
    if quantize and (export_format != "onnx" or dtype != "float32"):
        raise ExportError(
            f"int8 quantization is for float32 ONNX exports only (onnxruntime's QLinearConv), "
            f"not {export_format} {dtype}: use --format onnx; torch's dynamic quantization "
            "covers Linear/LSTM layers, which RetinaNet has none of"
        )
    extension = os.path.splitext(output or "")[1]
    if output is not None and extension.lower() not in EXTENSIONS[export_format]:
        fits = " or ".join(EXTENSIONS[export_format])
        others = [f for f in FORMATS if extension.lower() in EXTENSIONS[f]]
        raise ExportError(
            f"--output {output}: --format {export_format} writes {fits} files, not "
            f"{extension or 'a name without extension'}"
            + (f" (the extension of --format {others[0]})" if others else "")
            + f"; name it e.g. {os.path.splitext(output)[0]}{EXTENSIONS[export_format][0]}"
        )


def export_model(
    cfg: CfgNode,
    model: FocalLossRetinaNet,
    export_format: str,
    output: str,
    sample_image: Tensor,
    *,
    quantize: Optional[str] = None,
    calibration_images: Sequence[Tensor] = (),
    class_names: Sequence[str] = (),
    graph: str = "deployable",
) -> None:
    """Writes ``model`` to ``output`` (see the module docstring).

    Args:
        cfg: the model's config; stored in the file for :func:`load_exported`.
        model: a CPU :class:`FocalLossRetinaNet` with its weights; its ``inference_dtype``
            (``MODEL.INFERENCE_DTYPE``) is the dtype exported.
        export_format: one of :data:`FORMATS`.
        output: the file to write (``.ts``/``.pt`` or ``.onnx``, :data:`EXTENSIONS`); replaced
            only once the export is complete and checked.
        sample_image: (3, H, W) float32 image to trace with (:func:`load_test_input` or
            :func:`synthetic_test_image`).
        quantize: None, or one of :data:`QUANTIZATIONS` (ONNX only).
        calibration_images: images for int8 quantization.
        class_names: the names of the model's classes, stored in the file (see
            ``ExportedRetinaNet.class_names``); none for ``class_0``, ``class_1``, ...
        graph: one of :data:`GRAPHS`: "deployable", the model from decoded image to detections
            (:class:`~retinanet_plugin.export.deployable.DeployableRetinaNet`), or "raw-head",
            the network only (:class:`ExportableNetwork`).

    Raises:
        ExportError: an unsupported combination of options (:func:`check_export_options`), or
            an export whose outputs differ from the model's at a second image size.
        ImportError: ONNX export without onnx/onnxruntime.
    """
    if not isinstance(model, FocalLossRetinaNet):
        raise ExportError(
            f"export needs MODEL.META_ARCHITECTURE FocalLossRetinaNet, got {type(model).__name__}"
        )
    dtype = str(model.inference_dtype).replace("torch.", "")
    check_export_options(export_format, dtype, quantize, output, graph)
    if quantize and not calibration_images:
        raise ExportError("int8 quantization needs calibration images; none were given")
    info = {
        "config": without_weight_files(cfg).dump(),
        "format": export_format,
        "dtype": dtype,
        "quantize": quantize,
        "class_names": list(class_names),
        "graph": graph,
    }
    metadata = {METADATA_KEY: json.dumps(info)}
    if graph == "deployable":
        network = DeployableRetinaNet(model, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
        # For users of the bare file: the names of its class ids, and its input's channel order.
        names = list(class_names) or [f"class_{i}" for i in range(model.num_classes)]
        metadata.update({CLASS_NAMES_KEY: json.dumps(names), INPUT_FORMAT_KEY: cfg.INPUT.FORMAT})
    else:
        network = ExportableNetwork(model)
    network.eval()
    # Written aside and moved into place once checked: a failed export leaves no file, and an
    # earlier file at ``output`` stays as it was.
    with tempfile.TemporaryDirectory(prefix="retinanet_export_") as tmp:
        written = os.path.join(tmp, "model" + os.path.splitext(output)[1])
        if export_format == "torchscript":
            _export_torchscript(network, sample_image, written, metadata)
        elif not quantize:
            _export_onnx(network, sample_image, written, metadata)
        else:
            fp32_path = os.path.join(tmp, "float32.onnx")
            _export_onnx(network, sample_image, fp32_path, metadata)
            inputs = [_graph_input(network, image) for image in calibration_images]
            # The deployable graph's resize, decoding and NMS stay float32: int8 box coordinates
            # would be pixels off.
            scopes = NETWORK_SCOPES if graph == "deployable" else ()
            quantize_onnx_int8(fp32_path, written, inputs, scopes)
        with open(written, "rb") as source, atomic_write(output) as target:
            shutil.copyfileobj(source, target)
    logger.info(
        "Exported the %s graph as %s (%s%s) to %s",
        graph,
        export_format,
        dtype,
        f", {quantize}" if quantize else "",
        output,
    )
