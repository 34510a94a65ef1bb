"""Reading images: one reader for training and prediction (detectron2's pixels for 8-bit
images, 16-bit images scaled, EXIF orientation applied, large images read), and one clear
error naming an unreadable file."""

import json
import logging
import shutil
import zlib

import numpy as np
import PIL
import pytest
from PIL import Image

from conftest import plugin_cfg, warnings_of
from detectron2.data import DatasetCatalog
from detectron2.data.detection_utils import read_image as detectron2_read_image
from retinanet_plugin.data import build_train_mapper, register_coco_dataset
from retinanet_plugin.data.images import ImageMapper, ImageReadError, image_size, read_image

ORIENTATIONS = range(1, 9)


def exif_jpeg(path, pixels: np.ndarray, orientation: int) -> str:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    return str(path)


@pytest.fixture(scope="module")
def pixels():
    """(48, 80, 3) random uint8 pixels: not square, so that a turn shows in the shape."""
    return np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_8_bit_images_read_as_detectron2_reads_them(pixels, tmp_path, orientation):
    path = exif_jpeg(tmp_path / "a.jpg", pixels, orientation)
    for format in ("BGR", "RGB", "L"):
        expected = detectron2_read_image(path, format)
        assert np.array_equal(read_image(path, format), expected), format
    height, width = expected.shape[:2]
    assert image_size(path) == (width, height, orientation)
    turned = orientation in (5, 6, 7, 8)
    assert (width, height) == ((48, 80) if turned else (80, 48))


def test_training_reads_16_bit_pngs_as_predict_does(shapes_dataset, tmp_path):
    """The arrays the training (and evaluation) loader's mapper gives the model are predict's,
    for a 16-bit PNG (which detectron2's reader would clip at 255)."""
    from retinanet_plugin.cli import predict_outputs

    assert predict_outputs.read_image is read_image
    values = (np.arange(64 * 96, dtype=np.int64).reshape(64, 96) * 10).astype(np.uint16)
    path = str(tmp_path / "deep.png")
    Image.fromarray(values).save(path)
    expected = np.round(values / 257.0).astype(np.uint8)  # 0-65535 onto 0-255
    assert not np.array_equal(detectron2_read_image(path, "BGR")[..., 0], expected)
    predicted = read_image(path, "BGR")
    assert np.array_equal(predicted, np.repeat(expected[..., None], 3, axis=2))

    # No resize (shortest edge already 64) and no flip: the mapper's image is the file's.
    cfg = plugin_cfg(
        "retinanet_R18_GN_tiny.yaml",
        "INPUT.MIN_SIZE_TRAIN",
        (64,),
        "INPUT.MIN_SIZE_TEST",
        64,
        "INPUT.MAX_SIZE_TRAIN",
        1000,
        "INPUT.RANDOM_FLIP",
        "none",
    )
    record = {
        "file_name": path,
        "image_id": 0,
        "height": 64,
        "width": 96,
        "annotations": [{"bbox": [10, 10, 20, 20], "bbox_mode": 0, "category_id": 0}],
    }
    trained = build_train_mapper(cfg)(record)["image"].numpy().transpose(1, 2, 0)
    assert np.array_equal(trained, predicted)
    # The evaluation loader's mapper (train_net's Trainer.build_test_loader) too.
    evaluated = ImageMapper(cfg, is_train=False)(record)["image"].numpy().transpose(1, 2, 0)
    assert np.array_equal(evaluated, predicted)


def _two_tone_png(path, width: int, height: int) -> str:
    """A black-and-white (1 bit per pixel) PNG, white in the first 1000 columns, written directly
    (zlib) so that a 14000x14000 file takes a fraction of a second."""
    row = b"\x00" + b"\xff" * 125 + bytes(width // 8 - 125)  # filter byte 0, then 8 pixels/byte
    compressor = zlib.compressobj(1)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body).to_bytes(4, "big")
        return len(body).to_bytes(4, "big") + kind + body + crc

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([1, 0, 0, 0, 0])
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data))
        f.write(chunk(b"IEND", b""))
    return str(path)


def test_images_over_pils_limit_are_read_without_changing_it(tmp_path):
    """A 14000x14000 aerial image (more than twice PIL's MAX_IMAGE_PIXELS, which PIL refuses
    as a possible decompression bomb) is read; PIL's global limit stays as it was."""
    limit = PIL.Image.MAX_IMAGE_PIXELS
    path = _two_tone_png(tmp_path / "aerial.png", 14000, 14000)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)
    assert image_size(path) == (14000, 14000, 1)
    image = read_image(path, "L")
    assert image.shape == (14000, 14000, 1)
    assert image[::1000, 999, 0].tolist() == [255] * 14
    assert image[::1000, 1000, 0].tolist() == [0] * 14
    assert PIL.Image.MAX_IMAGE_PIXELS == limit


def test_the_readers_own_limit_names_the_file(tmp_path):
    path = str(tmp_path / "big.png")
    Image.new("L", (300, 200)).save(path)
    message = f"{path}: 300x200 = 60000 pixels, more than the 50000 the plugin reads"
    with pytest.raises(ImageReadError, match=message):
        read_image(path, "BGR", max_pixels=50000)
    assert read_image(path, "BGR", max_pixels=60000).shape == (200, 300, 3)


def _truncated(path):
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), np.uint8)).save(path)
    with open(path, "rb") as f:
        content = f.read()
    with open(path, "wb") as f:
        f.write(content[: len(content) // 2])


@pytest.mark.parametrize(
    "kind, make, message",
    [
        (
            "empty",
            lambda p: open(p, "wb").close(),
            "not an image file PIL can read \\(the file is empty",
        ),
        (
            "text",
            lambda p: open(p, "w").write("<html>"),
            "not an image file PIL can read \\(not in an image",
        ),
        ("truncated", _truncated, "cannot decode the image, it is corrupt or truncated"),
        ("missing", lambda p: None, "cannot open the image file \\(No such file"),
    ],
)
def test_unreadable_files_raise_one_error_naming_the_file(tmp_path, kind, make, message):
    """An ImageReadError is an OSError, as PIL's errors are: the training loader skips such an
    image with a warning naming it (see test_dataset_validation)."""
    path = str(tmp_path / f"{kind}.png")
    make(path)
    with pytest.raises(ImageReadError, match=f"^{path}: {message}") as error:
        read_image(path, "BGR")
    assert isinstance(error.value, OSError) and "\n" not in str(error.value)


def test_exif_turned_images_keep_their_boxes_and_are_counted(shapes_dataset, tmp_path, request):
    """An image turned by its EXIF orientation, annotated as shown (the turned size): its size is
    the turned one, no box is dropped or clipped, and the log counts the image."""
    json_file, image_root = shapes_dataset["train"]
    root = tmp_path / "images"
    shutil.copytree(image_root, root)
    with open(json_file) as f:
        data = json.load(f)
    image = data["images"][0]
    # Stored 128 wide x 64 high, shown 64 wide x 128 high; the boxes lie in the shown image.
    stored = np.zeros((64, 128, 3), np.uint8)
    exif_jpeg(root / "turned.jpg", stored, 6)
    image.update(file_name="turned.jpg", width=64, height=128)
    boxes = [[4.0, 70.0, 50.0, 50.0], [10.0, 10.0, 40.0, 20.0]]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != image["id"]]
    for number, box in enumerate(boxes):
        data["annotations"].append(
            dict(id=10000 + number, image_id=image["id"], category_id=1, bbox=box, iscrowd=0)
        )
    (tmp_path / "a.json").write_text(json.dumps(data))
    name = f"exif_{request.node.name}"
    register_coco_dataset(name, str(tmp_path / "a.json"), str(root))
    with warnings_of("retinanet_plugin.data.validation", logging.INFO) as messages:
        dicts = DatasetCatalog.get(name)
    record = next(d for d in dicts if d["image_id"] == image["id"])
    assert (record["width"], record["height"]) == (64, 128)
    assert [a["bbox"] for a in record["annotations"]] == boxes
    assert read_image(record["file_name"], "BGR").shape == (128, 64, 3)
    assert not any("outside their image" in m or "another width/height" in m for m in messages)
    assert any("1 of 16 images carry an EXIF orientation" in m for m in messages), messages
