"""Bad-input cases of the first releases: config files, options, config values, datasets,
weights, output folders, predict, plot_metrics and the tools (see bad_input_env.py)."""

import os
from typing import Dict, List

import torch
from bad_input_env import SHORT, TINY, Case, Env


def _duplicate_image_id(data):
    data["images"][1]["id"] = data["images"][0]["id"]


def _wrong_weights(env: Env) -> str:
    path = env.tmp / "other.pth"
    torch.save({"model": {"backbone.body.conv1.weight": torch.zeros(1)}}, path)
    return str(path)


def _bad_pointer(env: Env) -> List[str]:
    os.makedirs(env.out, exist_ok=True)
    env.path("out/last_checkpoint", "model_0000999.pth")
    return env.train("--resume")


def _base_cycle(env: Env) -> List[str]:
    env.path("b.yaml", "_BASE_: a.yaml\n")
    return ["--config-file", env.path("a.yaml", "_BASE_: b.yaml\n")]


def _earlier_demo(env: Env) -> List[str]:
    os.makedirs(env.out, exist_ok=True)
    env.path("out/metrics.json", "{}\n")
    return ["--output", env.out]


def _finished_run(env: Env) -> List[str]:
    os.makedirs(env.out, exist_ok=True)
    env.path("out/model_final.pth", b"weights")
    env.path("out/metrics.json", '{"iteration": 0, "total_loss": 1.0}\n')
    return env.train()


CASES: Dict[str, Case] = {
    # -- train_net.py: config file ----------------------------------------------------------
    "config-missing": Case(
        "train_net.py",
        "`--config-file` that does not exist",
        lambda e: ["--config-file", e.path("nope.yaml")],
        ["nope.yaml", "does not exist"],
    ),
    "config-folder": Case(
        "train_net.py",
        "`--config-file` that is a folder",
        lambda e: ["--config-file", str(e.tmp)],
        ["is a folder"],
    ),
    "config-empty": Case(
        "train_net.py",
        "empty config file",
        lambda e: ["--config-file", e.path("empty.yaml", "")],
        ["empty.yaml", "is empty"],
    ),
    "base-cycle": Case(
        "train_net.py",
        "`_BASE_` chain that loops",
        _base_cycle,
        ["a.yaml", "cycle"],
    ),
    "config-yaml": Case(
        "train_net.py",
        "YAML syntax error",
        lambda e: ["--config-file", e.path("bad.yaml", "MODEL: [\n")],
        ["bad.yaml", "line"],
    ),
    "unknown-key": Case(
        "train_net.py",
        "misspelled override key",
        lambda e: e.train("SOLVER.BASE_LRR", "0.1"),
        ["SOLVER.BASE_LRR", "SOLVER.BASE_LR"],
    ),
    "override-no-value": Case(
        "train_net.py",
        "override without a value",
        lambda e: e.train("SOLVER.BASE_LR"),
        ["'SOLVER.BASE_LR' has no value"],
    ),
    "wrong-type": Case(
        "train_net.py",
        "override of the wrong type",
        lambda e: e.train("SOLVER.MAX_ITER", "lots"),
        ["SOLVER.MAX_ITER", "'lots'"],
    ),
    # -- train_net.py: options --------------------------------------------------------------
    "unknown-option": Case(
        "train_net.py",
        "unknown option",
        lambda e: e.train("--resmue"),
        ["unknown option --resmue"],
    ),
    "register-too-few": Case(
        "train_net.py",
        "`--register-coco` with two of its three values, before overrides",
        lambda e: ["--config-file", TINY, "--register-coco", "x", "x.json", "SOLVER.MAX_ITER", "1"],
        ["--register-coco takes 3 value(s)", "NAME JSON IMAGE_ROOT", "'SOLVER.MAX_ITER'"],
    ),
    "num-gpus-0": Case(
        "train_net.py",
        "`--num-gpus 0`",
        lambda e: e.train("--num-gpus", "0"),
        ["--num-gpus 0"],
    ),
    "batch-not-divisible": Case(
        "train_net.py",
        "`SOLVER.IMS_PER_BATCH` not divisible by the processes",
        lambda e: e.train("--num-gpus", "2", "SOLVER.IMS_PER_BATCH", "3"),
        ["SOLVER.IMS_PER_BATCH = 3", "2 processes"],
    ),
    "cuda-without-gpu": Case(
        "train_net.py",
        "`--num-gpus 2` with `MODEL.DEVICE cuda` on a machine without a GPU",
        lambda e: e.train("--num-gpus", "2", "MODEL.DEVICE", "cuda"),
        ["MODEL.DEVICE = 'cuda'", "no CUDA GPU"],
    ),
    # -- train_net.py: config values --------------------------------------------------------
    "device-unknown": Case(
        "train_net.py",
        "unknown `MODEL.DEVICE`",
        lambda e: e.train("MODEL.DEVICE", "tpu"),
        ["MODEL.DEVICE = 'tpu'"],
    ),
    "input-format": Case(
        "train_net.py",
        "unknown `INPUT.FORMAT`",
        lambda e: e.train("INPUT.FORMAT", "BRG"),
        ["INPUT.FORMAT = 'BRG'", "'BGR'"],
    ),
    "pixel-mean-length": Case(
        "train_net.py",
        "`MODEL.PIXEL_MEAN` of the wrong length",
        lambda e: e.train("MODEL.PIXEL_MEAN", "[103.5, 116.3]"),
        ["MODEL.PIXEL_MEAN", "3 number"],
    ),
    "min-size-negative": Case(
        "train_net.py",
        "negative `INPUT.MIN_SIZE_TRAIN`",
        lambda e: e.train("INPUT.MIN_SIZE_TRAIN", "(-128,)"),
        ["INPUT.MIN_SIZE_TRAIN", "(-128,)"],
    ),
    "workers-negative": Case(
        "train_net.py",
        "negative `DATALOADER.NUM_WORKERS`",
        lambda e: e.train("DATALOADER.NUM_WORKERS", "-1"),
        ["DATALOADER.NUM_WORKERS = -1"],
    ),
    "test-aug": Case(
        "train_net.py",
        "`TEST.AUG.ENABLED True`",
        lambda e: e.train("TEST.AUG.ENABLED", "True"),
        ["TEST.AUG.ENABLED", "test-time augmentation"],
    ),
    # -- train_net.py: datasets -------------------------------------------------------------
    "test-set-unregistered": Case(
        "train_net.py",
        "`DATASETS.TEST` not registered (only `DATASETS.TRAIN` set)",
        lambda e: [
            "--config-file",
            TINY,
            *e.register(),
            "DATASETS.TRAIN",
            f"('{e.name}_train',)",
            *SHORT,
            "OUTPUT_DIR",
            e.out,
        ],
        ["DATASETS.TEST", "'retinanet_demo_val' is not registered", "--register-coco"],
    ),
    "train-set-typo": Case(
        "train_net.py",
        "misspelled `DATASETS.TRAIN` name",
        lambda e: e.train("DATASETS.TRAIN", f"('{e.name}_trian',)"),
        ["DATASETS.TRAIN", "_trian' is not registered", "did you mean"],
    ),
    "register-missing-json": Case(
        "train_net.py",
        "`--register-coco` with a missing JSON",
        lambda e: [
            "--config-file",
            TINY,
            "--register-coco",
            f"{e.name}_x",
            e.path("missing.json"),
            e.train_root,
        ],
        ["missing.json", "does not exist"],
    ),
    "duplicate-image-id": Case(
        "train_net.py",
        "COCO JSON with two images of one id",
        lambda e: [
            "--config-file",
            TINY,
            "--register-coco",
            f"{e.name}_dup",
            e.coco_copy(_duplicate_image_id),
            e.train_root,
            "DATASETS.TRAIN",
            f"('{e.name}_dup',)",
            "DATASETS.TEST",
            "()",
            *SHORT,
            "OUTPUT_DIR",
            e.out,
        ],
        ["edited.json", "2 images have id", "must be unique"],
    ),
    # -- train_net.py: weights and output folder --------------------------------------------
    "weights-missing": Case(
        "train_net.py",
        "`MODEL.WEIGHTS` that does not exist",
        lambda e: e.train("MODEL.WEIGHTS", e.path("gone.pth")),
        ["MODEL.WEIGHTS", "gone.pth"],
    ),
    "weights-folder": Case(
        "train_net.py",
        "`MODEL.WEIGHTS` that is a folder",
        lambda e: e.train("MODEL.WEIGHTS", str(e.tmp)),
        ["MODEL.WEIGHTS", "is a folder"],
    ),
    "weights-no-match": Case(
        "train_net.py",
        "weights of another architecture (no tensor fits)",
        lambda e: e.train("MODEL.WEIGHTS", _wrong_weights(e)),
        ["other.pth", "none of its 1 tensors fits", "MODEL.WEIGHTS ''"],
    ),
    "weights-not-a-checkpoint": Case(
        "train_net.py",
        "`MODEL.WEIGHTS` that is not a weights file",
        lambda e: e.train("MODEL.WEIGHTS", e.path("notes.pth", b"not a checkpoint")),
        ["notes.pth"],
    ),
    "eval-only-no-weights": Case(
        "train_net.py",
        "`--eval-only` without weights",
        lambda e: e.train("--eval-only"),
        ["--eval-only", "randomly initialized"],
    ),
    "bad-last-checkpoint": Case(
        "train_net.py",
        "`--resume` with garbage in `last_checkpoint`",
        _bad_pointer,
        ["last_checkpoint names 'model_0000999.pth'"],
    ),
    "output-holds-run": Case(
        "train_net.py",
        "`OUTPUT_DIR` holding a finished run (no `--resume`/`--overwrite`)",
        _finished_run,
        ["holds an earlier run", "model_final.pth", "--resume", "--overwrite"],
    ),
    "output-is-file": Case(
        "train_net.py",
        "`OUTPUT_DIR` that is a file",
        lambda e: e.train("OUTPUT_DIR", e.path("afile", "x")),
        ["OUTPUT_DIR", "is a file"],
    ),
    # -- predict -----------------------------------------------------------------------------
    "predict-threshold": Case(
        "predict",
        "`--score-threshold` outside [0, 1]",
        lambda e: e.predict("--score-threshold", "1.5"),
        ["--score-threshold 1.5", "[0, 1]"],
    ),
    "predict-batch-size": Case(
        "predict",
        "`--batch-size 0`",
        lambda e: e.predict("--batch-size", "0"),
        ["--batch-size 0"],
    ),
    "predict-tile-overlap": Case(
        "predict",
        "`--tile-overlap 1`",
        lambda e: e.predict("--tile", "256", "--tile-overlap", "1"),
        ["--tile-overlap 1", "[0, 1)"],
    ),
    "predict-no-weights": Case(
        "predict",
        "no weights",
        lambda e: e.predict(),
        ["no weights", "MODEL.WEIGHTS"],
    ),
    "predict-output-file": Case(
        "predict",
        "`--output` that is a file",
        lambda e: e.predict("--output", e.path("taken.txt", "x")),
        ["taken.txt", "is a file"],
    ),
    "predict-no-input": Case(
        "predict",
        "`--input` matching no image",
        lambda e: [
            "--config-file",
            TINY,
            "--input",
            e.path("nothing*.jpg"),
            "--output",
            str(e.tmp / "pred"),
            "MODEL.WEIGHTS",
            e.weights(),
        ],
        ["nothing*.jpg", "no image file matched"],
    ),
    "predict-dataset": Case(
        "predict",
        "`--dataset` not registered",
        lambda e: e.predict("--dataset", "shapez"),
        ["--dataset shapez", "not registered"],
    ),
    "predict-device": Case(
        "predict",
        "`MODEL.DEVICE cuda` on a machine without a GPU",
        lambda e: e.predict("MODEL.WEIGHTS", e.weights(), "MODEL.DEVICE", "cuda"),
        ["MODEL.DEVICE = 'cuda'", "no CUDA GPU"],
    ),
    # -- plot_metrics --------------------------------------------------------------------------
    "metrics-missing": Case(
        "plot_metrics",
        "metrics file that does not exist",
        lambda e: [e.path("metrics.json")],
        ["metrics.json", "does not exist"],
    ),
    "metrics-empty": Case(
        "plot_metrics",
        "empty metrics file",
        lambda e: [e.path("metrics.json", "")],
        ["metrics.json", "holds no records"],
    ),
    "metrics-corrupt": Case(
        "plot_metrics",
        "metrics file with a broken line before the last",
        lambda e: [e.path("metrics.json", '{"iteration": 0}\nnot json\n{"iteration": 1}\n')],
        ["metrics.json, line 2"],
    ),
    # -- tools/export.py -------------------------------------------------------------------------
    "export-folder": Case(
        "export.py",
        "`--output` in a folder that does not exist",
        lambda e: e.export("onnx", str(e.tmp / "missing" / "model.onnx")),
        ["missing", "does not exist"],
    ),
    "export-no-weights": Case(
        "export.py",
        "no weights",
        lambda e: ["--config-file", TINY, "--format", "onnx", "--output", e.path("m.onnx")],
        ["no weights to export"],
    ),
    "export-sample": Case(
        "export.py",
        "`--sample-image` that is not an image",
        lambda e: e.export(
            "torchscript", e.path("m.ts"), "--sample-image", e.path("x.png", b"nope")
        ),
        ["x.png", "cannot be read as an image"],
    ),
    # -- tools/ablate.py, tools/analyze_dataset.py, tools/demo.py ------------------------------
    "ablate-configs": Case(
        "ablate.py",
        "`--configs` matching no file",
        lambda e: ["--configs", e.path("nope_*.yaml"), "--output", e.out],
        ["nope_*.yaml", "matches no file"],
    ),
    "analyze-dataset": Case(
        "analyze_dataset.py",
        "`--dataset` not registered",
        lambda e: ["--config-file", TINY, *e.register(), "--dataset", f"{e.name}_trian"],
        ["--dataset", "_trian", "is not registered", "did you mean"],
    ),
    "analyze-write-config": Case(
        "analyze_dataset.py",
        "`--write-config` naming an existing file",
        lambda e: [
            "--config-file",
            TINY,
            "--fit-anchors",
            "--write-config",
            e.path("mine.yaml", ""),
        ],
        ["mine.yaml exists"],
    ),
    "demo-output": Case(
        "demo.py",
        "`--output` holding an earlier demo run",
        _earlier_demo,
        ["holds an earlier run", "--overwrite"],
    ),
}
