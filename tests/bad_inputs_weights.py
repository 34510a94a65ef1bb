"""Bad-input cases: weights and checkpoints to load, --resume and --resume-from (see
bad_input_env.py; run by test_bad_inputs.py)."""

import os
import pickle
from typing import Callable, Dict, List, Optional

import torch
from bad_input_env import TINY, Case, Env

from detectron2.modeling import build_model

# The shapes dataset has 4 classes; env.weights() and the weights below are of the tiny config's
# default 80.


def _tiny_weights(
    env: Env, name: str, *opts: str, edit: Optional[Callable[[Dict], None]] = None, **extra
) -> str:
    """A checkpoint of the tiny config with ``opts``, its state dict edited by ``edit``, with
    ``extra`` entries (e.g. an iteration: a training checkpoint)."""
    from conftest import plugin_cfg

    path = env.tmp / name
    state = build_model(plugin_cfg("retinanet_R18_GN_tiny.yaml", *opts)).state_dict()
    if edit:
        edit(state)
    torch.save({"model": state, **extra}, path)
    return str(path)


def _with_nan(state: Dict) -> None:
    state["head.bbox_pred.bias"][:2] = float("nan")
    state["backbone.bottom_up.stem.conv1.weight"][0, 0, 0, 0] = float("inf")


def _run_of_other_classes(env: Env) -> List[str]:
    """An OUTPUT_DIR whose last checkpoint has 80 classes, resumed on the 4-class dataset."""
    os.makedirs(env.out)
    _tiny_weights(env, "out/model_0000001.pth", iteration=1)
    env.path("out/last_checkpoint", "model_0000001.pth")
    return ["--resume", *env.train()]


def _torchscript(env: Env) -> List[str]:
    return ["--format", "torchscript", "--output", env.path("m.ts")]


def _four_classes(env: Env) -> str:
    return _tiny_weights(env, "four.pth", "MODEL.RETINANET.NUM_CLASSES", "4")


def _backbone_pkl(env: Env) -> str:
    """The tiny model's ResNet-18 alone, as detectron2's converted torchvision weights."""
    from conftest import plugin_cfg

    prefix = "backbone.bottom_up."
    state = build_model(plugin_cfg("retinanet_R18_GN_tiny.yaml")).state_dict()
    weights = {k[len(prefix) :]: v.numpy() for k, v in state.items() if k.startswith(prefix)}
    with open(env.tmp / "R-18.pkl", "wb") as f:
        pickle.dump({"model": weights, "__author__": "torchvision", "matching_heuristics": True}, f)
    return str(env.tmp / "R-18.pkl")


def _fpn64(env: Env) -> str:
    return _tiny_weights(env, "fpn64.pth", "MODEL.FPN.OUT_CHANNELS", "64")


def _fitted_anchors(env: Env) -> str:
    """A checkpoint written by the plugin's training of the tiny config with smaller anchors (the
    same number per location), with its metadata."""
    from conftest import plugin_cfg
    from retinanet_plugin.checkpoint.metadata import checkpoint_metadata

    opts = ["MODEL.ANCHOR_GENERATOR.SIZES", "[[16], [32], [64], [128], [256]]"]
    metadata = checkpoint_metadata(plugin_cfg("retinanet_R18_GN_tiny.yaml", *opts))
    return _tiny_weights(env, "fitted.pth", *opts, retinanet_plugin=metadata)


def _without_config(env: Env, *extra: str) -> List[str]:
    """predict's arguments without --config-file."""
    return ["--input", env.val_root, "--output", str(env.tmp / "pred"), *extra]


def _resume_from_in_output_dir(env: Env) -> List[str]:
    os.makedirs(env.out)
    return ["--resume-from", _tiny_weights(env, "out/model_0000001.pth", iteration=1), *env.train()]


CASES: Dict[str, Case] = {
    "weights-eval-other-classes": Case(
        "train_net.py",
        "`--eval-only` with a checkpoint of another class count",
        lambda e: ["--eval-only", *e.train("MODEL.WEIGHTS", e.weights())],
        [
            "weights.pth",
            "for 80 classes",
            "the model has 4 classes",
            "different numbers of classes",
        ],
        lambda e: [e.weights()],
    ),
    "weights-predict-other-classes": Case(
        "predict",
        "predict with a checkpoint of another class count",
        lambda e: e.predict("MODEL.WEIGHTS", _four_classes(e)),
        ["four.pth", "for 4 classes", "the model has 80 classes", "different numbers of classes"],
        lambda e: [e.path("four.pth"), e.val_root],
    ),
    "weights-export-other-classes": Case(
        "export.py",
        "export with a checkpoint of another class count",
        lambda e: ["--config-file", TINY, "--weights", _four_classes(e), *_torchscript(e)],
        ["four.pth", "for 4 classes", "the model has 80 classes"],
        lambda e: [e.path("four.pth")],
    ),
    "weights-predict-other-anchors": Case(
        "predict",
        "`--config-file` of other anchors than those the checkpoint was trained with",
        lambda e: e.predict("MODEL.WEIGHTS", _fitted_anchors(e)),
        [
            "fitted.pth",
            "MODEL.ANCHOR_GENERATOR.SIZES is [[32], [64], [128], [256], [512]] here",
            "[[16], [32], [64], [128], [256]] in the checkpoint",
            "--ignore-checkpoint-config",
        ],
        lambda e: [e.path("fitted.pth"), e.val_root],
    ),
    "weights-predict-no-config": Case(
        "predict",
        "no `--config-file`, with weights that hold no config",
        lambda e: _without_config(e, "MODEL.WEIGHTS", e.weights()),
        ["no --config-file", "weights.pth", "pass --config-file"],
        lambda e: [e.weights(), e.val_root],
    ),
    "weights-eval-pkl-no-config": Case(
        "train_net.py",
        "`--eval-only` of a model-zoo style `.pkl` without `--config-file`",
        lambda e: ["--eval-only", "MODEL.WEIGHTS", _backbone_pkl(e)],
        ["no --config-file", "R-18.pkl", ".pkl files", "pass --config-file"],
        lambda e: [e.path("R-18.pkl")],
    ),
    "weights-train-no-config": Case(
        "train_net.py",
        "training without `--config-file`",
        lambda e: ["MODEL.WEIGHTS", e.weights(), "OUTPUT_DIR", e.out],
        ["training needs --config-file", "only --eval-only"],
        lambda e: [e.weights()],
    ),
    "weights-eval-backbone-only": Case(
        "train_net.py",
        "`--eval-only` with ImageNet backbone weights (no FPN, no head)",
        lambda e: ["--eval-only", *e.train("MODEL.WEIGHTS", _backbone_pkl(e))],
        ["R-18.pkl", "lacks 42 of the model's tensors", "backbone.fpn_lateral3.weight", "random"],
        lambda e: [e.path("R-18.pkl")],
    ),
    "weights-resume-other-classes": Case(
        "train_net.py",
        "`--resume` where the last checkpoint has another class count than the dataset",
        _run_of_other_classes,
        ["model_0000001.pth", "for 80 classes", "the model has 4 classes", "new OUTPUT_DIR"],
        lambda e: [e.path("out/model_0000001.pth"), e.path("out/last_checkpoint")],
    ),
    "weights-resume-checkpoint-as-weights": Case(
        "train_net.py",
        "`--resume` with a training checkpoint as `MODEL.WEIGHTS` and no `last_checkpoint`",
        lambda e: ["--resume", *e.train("MODEL.WEIGHTS", _tiny_weights(e, "m.pth", iteration=29))],
        ["m.pth", "iteration 29", "no last_checkpoint", "--resume-from"],
        lambda e: [e.path("m.pth")],
    ),
    "weights-resume-from-and-resume": Case(
        "train_net.py",
        "`--resume-from` together with `--resume`",
        lambda e: ["--resume", "--resume-from", e.weights(), *e.train()],
        ["--resume-from", "weights.pth", "with --resume", "give one of them"],
        lambda e: [e.weights()],
    ),
    "weights-resume-from-weights-only": Case(
        "train_net.py",
        "`--resume-from` a file without training state",
        lambda e: ["--resume-from", e.weights(), *e.train()],
        ["--resume-from", "weights.pth", "no training state", "MODEL.WEIGHTS"],
        lambda e: [e.weights()],
    ),
    "weights-resume-from-missing": Case(
        "train_net.py",
        "`--resume-from` a file that does not exist",
        lambda e: ["--resume-from", e.path("gone.pth"), *e.train()],
        ["--resume-from", "gone.pth", "does not exist"],
    ),
    "weights-resume-from-in-output-dir": Case(
        "train_net.py",
        "`--resume-from` a checkpoint inside `OUTPUT_DIR`",
        _resume_from_in_output_dir,
        ["--resume-from", "model_0000001.pth", "is in OUTPUT_DIR", "new folder"],
        lambda e: [e.path("out/model_0000001.pth")],
    ),
    "weights-other-depth": Case(
        "train_net.py",
        "a ResNet-34 detector checkpoint for the ResNet-18 model",
        lambda e: e.train(
            "MODEL.WEIGHTS", _tiny_weights(e, "r34.pth", "MODEL.RESNETS.DEPTH", "34")
        ),
        ["r34.pth", "another architecture", "48 of its tensors are not in the model", "DEPTH"],
        lambda e: [e.path("r34.pth")],
    ),
    "weights-other-fpn-width": Case(
        "train_net.py",
        "a checkpoint of another FPN width",
        lambda e: ["--eval-only", *e.train("MODEL.WEIGHTS", _fpn64(e))],
        ["fpn64.pth", "backbone.fpn_lateral3.weight", "MODEL.FPN.OUT_CHANNELS is 128 here, 64"],
        lambda e: [e.path("fpn64.pth")],
    ),
    "weights-nan": Case(
        "train_net.py",
        "weights holding NaN and infinite values",
        lambda e: e.train("MODEL.WEIGHTS", _tiny_weights(e, "nan.pth", edit=_with_nan)),
        ["nan.pth", "2 of its 102 tensors", "head.bbox_pred.bias: 2 of 36", "stem.conv1.weight"],
        lambda e: [e.path("nan.pth")],
    ),
    "weights-url-unreachable": Case(
        "train_net.py",
        "an unreachable weights URL",
        lambda e: e.train("MODEL.WEIGHTS", "https://127.0.0.1:9/x.pth"),
        ["cannot download", "https://127.0.0.1:9/x.pth", "Connection refused"],
    ),
}
