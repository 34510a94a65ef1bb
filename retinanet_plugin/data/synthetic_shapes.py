"""A generated, class-imbalanced detection dataset of shapes, in COCO format.

Used by the demo and the tests: no download, deterministic for a given seed, and hard enough
to be a real detection task: four shape classes with very different frequencies (the imbalance
focal loss is about), sizes from 12 px to half the image, aspect ratios 1:2..2:1, overlapping
objects, random colors (so the class is the shape, not the color) and textured, noisy
backgrounds with shape-like clutter.
"""

import json
import os
from typing import Dict, List, Tuple

import cv2
import numpy as np

__all__ = [
    "SHAPE_CLASSES",
    "CLASS_FREQUENCIES",
    "DEMO_TRAIN",
    "DEMO_VAL",
    "make_shapes_dataset",
    "make_demo_dataset_args",
]

# Names the demo's splits are registered under (tools/demo.py, tools/ablate.py, benchmarks).
DEMO_TRAIN, DEMO_VAL = "retinanet_demo_train", "retinanet_demo_val"

SHAPE_CLASSES = ("ellipse", "rectangle", "triangle", "cross")
# Relative frequency of each class among objects (imbalanced on purpose).
CLASS_FREQUENCIES = (0.55, 0.27, 0.13, 0.05)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Low-frequency color texture plus pixel noise and a few line segments, (size, size, 3)."""
    coarse = rng.uniform(30, 225, size=(rng.integers(3, 9),) * 2 + (3,)).astype(np.float32)
    image = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    image += rng.normal(0, 12, size=image.shape).astype(np.float32)
    for _ in range(rng.integers(1, 5)):
        p1, p2 = rng.integers(0, size, 2), rng.integers(0, size, 2)
        color = rng.uniform(0, 255, 3).tolist()
        cv2.line(image, tuple(int(v) for v in p1), tuple(int(v) for v in p2), color, 1)
    return image


def _shape_mask(cls: int, cx: float, cy: float, w: float, h: float, size: int) -> np.ndarray:
    """uint8 mask of one shape of class ``cls`` centered at (cx, cy) with extent (w, h)."""
    mask = np.zeros((size, size), np.uint8)
    x0, y0, x1, y1 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    if SHAPE_CLASSES[cls] == "ellipse":
        cv2.ellipse(mask, (int(cx), int(cy)), (int(w / 2), int(h / 2)), 0, 0, 360, 255, -1)
    elif SHAPE_CLASSES[cls] == "rectangle":
        cv2.rectangle(mask, (int(x0), int(y0)), (int(x1), int(y1)), 255, -1)
    elif SHAPE_CLASSES[cls] == "triangle":
        points = np.array([[cx, y0], [x1, y1], [x0, y1]], np.int32)
        cv2.fillPoly(mask, [points], 255)
    else:  # cross: two bars a third of the extent thick
        cv2.rectangle(mask, (int(x0), int(cy - h / 6)), (int(x1), int(cy + h / 6)), 255, -1)
        cv2.rectangle(mask, (int(cx - w / 6), int(y0)), (int(cx + w / 6), int(y1)), 255, -1)
    return mask


def _iou(a: Tuple[float, ...], b: Tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _make_image(
    rng: np.random.Generator, size: int, max_objects: int
) -> Tuple[np.ndarray, List[Dict]]:
    image = _background(rng, size).astype(np.float64)  # blended in float64
    objects = []
    for _ in range(rng.integers(1, max_objects + 1)):
        cls = int(rng.choice(len(SHAPE_CLASSES), p=CLASS_FREQUENCIES))
        side = float(np.exp(rng.uniform(np.log(12), np.log(size * 0.5))))  # sqrt of area
        ratio = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))  # height / width
        w, h = side / np.sqrt(ratio), side * np.sqrt(ratio)
        cx, cy = rng.uniform(w / 2, size - w / 2), rng.uniform(h / 2, size - h / 2)
        mask = _shape_mask(cls, cx, cy, w, h, size)
        if cv2.countNonZero(mask) < 20:
            continue
        x, y, mask_w, mask_h = cv2.boundingRect(mask)
        box = (float(x), float(y), float(x + mask_w), float(y + mask_h))
        # Overlap is allowed, but an object must stay recognizable.
        if any(_iou(box, o["box"]) > 0.4 for o in objects):
            continue
        color = rng.uniform(0, 255, 3)
        # Blended inside the box only: outside it alpha is 0 and the pixels would stay as they are.
        inside = (slice(y, y + mask_h), slice(x, x + mask_w))
        alpha = (mask[inside][..., None] / 255.0) * rng.uniform(0.75, 1.0)
        image[inside] = image[inside] * (1 - alpha) + color * alpha
        objects.append({"box": box, "category": cls})
    image = np.clip(image + rng.normal(0, 6, size=image.shape), 0, 255).astype(np.uint8)
    return image, objects


def _write_split(
    root: str, split: str, num_images: int, size: int, max_objects: int, seed: int
) -> str:
    rng = np.random.default_rng(seed)
    image_dir = os.path.join(root, split)
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        image, objects = _make_image(rng, size, max_objects)
        file_name = f"{image_id:05d}.png"
        cv2.imwrite(os.path.join(image_dir, file_name), image)
        images.append({"id": image_id, "file_name": file_name, "height": size, "width": size})
        for obj in objects:
            x0, y0, x1, y1 = obj["box"]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": obj["category"] + 1,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(SHAPE_CLASSES)]
    json_file = os.path.join(root, f"{split}.json")
    with open(json_file, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return json_file


def make_shapes_dataset(
    root: str,
    num_train: int = 600,
    num_val: int = 100,
    image_size: int = 256,
    max_objects: int = 8,
    seed: int = 0,
) -> Dict[str, Tuple[str, str]]:
    """Writes train and val splits (PNG images + COCO json) under ``root``.

    Args:
        root: output folder; gets ``train/``, ``val/``, ``train.json``, ``val.json``.
        num_train, num_val: number of images per split.
        image_size: side of the square images in pixels.
        max_objects: at most this many objects per image (at least 1 is attempted).
        seed: the same seed writes the same dataset.

    Returns:
        ``{"train": (json_file, image_root), "val": (json_file, image_root)}``.
    """
    splits = {"train": (num_train, seed), "val": (num_val, seed + 1)}
    return {
        split: (_write_split(root, split, n, image_size, max_objects, s), os.path.join(root, split))
        for split, (n, s) in splits.items()
    }


def make_demo_dataset_args(
    root: str, num_train: int = 600, num_val: int = 100, image_size: int = 192
) -> List[str]:
    """Writes the demo's dataset (seed 0) under ``root`` and returns the ``train_net.py``
    arguments that register its splits as :data:`DEMO_TRAIN` and :data:`DEMO_VAL`."""
    splits = make_shapes_dataset(
        root, num_train=num_train, num_val=num_val, image_size=image_size, seed=0
    )
    return [
        "--register-coco", DEMO_TRAIN, *splits["train"],
        "--register-coco", DEMO_VAL, *splits["val"],
    ]  # fmt: skip
