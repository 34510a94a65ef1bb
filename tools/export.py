#!/usr/bin/env python
"""Exports a trained RetinaNet to TorchScript or ONNX for deployment (CPU).

    python tools/export.py --config-file output/demo/config.yaml \\
        --weights output/demo/model_final.pth --format onnx --output model.onnx
    python tools/export.py --config-file output/demo/config.yaml \\
        --weights output/demo/model_final.pth --format onnx --quantize int8 \\
        --calibration-images output/demo/data/train --output model_int8.onnx
    python tools/export.py ... --format torchscript --dtype bfloat16 --output model_bf16.ts

The file holds backbone + FPN + head; anchors, decoding and NMS run in Python:
``retinanet_plugin.export.load_exported(path)`` gives a drop-in for the PyTorch model. Trailing
``KEY VALUE`` pairs override the config (e.g. ``MODEL.RETINANET.SCORE_THRESH_TEST 0.3``, stored
in the file).
"""

import argparse
import logging
import sys

import retinanet_plugin  # noqa: F401  (compat patches, registered components)
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger
from retinanet_plugin.checkpoint import TRUST_WEIGHTS_HELP, RetinaNetCheckpointer
from retinanet_plugin.config_validation import load_config
from retinanet_plugin.export import (
    FORMATS,
    QUANTIZATIONS,
    ExportError,
    export_model,
    load_test_input,
    synthetic_test_image,
)
from retinanet_plugin.meta_arch import INFERENCE_DTYPES
from retinanet_plugin.predict import expand_inputs

logger = logging.getLogger("retinanet_plugin.export")


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--weights", help="checkpoint to export (default: MODEL.WEIGHTS)")
    parser.add_argument("--trust-weights", action="store_true", help=TRUST_WEIGHTS_HELP)
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--output", required=True, help="file to write (.ts or .onnx)")
    parser.add_argument(
        "--dtype",
        choices=sorted(INFERENCE_DTYPES),
        help="compute dtype (sets MODEL.INFERENCE_DTYPE; default: the config's); bfloat16 is "
        "TorchScript only",
    )
    parser.add_argument(
        "--quantize", choices=QUANTIZATIONS, help="int8: static quantization (ONNX only)"
    )
    parser.add_argument(
        "--sample-image", help="image to trace with (default: a random image of the test size)"
    )
    parser.add_argument(
        "--calibration-images",
        action="append",
        default=[],
        metavar="PATH",
        help="image file, folder or glob pattern for int8 calibration (repeatable), preferably "
        "training images",
    )
    parser.add_argument(
        "--num-calibration-images", type=int, default=32, help="at most this many (default 32)"
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return parser


def main(argv=None) -> int:
    parser = argument_parser()
    args = parser.parse_args(argv)
    setup_logger(name="retinanet_plugin")
    setup_logger(name="fvcore")
    opts = list(args.opts) + ["MODEL.DEVICE", "cpu"]
    if args.weights:
        opts += ["MODEL.WEIGHTS", args.weights]
    if args.dtype:
        opts += ["MODEL.INFERENCE_DTYPE", args.dtype]
    try:
        cfg = load_config(args.config_file, opts)
        if not cfg.MODEL.WEIGHTS:
            raise ExportError("no weights to export: pass --weights or set MODEL.WEIGHTS")
        calibration_files = []
        if args.quantize:
            found = expand_inputs(args.calibration_images)
            calibration_files = found[: args.num_calibration_images]
            if not calibration_files:
                raise ExportError(
                    "--quantize int8 needs calibration images: --calibration-images "
                    f"{args.calibration_images or '(not given)'} matched no file"
                )
        model = build_model(cfg).eval()
        RetinaNetCheckpointer(
            model, allow_new_classes=False, trust_weights=args.trust_weights
        ).load(cfg.MODEL.WEIGHTS)
        sample = (
            load_test_input(args.sample_image, cfg)["image"]
            if args.sample_image
            else synthetic_test_image(cfg)
        )
        export_model(
            cfg,
            model,
            args.format,
            args.output,
            sample,
            quantize=args.quantize,
            calibration_images=[load_test_input(f, cfg)["image"] for f in calibration_files],
        )
    # Bad input (config, files, class count of the weights, options): one message, no traceback.
    except (ValueError, OSError, ExportError, ImportError) as e:
        parser.exit(2, f"error: {e}\n")
    logger.info(
        "Wrote %s. Detections: retinanet_plugin.export.load_exported(%r)(inputs)",
        args.output,
        args.output,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
