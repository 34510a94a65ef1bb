"""Exporting the model to TorchScript and ONNX, and running the exported files."""

from .exporter import check_export_options, export_model
from .runtime import ExportedRetinaNet, ExportError, load_exported

__all__ = [
    "ExportError",
    "ExportedRetinaNet",
    "check_export_options",
    "export_model",
    "load_exported",
]
