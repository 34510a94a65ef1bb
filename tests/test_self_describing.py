"""A trained model that describes itself: checkpoints carry the run's config, class names,
datasets and versions, so that predict, ``--eval-only`` and tools/export.py work from the
weights file alone and refuse a config that builds another network."""

import importlib.util
import json
import os
import shutil

import pytest
import torch
import yaml
from train_runs import REPO, TINY, coco_args, run, train_net

from conftest import pycocotools_ap
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from retinanet_plugin.checkpoint.metadata import config_for_weights, read_metadata
from retinanet_plugin.cli import defaults as retinanet_cli
from retinanet_plugin.cli import predict as predict_cli
from retinanet_plugin.data.synthetic_shapes import SHAPE_CLASSES

# Anchors fitted to small objects (half the default sizes), as tools/analyze_dataset.py would
# give; the head's norm off so that detectron2 0.6's RetinaNetHead can be built from the config.
FITTED = ["MODEL.ANCHOR_GENERATOR.SIZES", "[[16], [32], [64], [128], [256]]"]
RUN_OPTS = [*FITTED, "MODEL.RETINANET.NORM", "", "SOLVER.MAX_ITER", "3"]


@pytest.fixture(scope="module")
def trained(shapes_dataset, tmp_path_factory):
    """The tiny model trained 3 iterations with fitted anchors: its OUTPUT_DIR."""
    output = tmp_path_factory.mktemp("self_describing")
    train_net(output, coco_args(shapes_dataset), *RUN_OPTS)
    return output


def _predict(shapes_dataset, output, *args, expect_ok=True):
    argv = ["--input", shapes_dataset["val"][1], "--output", str(output), *args]
    return run("-m", "retinanet_plugin.predict", *argv, expect_ok=expect_ok)


def test_checkpoint_holds_the_run_config_and_class_names(trained, shapes_dataset):
    checkpoint = torch.load(trained / "model_final.pth", map_location="cpu", weights_only=True)
    metadata = checkpoint["retinanet_plugin"]
    with open(shapes_dataset["train"][0]) as f:
        categories = [c["name"] for c in json.load(f)["categories"]]
    assert metadata["class_names"] == categories == list(SHAPE_CLASSES)
    # The stored config is the one the run recorded in OUTPUT_DIR.
    assert metadata["config"] == (trained / "config.yaml").read_text()
    stored = yaml.safe_load(metadata["config"])
    assert stored["MODEL"]["ANCHOR_GENERATOR"]["SIZES"] == [[16], [32], [64], [128], [256]]
    assert stored["MODEL"]["RETINANET"]["NUM_CLASSES"] == 4
    assert metadata["datasets"] == {"train": ["shapes_train"], "test": ["shapes_val"]}
    assert metadata["input_format"] == "BGR"
    assert metadata["pixel_std"] == [57.375, 57.120, 58.395]
    assert metadata["versions"]["torch"] == torch.__version__


def test_detectron2_checkpointer_and_retinanet_load_it(trained):
    """detectron2's own DetectionCheckpointer, into detectron2's RetinaNet built from the run's
    config, loads every tensor of the file and ignores the metadata."""
    expanded = [[s * 2 ** (i / 3) for i in range(3)] for s in (16, 32, 64, 128, 256)]
    cfg = config_for_weights("", ["MODEL.WEIGHTS", str(trained / "model_final.pth")])
    cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
    cfg.MODEL.ANCHOR_GENERATOR.NAME = "DefaultAnchorGenerator"
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = expanded
    model = build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    saved = torch.load(cfg.MODEL.WEIGHTS, map_location="cpu", weights_only=True)["model"]
    state = model.state_dict()
    assert set(state) <= set(saved)
    for name, tensor in state.items():
        torch.testing.assert_close(tensor, saved[name], rtol=0, atol=0, msg=name)


def test_metadata_survives_resume(trained, shapes_dataset, tmp_path):
    output = tmp_path / "run"
    shutil.copytree(trained, output)
    train_net(output, coco_args(shapes_dataset), "--resume", *RUN_OPTS[:-1], "5")
    before = read_metadata(str(trained / "model_final.pth"))
    after = read_metadata(str(output / "model_final.pth"))
    assert torch.load(output / "model_final.pth", weights_only=True)["iteration"] == 4
    # The same run, continued for more iterations: only MAX_ITER and OUTPUT_DIR differ.
    assert after["class_names"] == before["class_names"]
    before_cfg, after_cfg = yaml.safe_load(before["config"]), yaml.safe_load(after["config"])
    assert after_cfg["SOLVER"]["MAX_ITER"] == 5
    for cfg in (before_cfg, after_cfg):
        del cfg["SOLVER"]["MAX_ITER"], cfg["OUTPUT_DIR"]
    assert after_cfg == before_cfg


def test_predict_from_the_weights_alone(trained, shapes_dataset, tmp_path):
    weights = ["MODEL.WEIGHTS", str(trained / "model_final.pth")]
    with_config = ["--config-file", str(trained / "config.yaml")]
    _predict(shapes_dataset, tmp_path / "with", *with_config, *weights, "--score-threshold", "0")
    _predict(shapes_dataset, tmp_path / "alone", *weights, "--score-threshold", "0")
    expected = json.loads((tmp_path / "with" / "coco_results.json").read_text())
    got = json.loads((tmp_path / "alone" / "coco_results.json").read_text())
    assert expected and got == expected
    # No dataset registered: the boxes are labeled with the checkpoint's class names.
    cfg = config_for_weights("", weights)
    stored = read_metadata(weights[1])["class_names"]
    assert predict_cli._metadata(cfg, None, stored).thing_classes == list(SHAPE_CLASSES)


def test_eval_only_from_the_weights_alone(trained, shapes_dataset, tmp_path):
    weights = ["MODEL.WEIGHTS", str(trained / "model_final.pth")]
    results = []
    for name, config in (("with", ["--config-file", str(trained / "config.yaml")]), ("alone", [])):
        output = tmp_path / name
        argv = [*config, *coco_args(shapes_dataset), "--eval-only", *weights]
        run("train_net.py", *argv, "OUTPUT_DIR", str(output))
        results.append(output / "inference" / "shapes_val" / "coco_instances_results.json")
    expected, got = (json.loads(r.read_text()) for r in results)
    assert expected and got == expected
    ap = pycocotools_ap(shapes_dataset["val"][0], str(results[1]))
    assert ap == pycocotools_ap(shapes_dataset["val"][0], str(results[0]))


def _export(*argv):
    spec = importlib.util.spec_from_file_location("export_cli", f"{REPO}/tools/export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return retinanet_cli.run(module.main, [str(a) for a in argv])


def test_export_from_the_weights_alone(trained, shapes_dataset, tmp_path):
    pytest.importorskip("onnxruntime")
    from retinanet_plugin.export.exporter import load_exported, load_test_input

    weights = ["--weights", trained / "model_final.pth", "--format", "onnx"]
    with_config = ["--config-file", trained / "config.yaml"]
    assert _export(*with_config, *weights, "--output", tmp_path / "with.onnx") == 0
    assert _export(*weights, "--output", tmp_path / "alone.onnx") == 0
    exported = [load_exported(str(tmp_path / f"{n}.onnx")) for n in ("with", "alone")]
    assert exported[1].class_names == list(SHAPE_CLASSES)
    assert exported[1].cfg.MODEL.ANCHOR_GENERATOR.SIZES == [[16], [32], [64], [128], [256]]
    val_root = shapes_dataset["val"][1]
    image = load_test_input(f"{val_root}/{sorted(os.listdir(val_root))[0]}", exported[1].cfg)
    expected, got = (e([image])[0]["instances"] for e in exported)
    assert len(expected) > 0
    torch.testing.assert_close(got.scores, expected.scores, rtol=0, atol=0)
    torch.testing.assert_close(got.pred_boxes.tensor, expected.pred_boxes.tensor, rtol=0, atol=0)


def test_a_config_of_other_anchors_is_refused(trained, shapes_dataset, tmp_path, capsys):
    weights = ["MODEL.WEIGHTS", str(trained / "model_final.pth")]
    argv = ["--config-file", TINY, *weights]
    code, log = _predict(shapes_dataset, tmp_path / "p", *argv, expect_ok=False)
    assert code == 2
    (line,) = [line for line in log.splitlines() if line.startswith("error:")]
    assert "MODEL.ANCHOR_GENERATOR.SIZES is [[32], [64], [128], [256], [512]] here, " in line
    assert "[[16], [32], [64], [128], [256]] in the checkpoint" in line
    assert "--ignore-checkpoint-config" in line
    assert not (tmp_path / "p").exists()
    # --eval-only and export check the same way.
    evaluate = [*argv, "--eval-only", "OUTPUT_DIR", tmp_path / "e"]
    code, log = run("train_net.py", *evaluate, expect_ok=False)
    assert code == 2 and "MODEL.ANCHOR_GENERATOR.SIZES is [[32]" in log
    export = ["--config-file", TINY, "--weights", weights[1], "--format", "onnx"]
    capsys.readouterr()
    assert _export(*export, "--output", tmp_path / "m.onnx") == 2
    assert "MODEL.ANCHOR_GENERATOR.SIZES is [[32]" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()
    # Thresholds, device and datasets may differ.
    own = ["--config-file", str(trained / "config.yaml"), *weights]
    other = "MODEL.RETINANET.SCORE_THRESH_TEST 0.3 MODEL.DEVICE cpu DATASETS.TEST ()".split()
    _predict(shapes_dataset, tmp_path / "q", *own, *other)
    # With the flag, the given config is used: other anchors, other boxes.
    same = "INPUT.MIN_SIZE_TEST 128 INPUT.MAX_SIZE_TEST 160 MODEL.RETINANET.SCORE_THRESH_TEST 0.0"
    ignore = [*argv, "--ignore-checkpoint-config", "MODEL.RETINANET.NORM", "", *same.split()]
    for name, config in (("own", own), ("other", ignore)):
        _predict(shapes_dataset, tmp_path / name, *config, "--score-threshold", "0")
    own, other = (
        json.loads((tmp_path / n / "coco_results.json").read_text()) for n in ("own", "other")
    )
    assert own and other and [r["bbox"] for r in other] != [r["bbox"] for r in own]
