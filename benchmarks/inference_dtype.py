"""Accuracy and speed of bfloat16 inference (``MODEL.INFERENCE_DTYPE``) against float32.

Evaluates one trained model on a registered dataset with detectron2's test loader and the
plugin's COCO evaluator, once per dtype, and times the model on the dataset's images (the dtypes
taking turns, median over ``--reps`` passes). Defaults: the model and validation split that
``make demo`` leaves in ``output/demo``::

    python -m benchmarks.inference_dtype
    python -m benchmarks.inference_dtype --config-file configs/retinanet_R50_FPN_1x.yaml \\
        --register-coco my_val val.json images/ --dataset my_val MODEL.WEIGHTS model_final.pth
"""

import argparse
import json
import logging
import os

import torch

import retinanet_plugin  # noqa: F401  (registers the plugin's components)
from benchmarks.measure import device_label, interleaved_times, median
from detectron2.data import build_detection_test_loader
from detectron2.evaluation import inference_on_dataset
from detectron2.modeling import build_model
from retinanet_plugin.checkpoint.checkpointer import RetinaNetCheckpointer
from retinanet_plugin.config.loading import config_sets_key, load_config
from retinanet_plugin.data import (
    add_dataset_arguments,
    register_datasets_from_args,
    resolve_num_classes,
)
from retinanet_plugin.evaluation.coco_evaluation import build_coco_evaluator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "output", "demo")
DTYPES = ("float32", "bfloat16")


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--config-file", default=os.path.join(REPO, "configs", "retinanet_R18_GN_tiny.yaml")
    )
    parser.add_argument("--dataset", default="retinanet_demo_val")
    parser.add_argument("--reps", type=int, default=5, help="timed passes over the dataset")
    parser.add_argument("--output", default=os.path.join(REPO, "benchmarks", "results"))
    add_dataset_arguments(parser)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return parser


def build(args, dtype: str):
    weights = ["MODEL.WEIGHTS", os.path.join(DEMO, "model_final.pth")]
    cfg = load_config(args.config_file, [*weights, *args.opts, "MODEL.INFERENCE_DTYPE", dtype])
    cfg.DATASETS.TEST = (args.dataset,)
    user_set = config_sets_key(args.config_file, args.opts, "MODEL.RETINANET.NUM_CLASSES")
    resolve_num_classes(cfg, args.dataset, user_set)
    model = build_model(cfg).eval()
    RetinaNetCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    return cfg, model


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.WARNING)
    args = argument_parser().parse_args(argv)
    if not args.register_coco and not args.register_voc:
        args.register_coco = [
            [
                args.dataset,
                os.path.join(DEMO, "data", "val.json"),
                os.path.join(DEMO, "data", "val"),
            ]
        ]
    register_datasets_from_args(args)
    report = {"device": device_label(torch.device("cpu")), "dataset": args.dataset, "dtypes": {}}
    models = {}
    for dtype in DTYPES:
        cfg, model = build(args, dtype)
        loader = build_detection_test_loader(cfg, args.dataset)
        evaluator = build_coco_evaluator(cfg, args.dataset, output_dir=None)
        report["dtypes"][dtype] = {"bbox": inference_on_dataset(model, loader, evaluator)["bbox"]}
        models[dtype] = model
    inputs = list(build_detection_test_loader(cfg, args.dataset))

    def pass_over(model):
        def run():
            with torch.no_grad():
                for batch in inputs:
                    model(batch)

        return run

    times = interleaved_times(
        {dtype: pass_over(m) for dtype, m in models.items()}, torch.device("cpu"), 1, args.reps
    )
    for dtype in DTYPES:
        report["dtypes"][dtype]["seconds_per_image"] = median(times[dtype]) / len(inputs)
    f32, b16 = (report["dtypes"][d] for d in DTYPES)
    report["speedup"] = f32["seconds_per_image"] / b16["seconds_per_image"]
    report["ap_change"] = {k: b16["bbox"][k] - f32["bbox"][k] for k in ("AP", "AP50", "AP75")}
    os.makedirs(args.output, exist_ok=True)
    path = os.path.join(args.output, f"inference_dtype-{report['device']}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    for dtype in DTYPES:
        r = report["dtypes"][dtype]
        print(
            f"{dtype:9s} AP {r['bbox']['AP']:.2f} AP50 {r['bbox']['AP50']:.2f} "
            f"AP75 {r['bbox']['AP75']:.2f}  {1000 * r['seconds_per_image']:.1f} ms/image"
        )
    print(
        f"bfloat16 speed-up {report['speedup']:.2f}x, AP change {report['ap_change']['AP']:+.2f}"
        f"\nwrote {path}"
    )
    return report


if __name__ == "__main__":
    main()
