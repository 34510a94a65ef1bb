"""Running the training and predict commands in this process on the generated shapes dataset,
for the tests that train (see conftest.run_main)."""

import os

import torch

from conftest import run_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "retinanet_R18_GN_tiny.yaml")
# Small inputs and batches: a few iterations run in seconds.
# A model trained for a few iterations scores below the default 0.05: SCORE_THRESH_TEST 0 keeps
# every candidate, so that evaluation computes a real AP.
FAST = (
    "SOLVER.IMS_PER_BATCH 2 SOLVER.CHECKPOINT_PERIOD 2 INPUT.MIN_SIZE_TRAIN (128,) "
    "INPUT.MAX_SIZE_TRAIN 160 INPUT.MIN_SIZE_TEST 128 INPUT.MAX_SIZE_TEST 160 "
    "DATALOADER.NUM_WORKERS 0 SEED 1 MODEL.RETINANET.SCORE_THRESH_TEST 0.0"
).split()


def run(*args, expect_ok=True):
    """Runs ``train_net.py ARGS`` or ``-m retinanet_plugin.predict ARGS`` as its command line
    does, in this process (:func:`conftest.run_main`); returns (exit code, output)."""
    if args[0] == "train_net.py":
        from retinanet_plugin.cli import train

        main, argv = train.main, args[1:]
    else:
        assert args[:2] == ("-m", "retinanet_plugin.predict"), args
        from retinanet_plugin.cli import predict

        main, argv = predict.main, args[2:]
    code, log = run_main(main, argv)
    if expect_ok:
        assert code == 0, log[-5000:]
    return code, log


def coco_args(shapes_dataset, train_json=None):
    (json_train, root_train), (json_val, root_val) = shapes_dataset["train"], shapes_dataset["val"]
    return [
        "--register-coco",
        "shapes_train",
        train_json or json_train,
        root_train,
        "--register-coco",
        "shapes_val",
        json_val,
        root_val,
    ]


def train_net_argv(output_dir, dataset_args, *args, test_sets="('shapes_val',)"):
    """train_net.py's arguments for the tiny model on the shapes datasets, then ``args``."""
    datasets = ["DATASETS.TRAIN", "('shapes_train',)", "DATASETS.TEST", test_sets]
    return [
        *["--config-file", TINY, *dataset_args, *datasets, *FAST],
        *args,
        *["OUTPUT_DIR", str(output_dir)],
    ]


def train_net(output_dir, dataset_args, *args, expect_ok=True):
    argv = train_net_argv(output_dir, dataset_args, *args)
    return run("train_net.py", *argv, expect_ok=expect_ok)


def predict(input, output, trained, *args, expect_ok=True):
    """``predict --input INPUT --output OUTPUT ARGS`` with the trained tiny model's weights and
    the config its run recorded."""
    weights = ["MODEL.WEIGHTS", str(trained[0] / "model_final.pth")]
    config = ["--config-file", str(trained[0] / "config.yaml")]
    argv = [*config, "--input", input, "--output", str(output), *args, *weights]
    return run("-m", "retinanet_plugin.predict", *argv, expect_ok=expect_ok)


def assert_equal_weights(a, b):
    """Two state_dicts with the same keys and bitwise equal tensors."""
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
