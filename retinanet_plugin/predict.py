"""Detections on your own images: annotated pictures plus one COCO-results JSON.

    python -m retinanet_plugin.predict --config-file configs/retinanet_R18_GN_tiny.yaml \\
        --input photos/ --input "more/*.jpg" --output predictions/ \\
        MODEL.WEIGHTS output/model_final.pth

Class names (and, unless set, MODEL.RETINANET.NUM_CLASSES) come from a dataset with the model's
classes: ``--dataset NAME``, else the first one registered with the same ``--register-coco`` /
``--register-voc`` options as train_net.py, else ``DATASETS.TEST[0]`` if registered. Files that
cannot be read are reported by name and skipped; the exit code is 1 if any were, 2 for bad
options or if no input matched. 16-bit images are scaled to 8 bits, not clipped. ``--tile SIZE``
predicts large images tile by tile (:mod:`retinanet_plugin.tiling`).
"""

import argparse
import json
import logging
import os
import sys
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

import retinanet_plugin  # noqa: F401  (compat patches, registered components)
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.catalog import Metadata
from detectron2.data.detection_utils import build_augmentation, convert_image_to_rgb
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import Visualizer
from retinanet_plugin import cli
from retinanet_plugin.checkpoint import TRUST_WEIGHTS_HELP, RetinaNetCheckpointer
from retinanet_plugin.config_io import config_sets_key, load_config
from retinanet_plugin.data import (
    add_dataset_arguments,
    register_datasets_from_args,
    resolve_num_classes,
)
from retinanet_plugin.data.images import expand_inputs, read_image, test_input
from retinanet_plugin.errors import UserError
from retinanet_plugin.run_checks import check_device
from retinanet_plugin.tiling import TiledPredictor

logger = logging.getLogger("retinanet_plugin.predict")  # also when run as __main__


class PredictError(UserError, ValueError):
    """A prediction command that cannot work as given."""


MIN_DRAWING_SIDE = 512


class BatchPredictor:
    """Runs a RetinaNet on batches of images given as BGR/RGB arrays, like detectron2's
    DefaultPredictor (same resizing), but several images per forward pass.

    Args:
        cfg: a frozen config; MODEL.WEIGHTS is loaded.
        trust_weights: see ``RetinaNetCheckpointer``.
    """

    def __init__(self, cfg, trust_weights=False):
        self.model = build_model(cfg).eval()
        checkpointer = RetinaNetCheckpointer(
            self.model, allow_new_classes=False, trust_weights=trust_weights
        )
        checkpointer.load(cfg.MODEL.WEIGHTS)
        self.augmentations = T.AugmentationList(build_augmentation(cfg, is_train=False))
        self.input_format = cfg.INPUT.FORMAT

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray]) -> List:
        """
        Args:
            images: (H, W, 3) uint8 arrays in ``cfg.INPUT.FORMAT`` channel order.

        Returns:
            per image, detectron2 ``Instances`` in that image's pixel coordinates.
        """
        inputs = [test_input(image, self.augmentations) for image in images]
        return [output["instances"].to("cpu") for output in self.model(inputs)]


def _metadata(cfg, dataset_name: str):
    if dataset_name and dataset_name in DatasetCatalog.list():
        metadata = MetadataCatalog.get(dataset_name)
        if hasattr(metadata, "thing_classes"):
            return metadata
    # Not registered in MetadataCatalog: another run in this process may have other classes.
    return Metadata(thing_classes=[f"class_{i}" for i in range(cfg.MODEL.RETINANET.NUM_CLASSES)])


def _output_name(path: str, used: Dict[str, int]) -> str:
    stem = os.path.splitext(os.path.basename(path))[0]
    used[stem] = used.get(stem, 0) + 1
    return f"{stem}.png" if used[stem] == 1 else f"{stem}_{used[stem]}.png"


def predict_files(
    predictor: BatchPredictor,
    files: Sequence[str],
    output_dir: str,
    metadata,
    score_threshold: float,
    batch_size: int,
) -> Tuple[List[Dict], List[Tuple[str, str]], List[float]]:
    """Writes an annotated PNG per readable file.

    Returns:
        The COCO results (score >= ``score_threshold``), the unreadable files as
        [(file, error)], and each image's highest score (any threshold).
    """
    os.makedirs(output_dir, exist_ok=True)
    id_map = getattr(metadata, "thing_dataset_id_to_contiguous_id", None)
    to_dataset_id = {v: k for k, v in id_map.items()} if id_map else None
    results, failures, used_names, best_scores = [], [], {}, []
    batch = []  # (image id, path, image)

    def flush():
        outputs = predictor([image for _, _, image in batch])
        for (image_id, path, image), instances in zip(batch, outputs):
            if len(instances):
                best_scores.append(float(instances.scores.max()))
            instances = instances[instances.scores >= score_threshold]
            rgb = convert_image_to_rgb(image, predictor.input_format)
            # Small images are drawn enlarged so that labels stay readable.
            scale = max(1.0, MIN_DRAWING_SIDE / max(rgb.shape[:2]))
            drawing = Visualizer(rgb, metadata, scale=scale).draw_instance_predictions(instances)
            drawing.save(os.path.join(output_dir, _output_name(path, used_names)))
            for record in instances_to_coco_json(instances, image_id):
                if to_dataset_id:
                    record["category_id"] = to_dataset_id[record["category_id"]]
                record["file_name"] = path
                results.append(record)
        batch.clear()

    for image_id, path in enumerate(tqdm(files, desc="predict", unit="image")):
        try:
            image = read_image(path, predictor.input_format)
        except Exception as e:  # PIL raises several types for unreadable / truncated files
            logger.warning("Skipping %s: cannot read it as an image (%s)", path, e)
            failures.append((path, str(e)))
            continue
        batch.append((image_id, path, image))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return results, failures, best_scores


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument(
        "--input",
        action="append",
        required=True,
        help="image file, folder or glob pattern (repeatable)",
    )
    parser.add_argument("--output", required=True, help="folder for images and results JSON")
    parser.add_argument("--score-threshold", type=float, default=0.5, help="default: 0.5")
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward pass")
    parser.add_argument(
        "--tile",
        type=int,
        default=0,
        metavar="SIZE",
        help="predict each image in SIZE x SIZE tiles, merged with NMS (default 0: whole images)",
    )
    parser.add_argument(
        "--tile-overlap",
        type=float,
        default=0.25,
        metavar="F",
        help="fraction of a tile shared with its neighbours, in [0, 1); objects up to F * SIZE "
        "pixels across are found whole (default: 0.25)",
    )
    parser.add_argument("--dataset", default=None, help="registered dataset for class names")
    parser.add_argument("--trust-weights", action="store_true", help=TRUST_WEIGHTS_HELP)
    add_dataset_arguments(parser)
    parser.add_argument(cli.DEBUG_FLAG, action="store_true", help=cli.DEBUG_HELP)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return parser


def _check_options(args) -> None:
    """The options' values, before the model is built."""
    if not 0.0 <= args.score_threshold <= 1.0:
        raise PredictError(f"--score-threshold {args.score_threshold}: must be in [0, 1]")
    if args.batch_size < 1:
        raise PredictError(f"--batch-size {args.batch_size}: must be >= 1")
    if args.tile < 0:
        raise PredictError(f"--tile {args.tile}: must be a tile size in pixels, or 0 for none")
    if not 0.0 <= args.tile_overlap < 1.0:
        raise PredictError(f"--tile-overlap {args.tile_overlap}: must be in [0, 1)")
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise PredictError(f"--output {args.output} is a file; name a folder for the pictures")
    if args.dataset is not None and args.dataset not in DatasetCatalog.list():
        raise PredictError(
            f"--dataset {args.dataset}: not registered; register it with --register-coco or "
            "--register-voc, or leave --dataset out"
        )


def main(argv=None) -> int:
    args = cli.parse(argument_parser(), sys.argv[1:] if argv is None else argv)
    setup_logger(name="retinanet_plugin")
    setup_logger(name="fvcore")
    register_datasets_from_args(args)
    _check_options(args)
    cfg = load_config(args.config_file, args.opts)
    if not cfg.MODEL.WEIGHTS:
        raise PredictError(
            "no weights: set MODEL.WEIGHTS to a trained model (e.g. MODEL.WEIGHTS "
            "output/model_final.pth); a randomly initialized model detects nothing meaningful"
        )
    check_device(cfg)
    registered = [entry[0] for entry in args.register_coco + args.register_voc]
    dataset = args.dataset or next(iter(registered + list(cfg.DATASETS.TEST)), None)
    if dataset in DatasetCatalog.list():
        set_by_user = config_sets_key(args.config_file, args.opts, "MODEL.RETINANET.NUM_CLASSES")
        resolve_num_classes(cfg, dataset, set_by_user)
    cfg.freeze()

    files = expand_inputs(args.input)
    if not files:
        raise PredictError(f"--input {' '.join(args.input)}: no image file matched")
    predictor = BatchPredictor(cfg, trust_weights=args.trust_weights)
    if args.tile:
        nms_thresh = cfg.MODEL.RETINANET.NMS_THRESH_TEST
        predictor = TiledPredictor(
            predictor, args.tile, args.tile_overlap, nms_thresh, batch_size=args.batch_size
        )
        logger.info("Predicting in %d px tiles overlapping by %g", args.tile, args.tile_overlap)
    results, failures, scores = predict_files(
        predictor,
        files,
        args.output,
        _metadata(cfg, dataset),
        args.score_threshold,
        args.batch_size,
    )
    results_file = os.path.join(args.output, "coco_results.json")
    with open(results_file, "w") as f:
        json.dump(results, f)
    logger.info(
        "Predicted %d images: %d detections with score >= %g, %d images skipped; pictures and "
        "%s in %s",
        len(files) - len(failures),
        len(results),
        args.score_threshold,
        len(failures),
        os.path.basename(results_file),
        args.output,
    )
    if not results and scores:
        logger.warning(
            "No detection reached --score-threshold %g (the highest score was %.3f): lower it "
            "to see the model's best guesses",
            args.score_threshold,
            max(scores),
        )
    if failures:
        logger.error(
            "%d file(s) could not be read: %s", len(failures), ", ".join(p for p, _ in failures)
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
