"""What ``predict`` writes for each image or video frame: the drawing, the COCO results records,
the per-image JSON and the YOLO-style label file; the annotated video; and :class:`PredictRun`,
which predicts the inputs in order and writes these.

Every function takes detectron2 ``Instances`` (``pred_boxes`` (N, 4) XYXY in the image's pixels,
``scores`` (N,), ``pred_classes`` (N,) contiguous class indices) and the class names by index.
"""

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from detectron2.data.detection_utils import convert_image_to_rgb
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.structures import Instances
from detectron2.utils.colormap import colormap
from detectron2.utils.visualizer import Visualizer
from retinanet_plugin.checkpoint.atomic_io import atomic_write
from retinanet_plugin.cli.predict_files import RUN_FILE, OutputNames
from retinanet_plugin.data.images import ImageReadError, read_image
from retinanet_plugin.data.video import VideoReadError, video_fps, video_frames
from retinanet_plugin.engine.predictor import to_input_format
from retinanet_plugin.errors import UserError

logger = logging.getLogger(__name__)

__all__ = [
    "AnnotatedVideo",
    "DrawingOptions",
    "PredictRun",
    "RunSettings",
    "coco_records",
    "detection_labels",
    "draw",
    "per_image_record",
    "save_picture",
    "write_json",
    "yolo_lines",
]

# One color per class (detectron2's palette of 74), the same in every picture and frame.
_COLORS = colormap(rgb=True, maximum=1)
# The fields of a detection in the per-image JSON (the results JSON adds image_id, file_name).
_DETECTION_FIELDS = ("bbox", "score", "category_id", "category_name")


@dataclass
class DrawingOptions:
    """``--hide-labels``, ``--hide-scores``, ``--max-picture-size`` (0: the image's size)."""

    hide_labels: bool = False
    hide_scores: bool = False
    max_size: int = 0


def detection_labels(
    instances: Instances, names: Sequence[str], options: DrawingOptions
) -> Optional[List[str]]:
    """The text drawn at each detection: "name 87%", "name" (``hide_scores``), "87%"
    (``hide_labels``), or None (both: boxes only)."""
    if options.hide_labels and options.hide_scores:
        return None
    labels = []
    for class_id, score in zip(instances.pred_classes.tolist(), instances.scores.tolist()):
        parts = [] if options.hide_labels else [names[class_id]]
        parts += [] if options.hide_scores else [f"{score * 100:.0f}%"]
        labels.append(" ".join(parts))
    return labels


def draw(
    rgb: np.ndarray, instances: Instances, names: Sequence[str], options: DrawingOptions
) -> np.ndarray:
    """The image with its detections drawn (detectron2's ``Visualizer``): a box per detection in
    its class's color, labelled "name score%" unless hidden.

    Args:
        rgb: (H, W, 3) uint8 RGB image.

    Returns:
        (H', W', 3) uint8 RGB: the image's size, or its longest side scaled down to
        ``options.max_size``.
    """
    longest = max(rgb.shape[:2])
    scale = min(1.0, options.max_size / longest) if options.max_size else 1.0
    visualizer = Visualizer(rgb, scale=scale)
    classes = instances.pred_classes.tolist()
    drawing = visualizer.overlay_instances(
        boxes=instances.pred_boxes.tensor.numpy(),
        labels=detection_labels(instances, names, options),
        assigned_colors=[_COLORS[c % len(_COLORS)] for c in classes],
    )
    return drawing.get_image()


def save_picture(rgb: np.ndarray, path: str) -> None:
    """Writes a drawing as a PNG file (atomically: never a half-written picture)."""
    with atomic_write(path, "wb") as f:
        Image.fromarray(rgb).save(f, format="PNG")


def coco_records(
    instances: Instances,
    image_id,
    names: Sequence[str],
    dataset_ids: Optional[Dict[int, int]] = None,
    **fields,
) -> List[Dict]:
    """COCO results records (detectron2's ``instances_to_coco_json``: "image_id",
    "category_id", "bbox" as [x, y, width, height], "score"), each with "category_name" and
    ``fields`` (e.g. "file_name", "frame").

    Args:
        dataset_ids: contiguous class index -> the dataset's category id; None: the index.
    """
    records = instances_to_coco_json(instances, image_id)
    for record in records:
        record["category_name"] = names[record["category_id"]]
        if dataset_ids is not None:
            record["category_id"] = dataset_ids[record["category_id"]]
        record.update(fields)
    return records


def per_image_record(records: Sequence[Dict], image_id, height: int, width: int) -> Dict:
    """One image's entry of ``--per-image-json``: {"image_id", "height", "width",
    "detections": [{"bbox", "score", "category_id", "category_name"}]}."""
    detections = [{k: r[k] for k in _DETECTION_FIELDS} for r in records]
    return {"image_id": image_id, "height": height, "width": width, "detections": detections}


def write_json(data, path: str) -> None:
    with atomic_write(path, "w") as f:
        json.dump(data, f, indent=1)


def yolo_lines(instances: Instances) -> List[str]:
    """YOLO label lines: "class cx cy w h" per detection, the box's center and size divided by
    the image's width and height (6 decimals), class the contiguous index."""
    height, width = instances.image_size
    lines = []
    boxes = instances.pred_boxes.tensor.double().tolist()
    for class_id, (x0, y0, x1, y1) in zip(instances.pred_classes.tolist(), boxes):
        cx, cy = (x0 + x1) / 2 / width, (y0 + y1) / 2 / height
        lines.append(
            f"{class_id} {cx:.6f} {cy:.6f} {(x1 - x0) / width:.6f} {(y1 - y0) / height:.6f}"
        )
    return lines


class AnnotatedVideo:
    """An MP4 video (OpenCV's "mp4v" codec) written frame by frame from RGB drawings, all of
    the first frame's size.

    Args:
        path: the ``.mp4`` file.
        fps: frames per second (the input video's).
    """

    def __init__(self, path: str, fps: float):
        self.path, self.fps = path, fps
        self.writer = None

    def write(self, rgb: np.ndarray) -> None:
        """Appends a (H, W, 3) uint8 RGB frame.

        Raises:
            UserError: OpenCV cannot write the file (a build without an MP4 encoder).
        """
        import cv2

        if self.writer is None:
            height, width = rgb.shape[:2]
            fourcc = cv2.VideoWriter_fourcc(*"mp4v")
            self.writer = cv2.VideoWriter(self.path, fourcc, self.fps, (width, height))
            if not self.writer.isOpened():
                raise UserError(
                    f"{self.path}: OpenCV cannot write an MP4 video here (no mp4v encoder in "
                    "this OpenCV build?); install opencv-python-headless from PyPI"
                )
        self.writer.write(np.ascontiguousarray(rgb[:, :, ::-1]))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()


@dataclass
class RunSettings:
    """How a run writes its outputs (from the options)."""

    output_dir: str
    run_files: List[str]  # written first, as RUN_FILE: what --overwrite deletes
    class_names: List[str]
    score_threshold: float
    batch_size: int
    drawing: DrawingOptions
    # contiguous class index -> the dataset's category id; None: the index.
    dataset_ids: Optional[Dict[int, int]] = None
    # file -> the dataset's image id; None: the run counts images and frames from 0.
    image_ids: Optional[Dict[str, Any]] = None


class PredictRun:
    """Predicts inputs in order and writes their outputs; images are batched across files, a
    video's frames within it.

    Attributes:
        results: the COCO results records (score >= the threshold) so far.
        failures: the unreadable inputs, as [(file, error)].
        best_scores: each image's (frame's) highest score, whatever the threshold.
    """

    def __init__(self, predictor, settings: RunSettings):
        self.predictor = predictor
        self.settings = settings
        self.input_format = predictor.input_format
        self.results: List[Dict] = []
        self.failures: List[Tuple[str, str]] = []
        self.best_scores: List[float] = []
        self._batch: List[Tuple[str, OutputNames, np.ndarray]] = []
        self._next_id = 0
        self.frames = 0  # of videos, predicted

    def _image_id(self, path: str):
        if self.settings.image_ids is not None:
            return self.settings.image_ids[path]
        self._next_id += 1
        return self._next_id - 1

    def _predict(self, images: Sequence[np.ndarray], fields: Sequence[Dict]):
        """Per image: (its detections over the threshold, its per-image record, its drawing).

        Args:
            images: arrays in the model's input format.
            fields: per image, what its records add: {"file_name"}, and "frame" for a video's.
        """
        settings = self.settings
        for image, extra, instances in zip(images, fields, self.predictor(images)):
            if len(instances):
                self.best_scores.append(float(instances.scores.max()))
            instances = instances[instances.scores >= settings.score_threshold]
            image_id = self._image_id(extra["file_name"])
            records = coco_records(
                instances, image_id, settings.class_names, settings.dataset_ids, **extra
            )
            self.results += records
            rgb = convert_image_to_rgb(image, self.input_format)
            drawing = draw(rgb, instances, settings.class_names, settings.drawing)
            yield instances, per_image_record(records, image_id, *image.shape[:2]), drawing

    def _output(self, name: str) -> str:
        """The path of an output file (its folder made), after the list of the run's files."""
        run_file = os.path.join(self.settings.output_dir, RUN_FILE)
        if not os.path.exists(run_file):
            os.makedirs(self.settings.output_dir, exist_ok=True)
            write_json({"files": self.settings.run_files}, run_file)
        path = os.path.join(self.settings.output_dir, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path

    def flush(self) -> None:
        """Predicts the images read so far and writes their outputs."""
        if not self._batch:
            return
        paths, names, images = zip(*self._batch)
        self._batch.clear()
        fields = [{"file_name": path} for path in paths]
        for (instances, record, drawing), path, outputs in zip(
            self._predict(images, fields), paths, names
        ):
            save_picture(drawing, self._output(outputs.drawing))
            if outputs.json:
                write_json({"file_name": path, **record}, self._output(outputs.json))
            if outputs.yolo:
                with atomic_write(self._output(outputs.yolo), "w") as f:
                    f.writelines(line + "\n" for line in yolo_lines(instances))

    def image(self, path: str, outputs: OutputNames) -> None:
        try:
            image = read_image(path, self.input_format)
        except ImageReadError as e:  # its message names the file
            logger.warning("Skipping an image: %s", e)
            self.failures.append((path, str(e)))
            return
        self._batch.append((path, outputs, image))
        if len(self._batch) == self.settings.batch_size:
            self.flush()

    def video(self, path: str, outputs: OutputNames) -> None:
        """Predicts a video's frames (after the images before it) and writes its annotated
        video and, with ``--per-image-json``, one JSON of all its frames."""
        self.flush()
        frames = []
        video = None
        try:
            fps = video_fps(path)
            video = AnnotatedVideo(self._output(outputs.drawing), fps)
            for batch in video_frames(path, self.settings.batch_size):
                images = [to_input_format(f, "BGR", self.input_format) for f in batch]
                fields = [{"file_name": path, "frame": len(frames) + i} for i in range(len(batch))]
                for extra, (_, record, drawing) in zip(fields, self._predict(images, fields)):
                    frames.append({"frame": extra["frame"], **record})
                    self.frames += 1
                    video.write(drawing)
        except VideoReadError as e:
            logger.warning("Skipping a video: %s", e)
            self.failures.append((path, str(e)))
            return
        finally:
            if video is not None:
                video.close()
        if outputs.json:
            write_json({"file_name": path, "frames": frames}, self._output(outputs.json))
