"""The console commands that ``pip install .`` installs (setup.py's ``console_scripts``), each a
front end of :mod:`retinanet_plugin.cli` run under its error convention, with the same options
as the scripts: ``retinanet-train`` (``train_net.py``), ``retinanet-predict``,
``retinanet-export`` (``tools/export.py``), ``retinanet-analyze-dataset``
(``tools/analyze_dataset.py``) and ``retinanet-plot-metrics``."""

import importlib
import sys

from .defaults import run

__all__ = ["analyze_dataset", "export", "plot_metrics", "predict", "train"]


def _run(front_end: str) -> None:
    # Imported when its command runs: each front end pulls in other parts of the plugin.
    sys.exit(run(importlib.import_module(f"{__package__}.{front_end}").main))


def train() -> None:
    _run("train")


def predict() -> None:
    _run("predict")


def export() -> None:
    _run("export")


def analyze_dataset() -> None:
    _run("analyze_dataset")


def plot_metrics() -> None:
    _run("plot_metrics")
