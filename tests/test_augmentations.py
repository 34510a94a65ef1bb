"""Training augmentations (INPUT.AUG: retinanet_plugin.data.augmentations and .mixing).

Objects are filled rectangles, drawn into the image in a color that encodes their class and, for
the per-image augmentations, into a label map that detectron2's mapper transforms alongside the
image (as a semantic segmentation, nearest-neighbour). After each transform, every box must be the
tight box of its object's pixels, and objects that the rules drop must be gone.
"""

import os

import cv2
import numpy as np
import pytest
import torch
from train_runs import TINY

from conftest import plugin_cfg
from detectron2.data import DatasetCatalog, DatasetMapper, build_detection_train_loader
from detectron2.structures import Boxes, BoxMode, Instances
from retinanet_plugin.config.loading import ConfigError, load_config
from retinanet_plugin.data import (
    MixingDatasetMapper,
    build_train_loader,
    build_train_mapper,
    cutmix,
    mixing,
    mosaic,
    register_coco_dataset,
)

pytestmark = pytest.mark.usefixtures("single_thread")

FILL = (7, 7, 7)  # canvas value of the mixing tests, distinct from every object and background
# (height, width) and object boxes (x0, y0, x1, y1) of the test images; no two objects overlap.
LAYOUTS = [
    ((128, 160), [(10, 12, 50, 40), (70, 20, 120, 60), (20, 70, 60, 118), (100, 80, 150, 120)]),
    ((100, 120), [(5, 5, 45, 35), (60, 10, 110, 50), (30, 55, 90, 95)]),
    ((120, 90), [(10, 10, 80, 40), (5, 60, 40, 110), (50, 70, 85, 115)]),
    ((90, 140), [(20, 15, 70, 75), (90, 30, 130, 80)]),
]
AUGMENTATIONS = ("ROTATION", "SCALE_CROP", "COLOR_JITTER", "MOSAIC", "MIXUP", "CUTMIX")


def color(label):
    """BGR color of the object of class ``label`` (unique per label)."""
    return (200, 10 + 5 * label, 60)


def pixels_of(image_chw, label):
    """Boolean (H, W) mask of the pixels of the object of class ``label``."""
    return (image_chw == torch.tensor(color(label), dtype=torch.uint8).view(3, 1, 1)).all(0)


def tight_box(mask):
    ys, xs = np.nonzero(np.asarray(mask))
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=float)


def draw(size, boxes, first_label, background):
    """(H, W, 3) uint8 image and (H, W) uint8 label map (label + 1, 0 = background)."""
    image = np.full(size + (3,), background, np.uint8)
    labels = np.zeros(size, np.uint8)
    for label, (x0, y0, x1, y1) in enumerate(boxes, start=first_label):
        image[y0:y1, x0:x1] = color(label)
        labels[y0:y1, x0:x1] = label + 1
    return image, labels


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """Dataset records of LAYOUTS (files on disk), classes numbered across all images."""
    directory = tmp_path_factory.mktemp("augment")
    result, first_label = [], 0
    for index, (size, boxes) in enumerate(LAYOUTS):
        image, labels = draw(size, boxes, first_label, background=(30 + 20 * index,) * 3)
        file_name, label_file = (os.path.join(directory, f"{index}{s}.png") for s in ("", "_l"))
        cv2.imwrite(file_name, image)
        cv2.imwrite(label_file, labels)
        annotations = [
            {"bbox": list(box), "bbox_mode": BoxMode.XYXY_ABS, "category_id": label, "iscrowd": 0}
            for label, box in enumerate(boxes, start=first_label)
        ]
        result.append(
            {
                "file_name": file_name,
                "sem_seg_file_name": label_file,
                "height": size[0],
                "width": size[1],
                "image_id": index,
                "annotations": annotations,
            }
        )
        first_label += len(boxes)
    return result


@pytest.fixture(scope="module")
def shapes_train(shapes_dataset):
    """Name of the registered training split of the shapes dataset."""
    register_coco_dataset("augment_shapes_train", *shapes_dataset["train"])
    return "augment_shapes_train"


def aug_cfg(settings=None, **sections):
    """The tiny config with 128 px training images, the ``{KEY: value}`` ``settings`` and, for
    each ``SECTION={KEY: value}``, INPUT.AUG.SECTION enabled with those values."""
    settings = {"INPUT.MIN_SIZE_TRAIN": (128,), "INPUT.MAX_SIZE_TRAIN": 1000, **(settings or {})}
    for section, values in sections.items():
        for key, value in {"ENABLED": True, **values}.items():
            settings[f"INPUT.AUG.{section}.{key}"] = value
    opts = [str(item) for pair in settings.items() for item in pair]
    return plugin_cfg("retinanet_R18_GN_tiny.yaml", *opts)


def map_seeded(mapper, record, seed):
    np.random.seed(seed)
    return mapper(record)


def object_boxes(output):
    """{class: box} of the mapped output, and {class: tight box of its label-map pixels}."""
    instances = output["instances"]
    boxes = dict(zip(instances.gt_classes.tolist(), instances.gt_boxes.tensor.numpy()))
    labels = output["sem_seg"].numpy()
    masks = {label - 1: tight_box(labels == label) for label in np.unique(labels) if label}
    return boxes, masks


@pytest.mark.parametrize("expand", [True, False])
def test_rotation_boxes_fit_the_rotated_objects(records, expand):
    """detectron2's RotationTransform.apply_box (fvcore's: the box around the 4 rotated corners)
    gives the tight box of a rotated rectangle; without expansion it is clipped to the image,
    where it still covers the visible part."""
    cfg = aug_cfg(ROTATION={"PROB": 1.0, "ANGLE": (20.0, 40.0), "EXPAND": expand})
    mapper = build_train_mapper(cfg)
    for seed in range(3):
        for record in records[:2]:
            boxes, masks = object_boxes(map_seeded(mapper, record, seed))
            assert set(boxes) == set(masks)
            for label, box in boxes.items():
                mask = masks[label]
                assert (box[:2] <= mask[:2] + 1).all() and (box[2:] >= mask[2:] - 1).all()
                if expand:
                    np.testing.assert_allclose(box, mask, atol=2)
    # Rotation happened: a rotated rectangle's pixels fill clearly less than its box.
    output = map_seeded(mapper, records[0], 0)
    for label, box in object_boxes(output)[0].items():
        filled = (output["sem_seg"].numpy() == label + 1).sum()
        assert filled < 0.85 * (box[2] - box[0]) * (box[3] - box[1])


def test_scale_crop_clips_and_removes_boxes(records):
    """detectron2's ResizeScale + FixedSizeCrop: a SIZE output, boxes clipped to the crop and
    tight on what is left, boxes cropped away removed."""
    cfg = aug_cfg(SCALE_CROP={"PROB": 1.0, "SCALE_RANGE": (2.0, 3.0), "SIZE": (80, 72)})
    mapper = build_train_mapper(cfg)
    clipped = removed = 0
    for seed in range(8):
        output = map_seeded(mapper, records[0], seed)
        assert tuple(output["image"].shape[1:]) == (80, 72)
        boxes, masks = object_boxes(output)
        for label in range(len(LAYOUTS[0][1])):
            if label in masks:
                np.testing.assert_allclose(boxes[label], masks[label], atol=2)
                clipped += bool(np.isin(boxes[label], [0, 72, 80]).any())
            else:  # cropped away: gone, or a sliver thinner than a pixel
                removed += 1
                if label in boxes:
                    assert min(boxes[label][2:] - boxes[label][:2]) < 1
    assert clipped and removed


def test_color_jitter_changes_pixels_not_boxes(records):
    """Color jitter after the geometric augmentations: same boxes as detectron2's mapper for the
    same seed; brightness 0.5 alone halves the pixels (detectron2's BlendTransform)."""
    jitter = {"BRIGHTNESS": (0.5, 0.5), "CONTRAST": (1.0, 1.0), "SATURATION": (1.0, 1.0)}
    cfg = aug_cfg(COLOR_JITTER={"PROB": 1.0, **jitter})
    default = DatasetMapper(cfg, is_train=True)
    jittered = build_train_mapper(cfg)
    for seed in range(3):
        expected, output = (map_seeded(m, records[1], seed) for m in (default, jittered))
        assert torch.equal(
            output["instances"].gt_boxes.tensor, expected["instances"].gt_boxes.tensor
        )
        difference = output["image"].double() - expected["image"].double() * 0.5
        assert difference.abs().max() <= 1


def test_everything_off_is_detectron2s_default_mapper_and_loader(shapes_train):
    settings = {"DATASETS.TRAIN": (shapes_train,), "SOLVER.IMS_PER_BATCH": 4, "SEED": 5}
    cfg = aug_cfg({**settings, "DATALOADER.NUM_WORKERS": 0})
    mapper = build_train_mapper(cfg)
    assert isinstance(mapper, DatasetMapper)  # the plugin's ImageMapper: the same pixels (below)
    assert str(mapper.augmentations) == str(DatasetMapper(cfg, is_train=True).augmentations)

    # The same images in the same batches as detectron2's loader; each image mapped by
    # detectron2's mapper with the RNGs seeded from (sampler seed, rank 0, stream position).
    batches, loaders = [], []
    for build in (build_train_loader, build_detection_train_loader):
        # The samplers' seed: a draw from numpy's RNG (0.6) or cfg.SEED (upstream main).
        np.random.seed(3)
        loaders.append(build(cfg))
        batches.append(next(iter(loaders[-1])))
    ours, theirs = batches
    assert [d["file_name"] for d in ours] == [d["file_name"] for d in theirs]
    records = {r["file_name"]: r for r in DatasetCatalog.get(shapes_train)}
    seed = loaders[0].state_dict()["seed"]
    for position, d in enumerate(ours):
        np.random.seed(np.random.SeedSequence([seed, 0, position]).generate_state(1)[0])
        expected = DatasetMapper(cfg, is_train=True)(records[d["file_name"]])
        assert torch.equal(d["image"], expected["image"])
        assert torch.equal(d["instances"].gt_boxes.tensor, expected["instances"].gt_boxes.tensor)


def test_probability_zero_gives_detectron2s_output(records):
    """Everything enabled with PROB 0: the same images and boxes as detectron2's mapper, also for
    later images (no random numbers drawn)."""
    cfg = aug_cfg(**{name: {"PROB": 0.0} for name in AUGMENTATIONS})
    mapper = build_train_mapper(cfg, records)
    assert isinstance(mapper, MixingDatasetMapper)
    outputs = []
    for m in (mapper, DatasetMapper(cfg, is_train=True)):
        np.random.seed(5)
        outputs.append([m(record) for record in records * 2])
    for ours, theirs in zip(*outputs):
        assert torch.equal(ours["image"], theirs["image"])
        assert torch.equal(ours["instances"].gt_boxes.tensor, theirs["instances"].gt_boxes.tensor)


# ---------------------------------------------------------------------------------------------
# Mixing: the functions with random parameters from a test generator, and the mapper


def tensor_image(index):
    """(C, H, W) image and Instances of LAYOUTS[index], classes numbered as in ``records``."""
    size, boxes = LAYOUTS[index]
    first = sum(len(b) for _, b in LAYOUTS[:index])
    image, _ = draw(size, boxes, first, background=(30 + 20 * index,) * 3)
    instances = Instances(
        size,
        gt_boxes=Boxes(torch.tensor(boxes, dtype=torch.float32)),
        gt_classes=torch.arange(first, first + len(boxes)),
    )
    return torch.from_numpy(image).permute(2, 0, 1).contiguous(), instances


def visible_objects(image):
    """{class: (tight box, pixel count)} of every object color in ``image``."""
    found = {}
    for label in range(sum(len(b) for _, b in LAYOUTS)):
        mask = pixels_of(image, label)
        if mask.any():
            found[label] = (tight_box(mask), int(mask.sum()))
    return found


def test_mosaic_tiles_and_boxes():
    """Against a per-pixel reference of the 2x2 tiling; every kept box is the tight box of its
    object's visible pixels, and exactly the objects cut to <= MIN_SIZE px are dropped."""
    tiles = [tensor_image(i) for i in range(4)]
    images, instances = [t[0] for t in tiles], [t[1] for t in tiles]
    rng = np.random.default_rng(0)
    height, width = images[0].shape[1:]
    ys, xs = np.mgrid[0:height, 0:width]
    dropped = 0
    for _ in range(12):
        cx, cy = int(rng.integers(0, width + 1)), int(rng.integers(0, height + 1))
        output, kept = mosaic(images, instances, (cx, cy), FILL, min_size=4.0)
        reference = np.broadcast_to(np.array(FILL, np.uint8), (height, width, 3)).copy()
        for index, image in enumerate(images):
            h, w = image.shape[1:]
            right, below = index in (1, 3), index in (2, 3)
            in_quadrant = ((xs >= cx) == right) & ((ys >= cy) == below)
            sx = xs - cx if right else xs - cx + w
            sy = ys - cy if below else ys - cy + h
            inside = in_quadrant & (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
            reference[inside] = image.permute(1, 2, 0).numpy()[sy[inside], sx[inside]]
        assert torch.equal(output, torch.from_numpy(reference).permute(2, 0, 1))
        assert kept.image_size == (height, width)
        boxes = dict(zip(kept.gt_classes.tolist(), kept.gt_boxes.tensor.numpy()))
        for label, (box, _) in visible_objects(output).items():
            if min(box[2:] - box[:2]) > 4:
                np.testing.assert_array_equal(boxes.pop(label), box)
            else:
                dropped += 1
        assert not boxes  # no box without visible pixels
    assert dropped


def test_cutmix_pastes_a_rectangle_and_keeps_visible_boxes():
    """Pixels: B inside the rectangle, A outside. A's boxes are the tight boxes of their visible
    parts, B's are clipped to the rectangle; exactly those with < MIN_VISIBLE of their area
    visible are dropped."""
    (image_a, instances_a), (image_b, instances_b) = tensor_image(1), tensor_image(3)
    areas = {
        int(c): float(b.prod())
        for inst in (instances_a, instances_b)
        for c, b in zip(inst.gt_classes, inst.gt_boxes.tensor[:, 2:] - inst.gt_boxes.tensor[:, :2])
    }
    original = {
        int(c): b.numpy() for c, b in zip(instances_a.gt_classes, instances_a.gt_boxes.tensor)
    }
    rng = np.random.default_rng(1)
    height, width = image_a.shape[1:]
    shrunk_sides, dropped = np.zeros(4, int), 0
    for _ in range(100):
        x0, x1 = sorted(rng.integers(0, min(width, image_b.shape[2]) + 1, 2))
        y0, y1 = sorted(rng.integers(0, min(height, image_b.shape[1]) + 1, 2))
        output, kept = cutmix(image_a, instances_a, image_b, instances_b, (x0, y0, x1, y1), 0.3)
        inside = torch.zeros(height, width, dtype=torch.bool)
        inside[y0:y1, x0:x1] = True
        expected = torch.where(inside, on_canvas(image_b, height, width).byte(), image_a)
        assert torch.equal(output, expected)
        boxes = dict(zip(kept.gt_classes.tolist(), kept.gt_boxes.tensor.numpy()))
        for label, (box, count) in visible_objects(output).items():
            if count / areas[label] >= 0.3:
                np.testing.assert_array_equal(boxes.pop(label), box)
                if label in original:
                    shrunk_sides += box != original[label]
            else:
                dropped += 1
        assert not boxes
    assert shrunk_sides.all() and dropped  # each side of A's boxes was cut at least once


def mixing_mapper(records, **probs):
    """A MixingDatasetMapper without per-image augmentations (pixels stay exact)."""
    return MixingDatasetMapper(
        augmentations=[], image_format="BGR", dataset=records, fill=FILL, **probs
    )


def on_canvas(image, height, width):
    """``image`` top-left on a (3, height, width) float64 canvas of FILL, cut to its size."""
    canvas = torch.tensor(FILL, dtype=torch.float64).view(3, 1, 1).repeat(1, height, width)
    h, w = min(image.shape[1], height), min(image.shape[2], width)
    canvas[:, :h, :w] = image[:, :h, :w].double()
    return canvas


def test_mixup_blends_pixels_and_keeps_both_box_sets(records):
    """Each output is round(lambda * A + (1 - lambda) * B) for one record B and one lambda in
    (0, 1) (fitted by least squares), with the boxes of A followed by those of B."""
    mapper = mixing_mapper(records, mixup_prob=1.0, mixup_alpha=1.5)
    plain = mixing_mapper(records)
    images = [plain(r) for r in records]
    blends = []
    for seed in range(6):
        output = map_seeded(mapper, records[0], seed)
        height, width = output["image"].shape[1:]
        mixed = output["image"].double()
        a = on_canvas(images[0]["image"], height, width)
        matches = []
        for b_sample in images:
            canvas = np.maximum(images[0]["image"].shape[1:], b_sample["image"].shape[1:])
            if tuple(canvas) != (height, width):  # the canvas has the larger height and width
                continue
            b = on_canvas(b_sample["image"], height, width)
            if b_sample is images[0]:  # A mixed with itself: A whatever lambda is
                blend = 0.5
            else:
                blend = float(((mixed - b) * (a - b)).sum() / ((a - b) ** 2).sum())
            error = (mixed - (blend * a + (1 - blend) * b)).abs().max()
            if 0.001 < blend < 0.999 and error <= 1.0:
                matches.append((blend, b_sample))
        assert len(matches) == 1
        blend, b_sample = matches[0]
        if b_sample is not images[0]:
            blends.append(blend)
        expected = torch.cat(
            [images[0]["instances"].gt_boxes.tensor, b_sample["instances"].gt_boxes.tensor]
        )
        assert torch.equal(output["instances"].gt_boxes.tensor, expected)
        assert output["instances"].image_size == (height, width)
    assert len(set(blends)) > 1


def test_mapper_with_every_mix_always_on(records):
    """Mosaic, MixUp and CutMix at probability 1 on every record: a consistent output (image and
    instances of the same size, boxes inside it, classes from the dataset)."""
    mapper = mixing_mapper(records, mosaic_prob=1.0, mixup_prob=1.0, cutmix_prob=1.0)
    classes = {a["category_id"] for r in records for a in r["annotations"]}
    np.random.seed(0)
    for record in records:
        output = mapper(record)
        instances = output["instances"]
        height, width = output["image"].shape[1:]
        assert instances.image_size == (height, width)
        boxes = instances.gt_boxes.tensor
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= width).all()
        assert (boxes[:, 3] <= height).all() and instances.gt_boxes.nonempty().all()
        assert set(instances.gt_classes.tolist()) <= classes


def test_invalid_augmentation_values_are_config_errors():
    with pytest.raises(ConfigError) as error:
        load_config(
            TINY,
            [
                "INPUT.AUG.MIXUP.PROB",
                "1.5",
                "INPUT.AUG.ROTATION.ANGLE",
                "(10, -10)",
                "INPUT.AUG.CUTMIX.MIN_VISIBLE",
                "0.0",
            ],
        )
    message = str(error.value)
    assert "INPUT.AUG.MIXUP.PROB = 1.5: must be in [0, 1]" in message
    assert "INPUT.AUG.ROTATION.ANGLE" in message and "INPUT.AUG.CUTMIX.MIN_VISIBLE" in message


def test_training_with_every_augmentation(shapes_train, tmp_path, monkeypatch):
    """The plugin's Trainer trains a few iterations with every augmentation always on, with the
    loader of retinanet_plugin.data.build_train_loader."""
    from retinanet_plugin.engine import trainer as trainer_module

    calls = {name: 0 for name in ("build_train_loader", "mosaic", "mixup", "cutmix")}

    def counting(module, name):
        function = getattr(module, name)

        def counted(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)

    counting(trainer_module, "build_train_loader")
    for name in ("mosaic", "mixup", "cutmix"):
        counting(mixing, name)
    sections = {name: {"PROB": 1.0} for name in AUGMENTATIONS}
    sections["SCALE_CROP"]["SIZE"] = (128, 128)
    settings = {"DATASETS.TRAIN": (shapes_train,), "DATASETS.TEST": (), "OUTPUT_DIR": tmp_path}
    settings.update({"MODEL.RETINANET.NUM_CLASSES": 4, "SOLVER.IMS_PER_BATCH": 2})
    cfg = aug_cfg({**settings, "SOLVER.MAX_ITER": 2}, **sections)
    trainer = trainer_module.Trainer(cfg)
    trainer.train()
    assert trainer.iter == 2  # detectron2 counts up to MAX_ITER after the last step
    assert calls["build_train_loader"] == 1
    assert calls["mosaic"] >= 4 and calls["mixup"] >= 4 and calls["cutmix"] >= 4  # 2 x 2 images
    assert np.isfinite(trainer.storage.history("total_loss").latest())
