"""Box AP and latency of the deployment exports against the PyTorch model (CPU).

Exports one trained model in every supported form (:mod:`retinanet_plugin.export.exporter`),
evaluates each on a registered dataset with detectron2's ``inference_on_dataset`` and the plugin's
COCO evaluator, and times each on the dataset's images, one image per call including post-processing
(the variants taking turns on every image; median over images and passes). Defaults: the model and
validation split that ``make demo`` leaves in ``output/demo``, int8 calibrated on its first training
images::

    python -m benchmarks.export_accuracy
    python -m benchmarks.export_accuracy --config-file my/config.yaml --weights model.pth \\
        --register-coco my_val val.json images/ --dataset my_val --calibration-images train/

Writes ``benchmarks/results/export-<machine>.json``, one entry per ``--threads`` (torch's and
onnxruntime's intra-op threads; entries of other thread counts are kept), with the load average
before and after (other jobs on the machine make latencies contended).
"""

import argparse
import json
import logging
import math
import os
import tempfile

import torch

import retinanet_plugin  # noqa: F401  (registers the plugin's components)
from benchmarks.measure import device_label, interleaved_times, median
from detectron2.data import build_detection_test_loader
from detectron2.evaluation import inference_on_dataset
from detectron2.modeling import build_model
from retinanet_plugin.checkpoint.checkpointer import RetinaNetCheckpointer
from retinanet_plugin.config.loading import load_config
from retinanet_plugin.data import add_dataset_arguments, register_datasets_from_args
from retinanet_plugin.data.images import expand_inputs
from retinanet_plugin.evaluation.coco_evaluation import build_coco_evaluator
from retinanet_plugin.export.exporter import export_model, load_exported, load_test_input

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "output", "demo")
# name: (how it runs, MODEL.INFERENCE_DTYPE, export format or None for the PyTorch model, quantize)
VARIANTS = {
    "pytorch_float32": ("PyTorch model", "float32", None, None),
    "pytorch_bfloat16": ("PyTorch model, MODEL.INFERENCE_DTYPE bfloat16", "bfloat16", None, None),
    "torchscript_float32": ("TorchScript", "float32", "torchscript", None),
    "torchscript_bfloat16": ("TorchScript, bfloat16 autocast", "bfloat16", "torchscript", None),
    "onnx_float32": ("ONNX, onnxruntime CPU", "float32", "onnx", None),
    "onnx_int8": ("ONNX int8 (static QDQ), onnxruntime CPU", "float32", "onnx", "int8"),
}
SUFFIXES = {"torchscript": ".ts", "onnx": ".onnx"}


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", default=os.path.join(DEMO, "config.yaml"))
    parser.add_argument("--weights", default=os.path.join(DEMO, "model_final.pth"))
    parser.add_argument("--dataset", default="retinanet_demo_val")
    parser.add_argument(
        "--calibration-images",
        action="append",
        default=[],
        help="int8 calibration images: files, folders, globs (default: the demo's training set)",
    )
    parser.add_argument("--num-calibration-images", type=int, default=32)
    parser.add_argument("--passes", type=int, default=1, help="timed passes over the dataset")
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch and onnxruntime"
    )
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    parser.add_argument("--output", default=os.path.join(REPO, "benchmarks", "results"))
    add_dataset_arguments(parser)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return parser


def build_runners(args, tmp: str) -> dict:
    """name -> (callable taking detectron2 model inputs, config) for every variant asked for."""
    runners = {}
    for name in args.variants.split(","):
        _, dtype, export_format, quantize = VARIANTS[name]
        opts = [*args.opts, "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", args.weights]
        cfg = load_config(args.config_file, [*opts, "MODEL.INFERENCE_DTYPE", dtype])
        model = build_model(cfg).eval()
        RetinaNetCheckpointer(model, allow_new_classes=False).load(cfg.MODEL.WEIGHTS)
        if export_format is None:
            runners[name] = model, cfg
            continue
        files = expand_inputs(args.calibration_images)[: args.num_calibration_images]
        calibration = [load_test_input(f, cfg)["image"] for f in files] if quantize else ()
        # The first validation image is the tracing sample, as a user would pick one.
        sample = next(iter(build_detection_test_loader(cfg, args.dataset)))[0]["image"].float()
        path = os.path.join(tmp, name + SUFFIXES[export_format])
        export_model(
            cfg,
            model,
            export_format,
            path,
            sample,
            quantize=quantize,
            calibration_images=calibration,
        )
        runners[name] = load_exported(path, num_threads=args.threads), cfg
    return runners


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.WARNING)
    args = argument_parser().parse_args(argv)
    if not args.register_coco and not args.register_voc:
        data = os.path.join(DEMO, "data")
        args.register_coco = [[args.dataset, os.path.join(data, "val.json"), data + "/val"]]
        args.calibration_images = args.calibration_images or [os.path.join(data, "train")]
    register_datasets_from_args(args)
    torch.set_num_threads(args.threads)
    run = {
        "dataset": args.dataset,
        "config_file": os.path.relpath(args.config_file, REPO),
        "weights": os.path.relpath(args.weights, REPO),
        "threads": args.threads,
        "load_average_before": os.getloadavg(),
        "variants": {},
    }
    with tempfile.TemporaryDirectory(prefix="export_accuracy_") as tmp:
        runners = build_runners(args, tmp)
        for name, (runner, cfg) in runners.items():
            loader = build_detection_test_loader(cfg, args.dataset)
            evaluator = build_coco_evaluator(cfg, args.dataset, output_dir=None)
            with torch.no_grad():
                bbox = inference_on_dataset(runner, loader, evaluator)["bbox"]
            # NaN (e.g. APl without large objects) becomes null, so the file is strict JSON.
            bbox = {k: None if math.isnan(v) else v for k, v in bbox.items()}
            run["variants"][name] = {"runs_as": VARIANTS[name][0], "bbox": bbox}
            if not isinstance(runner, torch.nn.Module):
                run["variants"][name]["file_mib"] = os.path.getsize(runner.path) / 2**20
        inputs = list(build_detection_test_loader(cfg, args.dataset))
        run["num_images"], run["passes"] = len(inputs), args.passes

        # Each call runs the next image; the variants take turns, so they see the same images
        # under the same machine load.
        def next_image(runner):
            images = iter(inputs * args.passes)
            return lambda: runner(next(images))

        with torch.no_grad():
            times = interleaved_times(
                {name: next_image(r) for name, (r, _) in runners.items()},
                torch.device("cpu"),
                warmup=0,
                reps=len(inputs) * args.passes,
            )
    # Every variant is warm: evaluation ran it on all images first.
    for name, seconds in times.items():
        run["variants"][name]["median_ms_per_image"] = 1000 * median(seconds)
    run["load_average_after"] = os.getloadavg()
    device = device_label(torch.device("cpu"))
    os.makedirs(args.output, exist_ok=True)
    path = os.path.join(args.output, f"export-{device}.json")
    # One entry per thread count: runs with other counts already in the file are kept.
    runs = {}
    if os.path.isfile(path):
        with open(path) as f:
            runs = json.load(f)["runs"]
    runs[f"{args.threads} threads"] = run
    report = {"device": device, "runs": runs}
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    for name, r in run["variants"].items():
        print(
            f"{name:22s} AP {r['bbox']['AP']:6.2f} AP50 {r['bbox']['AP50']:6.2f} "
            f"AP75 {r['bbox']['AP75']:6.2f}  {r['median_ms_per_image']:7.1f} ms/image"
        )
    print(
        f"{args.threads} threads; load average before {run['load_average_before']}, after "
        f"{run['load_average_after']}\nwrote {path}"
    )
    return report


if __name__ == "__main__":
    main()
