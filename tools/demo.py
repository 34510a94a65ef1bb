#!/usr/bin/env python
"""The demo: RetinaNet learns a class-imbalanced detection task from scratch on the CPU.

1. generates the shapes dataset (seeded) and registers it through the COCO path a user's own
   dataset takes (``train_net.py --register-coco``);
2. trains ``configs/retinanet_resnet10t_demo.yaml`` (a small RetinaNet with its recipe for about
   10 minutes on 2 cores) and evaluates it on the validation split with
   detectron2's COCOEvaluator;
3. plots losses / learning rate / AP, and draws the predictions on validation images.

Everything lands in ``output/demo/``: ``metrics.json``, tensorboard events, checkpoints,
``demo_results.json`` (COCO metrics and wall time), ``training_curves.png`` and
``predictions/*.png``. Extra ``KEY VALUE`` arguments override the config, e.g.
``python tools/demo.py SOLVER.MAX_ITER 100``.
"""
import time

# The wall time counts from here: the imports below (torch, detectron2) take seconds.
STARTED = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from retinanet_plugin.cli import defaults as cli  # noqa: E402
from retinanet_plugin.engine.run_checks import earlier_run_outputs  # noqa: E402
from retinanet_plugin.errors import UserError  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "retinanet_resnet10t_demo.yaml")


# What the demo writes besides train_net.py's outputs (run_checks.RUN_OUTPUTS) and predictions/.
DEMO_OUTPUTS = ("training_curves.png", "demo_results.json")
# The shapes are 12 px to half the image across (retinanet_plugin.data.synthetic_shapes), so the
# images are at least 24 px; the model takes any size (the loader resizes to INPUT.MIN_SIZE_*).
MIN_IMAGE_SIZE = 24


def check_demo_data(num_train: int, num_val: int, image_size: int) -> None:
    """Refuses sizes of the demo's generated dataset that it cannot be made or trained with.

    Raises:
        UserError: naming the option.
    """
    if num_train < 1:
        raise UserError(f"--num-train {num_train}: training needs at least 1 image")
    if num_val < 1:
        raise UserError(f"--num-val {num_val}: evaluation needs at least 1 image")
    if image_size < MIN_IMAGE_SIZE:
        raise UserError(
            f"--image-size {image_size}: must be at least {MIN_IMAGE_SIZE} px (the generated "
            "shapes are 12 px to half the image across)"
        )


def final_metrics(metrics_file: str) -> dict:
    """The last evaluation record of a detectron2 metrics.json ("bbox/..." keys)."""
    from retinanet_plugin.cli.plot_metrics import read_metrics

    evaluations = [r for r in read_metrics(metrics_file) if "bbox/AP" in r]
    if not evaluations:
        raise RuntimeError(f"{metrics_file} has no evaluation results")
    # NaN (e.g. APl without large objects) becomes null, so the file is strict JSON.
    return {
        k[len("bbox/") :]: None if isinstance(v, float) and math.isnan(v) else v
        for k, v in evaluations[-1].items()
        if k.startswith("bbox/")
    }


def iteration_times(metrics_file: str) -> dict:
    """Median seconds per training iteration and the part of it spent waiting for data, from
    detectron2's ``time`` and ``data_time`` metrics (the first logged window, with start-up,
    left out when there are others)."""
    from retinanet_plugin.cli.plot_metrics import read_metrics

    rows = [r for r in read_metrics(metrics_file) if "time" in r and "data_time" in r]
    rows = rows[1:] or rows
    if not rows:
        return {}
    median = lambda key: round(float(sorted(r[key] for r in rows)[len(rows) // 2]), 3)  # noqa
    return {
        "seconds_per_iteration": median("time"),
        "data_seconds_per_iteration": median("data_time"),
    }


def main(argv=None, started=None) -> int:
    """Runs the demo; ``started``: the ``time.perf_counter()`` its wall time counts from (default:
    now; as a script, the start of the process, imports included)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default=os.path.join(REPO, "output", "demo"))
    parser.add_argument("--num-train", type=int, default=600)
    parser.add_argument("--num-val", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=192, help="side of the square images")
    parser.add_argument("--num-pictures", type=int, default=8, help="validation images to draw")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier demo run in --output"
    )
    parser.add_argument(cli.DEBUG_FLAG, action="store_true", help=cli.DEBUG_HELP)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = cli.parse(parser, sys.argv[1:] if argv is None else argv)
    start = time.perf_counter() if started is None else started
    phases = {"start_up_s": time.perf_counter() - start}
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise UserError(f"--output {args.output} is a file; name a folder for the demo's outputs")
    check_demo_data(args.num_train, args.num_val, args.image_size)
    if args.num_pictures < 0:
        raise UserError(f"--num-pictures {args.num_pictures}: must be >= 0")

    from retinanet_plugin.cli import predict
    from retinanet_plugin.cli.plot_metrics import plot_metrics
    from retinanet_plugin.cli.predict_files import earlier_run
    from retinanet_plugin.data import DEMO_VAL, make_demo_dataset_args

    pictures = os.path.join(args.output, "predictions")
    found = earlier_run_outputs(args.output) + [
        name for name in DEMO_OUTPUTS if os.path.exists(os.path.join(args.output, name))
    ]
    # Also refuses, before training, a predictions folder that predict could not replace.
    found += ["predictions"] if earlier_run(pictures) else []
    if found and not args.overwrite:
        raise UserError(
            f"--output {args.output} holds an earlier run ({', '.join(found)}); pass --overwrite "
            "to replace it (make demo does), or choose another --output"
        )

    datasets = make_demo_dataset_args(
        os.path.join(args.output, "data"), args.num_train, args.num_val, args.image_size
    )
    phases["data_generation_s"] = time.perf_counter() - start - sum(phases.values())
    command = [
        sys.executable,
        os.path.join(REPO, "train_net.py"),
        "--config-file",
        CONFIG,
        *datasets,
        *(["--overwrite"] if args.overwrite else []),
        "OUTPUT_DIR",
        args.output,
        *args.opts,
    ]
    print("+", " ".join(command), flush=True)
    if subprocess.run(command).returncode != 0:
        return 1  # train_net.py has said why
    phases["training_and_evaluation_s"] = time.perf_counter() - start - sum(phases.values())

    curves = plot_metrics(
        os.path.join(args.output, "metrics.json"),
        os.path.join(args.output, "training_curves.png"),
    )
    val_root = os.path.join(args.output, "data", "val")  # make_shapes_dataset's layout
    inputs = [os.path.join(val_root, name) for name in sorted(os.listdir(val_root))]
    # The weights hold the run's config (overrides included): no --config-file needed.
    predict_args = [*datasets, "--dataset", DEMO_VAL]
    for path in inputs[: args.num_pictures]:
        predict_args += ["--input", path]
    weights = os.path.join(args.output, "model_final.pth")
    predict_args += ["--output", pictures, *(["--overwrite"] if args.overwrite else [])]
    predict_args += ["MODEL.WEIGHTS", weights]
    if args.num_pictures and predict.main(predict_args) != 0:
        raise UserError("drawing the predictions failed (see the messages above)")

    metrics_file = os.path.join(args.output, "metrics.json")
    results = {"bbox": final_metrics(metrics_file), **iteration_times(metrics_file)}
    wall_time = time.perf_counter() - start
    phases["drawing_and_report_s"] = wall_time - sum(phases.values())
    results.update({name: round(seconds, 1) for name, seconds in phases.items()})
    results["wall_time_s"] = round(wall_time, 1)
    with open(os.path.join(args.output, "demo_results.json"), "w") as f:
        json.dump(results, f, indent=2)
    # None: detectron2 gives NaN when the model detects nothing at all.
    ap = {k: "n/a" if v is None else f"{v:.1f}" for k, v in results["bbox"].items()}
    print(
        f"\nDemo finished in {results['wall_time_s']:.0f} s. Validation box AP: {ap['AP']} "
        f"(AP50 {ap['AP50']}, AP75 {ap['AP75']})"
    )
    if "seconds_per_iteration" in results:
        print(
            f"Training: {results['seconds_per_iteration']:.2f} s per iteration, of which "
            f"{results['data_seconds_per_iteration']:.3f} s waiting for data"
        )
    print(
        f"Metrics: {os.path.join(args.output, 'demo_results.json')}\nCurves: {curves}\n"
        f"Pictures: {pictures}/"
    )
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(lambda argv: main(argv, started=STARTED)))
