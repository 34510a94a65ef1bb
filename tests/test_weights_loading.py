"""What RetinaNetCheckpointer loads: weights that fit the model, with what was not loaded counted
in one warning line; the classification layer re-initialized only to fine-tune; other class
counts, other architectures and NaN weights refused before the model is touched."""

import logging
import math
import pickle

import pytest
import torch
from detectron2_pairs import build_pair

from conftest import plugin_cfg
from detectron2.modeling import build_model
from retinanet_plugin.checkpoint.checkpointer import (
    CorruptWeightsError,
    RetinaNetCheckpointer,
    WeightsMismatchError,
)

TINY = "retinanet_R18_GN_tiny.yaml"


def tiny(*opts):
    return build_model(plugin_cfg(TINY, *opts))


def state_of(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_state(model, expected):
    state = model.state_dict()
    assert state.keys() == expected.keys()
    different = [k for k in state if not torch.equal(state[k], expected[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def warnings_of_loading(caplog):
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name.startswith(("retinanet_plugin", "fvcore"))
    ]


@pytest.fixture(scope="module")
def four_classes(tmp_path_factory):
    """(path, state) of a 4-class tiny model's checkpoint."""
    torch.manual_seed(1)
    state = tiny("MODEL.RETINANET.NUM_CLASSES", "4").state_dict()
    path = tmp_path_factory.mktemp("weights") / "four.pth"
    torch.save({"model": state}, path)
    return str(path), state


def test_default_load_refuses_another_class_count_and_leaves_the_model(four_classes):
    """The README's ``RetinaNetCheckpointer(model).load(path)`` (evaluation, prediction,
    export): an 80-class model and a 4-class file are refused, the model untouched."""
    path, _ = four_classes
    model = tiny()
    before = state_of(model)
    with pytest.raises(WeightsMismatchError) as error:
        RetinaNetCheckpointer(model).load(path)
    message = str(error.value)
    assert path in message and "for 4 classes" in message and "has 80 classes" in message
    assert "(36, 128, 3, 3)" in message and "(720, 128, 3, 3)" in message  # 9 anchors x K
    assert_state(model, before)


def test_fine_tuning_reinitializes_only_the_classification_layer(four_classes, caplog):
    path, state = four_classes
    model = tiny()
    with caplog.at_level(logging.INFO):
        RetinaNetCheckpointer(model, allow_new_classes=True).load(path)
    loaded = model.state_dict()
    for key, value in state.items():
        if not key.startswith("head.cls_score."):
            assert torch.equal(loaded[key], value), key
    # The paper's prior: every anchor starts with foreground probability 0.01.
    prior_bias = -math.log((1 - 0.01) / 0.01)
    assert torch.allclose(loaded["head.cls_score.bias"], torch.full((720,), prior_bias))
    assert "re-initialized the classification layer" in caplog.text
    assert not warnings_of_loading(caplog)


def test_restoring_a_training_state_never_reinitializes(four_classes):
    """Resuming (the optimizer state restored too) with another class count is refused even
    where fine-tuning is allowed: the optimizer state would not fit the new layer."""
    path, _ = four_classes
    model = tiny()
    before = state_of(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    checkpointer = RetinaNetCheckpointer(model, allow_new_classes=True, optimizer=optimizer)
    with pytest.raises(WeightsMismatchError, match="Resuming continues a run with its own"):
        checkpointer.load(path)
    assert_state(model, before)


def test_detectron2_model_zoo_retinanet_loads_every_tensor_without_warning(tmp_path, caplog):
    """A .pkl in detectron2's model zoo format, of detectron2's own RetinaNet (with the anchor
    buffers that old detectron2 checkpoints hold)."""
    plugin, reference = build_pair("R18_GN_tiny")
    weights = {k: v.numpy() + 1.0 for k, v in reference.state_dict().items()}
    weights["anchor_generator.cell_anchors.0"] = torch.zeros(9, 4).numpy()
    path = tmp_path / "model_final_zoo.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": weights, "__author__": "Detectron2 Model Zoo"}, f)
    with caplog.at_level(logging.INFO):
        RetinaNetCheckpointer(plugin).load(str(path))
    assert_state(plugin, {k: torch.from_numpy(v) for k, v in weights.items() if "anchor" not in k})
    assert not warnings_of_loading(caplog)


def test_imagenet_backbone_counts_what_it_leaves_in_one_warning(tmp_path, caplog):
    """A ResNet-34 backbone (detectron2's converted-torchvision .pkl format, names matched by
    detectron2's heuristics) for the ResNet-18 model: refused to evaluate; to train from, the
    blocks both have are loaded, the model's FPN and head and the file's extra blocks are counted
    in one line."""
    r34 = tiny("MODEL.RESNETS.DEPTH", "34").state_dict()
    prefix = "backbone.bottom_up."
    backbone = {k[len(prefix) :]: v.numpy() for k, v in r34.items() if k.startswith(prefix)}
    path = tmp_path / "R-34.pkl"
    with open(path, "wb") as f:
        pickle.dump(
            {"model": backbone, "__author__": "torchvision", "matching_heuristics": True}, f
        )
    model = tiny()
    own = model.state_dict()
    left = [k for k in own if not k.startswith(prefix)]
    unused = [k for k in backbone if prefix + k not in own]
    assert left and unused  # FPN and head; res2.2, res3.2, ...
    with pytest.raises(WeightsMismatchError) as error:  # to evaluate: a random FPN and head
        RetinaNetCheckpointer(model).load(str(path))
    assert f"{path} lacks {len(left)} of the model's tensors" in str(error.value)
    with caplog.at_level(logging.WARNING):  # to train from
        RetinaNetCheckpointer(model, allow_new_classes=True).load(str(path))
    for key in own:
        if key.startswith(prefix):
            assert torch.equal(
                model.state_dict()[key], torch.from_numpy(backbone[key[len(prefix) :]])
            )
    lines = warnings_of_loading(caplog)
    assert len(lines) == 1, lines
    assert (
        f"Loaded {len(own) - len(left)} of the model's {len(own)} tensors from {path}" in lines[0]
    )
    assert f"{len(left)} of the model's tensors keep their initialization" in lines[0]
    assert f"{len(unused)} of the file's tensors were not used" in lines[0]


def test_weights_with_nan_are_refused_before_loading(tmp_path):
    model = tiny()
    before = state_of(model)
    state = state_of(model)
    state["head.cls_subnet.0.weight"][0, 0] = float("nan")  # 3x3 values
    path = tmp_path / "diverged.pth"
    torch.save({"model": state}, path)
    with pytest.raises(CorruptWeightsError) as error:
        RetinaNetCheckpointer(model, allow_new_classes=True).load(str(path))
    assert f"{path}: 1 of its {len(state)} tensors" in str(error.value)
    assert "head.cls_subnet.0.weight: 9 of" in str(error.value)
    assert_state(model, before)
