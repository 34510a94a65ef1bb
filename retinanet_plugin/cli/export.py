"""Exports a trained RetinaNet to TorchScript or ONNX for deployment (CPU).

    python tools/export.py --weights output/demo/model_final.pth --format onnx \\
        --output model.onnx
    python tools/export.py ... --format onnx --graph raw-head --output model_head.onnx
    python tools/export.py --weights output/demo/model_final.pth --format onnx --quantize int8 \\
        --calibration-images output/demo/data/train --output model_int8.onnx
    python tools/export.py ... --format torchscript --dtype bfloat16 --output model_bf16.ts

``--graph deployable`` (the default) writes the whole model, decoded uint8 image in, boxes,
scores and class ids out, which runs in a bare onnxruntime session (or ``torch.jit.load``) with
no plugin code (docs/deployment.md); ``--graph raw-head`` writes backbone + FPN + head, with
anchors, decoding and NMS in Python. For both,
``retinanet_plugin.export.exporter.load_exported(path)`` gives a drop-in for the PyTorch model.
The config is the one the plugin's training stored in the weights file (``--config-file`` for
model-zoo ``.pkl`` files and other checkpoints; one that builds another network than the stored
config is refused unless ``--ignore-checkpoint-config``); the exported file holds it and the
stored class names. Trailing ``KEY VALUE`` pairs override the config (e.g.
``MODEL.RETINANET.SCORE_THRESH_TEST 0.3``, stored in the file). ``--output`` has the format's
extension (.onnx; .ts or .pt); an existing file is replaced only if it is an earlier export and
``--overwrite`` is given.
"""

import argparse
import logging
import os
import sys

import torch

from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger
from retinanet_plugin.checkpoint.checkpointer import TRUST_WEIGHTS_HELP, RetinaNetCheckpointer
from retinanet_plugin.checkpoint.metadata import (
    IGNORE_CONFIG_FLAG,
    IGNORE_CONFIG_HELP,
    config_for_weights,
    read_metadata,
)
from retinanet_plugin.cli import defaults as cli
from retinanet_plugin.cli.predict_files import find_images
from retinanet_plugin.export.exporter import (
    FORMATS,
    GRAPHS,
    QUANTIZATIONS,
    ExportError,
    check_export_options,
    export_model,
    is_exported_model,
    load_test_input,
    synthetic_test_image,
)
from retinanet_plugin.modeling.meta_arch import INFERENCE_DTYPES

logger = logging.getLogger("retinanet_plugin.export.exporter")


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument(
        "--config-file",
        default="",
        metavar="FILE",
        help="the model's config (default: the one stored in the weights file)",
    )
    parser.add_argument("--weights", help="checkpoint to export (default: MODEL.WEIGHTS)")
    parser.add_argument("--trust-weights", action="store_true", help=TRUST_WEIGHTS_HELP)
    parser.add_argument(IGNORE_CONFIG_FLAG, action="store_true", help=IGNORE_CONFIG_HELP)
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument(
        "--graph",
        choices=GRAPHS,
        default="deployable",
        help="deployable (default): image to detections, runs without the plugin; raw-head: "
        "the network's outputs, post-processed by the plugin's Python code",
    )
    parser.add_argument(
        "--output", required=True, help="file to write (.ts or .pt for torchscript, .onnx)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier export at --output"
    )
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
    parser.add_argument(cli.DEBUG_FLAG, action="store_true", help=cli.DEBUG_HELP)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return parser


def _check_options(args) -> None:
    """The options' values, before the model is built."""
    folder = os.path.dirname(os.path.abspath(args.output))
    if os.path.isdir(args.output):
        raise ExportError(f"--output {args.output} is a folder; name the file to write")
    if not os.path.isdir(folder):
        raise ExportError(
            f"--output {args.output}: folder {folder} does not exist; create it first"
        )
    if args.num_calibration_images < 1:
        raise ExportError(f"--num-calibration-images {args.num_calibration_images}: must be >= 1")
    for image in [args.sample_image] if args.sample_image else []:
        if not os.path.isfile(image):
            raise ExportError(f"--sample-image {image} does not exist")


def _check_output_is_new(args, cfg) -> None:
    """Refuses an ``--output`` that is one of the command's own input files, or an existing
    file that is not an earlier export (or is one, without ``--overwrite``)."""
    if not os.path.exists(args.output):
        return
    inputs = {
        "--weights / MODEL.WEIGHTS": cfg.MODEL.WEIGHTS,
        "--config-file": args.config_file,
        "--sample-image": args.sample_image,
    }
    for option, path in inputs.items():
        if path and os.path.exists(path) and os.path.samefile(path, args.output):
            raise ExportError(
                f"--output {args.output} is the {option} file; name a new file for the export"
            )
    if not is_exported_model(args.output):
        raise ExportError(
            f"--output {args.output} exists and is not a model written by tools/export.py; "
            "name a new file (or move that one away)"
        )
    if not args.overwrite:
        raise ExportError(
            f"--output {args.output} holds an earlier export; pass --overwrite to replace it, or "
            "name a new file"
        )


def _read_input(path: str, cfg) -> torch.Tensor:
    try:
        return load_test_input(path, cfg)["image"]
    except (OSError, SyntaxError) as e:  # what PIL raises for files it cannot decode
        raise ExportError(f"{path} cannot be read as an image ({e})") from e


def main(argv=None) -> int:
    args = cli.parse(argument_parser(), sys.argv[1:] if argv is None else argv)
    setup_logger(name="retinanet_plugin")
    setup_logger(name="fvcore")
    _check_options(args)
    opts = list(args.opts) + ["MODEL.DEVICE", "cpu"]
    if args.weights:
        opts += ["MODEL.WEIGHTS", args.weights]
    if args.dtype:
        opts += ["MODEL.INFERENCE_DTYPE", args.dtype]
    cfg = config_for_weights(
        args.config_file,
        opts,
        ignore_checkpoint_config=args.ignore_checkpoint_config,
        trust_weights=args.trust_weights,
    )
    check_export_options(
        args.format, cfg.MODEL.INFERENCE_DTYPE, args.quantize, args.output, args.graph
    )
    if not cfg.MODEL.WEIGHTS:
        raise ExportError("no weights to export: pass --weights or set MODEL.WEIGHTS")
    _check_output_is_new(args, cfg)
    calibration_files = []
    if args.quantize:
        if not args.calibration_images:
            raise ExportError("--quantize int8 needs calibration images: pass --calibration-images")
        found, _ = find_images(args.calibration_images, "--calibration-images")
        calibration_files = [path for path, _ in found[: args.num_calibration_images]]
    model = build_model(cfg).eval()
    RetinaNetCheckpointer(model, allow_new_classes=False, trust_weights=args.trust_weights).load(
        cfg.MODEL.WEIGHTS
    )
    sample = _read_input(args.sample_image, cfg) if args.sample_image else synthetic_test_image(cfg)
    try:
        export_model(
            cfg,
            model,
            args.format,
            args.output,
            sample,
            quantize=args.quantize,
            graph=args.graph,
            class_names=(read_metadata(cfg.MODEL.WEIGHTS, args.trust_weights) or {}).get(
                "class_names", []
            ),
            calibration_images=[_read_input(f, cfg) for f in calibration_files],
        )
    except ImportError as e:  # onnx / onnxruntime not installed; the message says how
        raise ExportError(str(e)) from e
    logger.info(
        "Wrote %s. Detections: retinanet_plugin.export.exporter.load_exported(%r)(inputs)%s",
        args.output,
        args.output,
        (
            ", or without the plugin: image in, boxes, scores and classes out (docs/deployment.md)"
            if args.graph == "deployable"
            else ""
        ),
    )
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
