"""Reading image files, the same way for training (:class:`ImageMapper`), evaluation,
prediction and export (:func:`read_image`): as detectron2's ``read_image`` (EXIF orientation
applied, then ``convert_PIL_to_numpy``), with two decisions of its own; and resizing as
detectron2's test loader does.

* 16-bit images are scaled, not clipped: detectron2 converts a 16-bit greyscale PNG or TIFF
  (microscopy, remote sensing, medical images) to 8 bits by clipping every value above 255,
  which turns most of the image white. Here such an image is scaled to 0-255 instead
  (value / 257, the exact map of 0-65535 onto 0-255).
* Large images are read: PIL refuses images of more than twice ``PIL.Image.MAX_IMAGE_PIXELS``
  (about 179 million pixels, e.g. a 14000x14000 aerial image, which ``predict --tile`` is for)
  as possible decompression bombs. The plugin's reader does not change PIL's global limit: it
  applies its own, :data:`MAX_IMAGE_PIXELS` (OpenCV's default limit), to files PIL refuses.

A file that cannot be read (empty, corrupt, truncated, over the limit) raises
:class:`ImageReadError`, one line naming the file.
"""

import contextlib
import copy
import glob
import os
import struct
import zlib
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.data.detection_utils import convert_PIL_to_numpy
from detectron2.utils.file_io import PathManager

from ..errors import UserError

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "ImageMapper",
    "SIXTEEN_BIT_MODES",
    "ImageReadError",
    "exif_orientation",
    "expand_inputs",
    "image_size",
    "open_image",
    "trained_on",
    "read_image",
    "test_input",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# PIL's modes for 16-bit greyscale files (PNG, TIFF); "I" is how some versions open them.
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")

# The most pixels the plugin reads from one image (OpenCV's default, 2**30: a 32768x32768 image
# as 3 GiB of 8-bit RGB), for the images PIL's own limit refuses.
MAX_IMAGE_PIXELS = 2**30

# EXIF orientations that rotate the image by 90 degrees, swapping width and height.
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
_EXIF_ORIENTATION = 0x0112

# What PIL raises for a file it cannot decode: UnidentifiedImageError and "image file is
# truncated" are OSErrors; broken chunks give SyntaxError, ValueError, EOFError, struct.error or
# zlib.error.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)
# What a format plugin raises for a file of another format (Image.open tries the next one).
_NOT_THIS_FORMAT = (SyntaxError, IndexError, TypeError, struct.error)


class ImageReadError(UserError, OSError):
    """An image file cannot be read (missing, empty, corrupt, truncated or too large). An
    ``OSError``, as what PIL raises for such files, so that the training loader skips it."""


def expand_inputs(inputs: Sequence[str]) -> List[str]:
    """Image files named by paths, folders (their image files) or glob patterns, in order."""
    files = []
    for item in inputs:
        if os.path.isdir(item):
            names = sorted(os.listdir(item))
            files += [os.path.join(item, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
        elif os.path.isfile(item):
            files.append(item)
        else:
            files += sorted(glob.glob(item))
    return list(dict.fromkeys(files))  # drop repeats, keep order


def _open_past_pil_limit(f, path: str) -> Image.Image:
    """Opens an image that ``Image.open`` refused as too large, with PIL's format plugins as
    ``Image.open`` does, but without its size check (the caller checks the size)."""
    Image.init()
    f.seek(0)
    prefix = f.read(16)
    for format_id in Image.ID:
        factory, accept = Image.OPEN[format_id]
        accepted = accept(prefix) if accept else True
        if accepted and not isinstance(accepted, str):  # a str is a warning: not this format
            f.seek(0)
            try:
                return factory(f, path)
            except _NOT_THIS_FORMAT:
                continue
    raise ImageReadError(f"{path}: cannot identify the image format")


@contextlib.contextmanager
def open_image(path: str, max_pixels: int = MAX_IMAGE_PIXELS) -> Iterator[Image.Image]:
    """The image file ``path`` opened with PIL (header read, pixels not yet decoded), accepting
    up to ``max_pixels`` pixels whatever ``PIL.Image.MAX_IMAGE_PIXELS`` says.

    Raises:
        ImageReadError: the file does not exist, is empty, is not an image PIL can identify or
            has more than ``max_pixels`` pixels.
    """
    try:
        f = PathManager.open(path, "rb")
    except OSError as e:
        raise ImageReadError(f"{path}: cannot open the image file ({e.strerror or e})") from e
    with f:
        try:
            image = Image.open(f)
        except Image.DecompressionBombError:
            image = _open_past_pil_limit(f, path)
        except _DECODE_ERRORS as e:
            if os.path.isfile(path) and os.path.getsize(path) == 0:
                what = "the file is empty"
            elif isinstance(e, UnidentifiedImageError):
                what = "not in an image format PIL knows"
            else:
                what = f"{type(e).__name__}: {e}"
            raise ImageReadError(f"{path}: not an image file PIL can read ({what})") from e
        with image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageReadError(
                    f"{path}: {width}x{height} = {width * height} pixels, more than the "
                    f"{max_pixels} the plugin reads from one image; split it into smaller files"
                )
            yield image


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation (1-8) that detectron2's ``read_image`` applies to ``image``; 1 (none)
    for images without one or with broken EXIF data, as detectron2 treats them."""
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # as detectron2's read_image: broken EXIF data means no orientation
        return 1
    return orientation if orientation in range(1, 9) else 1


def image_size(path: str, max_pixels: int = MAX_IMAGE_PIXELS) -> Tuple[int, int, int]:
    """(width, height, EXIF orientation) of an image as :func:`read_image` gives it (EXIF
    orientation applied), from the file's header alone.

    Raises:
        ImageReadError: see :func:`open_image`.
    """
    with open_image(path, max_pixels) as image:
        width, height = image.size
        orientation = exif_orientation(image)
    if orientation in TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    return width, height, orientation


def read_image(path: str, format: str, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """An image file as an (H, W, C) uint8 array in ``format`` (see detectron2's
    ``read_image``: "BGR", "RGB", "L", ...), EXIF orientation applied; 16-bit images are scaled
    to 8 bits rather than clipped; up to ``max_pixels`` pixels (see the module).

    Raises:
        ImageReadError: the file cannot be read as an image, naming it.
    """
    with open_image(path, max_pixels) as image:
        try:
            if exif_orientation(image) != 1:
                image = ImageOps.exif_transpose(image)
            if image.mode not in SIXTEEN_BIT_MODES:
                return convert_PIL_to_numpy(image, format)
            values = np.asarray(image, dtype=np.float64)
        except _DECODE_ERRORS as e:
            raise ImageReadError(
                f"{path}: cannot decode the image, it is corrupt or truncated "
                f"({type(e).__name__}: {e})"
            ) from e
    if values.max(initial=0) > 65535:  # a 32-bit "I" image: scale its own range
        values = values * (65535.0 / values.max())
    grey = Image.fromarray(np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8), mode="L")
    return convert_PIL_to_numpy(grey, format)


def trained_on(annotation: Dict) -> bool:
    """Whether training uses a box: crowd boxes are left out, as detectron2's mapper leaves them
    out, except VOC "difficult" objects (crowd boxes with ``"difficult": 1``, see
    :func:`.validation.mark_voc_difficult`), which it keeps as detectron2's VOC loader does."""
    return annotation.get("iscrowd", 0) == 0 or bool(annotation.get("difficult"))


class ImageMapper(DatasetMapper):
    """detectron2's ``DatasetMapper``, reading the image with :func:`read_image` (the reader of
    ``predict`` and export) instead of detectron2's, so that training sees the pixels prediction
    sees: detectron2's clips 16-bit images at 255, and refuses images over PIL's pixel limit.

    Boxes, instance masks and keypoints are mapped as ``DatasetMapper`` maps them (detectron2's
    public ``detection_utils``), the boxes of :func:`trained_on` only; a semantic segmentation
    label map as ``DatasetMapper`` reads it. Precomputed proposals, which RetinaNet has no use
    for, are refused.
    """

    @configurable
    def __init__(self, is_train: bool = True, **kwargs):
        super().__init__(is_train, **kwargs)
        if self.proposal_topk is not None:
            raise ValueError("precomputed proposals (MODEL.LOAD_PROPOSALS) are not supported")

    def __call__(self, dataset_dict: Dict) -> Dict:
        """Returns a copy of ``dataset_dict`` with "image" ((C, H, W) uint8 tensor, augmented),
        "sem_seg" ((H, W) int64) if it names a label map and, in training, "instances"
        (``gt_boxes``, ``gt_classes``, ...) in place of "annotations"."""
        dataset_dict = copy.deepcopy(dataset_dict)  # modified below
        image = read_image(dataset_dict["file_name"], format=self.image_format)
        utils.check_image_size(dataset_dict, image)
        sem_seg = None
        if "sem_seg_file_name" in dataset_dict:  # a label map, read as detectron2 reads it
            sem_seg = utils.read_image(dataset_dict.pop("sem_seg_file_name"), "L").squeeze(2)
        aug_input = T.AugInput(image, sem_seg=sem_seg)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if sem_seg is not None:
            dataset_dict["sem_seg"] = torch.as_tensor(aug_input.sem_seg.astype("long"))
        annotations = dataset_dict.pop("annotations", None)
        if not self.is_train or annotations is None:
            return dataset_dict
        for annotation in annotations:
            if not self.use_instance_mask:
                annotation.pop("segmentation", None)
            if not self.use_keypoint:
                annotation.pop("keypoints", None)
        transformed = [
            utils.transform_instance_annotations(
                a, transforms, image.shape[:2], keypoint_hflip_indices=self.keypoint_hflip_indices
            )
            for a in annotations
            if trained_on(a)
        ]
        instances = utils.annotations_to_instances(
            transformed, image.shape[:2], mask_format=self.instance_mask_format
        )
        if self.recompute_boxes:
            instances.gt_boxes = instances.gt_masks.get_bounding_boxes()
        dataset_dict["instances"] = utils.filter_empty_instances(instances)
        return dataset_dict


def test_input(image: np.ndarray, augmentations: T.AugmentationList) -> Dict:
    """An image as detectron2's test loader gives it to the model.

    Args:
        image: (H, W, 3) uint8 array in ``cfg.INPUT.FORMAT`` channel order.
        augmentations: the test augmentations, ``build_augmentation(cfg, is_train=False)``
            (the shortest edge resized to ``INPUT.MIN_SIZE_TEST``).

    Returns:
        {"image": (3, H', W') float32 resized, "height", "width": the size of ``image``, to
        which the model scales its detections back}.
    """
    aug_input = T.AugInput(image)
    augmentations(aug_input)
    tensor = torch.as_tensor(aug_input.image.astype("float32").transpose(2, 0, 1))
    return {"image": tensor, "height": image.shape[0], "width": image.shape[1]}
