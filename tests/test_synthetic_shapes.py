"""The generated shapes dataset: the demo's validation split stays the same images and boxes."""

import hashlib
import os

import cv2

from retinanet_plugin.data import make_shapes_dataset

# SHA-256 over the demo's validation split (seed 1, 100 images of 192 px): its COCO json, then
# the decoded pixels of each image in name order (PNG bytes may differ between zlib versions).
# The demo's published AP is measured on exactly these images; a change to the generator that
# changes them must be deliberate (and the README's demo figures re-measured).
DEMO_VAL_SHA256 = "9afd04a46a99946cc4deec83026a7c56b1c60965e353b7e85a4519311bd202b8"


def test_demo_validation_split_is_unchanged(tmp_path):
    json_file, image_root = make_shapes_dataset(
        str(tmp_path), num_train=0, num_val=100, image_size=192, seed=0
    )["val"]
    digest = hashlib.sha256()
    with open(json_file, "rb") as f:
        digest.update(f.read())
    names = sorted(os.listdir(image_root))
    for name in names:
        digest.update(cv2.imread(os.path.join(image_root, name)).tobytes())
    assert len(names) == 100
    assert digest.hexdigest() == DEMO_VAL_SHA256
