"""Weight files cannot run code unless trusted: RetinaNetCheckpointer's restricted unpickling of
.pkl files, weights-only loading of .pth files, --trust-weights, and the errors for missing or
malformed files."""

import json
import os
import pickle
import random
import re
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from conftest import run_main
from retinanet_plugin.checkpoint.checkpointer import RetinaNetCheckpointer
from retinanet_plugin.checkpoint.safe_loading import NotACheckpointError, UnsafeCheckpointError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "retinanet_R18_GN_tiny.yaml")


class WritesMarker:
    """Unpickling it creates the file ``marker`` (stands for any code an attacker chooses)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


class Harmless:
    """A class outside the allow-list that does nothing when unpickled."""

    def __init__(self, value):
        self.value = value


def model():
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 4, 3), fc=nn.Linear(4, 2)))


def zoo_weights(net):
    """The model's weights as numpy arrays, in detectron2's model zoo .pkl format."""
    return {
        "model": {k: v.detach().numpy() + 1.0 for k, v in net.state_dict().items()},
        "__author__": "Detectron",
    }


def write_pickle(path, obj, protocol=pickle.HIGHEST_PROTOCOL):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return str(path)


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_model_zoo_pkl_loads(tmp_path, protocol):
    net = model()
    weights = zoo_weights(net)
    weights["model"]["conv.weight"] = np.asfortranarray(weights["model"]["conv.weight"])
    weights["scalar"], weights["text"] = np.float32(0.5), b"bytes"  # extras detectron2 ignores
    path = write_pickle(tmp_path / "model.pkl", weights, protocol)
    RetinaNetCheckpointer(net).load(path)
    for name, value in net.state_dict().items():
        torch.testing.assert_close(value, torch.from_numpy(weights["model"][name]))


def test_caffe2_blobs_pkl_goes_through_detectron2_matching(tmp_path):
    """Files without __author__ get detectron2's Caffe2 handling: blobs, no *_momentum."""
    net = model()
    blobs = {k: v.detach().numpy() - 1.0 for k, v in net.state_dict().items()}
    blobs["conv.weight_momentum"] = np.zeros(1, np.float32)
    path = write_pickle(tmp_path / "c2.pkl", {"blobs": blobs}, protocol=2)
    checkpoint = RetinaNetCheckpointer(net)._load_file(path)
    assert checkpoint["__author__"] == "Caffe2" and checkpoint["matching_heuristics"]
    assert set(checkpoint["model"]) == set(net.state_dict())


@pytest.mark.parametrize("extension", ["pkl", "pth"])
def test_malicious_file_is_refused_without_running(tmp_path, extension):
    marker = tmp_path / "marker"
    path = str(tmp_path / f"evil.{extension}")
    payload = {"model": {"fc.bias": np.zeros(2, np.float32)}, "x": WritesMarker(marker)}
    if extension == "pkl":
        write_pickle(path, payload)
    else:
        torch.save(payload, path)
    with pytest.raises(UnsafeCheckpointError) as error:
        RetinaNetCheckpointer(model()).load(path)
    assert not marker.exists()
    message = str(error.value)
    assert path in message and "builtins.exec" in message and "--trust-weights" in message


def test_own_training_checkpoint_loads_weights_only(tmp_path):
    """What train_net saves (model, optimizer with momentum, scheduler, iteration) resumes."""

    def checkpointer(net):
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 2)
        return (
            RetinaNetCheckpointer(net, str(tmp_path), optimizer=optimizer, scheduler=scheduler),
            optimizer,
            scheduler,
        )

    net = model()
    saver, optimizer, scheduler = checkpointer(net)
    net.fc(net.conv(torch.ones(1, 3, 3, 3)).flatten(1)).sum().backward()
    optimizer.step()
    scheduler.step()
    saver.save("model_final", iteration=7)

    other = model()
    loader, other_optimizer, other_scheduler = checkpointer(other)
    assert loader.resume_or_load("", resume=True)["iteration"] == 7
    for a, b in zip(net.state_dict().values(), other.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert other_optimizer.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()
    assert other_scheduler.last_epoch == scheduler.last_epoch == 1


def test_trust_weights_restores_full_unpickling(tmp_path, caplog):
    net = model()
    weights = zoo_weights(net)
    weights["extra"] = Harmless(3)
    path = write_pickle(tmp_path / "trusted.pkl", weights)
    with pytest.raises(UnsafeCheckpointError, match="test_safe_loading.Harmless"):
        RetinaNetCheckpointer(net).load(path)
    RetinaNetCheckpointer(net, trust_weights=True).load(path)
    torch.testing.assert_close(net.fc.bias, torch.from_numpy(weights["model"]["fc.bias"]))
    assert "--trust-weights: unpickling arbitrary objects can run code" in caplog.text

    # The flag really switches the check off: the same malicious file now runs its code.
    marker = tmp_path / "marker"
    evil = str(tmp_path / "evil.pth")
    torch.save({"model": net.state_dict(), "x": WritesMarker(marker)}, evil)
    RetinaNetCheckpointer(model(), trust_weights=True).load(evil)
    assert marker.exists()


@pytest.mark.parametrize("name", ["missing.pkl", "missing.pth"])
def test_missing_file_is_a_file_not_found_error(tmp_path, name):
    path = str(tmp_path / name)
    with pytest.raises(FileNotFoundError, match=path):
        RetinaNetCheckpointer(model()).load(path)


@pytest.mark.parametrize("extension", ["pkl", "pth"])
@pytest.mark.parametrize(
    "content",
    [
        random.Random(0).randbytes(64),
        random.Random(2).randbytes(64),  # torch's unpickler raises IndexError on these
        b"",
        b"weights: none\n",
        json.dumps({"model": [1, 2]}).encode(),
        pickle.dumps([1, 2]),
    ],
    ids=["random", "random-malformed-pickle", "empty", "text", "json", "pickled-list"],
)
def test_not_a_checkpoint_is_a_clear_error(tmp_path, extension, content):
    path = tmp_path / f"weights.{extension}"
    path.write_bytes(content)
    with pytest.raises(NotACheckpointError, match="is not a weights file: expected") as error:
        RetinaNetCheckpointer(model()).load(str(path))
    assert str(path) in str(error.value)


def test_train_net_refuses_malicious_weights(tmp_path, shapes_dataset):
    """End to end: --eval-only with a malicious MODEL.WEIGHTS stops before anything runs."""
    marker = tmp_path / "marker"
    path = write_pickle(tmp_path / "evil.pkl", {"model": {}, "x": WritesMarker(marker)})
    from retinanet_plugin.cli import train

    status, output = run_main(
        train.main,
        [
            "--config-file",
            TINY,
            "--eval-only",
            "--register-coco",
            "evil_val",
            *shapes_dataset["val"],
            "MODEL.WEIGHTS",
            path,
            "DATASETS.TEST",
            "('evil_val',)",
            "OUTPUT_DIR",
            str(tmp_path / "out"),
        ],
    )
    assert status == 2
    assert f"error: Refusing to load {path}: it refers to builtins.exec" in output
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_a_weights_file_that_cannot_be_read_is_not_called_malformed(tmp_path, monkeypatch, suffix):
    """A read failure (here a PermissionError, which root's test run cannot provoke with file
    modes) says the file cannot be read, not that it is not a weights file."""
    import builtins

    import torch

    from retinanet_plugin.checkpoint.checkpointer import RetinaNetCheckpointer
    from retinanet_plugin.checkpoint.safe_loading import WeightsReadError

    path = tmp_path / f"weights{suffix}"
    path.write_bytes(b"x")
    real_open = builtins.open

    def refusing_open(file, *args, **kwargs):
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    with pytest.raises(WeightsReadError, match=rf"cannot read {re.escape(str(path))}: Permission"):
        RetinaNetCheckpointer(torch.nn.Linear(1, 1)).load(str(path))


@pytest.mark.parametrize(
    "content",
    [
        {"model": {"w": np.zeros(2, np.float32)}, "__author__": "Detectron2 model zoo"},
        {"blobs": {"w": np.ones(2, np.float32), "w_momentum": np.ones(2, np.float32)}},
        {"conv1_w": np.ones((1, 1), np.float32), "conv1_w_momentum": np.ones((1, 1), np.float32)},
    ],
    ids=["detectron2", "caffe2-detection", "imagenet"],
)
def test_pkl_files_give_what_detectron2_makes_of_them(tmp_path, content):
    """The plugin unpickles .pkl files itself (with its allow-list) and hands detectron2's name
    matching the same dict detectron2's own DetectionCheckpointer._load_file makes."""
    import pickle

    from detectron2.checkpoint import DetectionCheckpointer

    path = str(tmp_path / "weights.pkl")
    with open(path, "wb") as f:
        pickle.dump(content, f)
    model = torch.nn.Linear(1, 1)
    ours = RetinaNetCheckpointer(model)._load_file(path)
    theirs = DetectionCheckpointer(model)._load_file(path)
    assert ours.keys() == theirs.keys() and ours["model"].keys() == theirs["model"].keys()
    assert {k: v for k, v in ours.items() if k != "model"} == {
        k: v for k, v in theirs.items() if k != "model"
    }
    for key, value in theirs["model"].items():
        np.testing.assert_array_equal(ours["model"][key], value)
