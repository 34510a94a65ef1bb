"""Bad-input cases: predict, plot_metrics and the tools (see bad_input_env.py; run by
test_bad_inputs.py). Each ``keep`` lists the user's photos, weights or earlier results that the
refused command must leave as they were."""

import json
import os
import shutil
import zipfile
from typing import Dict, List

from bad_input_env import TINY, Case, Env

ABLATION = os.path.join(os.path.dirname(TINY), "ablations", "table1a_ce_alpha0.25.yaml")


def _photos(env: Env) -> str:
    """A copy of the validation images: the user's photos."""
    photos = str(env.tmp / "photos")
    if not os.path.isdir(photos):
        shutil.copytree(env.val_root, photos)
    return photos


def _predict(env: Env, inputs: List[str], output: str, *extra: str) -> List[str]:
    argv = ["--config-file", TINY, "--output", output, "MODEL.WEIGHTS", env.weights(), *extra]
    for item in inputs:
        argv += ["--input", item]
    return argv


def _earlier_predict_run(env: Env) -> List[str]:
    """pred/ as a predict run leaves it: its pictures, results and list of files."""
    pred = env.tmp / "pred"
    pred.mkdir()
    (pred / "00001.png").write_bytes(b"an earlier drawing")
    (pred / "coco_results.json").write_text("[]")
    files = ["predict_run.json", "coco_results.json", "00001.png"]
    (pred / "predict_run.json").write_text(json.dumps({"files": files}))
    return _predict(env, [_photos(env)], str(pred))


def _results_without_list(env: Env) -> List[str]:
    pred = env.tmp / "pred"
    pred.mkdir()
    (pred / "coco_results.json").write_text("[]")
    (pred / "00001.png").write_bytes(b"a drawing of an older version")
    return _predict(env, [_photos(env)], str(pred))


def _picture_taken(env: Env) -> List[str]:
    pred = env.tmp / "pred"
    pred.mkdir()
    (pred / "00002.png").write_bytes(b"the user's own picture")
    return _predict(env, [_photos(env)], str(pred))


def _folder_taken(env: Env) -> List[str]:
    """photos/sub/00001.png to draw into pred/, where sub is a file of the user's."""
    photos = env.tmp / "photos"
    (photos / "sub").mkdir(parents=True)
    shutil.copy(os.path.join(env.val_root, "00001.png"), photos / "sub")
    pred = env.tmp / "pred"
    pred.mkdir()
    (pred / "sub").write_text("the user's notes")
    return _predict(env, [str(photos)], str(pred))


def _same_drawing(env: Env) -> List[str]:
    photos = env.tmp / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(b"one photo")
    (photos / "a.jpg.png").write_bytes(b"another photo")
    return _predict(env, [str(photos)], env.out)


def _empty_folder(env: Env) -> List[str]:
    empty = env.tmp / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("no image")
    return _predict(env, [_photos(env), str(empty)], env.out)


def _truncated(env: Env) -> str:
    with open(os.path.join(env.val_root, "00001.png"), "rb") as f:
        data = f.read()
    return env.path("cut.png", data[: len(data) // 2])


def _weights_as_output(env: Env) -> List[str]:
    weights = env.tmp / "model.pt"
    shutil.copy(env.weights(), weights)
    return [
        "--config-file",
        TINY,
        "--weights",
        str(weights),
        "--format",
        "torchscript",
        "--output",
        str(weights),
    ]


def _earlier_export(env: Env) -> str:
    """A file with the metadata of an export (what tools/export.py checks)."""
    path = str(env.tmp / "model.ts")
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("model/extra/retinanet_plugin", "{}")
    return path


def _metrics(env: Env) -> str:
    return env.path("metrics.json", '{"iteration": 0, "total_loss": 1.0, "lr": 0.01}\n')


def _foreign_run(env: Env) -> List[str]:
    run = env.tmp / "out" / "table1a_ce_alpha0.25"
    run.mkdir(parents=True)
    (run / "model_final.pth").write_bytes(b"the user's trained weights")
    (run / "metrics.json").write_text('{"iteration": 0}\n')
    return ["--configs", ABLATION, "--model-config", TINY, "--output", env.out]


def _earlier_analysis(env: Env) -> List[str]:
    os.makedirs(env.out)
    env.path("out/analysis.json", "{}")
    return ["--config-file", TINY, *env.register(), "--output", env.out]


CASES: Dict[str, Case] = {
    # -- predict: where the pictures go ------------------------------------------------------
    "tools-predict-output-is-input": Case(
        "predict",
        "`--output` equal to the `--input` folder",
        lambda e: _predict(e, [_photos(e)], _photos(e)),
        ["--output", "photos", "is, or is inside, the input folder", "outside it"],
        keep=lambda e: [_photos(e)],
    ),
    "tools-predict-output-inside-input": Case(
        "predict",
        "`--output` inside the `--input` folder",
        lambda e: _predict(e, [_photos(e)], os.path.join(_photos(e), "predictions")),
        ["photos/predictions", "is, or is inside, the input folder"],
        keep=lambda e: [_photos(e)],
    ),
    "tools-predict-earlier-run": Case(
        "predict",
        "`--output` holding an earlier predict run",
        _earlier_predict_run,
        ["pred", "holds an earlier predict run", "--overwrite"],
        keep=lambda e: [str(e.tmp / "pred"), _photos(e)],
    ),
    "tools-predict-results-without-list": Case(
        "predict",
        "`--output` holding a `coco_results.json` without the list of its run's files",
        _results_without_list,
        ["pred", "holds a coco_results.json without the predict_run.json", "cannot be told apart"],
        keep=lambda e: [str(e.tmp / "pred")],
    ),
    "tools-predict-picture-taken": Case(
        "predict",
        "`--output` holding a file of a drawing's name that no predict run wrote",
        _picture_taken,
        ["pred", "already holds 00002.png"],
        keep=lambda e: [str(e.tmp / "pred")],
    ),
    "tools-predict-folder-taken": Case(
        "predict",
        "`--output` holding a file where a mirrored sub-folder goes",
        _folder_taken,
        ["pred", "already holds sub", "where the picture sub/00001.png goes"],
        keep=lambda e: [str(e.tmp / "pred"), str(e.tmp / "photos")],
    ),
    "tools-predict-same-drawing": Case(
        "predict",
        "two inputs that would be drawn under one name (`a.jpg`, `a.jpg.png`)",
        _same_drawing,
        ["a.jpg and", "a.jpg.png would both be drawn as a.jpg.png"],
        keep=lambda e: [str(e.tmp / "photos")],
    ),
    # -- predict: inputs -----------------------------------------------------------------------
    "tools-predict-missing-input": Case(
        "predict",
        "one of several `--input` paths that does not exist",
        lambda e: _predict(e, [_photos(e), e.path("photos/IMG_0001.jpg")], e.out),
        ["--input", "IMG_0001.jpg does not exist"],
    ),
    "tools-predict-empty-folder": Case(
        "predict",
        "an `--input` folder without images (sub-folders included)",
        _empty_folder,
        ["--input", "empty: no image file matched", "sub-folders"],
    ),
    "tools-predict-truncated-alone": Case(
        "predict",
        "a truncated image file given alone",
        lambda e: _predict(e, [_truncated(e)], e.out),
        ["none of the 1 input image(s) could be read", "cut.png"],
        keep=lambda e: [e.path("cut.png")],
    ),
    "tools-predict-empty-file-alone": Case(
        "predict",
        "an empty image file given alone",
        lambda e: _predict(e, [e.path("empty.jpg", b"")], e.out),
        ["none of the 1 input image(s) could be read", "empty.jpg"],
    ),
    "tools-predict-broken-video-alone": Case(
        "predict",
        "a video file OpenCV cannot open, given alone",
        lambda e: _predict(e, [e.path("clip.mp4", b"not a video" * 10)], e.out),
        ["none of the 1 input image(s) could be read", "clip.mp4", "OpenCV cannot open it"],
        keep=lambda e: [e.path("clip.mp4")],
    ),
    "tools-predict-yolo-video": Case(
        "predict",
        "`--yolo-txt` with a video among the inputs",
        lambda e: _predict(e, [e.path("clip.mp4", b"a video")], e.out, "--yolo-txt"),
        ["--yolo-txt", "clip.mp4 is a video", "YOLO label files are per image"],
    ),
    "tools-predict-not-in-dataset": Case(
        "predict",
        "inputs of which some are images of the registered dataset and some are not",
        lambda e: _predict(
            e, [e.val_root, _truncated(e)], e.out, "--dataset", f"{e.name}_val", *e.register()
        ),
        ["1 of the 7 inputs are not images of the dataset", "cut.png", "separate runs"],
    ),
    "tools-predict-picture-size": Case(
        "predict",
        "`--max-picture-size` below 0",
        lambda e: _predict(e, [_photos(e)], e.out, "--max-picture-size", "-1"),
        ["--max-picture-size -1", "must be a size in pixels, or 0"],
    ),
    # -- tools/export.py -----------------------------------------------------------------------
    "tools-export-extension": Case(
        "export.py",
        "`--format onnx --output model.ts`",
        lambda e: e.export("onnx", str(e.tmp / "model.ts")),
        ["--output", "model.ts", "--format onnx writes .onnx files", "model.onnx"],
    ),
    "tools-export-no-extension": Case(
        "export.py",
        "`--format torchscript --output model` (no extension)",
        lambda e: e.export("torchscript", str(e.tmp / "model")),
        ["--output", "--format torchscript writes .ts or .pt files"],
    ),
    "tools-export-over-weights": Case(
        "export.py",
        "`--output` equal to `--weights`",
        _weights_as_output,
        ["--output", "model.pt is the --weights / MODEL.WEIGHTS file"],
        keep=lambda e: [str(e.tmp / "model.pt")],
    ),
    "tools-export-over-other-file": Case(
        "export.py",
        "`--output` an existing file that is not an export",
        lambda e: e.export("onnx", e.path("notes.onnx", b"the user's notes")),
        ["notes.onnx exists and is not a model written by tools/export.py"],
        keep=lambda e: [e.path("notes.onnx")],
    ),
    "tools-export-over-earlier-export": Case(
        "export.py",
        "`--output` an earlier export, without `--overwrite`",
        lambda e: e.export("torchscript", _earlier_export(e)),
        ["model.ts holds an earlier export", "--overwrite"],
        keep=lambda e: [str(e.tmp / "model.ts")],
    ),
    "tools-export-int8-torchscript": Case(
        "export.py",
        "`--format torchscript --quantize int8` (no calibration images)",
        lambda e: e.export("torchscript", str(e.tmp / "m.ts"), "--quantize", "int8"),
        ["int8 quantization is for float32 ONNX exports only", "not torchscript", "--format onnx"],
    ),
    "tools-export-unknown-format": Case(
        "export.py",
        "`--format tflite` (an unknown format)",
        lambda e: e.export("tflite", str(e.tmp / "m.tflite")),
        ["--format", "'tflite'", "torchscript", "onnx"],
    ),
    "tools-export-unknown-graph": Case(
        "export.py",
        "`--graph full` (an unknown graph)",
        lambda e: e.export("onnx", str(e.tmp / "m.onnx"), "--graph", "full"),
        ["--graph", "'full'", "deployable", "raw-head"],
    ),
    "tools-export-calibration-missing": Case(
        "export.py",
        "`--calibration-images` naming a folder that does not exist",
        lambda e: e.export(
            "onnx",
            str(e.tmp / "m.onnx"),
            "--quantize",
            "int8",
            "--calibration-images",
            str(e.tmp / "train_images"),
        ),
        ["--calibration-images", "train_images does not exist"],
    ),
    # -- plot_metrics --output -----------------------------------------------------------------
    "tools-metrics-no-extension": Case(
        "plot_metrics",
        "`--output` without extension",
        lambda e: [_metrics(e), "--output", str(e.tmp / "curves")],
        ["curves", "a name without extension is not an image format", ".png", ".pdf"],
    ),
    "tools-metrics-extension": Case(
        "plot_metrics",
        "`--output` with an extension matplotlib cannot write",
        lambda e: [_metrics(e), "--output", str(e.tmp / "curves.txt")],
        ["curves.txt", ".txt is not an image format", ".svg"],
    ),
    "tools-metrics-input-as-output": Case(
        "plot_metrics",
        "`--output` equal to the metrics file",
        lambda e: [_metrics(e), "--output", _metrics(e)],
        ["metrics.json is the metrics file itself", "training_curves.png"],
        keep=lambda e: [_metrics(e)],
    ),
    "tools-metrics-json-output": Case(
        "plot_metrics",
        "`--output` with the input's extension (.json)",
        lambda e: [_metrics(e), "--output", str(e.tmp / "curves.json")],
        ["curves.json", ".json is not an image format"],
    ),
    "tools-metrics-missing-folder": Case(
        "plot_metrics",
        "`--output` in a folder that does not exist",
        lambda e: [_metrics(e), "--output", str(e.tmp / "plots" / "curves.png")],
        ["plots", "does not exist"],
    ),
    "tools-metrics-existing-output": Case(
        "plot_metrics",
        "`--output` an existing file, without `--overwrite`",
        lambda e: [_metrics(e), "--output", e.path("mine.png", b"the user's picture")],
        ["mine.png exists", "--overwrite"],
        keep=lambda e: [e.path("mine.png")],
    ),
    # -- tools/demo.py -------------------------------------------------------------------------
    "tools-demo-output-file": Case(
        "demo.py",
        "`--output` that is a file",
        lambda e: ["--output", e.path("results.txt", "the user's notes")],
        ["--output", "results.txt is a file"],
        keep=lambda e: [e.path("results.txt")],
    ),
    "tools-demo-num-train": Case(
        "demo.py",
        "`--num-train 0`",
        lambda e: ["--output", e.out, "--num-train", "0"],
        ["--num-train 0", "at least 1"],
    ),
    "tools-demo-image-size": Case(
        "demo.py",
        "`--image-size 8`",
        lambda e: ["--output", e.out, "--image-size", "8"],
        ["--image-size 8", "at least 24"],
    ),
    # -- tools/ablate.py -----------------------------------------------------------------------
    "tools-ablate-override-typo": Case(
        "ablate.py",
        "misspelled key in the overrides for every run",
        lambda e: [
            "--configs",
            ABLATION,
            "--model-config",
            TINY,
            "--output",
            e.out,
            "SOLVER.MAX_ITERR",
            "5",
        ],
        ["table1a_ce_alpha0.25.yaml on --model-config", "SOLVER.MAX_ITERR", "SOLVER.MAX_ITER?"],
    ),
    "tools-ablate-full-config-typo": Case(
        "ablate.py",
        "misspelled key in the overrides, configs used whole",
        lambda e: ["--configs", TINY, "--output", e.out, "SOLVER.BASE_LRR", "0.1"],
        ["retinanet_R18_GN_tiny.yaml", "unknown config key SOLVER.BASE_LRR"],
    ),
    "tools-ablate-output-file": Case(
        "ablate.py",
        "`--output` that is a file",
        lambda e: ["--configs", ABLATION, "--output", e.path("table.md", "mine")],
        ["--output", "table.md is a file"],
        keep=lambda e: [e.path("table.md")],
    ),
    "tools-ablate-foreign-run": Case(
        "ablate.py",
        "`--output` whose run folder holds a training run ablate did not start",
        _foreign_run,
        ["table1a_ce_alpha0.25 holds a training run that tools/ablate.py did not start"],
        keep=lambda e: [e.out],
    ),
    "tools-ablate-image-size": Case(
        "ablate.py",
        "`--demo-data --image-size 8`",
        lambda e: [
            "--configs",
            ABLATION,
            "--model-config",
            TINY,
            "--demo-data",
            "--image-size",
            "8",
            "--output",
            e.out,
        ],
        ["--image-size 8", "at least 24"],
    ),
    # -- tools/analyze_dataset.py --------------------------------------------------------------
    "tools-analyze-earlier-analysis": Case(
        "analyze_dataset.py",
        "`--output` holding an earlier analysis, without `--overwrite`",
        _earlier_analysis,
        ["holds an earlier analysis (analysis.json)", "--overwrite"],
        keep=lambda e: [e.out],
    ),
    "tools-analyze-write-config-folder": Case(
        "analyze_dataset.py",
        "`--write-config` in a folder that does not exist",
        lambda e: [
            "--config-file",
            TINY,
            "--fit-anchors",
            "--write-config",
            str(e.tmp / "configs" / "fitted.yaml"),
        ],
        ["--write-config", "configs", "does not exist"],
    ),
}
