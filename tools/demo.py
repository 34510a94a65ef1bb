#!/usr/bin/env python
"""The demo: generate the shapes dataset, train the tiny RetinaNet from scratch, evaluate.

Runs the same path a user's own dataset takes: the generated COCO files are registered with
``train_net.py --register-coco`` and trained with ``configs/retinanet_R18_GN_tiny.yaml``.
Everything goes under ``output/demo/`` (dataset, checkpoints, metrics.json, tensorboard events,
COCO evaluation). Extra ``KEY VALUE`` arguments override the config, e.g.
``python tools/demo.py SOLVER.MAX_ITER 100``.
"""
import argparse
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default=os.path.join(REPO, "output", "demo"))
    parser.add_argument("--num-train", type=int, default=600)
    parser.add_argument("--num-val", type=int, default=100)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = parser.parse_args()

    from retinanet_plugin.data import make_shapes_dataset

    splits = make_shapes_dataset(
        os.path.join(args.output, "data"), num_train=args.num_train, num_val=args.num_val, seed=0
    )
    command = [
        sys.executable, os.path.join(REPO, "train_net.py"),
        "--config-file", os.path.join(REPO, "configs", "retinanet_R18_GN_tiny.yaml"),
        "--register-coco", "retinanet_demo_train", *splits["train"],
        "--register-coco", "retinanet_demo_val", *splits["val"],
        "OUTPUT_DIR", args.output,
        *args.opts,
    ]
    print("+", " ".join(command), flush=True)
    sys.exit(subprocess.call(command))


if __name__ == "__main__":
    main()
