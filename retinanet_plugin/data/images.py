"""Images for inference: read (detectron2's ``read_image``, with 16-bit images scaled) and
resized as detectron2's test loader does.

detectron2 converts a 16-bit greyscale PNG or TIFF (microscopy, remote sensing, medical images)
to 8 bits by clipping every value above 255, which turns most of the image white. Here such an
image is scaled to 0-255 instead (value / 257, the exact map of 0-65535 onto 0-255); every other
image is read by detectron2's ``read_image`` unchanged.
"""

import glob
import os
from typing import Dict, List, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from detectron2.data import transforms as T
from detectron2.data.detection_utils import convert_PIL_to_numpy
from detectron2.data.detection_utils import read_image as detectron2_read_image
from detectron2.utils.file_io import PathManager

__all__ = ["IMAGE_EXTENSIONS", "SIXTEEN_BIT_MODES", "expand_inputs", "read_image", "test_input"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# PIL's modes for 16-bit greyscale files (PNG, TIFF); "I" is how some versions open them.
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


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


def read_image(path: str, format: str) -> np.ndarray:
    """An image file as an (H, W, C) array in ``format`` (see detectron2's ``read_image``),
    EXIF orientation applied; 16-bit images are scaled to 8 bits rather than clipped.

    Raises:
        OSError, SyntaxError: the file cannot be read as an image (as PIL raises them).
    """
    with PathManager.open(path, "rb") as f:
        with Image.open(f) as image:
            if image.mode not in SIXTEEN_BIT_MODES:
                return detectron2_read_image(path, format=format)
            values = np.asarray(ImageOps.exif_transpose(image), dtype=np.float64)
    if values.max(initial=0) > 65535:  # a 32-bit "I" image: scale its own range
        values = values * (65535.0 / values.max())
    grey = Image.fromarray(np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8), mode="L")
    return convert_PIL_to_numpy(grey, format)


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
