"""Prediction from Python: a weights file in, detections with class names out.

    from retinanet_plugin.engine import Predictor

    predictor = Predictor.from_checkpoint("output/model_final.pth", device="cpu")
    detections = predictor("photo.jpg")  # or a PIL image, or an (H, W, 3) uint8 BGR array
    for box, score, name in zip(detections.boxes, detections.scores, detections.class_names):
        print(name, score, box)

:class:`Predictor` is detectron2's ``DefaultPredictor`` (same resizing, same model call), built
from the config and class names a checkpoint of the plugin stores in itself
(:mod:`retinanet_plugin.checkpoint.metadata`), reading files with the plugin's image reader
(:func:`retinanet_plugin.data.images.read_image`). :class:`BatchPredictor` is the part that runs
the model on batches of arrays; ``predict`` uses it directly.

Channel order: NumPy arrays are taken in BGR order by default, as ``DefaultPredictor``,
``cv2.imread`` and video frames give them (``channel_order="RGB"`` for arrays from PIL, imageio
or matplotlib); PIL images and files are converted from their own mode. Whatever it is given,
the model gets its ``INPUT.FORMAT``.
"""

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from detectron2.config import CfgNode
from detectron2.data import transforms as T
from detectron2.data.detection_utils import build_augmentation, convert_PIL_to_numpy
from detectron2.modeling import build_model
from detectron2.structures import Instances

from ..checkpoint.checkpointer import RetinaNetCheckpointer
from ..checkpoint.metadata import config_for_weights, read_metadata
from ..data.images import read_image, test_input
from ..errors import UserError

__all__ = [
    "BatchPredictor",
    "Detections",
    "Predictor",
    "PredictorInputError",
    "class_names_for",
    "to_input_format",
]

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]
CHANNEL_ORDERS = ("BGR", "RGB")


class PredictorInputError(UserError, ValueError):
    """An image or option that :class:`Predictor` cannot take."""


def to_input_format(image: np.ndarray, channel_order: str, input_format: str) -> np.ndarray:
    """An (H, W, 3) uint8 array in ``channel_order`` ("BGR" or "RGB") as an array in the model's
    ``INPUT.FORMAT`` (e.g. "BGR", "RGB", "L": (H, W, 1))."""
    if channel_order == input_format:
        return image
    rgb = image if channel_order == "RGB" else image[:, :, ::-1]
    if input_format == "RGB":
        return rgb
    if input_format == "BGR":
        return image[:, :, ::-1]
    return convert_PIL_to_numpy(Image.fromarray(np.ascontiguousarray(rgb)), input_format)


class BatchPredictor:
    """Runs a RetinaNet on batches of images given as arrays, like detectron2's
    DefaultPredictor (same resizing), but several images per forward pass.

    Args:
        cfg: a frozen config; MODEL.WEIGHTS is loaded.
        trust_weights: see ``RetinaNetCheckpointer``.
    """

    def __init__(self, cfg: CfgNode, trust_weights: bool = False):
        self.model = build_model(cfg).eval()
        checkpointer = RetinaNetCheckpointer(
            self.model, allow_new_classes=False, trust_weights=trust_weights
        )
        checkpointer.load(cfg.MODEL.WEIGHTS)
        self.augmentations = T.AugmentationList(build_augmentation(cfg, is_train=False))
        self.input_format = cfg.INPUT.FORMAT

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray]) -> List[Instances]:
        """
        Args:
            images: (H, W, C) uint8 arrays in ``cfg.INPUT.FORMAT`` channel order.

        Returns:
            per image, detectron2 ``Instances`` in that image's pixel coordinates.
        """
        inputs = [test_input(image, self.augmentations) for image in images]
        return [output["instances"].to("cpu") for output in self.model(inputs)]


@dataclass
class Detections:
    """The detections of one image, N of them, in the order the model gives them.

    Attributes:
        boxes: (N, 4) float32, (x0, y0, x1, y1) in pixels of the image as given (for a file:
            after its EXIF orientation).
        scores: (N,) float32 in [0, 1].
        class_ids: (N,) int64, the model's class index in [0, NUM_CLASSES).
        class_names: N names, ``class_names[i]`` that of ``class_ids[i]``.
        image_size: (height, width) of the image.
    """

    boxes: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray
    class_names: List[str]
    image_size: Tuple[int, int]

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def from_instances(cls, instances: Instances, names: Sequence[str]) -> "Detections":
        """From detectron2 ``Instances`` (``pred_boxes``, ``scores``, ``pred_classes``) and the
        name of each class index."""
        class_ids = instances.pred_classes.numpy().astype(np.int64)
        return cls(
            boxes=instances.pred_boxes.tensor.numpy().astype(np.float32),
            scores=instances.scores.numpy().astype(np.float32),
            class_ids=class_ids,
            class_names=[names[i] for i in class_ids],
            image_size=tuple(instances.image_size),
        )


def class_names_for(cfg: CfgNode, stored: Sequence[str]) -> List[str]:
    """The model's class names: ``stored`` (a checkpoint's) if they are NUM_CLASSES names, else
    ``class_0``, ``class_1``, ..."""
    count = cfg.MODEL.RETINANET.NUM_CLASSES
    return list(stored) if len(stored) == count else [f"class_{i}" for i in range(count)]


class Predictor:
    """One image (or a list) in, :class:`Detections` out; see the module for an example.

    Args:
        cfg: the model's config; MODEL.WEIGHTS is loaded. Use :meth:`from_checkpoint` to take
            it from a checkpoint of the plugin.
        class_names: NUM_CLASSES names, by class index (default: ``class_0``, ...).
        trust_weights: see ``RetinaNetCheckpointer``.
    """

    def __init__(
        self,
        cfg: CfgNode,
        class_names: Optional[Sequence[str]] = None,
        trust_weights: bool = False,
    ):
        self.cfg = cfg.clone()
        self.cfg.freeze()
        names = list(class_names) if class_names is not None else class_names_for(cfg, [])
        if len(names) != cfg.MODEL.RETINANET.NUM_CLASSES:
            raise PredictorInputError(
                f"class_names: {len(names)} names for a model of "
                f"{cfg.MODEL.RETINANET.NUM_CLASSES} classes (MODEL.RETINANET.NUM_CLASSES); "
                "give one name per class"
            )
        self.class_names = names
        self.batch_predictor = BatchPredictor(self.cfg, trust_weights=trust_weights)

    @classmethod
    def from_checkpoint(
        cls,
        path: str,
        *,
        config_file: str = "",
        opts: Sequence[str] = (),
        device: Optional[str] = None,
        score_threshold: Optional[float] = None,
        class_names: Optional[Sequence[str]] = None,
        trust_weights: bool = False,
    ) -> "Predictor":
        """A predictor for the weights file ``path``, with the config and class names it stores
        (a checkpoint written by the plugin's training); no config file needed.

        Args:
            path: the weights (MODEL.WEIGHTS).
            config_file: a config for weights that store none (model-zoo ``.pkl`` files); one
                that builds another network than the stored config is refused.
            opts: ``KEY VALUE`` config overrides, as on the command line.
            device: MODEL.DEVICE ("cpu", "cuda"; default: the stored config's).
            score_threshold: MODEL.RETINANET.SCORE_THRESH_TEST (default: the stored config's).
            class_names: names by class index (default: the stored ones, else ``class_0``, ...).
            trust_weights: read ``path`` with full unpickling (only for files you trust).

        Raises:
            CheckpointConfigError: ``path`` stores no config and no ``config_file`` is given,
                or ``config_file`` builds another network.
        """
        overrides = [str(v) for v in opts]
        if device is not None:
            overrides += ["MODEL.DEVICE", device]
        if score_threshold is not None:
            overrides += ["MODEL.RETINANET.SCORE_THRESH_TEST", str(score_threshold)]
        overrides += ["MODEL.WEIGHTS", os.fspath(path)]
        cfg = config_for_weights(config_file, overrides, trust_weights=trust_weights)
        if class_names is None:
            stored = read_metadata(cfg.MODEL.WEIGHTS, trust_weights) or {}
            class_names = class_names_for(cfg, stored.get("class_names", []))
        return cls(cfg, class_names, trust_weights=trust_weights)

    def _array(self, image: ImageLike, channel_order: str) -> np.ndarray:
        """``image`` as an array in the model's INPUT.FORMAT."""
        input_format = self.cfg.INPUT.FORMAT
        if isinstance(image, (str, os.PathLike)):
            return read_image(os.fspath(image), input_format)
        if isinstance(image, Image.Image):
            return convert_PIL_to_numpy(image, input_format)
        if not isinstance(image, np.ndarray):
            raise PredictorInputError(
                f"image: a {type(image).__name__}; give a file path, a PIL image or an "
                "(H, W, 3) uint8 NumPy array"
            )
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise PredictorInputError(
                f"image: a {image.dtype} array of shape {tuple(image.shape)}; give an (H, W, 3) "
                "uint8 array (BGR, or channel_order='RGB')"
            )
        if channel_order not in CHANNEL_ORDERS:
            raise PredictorInputError(
                f"channel_order {channel_order!r}: must be one of {', '.join(CHANNEL_ORDERS)}"
            )
        return to_input_format(image, channel_order, input_format)

    def predict_batch(
        self, images: Sequence[ImageLike], channel_order: str = "BGR"
    ) -> List[Detections]:
        """The detections of several images, in one forward pass.

        Args:
            images: file paths, PIL images or (H, W, 3) uint8 arrays, mixed as you like.
            channel_order: the channel order of the arrays among ``images``: "BGR" (as
                ``cv2.imread`` and detectron2's ``DefaultPredictor``) or "RGB".

        Raises:
            ImageReadError: a file cannot be read.
            PredictorInputError: an image of another type or shape.
        """
        arrays = [self._array(image, channel_order) for image in images]
        outputs = self.batch_predictor(arrays) if arrays else []
        return [Detections.from_instances(o, self.class_names) for o in outputs]

    def __call__(self, image: ImageLike, channel_order: str = "BGR") -> Detections:
        """The detections of one image: a file path, a PIL image or an (H, W, 3) uint8 array
        (``channel_order``, see :meth:`predict_batch`)."""
        return self.predict_batch([image], channel_order)[0]
