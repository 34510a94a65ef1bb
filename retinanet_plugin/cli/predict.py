"""Detections on your own images: annotated pictures plus one COCO-results JSON.

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

Inputs: a folder gives its images (by extension) and those of its sub-folders; every ``--input``
must exist and give at least one image. Files that cannot be read are reported by name and
skipped (exit code 1); if none can be read, that is an error (exit code 2, as for bad options).

Outputs mirror the inputs: the drawing of ``photos/sub/a.jpg`` (``--input photos``) is
``OUTPUT/sub/a.jpg.png`` (a PNG input keeps its name), with several inputs under the folder they
share. ``OUTPUT/coco_results.json`` holds the detections and ``OUTPUT/predict_run.json`` the list
of the run's files. ``--output`` may not be, or lie inside, an input folder, and may not hold an
earlier run's results unless ``--overwrite`` (which deletes that run's files first) or a file of
the same name as a drawing that no earlier run wrote.
"""

import argparse
import glob
import json
import logging
import os
import sys
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.catalog import Metadata
from detectron2.data.detection_utils import build_augmentation, convert_image_to_rgb
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import Visualizer
from retinanet_plugin.checkpoint.atomic_io import atomic_write
from retinanet_plugin.checkpoint.checkpointer import TRUST_WEIGHTS_HELP, RetinaNetCheckpointer
from retinanet_plugin.checkpoint.metadata import (
    IGNORE_CONFIG_FLAG,
    IGNORE_CONFIG_HELP,
    config_for_weights,
    read_metadata,
    sets_key,
)
from retinanet_plugin.cli import defaults as cli
from retinanet_plugin.data import (
    add_dataset_arguments,
    register_datasets_from_args,
    resolve_num_classes,
)
from retinanet_plugin.data.images import (
    IMAGE_EXTENSIONS,
    ImageReadError,
    read_image,
    test_input,
)
from retinanet_plugin.engine.run_checks import check_device
from retinanet_plugin.errors import UserError
from retinanet_plugin.modeling.tiling import TiledPredictor

logger = logging.getLogger("retinanet_plugin.cli.predict")  # also when run as __main__


class PredictError(UserError, ValueError):
    """A prediction command that cannot work as given."""


MIN_DRAWING_SIDE = 512
RESULTS_FILE = "coco_results.json"
# The list of a run's files, so that --overwrite deletes exactly those.
RUN_FILE = "predict_run.json"


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


def _metadata(cfg, dataset_name: str, stored_classes: Sequence[str]):
    """The class names to draw: the dataset's, else those stored in the checkpoint (if it has
    the model's number of classes), else ``class_0``, ``class_1``, ..."""
    if dataset_name and dataset_name in DatasetCatalog.list():
        metadata = MetadataCatalog.get(dataset_name)
        if hasattr(metadata, "thing_classes"):
            return metadata
    # Not registered in MetadataCatalog: another run in this process may have other classes.
    count = cfg.MODEL.RETINANET.NUM_CLASSES
    names = list(stored_classes) if len(stored_classes) == count else []
    return Metadata(thing_classes=names or [f"class_{i}" for i in range(count)])


def _is_image_name(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def _folder_images(folder: str) -> Tuple[List[str], int]:
    """The image files (by extension) in ``folder`` and its sub-folders, sorted, and the number
    of other files there."""
    images, others = [], 0
    for parent, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            if _is_image_name(name):
                images.append(os.path.join(parent, name))
            else:
                others += 1
    return images, others


def find_images(
    inputs: Sequence[str], option: str = "--input"
) -> Tuple[List[Tuple[str, str]], List[str]]:
    """The image files that ``--input`` options name, in order, without repeats.

    Args:
        inputs: files (taken whatever their extension), folders (their image files by extension,
            sub-folders included) and glob patterns (their matches, as files or folders).
        option: the option they were given with, for the messages.

    Returns:
        A list of (file, root): each file with the folder whose tree its picture mirrors (the
        input folder, or the file's own folder); and the input folders, matched ones included.

    Raises:
        PredictError: an input that does not exist, matches nothing or holds no image.
    """
    found: Dict[str, Tuple[str, str]] = {}  # normalized path -> (path, root)
    folders: List[str] = []
    skipped = 0
    for item in inputs:
        if os.path.isdir(item) or os.path.isfile(item):
            matches = [item]
        elif glob.has_magic(item):
            matches = sorted(glob.glob(item))
            if not matches:
                raise PredictError(f"{option} {item}: no image file matched (no file matches it)")
        else:
            raise PredictError(f"{option} {item} does not exist")
        given = 0
        for match in matches:
            if os.path.isdir(match):
                images, others = _folder_images(match)
                folders.append(match)
                skipped += others
                pairs = [(path, match) for path in images]
            elif match == item or _is_image_name(match):  # a file named, or a matching image
                pairs = [(match, os.path.dirname(match) or ".")]
            else:
                skipped += 1
                pairs = []
            given += len(pairs)
            for path, root in pairs:
                found.setdefault(os.path.normpath(os.path.abspath(path)), (path, root))
        if not given:
            raise PredictError(
                f"{option} {item}: no image file matched (none with the extensions "
                f"{', '.join(IMAGE_EXTENSIONS)} in it or its sub-folders)"
            )
    if skipped:
        logger.info("Left out %d file(s) in the %s folders that are not images", skipped, option)
    return list(found.values()), folders


def picture_names(files: Sequence[Tuple[str, str]]) -> List[str]:
    """The drawing of each file, relative to the output folder: its path under the folder that
    all inputs' roots share, with ".png" added unless it is a PNG.

    Raises:
        PredictError: two files would get the same drawing (e.g. ``a.jpg`` and ``a.jpg.png``).
    """
    common = os.path.commonpath([os.path.abspath(root) for _, root in files])
    names, owners = [], {}
    for path, _ in files:
        name = os.path.relpath(os.path.abspath(path), common)
        name = name if name.lower().endswith(".png") else name + ".png"
        # Case-insensitive, as the names would collide on macOS's and Windows' file systems.
        other = owners.setdefault(name.lower(), path)
        if other != path:
            raise PredictError(
                f"--input: {other} and {path} would both be drawn as {name}; rename one of "
                "them or predict them into separate --output folders"
            )
        names.append(name)
    return names


def _inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (links resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def earlier_run(output_dir: str) -> List[str]:
    """The files of an earlier run in ``output_dir`` (paths relative to it), [] if none.

    Raises:
        PredictError: a results file without the list of its run's files, or a list that
            cannot be read.
    """
    run_file = os.path.join(output_dir, RUN_FILE)
    if not os.path.lexists(run_file):
        if os.path.lexists(os.path.join(output_dir, RESULTS_FILE)):
            raise PredictError(
                f"--output {output_dir} holds a {RESULTS_FILE} without the {RUN_FILE} that lists "
                "its run's pictures, so they cannot be told apart from other files; choose "
                "another --output, or delete that folder"
            )
        return []
    try:
        with open(run_file) as f:
            names = json.load(f)["files"]
        # Only names inside the folder: --overwrite deletes them.
        if not all(
            isinstance(n, str) and _inside(os.path.join(output_dir, n), output_dir) for n in names
        ):
            raise ValueError("it names a file outside the folder")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PredictError(
            f"--output {output_dir}: its {RUN_FILE}, the list of an earlier run's files, cannot "
            f"be read ({type(e).__name__}: {e}); choose another --output, or delete that folder"
        ) from e
    return names


def check_output(output_dir: str, inputs, pictures: Sequence[str], overwrite: bool):
    """Refuses an output folder where the run would replace or mix with files it did not write.

    Args:
        output_dir: ``--output``.
        inputs: :func:`find_images`' result.
        pictures: :func:`picture_names`' result.
        overwrite: ``--overwrite``.

    Returns:
        The earlier run's files to delete before writing (empty without one).

    Raises:
        PredictError: ``output_dir`` is a file, an input folder or inside one, or the folder of
            an input file; it holds an earlier run and ``overwrite`` is False; or a drawing's
            name is taken by a file that no earlier run wrote.
    """
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise PredictError(f"--output {output_dir} is a file; name a folder for the pictures")
    files, folders = inputs
    file_folders = {os.path.dirname(path) or "." for path, _ in files}
    for folder in folders + sorted(f for f in file_folders if _inside(f, output_dir)):
        if _inside(output_dir, folder):
            raise PredictError(
                f"--output {output_dir} is, or is inside, the input folder {folder}: the "
                "pictures would replace or mix with your images, and a later run would take them "
                "as input; choose a folder outside it"
            )
    earlier = earlier_run(output_dir)
    if earlier and not overwrite:
        raise PredictError(
            f"--output {output_dir} holds an earlier predict run ({RESULTS_FILE}, "
            f"{len(earlier) - 2} picture(s)); pass --overwrite to replace it, or choose another "
            "--output"
        )
    for name in pictures:
        taken = _taken(output_dir, name, earlier)
        if taken:
            raise PredictError(
                f"--output {output_dir} already holds {taken}, which no earlier predict run "
                f"wrote, where the picture {name} goes; choose another --output"
            )
    return earlier


def _taken(output_dir: str, picture: str, earlier: Sequence[str]) -> str:
    """The file in ``output_dir`` that writing ``picture`` (a relative path) would replace or
    that stands where one of its sub-folders goes, unless an earlier run wrote it; "" if none."""
    parts = picture.split(os.sep)
    for depth in range(1, len(parts) + 1):
        name = os.sep.join(parts[:depth])
        path = os.path.join(output_dir, name)
        if depth == len(parts) and name not in earlier and os.path.lexists(path):
            return name
        if depth < len(parts) and os.path.lexists(path) and not os.path.isdir(path):
            return name
    return ""


def remove_earlier_run(output_dir: str, earlier: Sequence[str]) -> None:
    """Deletes the files of an earlier run (and the sub-folders they leave empty)."""
    removed = 0
    for name in sorted(earlier, key=lambda n: n == RUN_FILE):  # the list last
        path = os.path.join(output_dir, name)
        if os.path.isfile(path):
            os.remove(path)
            removed += 1
        parent = os.path.dirname(name)
        while parent:
            try:
                os.rmdir(os.path.join(output_dir, parent))
            except OSError:  # not empty
                break
            parent = os.path.dirname(parent)
    logger.warning(
        "--overwrite: removed the %d file(s) of the earlier predict run in %s", removed, output_dir
    )


def predict_files(
    predictor: BatchPredictor,
    files: Sequence[str],
    pictures: Sequence[str],
    output_dir: str,
    metadata,
    score_threshold: float,
    batch_size: int,
) -> Tuple[List[Dict], List[Tuple[str, str]], List[float]]:
    """Writes an annotated PNG per readable file, at ``output_dir/<its picture name>``, after
    the list of the run's files (:data:`RUN_FILE`, written before the first picture).

    Returns:
        The COCO results (score >= ``score_threshold``), the unreadable files as
        [(file, error)], and each image's highest score (any threshold).
    """
    id_map = getattr(metadata, "thing_dataset_id_to_contiguous_id", None)
    to_dataset_id = {v: k for k, v in id_map.items()} if id_map else None
    results, failures, best_scores = [], [], []
    batch = []  # (image id, path, picture, image)

    def flush():
        if not os.path.exists(os.path.join(output_dir, RUN_FILE)):
            os.makedirs(output_dir, exist_ok=True)
            with atomic_write(os.path.join(output_dir, RUN_FILE), "w") as f:
                json.dump({"files": [RUN_FILE, RESULTS_FILE, *pictures]}, f, indent=1)
        outputs = predictor([image for *_, image in batch])
        for (image_id, path, picture, image), instances in zip(batch, outputs):
            if len(instances):
                best_scores.append(float(instances.scores.max()))
            instances = instances[instances.scores >= score_threshold]
            rgb = convert_image_to_rgb(image, predictor.input_format)
            # Small images are drawn enlarged so that labels stay readable.
            scale = max(1.0, MIN_DRAWING_SIDE / max(rgb.shape[:2]))
            drawing = Visualizer(rgb, metadata, scale=scale).draw_instance_predictions(instances)
            picture = os.path.join(output_dir, picture)
            os.makedirs(os.path.dirname(picture), exist_ok=True)
            drawing.save(picture)
            for record in instances_to_coco_json(instances, image_id):
                if to_dataset_id:
                    record["category_id"] = to_dataset_id[record["category_id"]]
                record["file_name"] = path
                results.append(record)
        batch.clear()

    progress = tqdm(list(enumerate(zip(files, pictures))), desc="predict", unit="image")
    for image_id, (path, picture) in progress:
        try:
            image = read_image(path, predictor.input_format)
        except ImageReadError as e:  # its message names the file
            logger.warning("Skipping an image: %s", e)
            failures.append((path, str(e)))
            continue
        batch.append((image_id, path, picture, image))
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
        help="image file, folder or glob pattern (repeatable)",
    )
    parser.add_argument("--output", required=True, help="folder for images and results JSON")
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
    parser.add_argument("--dataset", default=None, help="registered dataset for class names")
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
    inputs = find_images(args.input)
    files = [path for path, _ in inputs[0]]
    pictures = picture_names(inputs[0])
    earlier = check_output(args.output, inputs, pictures, args.overwrite)
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
    registered = [entry[0] for entry in args.register_coco + args.register_voc]
    dataset = args.dataset or next(iter(registered + list(cfg.DATASETS.TEST)), None)
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
    if earlier:
        remove_earlier_run(args.output, earlier)
    results, failures, scores = predict_files(
        predictor,
        files,
        pictures,
        args.output,
        _metadata(cfg, dataset, stored.get("class_names", [])),
        args.score_threshold,
        args.batch_size,
    )
    if len(failures) == len(files):
        shown = "; ".join(error for _, error in failures[:3])
        more = f" and {len(failures) - 3} more" if len(failures) > 3 else ""
        raise PredictError(f"none of the {len(files)} input image(s) could be read: {shown}{more}")
    results_file = os.path.join(args.output, RESULTS_FILE)
    with atomic_write(results_file, "w") as f:
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
