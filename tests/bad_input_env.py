"""What the bad-input cases share: the :class:`Case` record and the :class:`Env` of files a case
refers to. The cases live in ``bad_inputs_*.py`` beside this file, one module per area; the test
that runs them and the docs' table are in ``test_bad_inputs.py``."""

import json
import os
from typing import Callable, Dict, List, NamedTuple

import torch

import retinanet_plugin  # noqa: F401  (registers the plugin's components)
from detectron2.modeling import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "retinanet_R18_GN_tiny.yaml")
# Bounds what a case would run if its check did not fire.
SHORT = ["SOLVER.MAX_ITER", "1", "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0"]


class Case(NamedTuple):
    entry: str  # the command (train_net.py, predict, plot_metrics, export.py, ablate.py, demo.py)
    what: str  # the bad input, for the docs' table
    argv: Callable[["Env"], List[str]]
    expected: List[str]  # fragments the message must contain (the file / key / value named)
    # Files or folders (paths from the Env) that must be byte-for-byte unchanged by the command:
    # the user's photos, weights, configs, earlier results.
    keep: Callable[["Env"], List[str]] = lambda env: []


class Env:
    """Files the cases refer to, made once per test in ``tmp_path``."""

    def __init__(self, tmp_path, shapes_dataset, name: str):
        self.tmp = tmp_path
        self.name = name
        (self.train_json, self.train_root), (self.val_json, self.val_root) = (
            shapes_dataset["train"],
            shapes_dataset["val"],
        )
        self.out = str(tmp_path / "out")

    def path(self, name: str, content=None) -> str:
        path = self.tmp / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            path.write_text(content)
        return str(path)

    def register(self) -> List[str]:
        """train_net's dataset options for the shapes splits, under names unique to the test."""
        return [
            "--register-coco",
            f"{self.name}_train",
            self.train_json,
            self.train_root,
            "--register-coco",
            f"{self.name}_val",
            self.val_json,
            self.val_root,
        ]

    def train(self, *extra: str) -> List[str]:
        """A correct train_net command line, then ``extra``."""
        return [
            "--config-file",
            TINY,
            *self.register(),
            "DATASETS.TRAIN",
            f"('{self.name}_train',)",
            "DATASETS.TEST",
            f"('{self.name}_val',)",
            *SHORT,
            "OUTPUT_DIR",
            self.out,
            *extra,
        ]

    def export(self, format: str, output: str, *extra: str) -> List[str]:
        """tools/export.py's arguments for the tiny model with weights, then ``extra``."""
        return [
            "--config-file",
            TINY,
            "--weights",
            self.weights(),
            "--format",
            format,
            "--output",
            output,
            *extra,
        ]

    def weights(self) -> str:
        """An untrained tiny model's checkpoint (a valid weights file)."""
        from conftest import plugin_cfg

        path = self.tmp / "weights.pth"
        if not path.exists():
            model = build_model(plugin_cfg("retinanet_R18_GN_tiny.yaml"))
            torch.save({"model": model.state_dict()}, path)
        return str(path)

    def coco_copy(self, edit: Callable[[Dict], None]) -> str:
        with open(self.train_json) as f:
            data = json.load(f)
        edit(data)
        return self.path("edited.json", json.dumps(data))

    def predict(self, *extra: str) -> List[str]:
        return [
            "--config-file",
            TINY,
            "--input",
            self.val_root,
            "--output",
            str(self.tmp / "pred"),
            *extra,
        ]
