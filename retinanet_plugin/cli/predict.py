"""Detections on your own images and videos: annotated pictures and videos, COCO results.

Optionally also a JSON and a YOLO label file per image.

    python -m retinanet_plugin.predict --input photos/ --input "more/*.jpg" \\
        --output predictions/ MODEL.WEIGHTS output/model_final.pth

The config is the one stored in MODEL.WEIGHTS by the plugin's training (overrides such as
``MODEL.DEVICE cpu`` apply on top); model-zoo ``.pkl`` files and other checkpoints need
``--config-file``. A ``--config-file`` that builds another network than the stored config
(anchors, classes, backbone, input size) is refused unless ``--ignore-checkpoint-config``.

Class names (and, unless set, MODEL.RETINANET.NUM_CLASSES) come from a dataset with the model's
classes: ``--dataset NAME``, else the first one registered with the same ``--register-coco`` /
``--register-voc`` options as train_net.py, else ``DATASETS.TEST[0]`` if registered, else the
class names stored in the checkpoint. 16-bit images are scaled to 8 bits, not clipped.
``--tile SIZE`` predicts large images tile by tile (:mod:`retinanet_plugin.modeling.tiling`).

Inputs: a folder gives its images and videos (by extension) and those of its sub-folders; every
``--input`` must exist and give at least one. A video is predicted frame by frame (OpenCV).
Files that cannot be read are reported by name and skipped (exit code 1); if none can be read,
that is an error (exit code 2, as for bad options).

Results: ``OUTPUT/coco_results.json``, COCO results records with "category_name" and
"file_name" ("frame" for a video's). "category_id" is the dataset's id where the class names
come from a COCO dataset, else the model's class index. When every input is an image of the
``--dataset`` (else of the first dataset the options register), "image_id" is that dataset's,
so the file goes straight into pycocotools' ``COCO.loadRes``; when none is, "image_id" counts
the images and video frames of the run from 0; a mix is refused.

Outputs mirror the inputs: the drawing of ``photos/sub/a.jpg`` (``--input photos``) is
``OUTPUT/sub/a.jpg.png`` (a PNG keeps its name; a video ``v.avi`` gives ``OUTPUT/v.avi.mp4``),
with several inputs under the folder they share; ``--per-image-json`` adds ``sub/a.jpg.json``
and ``--yolo-txt`` ``sub/a.txt`` (and ``classes.txt``). ``OUTPUT/predict_run.json`` lists the
run's files. ``--output`` may not be, or lie inside, an input folder, and may not hold an
earlier run's results unless ``--overwrite`` (which deletes that run's files first) or a file of
the same name as an output that no earlier run wrote.
"""

import argparse
import logging
import os
import sys
from typing import Any, Dict, Optional, Sequence

from tqdm import tqdm

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.utils.logger import setup_logger
from retinanet_plugin.checkpoint.atomic_io import atomic_write
from retinanet_plugin.checkpoint.checkpointer import TRUST_WEIGHTS_HELP
from retinanet_plugin.checkpoint.metadata import (
    IGNORE_CONFIG_FLAG,
    IGNORE_CONFIG_HELP,
    config_for_weights,
    read_metadata,
    sets_key,
)
from retinanet_plugin.cli import defaults as cli
from retinanet_plugin.cli.predict_files import (
    RESULTS_FILE,
    RUN_FILE,
    YOLO_CLASSES_FILE,
    PredictError,
    check_output,
    find_images,
    is_video,
    output_names,
    remove_earlier_run,
)
from retinanet_plugin.cli.predict_outputs import DrawingOptions, PredictRun, RunSettings, write_json
from retinanet_plugin.data import (
    add_dataset_arguments,
    register_datasets_from_args,
    resolve_num_classes,
)
from retinanet_plugin.engine.predictor import BatchPredictor, class_names_for
from retinanet_plugin.engine.run_checks import check_device
from retinanet_plugin.modeling.tiling import TiledPredictor

logger = logging.getLogger("retinanet_plugin.cli.predict")  # also when run as __main__


def _metadata(cfg, dataset_name: str, stored_classes: Sequence[str]):
    """The class names to draw: the dataset's, else those stored in the checkpoint (if it has
    the model's number of classes), else ``class_0``, ``class_1``, ..."""
    if dataset_name and dataset_name in DatasetCatalog.list():
        metadata = MetadataCatalog.get(dataset_name)
        if hasattr(metadata, "thing_classes"):
            return metadata
    # Not registered in MetadataCatalog: another run in this process may have other classes.
    return Metadata(thing_classes=class_names_for(cfg, stored_classes))


def dataset_image_ids(dataset: str, files: Sequence[str]) -> Optional[Dict[str, Any]]:
    """The image id of each file in the registered dataset ``dataset`` (matched by path, links
    resolved), if every file is one of its images; None if none is.

    Raises:
        PredictError: some files are images of the dataset and others are not (the results'
            image ids would mix the dataset's with positions).
    """
    try:
        records = DatasetCatalog.get(dataset)
    except (OSError, ValueError) as e:  # a built-in dataset (for its class names) not here
        logger.warning(
            "Cannot list the images of the dataset %s (%s: %s): image_id in the results counts "
            "the images and video frames from 0",
            dataset,
            type(e).__name__,
            e,
        )
        return None
    by_path = {os.path.realpath(r["file_name"]): r["image_id"] for r in records}
    ids = {path: by_path.get(os.path.realpath(path)) for path in files}
    outside = [path for path, image_id in ids.items() if image_id is None]
    if len(outside) == len(files):
        logger.info(
            "No input is an image of the dataset %s: image_id in the results counts the images "
            "and video frames from 0",
            dataset,
        )
        return None
    if outside:
        raise PredictError(
            f"--input: {len(outside)} of the {len(files)} inputs are not images of the dataset "
            f"{dataset} (e.g. {outside[0]}): their results could not have its image ids; predict "
            "its images and the others in separate runs"
        )
    logger.info(
        "All %d inputs are images of the dataset %s: the results have its image ids (for "
        "pycocotools' COCO.loadRes)",
        len(files),
        dataset,
    )
    return ids


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
        help="the model's config (default: the one stored in MODEL.WEIGHTS)",
    )
    parser.add_argument(
        "--input",
        action="append",
        required=True,
        help="image or video file, folder or glob pattern (repeatable)",
    )
    parser.add_argument(
        "--output", required=True, help="folder for the pictures, videos and results JSON"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier predict run in --output (its files are deleted first)",
    )
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
    parser.add_argument(
        "--per-image-json",
        action="store_true",
        help="also write a JSON of each image's detections (a video's: of each frame), "
        "mirrored as the pictures: sub/a.jpg.json",
    )
    parser.add_argument(
        "--yolo-txt",
        action="store_true",
        help="also write a YOLO label file per image (class cx cy w h, normalized to the image "
        "size), mirrored as the pictures: sub/a.txt, and classes.txt",
    )
    parser.add_argument("--hide-labels", action="store_true", help="no class names in pictures")
    parser.add_argument("--hide-scores", action="store_true", help="no scores in pictures")
    parser.add_argument(
        "--max-picture-size",
        type=int,
        default=0,
        metavar="PIXELS",
        help="scale pictures and videos down to this longest side (default 0: the input's size)",
    )
    parser.add_argument(
        "--dataset",
        default=None,
        help="registered dataset for class names, and for image and category ids if the inputs "
        "are its images",
    )
    parser.add_argument("--trust-weights", action="store_true", help=TRUST_WEIGHTS_HELP)
    parser.add_argument(IGNORE_CONFIG_FLAG, action="store_true", help=IGNORE_CONFIG_HELP)
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
    if args.max_picture_size < 0:
        raise PredictError(
            f"--max-picture-size {args.max_picture_size}: must be a size in pixels, or 0 for "
            "the input's size"
        )
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
    inputs = find_images(args.input, videos=True)
    files = [path for path, _ in inputs[0]]
    videos = [path for path in files if is_video(path)]
    if videos and args.yolo_txt:
        raise PredictError(
            f"--yolo-txt: {videos[0]} is a video, and YOLO label files are per image; leave "
            "--yolo-txt out (--per-image-json gives each frame's detections), or predict the "
            "video's frames as images"
        )
    names = output_names(inputs[0], args.per_image_json, args.yolo_txt)
    outputs = [name for outputs in names for name in outputs.files()]
    outputs += [YOLO_CLASSES_FILE] if args.yolo_txt else []
    earlier = check_output(args.output, inputs, outputs, args.overwrite)
    registered = [entry[0] for entry in args.register_coco + args.register_voc]
    # Image ids only from a dataset the command names (DATASETS.TEST's files may not be here).
    id_dataset = args.dataset or next(iter(registered), None)
    image_ids = dataset_image_ids(id_dataset, files) if id_dataset else None
    cfg = config_for_weights(
        args.config_file,
        args.opts,
        ignore_checkpoint_config=args.ignore_checkpoint_config,
        trust_weights=args.trust_weights,
    )
    if not cfg.MODEL.WEIGHTS:
        raise PredictError(
            "no weights: set MODEL.WEIGHTS to a trained model (e.g. MODEL.WEIGHTS "
            "output/model_final.pth); a randomly initialized model detects nothing meaningful"
        )
    check_device(cfg)
    dataset = id_dataset or next(iter(cfg.DATASETS.TEST), None)
    if dataset in DatasetCatalog.list():
        set_by_user = sets_key(args.config_file, args.opts, "MODEL.RETINANET.NUM_CLASSES")
        resolve_num_classes(cfg, dataset, set_by_user)
    cfg.freeze()

    predictor = BatchPredictor(cfg, trust_weights=args.trust_weights)
    stored = read_metadata(cfg.MODEL.WEIGHTS, args.trust_weights) or {}
    if args.tile:
        nms_thresh = cfg.MODEL.RETINANET.NMS_THRESH_TEST
        predictor = TiledPredictor(
            predictor, args.tile, args.tile_overlap, nms_thresh, batch_size=args.batch_size
        )
        logger.info("Predicting in %d px tiles overlapping by %g", args.tile, args.tile_overlap)
    metadata = _metadata(cfg, dataset, stored.get("class_names", []))
    id_map = metadata.get("thing_dataset_id_to_contiguous_id", None)
    settings = RunSettings(
        output_dir=args.output,
        run_files=[RUN_FILE, RESULTS_FILE, *outputs],
        class_names=list(metadata.thing_classes),
        score_threshold=args.score_threshold,
        batch_size=args.batch_size,
        drawing=DrawingOptions(args.hide_labels, args.hide_scores, args.max_picture_size),
        dataset_ids={v: k for k, v in id_map.items()} if id_map else None,
        image_ids=image_ids,
    )
    if earlier:
        remove_earlier_run(args.output, earlier)
    run = PredictRun(predictor, settings)
    for path, outputs in tqdm(list(zip(files, names)), desc="predict", unit="file"):
        if is_video(path):
            run.video(path, outputs)
        else:
            run.image(path, outputs)
    run.flush()
    failures = run.failures
    if len(failures) == len(files):
        shown = "; ".join(error for _, error in failures[:3])
        more = f" and {len(failures) - 3} more" if len(failures) > 3 else ""
        raise PredictError(f"none of the {len(files)} input image(s) could be read: {shown}{more}")
    write_json(run.results, os.path.join(args.output, RESULTS_FILE))
    if args.yolo_txt:
        with atomic_write(os.path.join(args.output, YOLO_CLASSES_FILE), "w") as f:
            f.writelines(name + "\n" for name in settings.class_names)
    failed_videos = sum(is_video(path) for path, _ in failures)
    video_part = (
        f" and {len(videos) - failed_videos} videos ({run.frames} frames)" if videos else ""
    )
    logger.info(
        "Predicted %d images%s: %d detections with score >= %g, %d images skipped; pictures "
        "and %s in %s",
        len(files) - len(videos) - (len(failures) - failed_videos),
        video_part,
        len(run.results),
        args.score_threshold,
        len(failures),
        RESULTS_FILE,
        args.output,
    )
    if not run.results and run.best_scores:
        logger.warning(
            "No detection reached --score-threshold %g (the highest score was %.3f): lower it "
            "to see the model's best guesses",
            args.score_threshold,
            max(run.best_scores),
        )
    if failures:
        logger.error(
            "%d file(s) could not be read: %s", len(failures), ", ".join(p for p, _ in failures)
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
