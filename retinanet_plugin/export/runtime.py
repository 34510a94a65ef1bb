"""Running a model exported by :mod:`retinanet_plugin.export.exporter` with the PyTorch model's
interface: :func:`load_exported` gives an :class:`ExportedRetinaNet`, which takes detectron2's input
dicts (:func:`load_test_input`) and returns its ``Instances``. A deployable graph computes the
detections itself (it runs without this module too); a raw-head graph computes the network
(normalization to head outputs), and anchors, decoding, NMS and rescaling are the model's own
Python code (``retinanet_plugin.modeling.postprocessing``), on a model built from the config the
file carries.
"""

import json
import os
import zipfile
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from detectron2.config import CfgNode, get_cfg
from detectron2.data import transforms as T
from detectron2.data.detection_utils import build_augmentation
from detectron2.modeling import build_model
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances

from ..config.defaults import add_retinanet_config
from ..config.validation import validate_config
from ..data.images import read_image, test_input
from ..errors import UserError

__all__ = [
    "ExportError",
    "ExportedRetinaNet",
    "is_exported_model",
    "load_exported",
    "load_test_input",
]

# Name of the ONNX metadata entry / TorchScript extra file holding config and export options.
METADATA_KEY = "retinanet_plugin"
# Entries of deployable graphs for their users: the class names (a JSON list, indexed by the
# "classes" output) and the input's channel order (cfg.INPUT.FORMAT).
CLASS_NAMES_KEY = "class_names"
INPUT_FORMAT_KEY = "input_format"
# The exported graphs: the whole model (image to detections), or the network (image to the
# head's outputs), whose post-processing runs in Python.
GRAPHS = ("deployable", "raw-head")
INSTALL_HINT = "pip install 'retinanet_plugin[export]' (or pip install onnx onnxruntime)"


class ExportError(UserError, RuntimeError):
    """An export that cannot be made (unsupported option) or whose result is wrong."""


def onnx_modules(purpose: str):
    """The ``onnx`` and ``onnxruntime`` modules, or an ImportError saying how to install them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise ImportError(f"{purpose} needs onnx and onnxruntime ({e}); {INSTALL_HINT}") from e
    return onnx, onnxruntime


def load_test_input(path: str, cfg: CfgNode) -> Dict:
    """An image file as detectron2's test loader gives it to the model.

    Returns:
        {"image": (3, H, W) float32 in ``cfg.INPUT.FORMAT``, resized by detectron2's test
        augmentation (shortest edge to ``INPUT.MIN_SIZE_TEST``), "height", "width": the file's
        size, to which the detections are scaled back}.
    """
    augmentations = T.AugmentationList(build_augmentation(cfg, is_train=False))
    return test_input(read_image(path, cfg.INPUT.FORMAT), augmentations)


def is_exported_model(path: str) -> bool:
    """Whether ``path`` is a file written by :func:`retinanet_plugin.export.export_model` (a
    TorchScript archive or ONNX model with the plugin's metadata), from its metadata alone."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                return any(n.endswith(f"/extra/{METADATA_KEY}") for n in archive.namelist())
        except zipfile.BadZipFile:
            return False
    try:
        import onnx

        proto = onnx.load(path, load_external_data=False)
    except Exception:  # onnx missing, or a file onnx cannot parse: not one to replace
        return False
    return any(p.key == METADATA_KEY for p in proto.metadata_props)


class TorchScriptGraph:
    """A TorchScript file written by :func:`export_model`, called like the network."""

    def __init__(self, path: str):
        files = {METADATA_KEY: ""}
        self.module = torch.jit.load(path, map_location="cpu", _extra_files=files)
        self.info = files[METADATA_KEY]

    def __call__(self, image: Tensor) -> List[Tensor]:
        with torch.no_grad():
            return list(self.module(image))


class OnnxGraph:
    """An ONNX file written by :func:`export_model`, run by onnxruntime's CPU provider."""

    def __init__(self, path: str, num_threads: Optional[int] = None):
        _, onnxruntime = onnx_modules("Running an ONNX export")
        options = onnxruntime.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = num_threads
        self.session = onnxruntime.InferenceSession(
            path, options, providers=["CPUExecutionProvider"]
        )
        self.info = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY, "")

    def __call__(self, image: Tensor) -> List[Tensor]:
        outputs = self.session.run(None, {"image": image.numpy()})
        return [torch.from_numpy(x) for x in outputs]


class ExportedRetinaNet:
    """An exported RetinaNet with the PyTorch model's interface and output, on the CPU.

    ``exported(batched_inputs)`` takes what ``FocalLossRetinaNet`` takes at inference (a list of
    dicts with "image": (3, H, W) tensor in ``cfg.INPUT.FORMAT``, resized for the test, uint8 or
    float, and optional "height"/"width" of the original image) and returns
    ``[{"instances": Instances}]`` with ``pred_boxes``, ``scores`` and ``pred_classes`` in the
    original image's coordinates, so it can replace the model, e.g. in detectron2's
    ``inference_on_dataset``. Images run one at a time, as detectron2's test loader feeds them.

    A deployable graph (``graph == "deployable"``) is given the image as the decoded uint8 image
    it stands for (float values are rounded), which it leaves at its size, as that is the test
    size already, and returns the detections. For a raw-head graph, post-processing is the
    model's own ``forward_inference``, on a ``FocalLossRetinaNet`` built from the config stored in
    the file (its backbone and head are not needed and are dropped).
    ``class_names`` are the names stored in the file (``class_0``, ... in a file without them).

    Args:
        path: a ``.ts``/``.onnx`` file written by :func:`export_model` (TorchScript files are
            recognized as zip archives, anything else is read as ONNX). TorchScript files contain
            code that ``torch.jit.load`` runs: load only files from a trusted source.
        num_threads: onnxruntime's intra-op threads for ONNX files (default: onnxruntime's, one
            per physical core). TorchScript runs on torch's threads (``torch.set_num_threads``).
    """

    def __init__(self, path: str, num_threads: Optional[int] = None):
        if not os.path.isfile(path):
            raise ExportError(f"exported model {path} does not exist")
        self.path = path
        try:
            if zipfile.is_zipfile(path):
                self.graph = TorchScriptGraph(path)
            else:
                self.graph = OnnxGraph(path, num_threads)
        except ImportError:  # onnx/onnxruntime missing: its own message says how to install
            raise
        except Exception as e:  # torch.jit and onnxruntime raise their own types for junk
            reason = (str(e).strip().splitlines() or [""])[0][:200]
            raise ExportError(
                f"{path} is not a TorchScript or ONNX model ({type(e).__name__}: {reason}); "
                "load a file written by tools/export.py"
            ) from e
        if not self.graph.info:
            raise ExportError(
                f"{path} has no {METADATA_KEY!r} metadata: it was not written by "
                "retinanet_plugin.export.exporter (tools/export.py)"
            )
        info = json.loads(self.graph.info)
        self.format, self.dtype, self.quantize = info["format"], info["dtype"], info["quantize"]
        self.graph_kind = info.get("graph", "raw-head")  # files from before deployable graphs
        self.cfg = _config_from_yaml(info["config"], path)
        num_classes = self.cfg.MODEL.RETINANET.NUM_CLASSES
        # Files exported without class names (older ones, or weights that had none) count them.
        self.class_names: List[str] = info.get("class_names") or [
            f"class_{i}" for i in range(num_classes)
        ]
        if self.graph_kind == "raw-head":
            self.model = build_model(self.cfg).eval()
            del self.model.backbone, self.model.head  # the exported graph replaces them

    @torch.no_grad()
    def __call__(self, batched_inputs: Sequence[Dict]) -> List[Dict[str, Instances]]:
        results = []
        for inputs in batched_inputs:
            if self.graph_kind == "deployable":
                results.append(self._detections(inputs))
                continue
            image = inputs["image"].to(torch.float32)  # the graph's input type
            outputs = self.graph(image)
            num_levels = len(outputs) // 2
            logits, deltas = outputs[:num_levels], outputs[num_levels:]
            image_size = tuple(image.shape[-2:])
            # forward_inference reads only the image sizes of the batch, and only the grid size
            # of each level's features (for the anchors), which the head outputs share.
            (instances,) = self.model.forward_inference(
                ImageList(image[None], [image_size]), logits, (logits, deltas)
            )
            height = inputs.get("height", image_size[0])
            width = inputs.get("width", image_size[1])
            results.append({"instances": detector_postprocess(instances, height, width)})
        return results

    def _detections(self, inputs: Dict) -> Dict[str, Instances]:
        """A deployable graph's detections of one input dict, in its "height" x "width"."""
        image = inputs["image"]
        decoded = image.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous()
        boxes, scores, classes = self.graph(decoded)
        image_size = tuple(image.shape[-2:])
        instances = Instances(
            image_size, pred_boxes=Boxes(boxes), scores=scores, pred_classes=classes
        )
        height = inputs.get("height", image_size[0])
        width = inputs.get("width", image_size[1])
        return {"instances": detector_postprocess(instances, height, width)}


def load_exported(path: str, num_threads: Optional[int] = None) -> ExportedRetinaNet:
    """The :class:`ExportedRetinaNet` of a file written by :func:`export_model`."""
    return ExportedRetinaNet(path, num_threads)


def without_weight_files(cfg: CfgNode) -> CfgNode:
    """A copy of ``cfg`` naming no weight file (the exported graph holds the weights; a path of
    the exporting machine, e.g. MODEL.TIMM.WEIGHTS, would not exist where the file is loaded)."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.TIMM.WEIGHTS = ""
    return cfg


def _config_from_yaml(text: str, source: str) -> CfgNode:
    """The plugin config stored in an exported file, on the CPU and without weight files (also
    for files exported before they were left out)."""
    cfg = get_cfg()
    add_retinanet_config(cfg)
    cfg.merge_from_other_cfg(CfgNode.load_cfg(text))  # yaml.safe_load
    cfg = without_weight_files(cfg)
    cfg.MODEL.DEVICE = "cpu"
    validate_config(cfg, source)
    return cfg
