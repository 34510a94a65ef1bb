"""retinanet_plugin.cli.predict: which files it reads, where it draws them, and what it replaces."""

import json
import os
import shutil

import pytest
import torch
from PIL import Image

from conftest import TINY, plugin_cfg, run_main
from detectron2.modeling import build_model
from retinanet_plugin.cli import predict
from retinanet_plugin.cli.predict_files import PredictError, find_images, picture_names

SMALL = ["INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64"]
# The untrained model scores about 0.01 (the prior): every image gets detections.
SMALL += ["MODEL.RETINANET.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "3"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """An untrained tiny model's checkpoint."""
    path = tmp_path_factory.mktemp("weights") / "model.pth"
    torch.save({"model": build_model(plugin_cfg("retinanet_R18_GN_tiny.yaml")).state_dict()}, path)
    return str(path)


def run_predict(weights, output, *inputs, extra=()):
    argv = ["--config-file", TINY, "--output", str(output), "--score-threshold", "0"]
    for item in inputs:
        argv += ["--input", str(item)]
    return run_main(predict.main, [*argv, *extra, *SMALL, "MODEL.WEIGHTS", weights])


def photo_tree(root, shapes_dataset):
    """photos/a.jpg, a.png, notes.txt, sub/b.png, sub/deeper/c.jpeg (the shapes' images)."""
    val_root = shapes_dataset["val"][1]
    sources = [os.path.join(val_root, n) for n in sorted(os.listdir(val_root))]
    photos = root / "photos"
    (photos / "sub" / "deeper").mkdir(parents=True)
    for source, name in zip(sources, ["a.jpg", "a.png", "sub/b.png", "sub/deeper/c.jpeg"]):
        Image.open(source).convert("RGB").save(photos / name)
    (photos / "notes.txt").write_text("not an image")
    return photos


def test_picture_names_mirror_the_inputs_under_their_common_folder(tmp_path):
    files = [
        ("in/a.jpg", "in"),
        ("in/a.png", "in"),
        ("in/sub/A.TIF", "in"),
        ("more/x.PNG", "more"),
    ]
    assert picture_names(files) == ["in/a.jpg.png", "in/a.png", "in/sub/A.TIF.png", "more/x.PNG"]
    assert picture_names(files[:3]) == ["a.jpg.png", "a.png", "sub/A.TIF.png"]
    with pytest.raises(PredictError, match="in/a.jpg and in/a.JPG.png would both be drawn"):
        picture_names([("in/a.jpg", "in"), ("in/a.JPG.png", "in")])


def test_find_images_recurses_and_counts_what_it_leaves_out(tmp_path, shapes_dataset, caplog):
    photos = photo_tree(tmp_path, shapes_dataset)
    other = tmp_path / "other.bmp"
    other.write_bytes(b"")
    with caplog.at_level("INFO", logger="retinanet_plugin.cli.predict_files"):
        files, folders = find_images([str(photos), str(other), str(photos / "a.png")])
    names = ["a.jpg", "a.png", "sub/b.png", "sub/deeper/c.jpeg"]
    assert files == [(str(photos / n), str(photos)) for n in names] + [(str(other), str(tmp_path))]
    assert folders == [str(photos)]
    assert "Left out 1 file(s) in the --input folders that are not images" in caplog.text


def test_predict_draws_every_image_of_the_tree_and_lists_its_run(weights, tmp_path, shapes_dataset):
    photos = photo_tree(tmp_path, shapes_dataset)
    before = {p: p.read_bytes() for p in photos.rglob("*") if p.is_file()}
    output = tmp_path / "out"
    status, log = run_predict(weights, output, photos)
    assert status == 0, log[-3000:]
    drawn = sorted(str(p.relative_to(output)) for p in output.rglob("*.png"))
    assert drawn == ["a.jpg.png", "a.png", "sub/b.png", "sub/deeper/c.jpeg.png"]
    results = json.loads((output / "coco_results.json").read_text())
    assert {r["file_name"] for r in results} == {
        str(photos / n) for n in ("a.jpg", "a.png", "sub/b.png", "sub/deeper/c.jpeg")
    }
    run = json.loads((output / "predict_run.json").read_text())
    assert sorted(run["files"]) == sorted(["predict_run.json", "coco_results.json", *drawn])
    assert {p: p.read_bytes() for p in photos.rglob("*") if p.is_file()} == before


def test_overwrite_deletes_the_earlier_runs_files_only(weights, tmp_path, shapes_dataset):
    photos = photo_tree(tmp_path, shapes_dataset)
    output = tmp_path / "out"
    assert run_predict(weights, output, photos)[0] == 0
    (output / "mine.txt").write_text("the user's own file")
    status, log = run_predict(weights, output, photos / "a.png")
    assert status == 2 and "holds an earlier predict run" in log
    status, log = run_predict(weights, output, photos / "a.png", extra=["--overwrite"])
    assert status == 0, log[-3000:]
    assert "--overwrite: removed the 6 file(s) of the earlier predict run" in log
    left = sorted(str(p.relative_to(output)) for p in output.rglob("*"))
    assert left == ["a.png", "coco_results.json", "mine.txt", "predict_run.json"]
    results = json.loads((output / "coco_results.json").read_text())
    assert {r["file_name"] for r in results} == {str(photos / "a.png")}


def test_a_broken_photo_in_a_folder_is_skipped_and_named(weights, tmp_path, shapes_dataset):
    photos = photo_tree(tmp_path, shapes_dataset)
    good = (photos / "a.png").read_bytes()
    (photos / "sub" / "cut.png").write_bytes(good[: len(good) // 2])  # truncated
    status, log = run_predict(weights, tmp_path / "out", photos)
    assert status == 1
    assert "1 file(s) could not be read: " + str(photos / "sub" / "cut.png") in log
    assert "Predicted 4 images" in log and "1 images skipped" in log
    assert not (tmp_path / "out" / "sub" / "cut.png").exists()


def test_output_beside_an_input_file_is_fine(weights, tmp_path, shapes_dataset):
    """An input file's own folder may hold the output folder (only the folder itself, or an
    input folder, is refused)."""
    source = os.path.join(shapes_dataset["val"][1], "00001.png")
    shutil.copy(source, tmp_path / "photo.png")
    status, log = run_predict(weights, tmp_path / "out", tmp_path / "photo.png")
    assert status == 0, log[-3000:]
    assert (tmp_path / "out" / "photo.png").is_file()


def test_an_image_over_pils_pixel_limit_is_predicted_in_tiles(
    weights, tmp_path, shapes_dataset, monkeypatch
):
    """PIL refuses images of more than twice its MAX_IMAGE_PIXELS (a 14000x14000 aerial photo)
    as decompression bombs; predict --tile reads them anyway. The limit is lowered here so that
    a 128x128 image is over it."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    photo = os.path.join(shapes_dataset["val"][1], "00001.png")
    with pytest.raises(Image.DecompressionBombError):
        Image.open(photo)
    status, log = run_predict(weights, tmp_path / "out", photo, extra=["--tile", "64"])
    assert status == 0, log[-3000:]
    assert "Predicted 1 images" in log
    results = json.loads((tmp_path / "out" / "coco_results.json").read_text())
    assert results and all(r["file_name"] == photo for r in results)
    assert all(
        x >= 0 and y >= 0 and x + w <= 128.01 and y + h <= 128.01
        for r in results
        for x, y, w, h in [r["bbox"]]
    )
