"""retinanet_plugin.cli.predict: which files it reads (images, videos), what it writes for them
(pictures, videos, results with dataset ids, per-image JSON, YOLO labels), what it replaces."""

import json
import os
import shutil

import pytest
import torch
from PIL import Image

from conftest import TINY, plugin_cfg, run_main
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from retinanet_plugin.cli import predict
from retinanet_plugin.cli.predict_files import PredictError, find_images, picture_names
from retinanet_plugin.cli.predict_outputs import DrawingOptions, detection_labels, yolo_lines
from retinanet_plugin.data.synthetic_shapes import SHAPE_CLASSES

SMALL = ["INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64"]
# The untrained model scores about 0.01 (the prior): every image gets detections.
SMALL += ["MODEL.RETINANET.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "3"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """An untrained tiny model's checkpoint."""
    path = tmp_path_factory.mktemp("weights") / "model.pth"
    torch.manual_seed(0)
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


def test_yolo_lines_are_the_normalized_center_and_size():
    """Hand-computed: a 200x100 image, box x 20-60, y 10-50, class 2."""
    instances = Instances((100, 200))
    instances.pred_boxes = Boxes(torch.tensor([[20.0, 10.0, 60.0, 50.0]]))
    instances.scores = torch.tensor([0.875])
    instances.pred_classes = torch.tensor([2])
    assert yolo_lines(instances) == ["2 0.200000 0.300000 0.200000 0.400000"]
    names = ["a", "b", "circle"]
    labels = [
        detection_labels(instances, names, DrawingOptions(hide_labels=labels, hide_scores=scores))
        for labels, scores in [(False, False), (True, False), (False, True), (True, True)]
    ]
    assert labels == [["circle 88%"], ["88%"], ["circle"], None]


def test_per_image_json_yolo_txt_and_pictures_at_the_images_size(weights, tmp_path, shapes_dataset):
    photos = photo_tree(tmp_path, shapes_dataset)
    (photos / "a.png").unlink()  # its YOLO labels would be a.txt, as a.jpg's
    output = tmp_path / "out"
    extra = ["--per-image-json", "--yolo-txt", "--hide-scores"]
    status, log = run_predict(weights, output, photos, extra=extra)
    assert status == 0, log[-3000:]
    results = json.loads((output / "coco_results.json").read_text())
    assert len(results) > 6  # up to 3 per image
    assert all(r["category_name"] == f"class_{r['category_id']}" for r in results)
    for name in ("a.jpg", "sub/b.png", "sub/deeper/c.jpeg"):
        path = str(photos / name)
        picture = output / (name if name.endswith(".png") else name + ".png")
        assert Image.open(picture).size == Image.open(path).size == (128, 128)
        own = [r for r in results if r["file_name"] == path]
        record = json.loads((output / (name + ".json")).read_text())
        assert record["file_name"] == path and (record["height"], record["width"]) == (128, 128)
        fields = ("bbox", "score", "category_id", "category_name")
        assert record["detections"] == [{k: r[k] for k in fields} for r in own]
        lines = (output / (os.path.splitext(name)[0] + ".txt")).read_text().splitlines()
        assert len(lines) == len(own) > 0
        for line, record in zip(lines, own):
            class_id, *box = line.split()
            x, y, w, h = record["bbox"]
            assert int(class_id) == record["category_id"]
            expected = [(x + w / 2) / 128, (y + h / 2) / 128, w / 128, h / 128]
            assert [float(v) for v in box] == pytest.approx(expected, abs=1e-6)
    assert (output / "classes.txt").read_text() == "".join(f"class_{i}\n" for i in range(80))
    run = json.loads((output / "predict_run.json").read_text())["files"]
    assert sorted(run) == sorted(str(p.relative_to(output)) for p in output.rglob("*.*"))


def test_yolo_labels_of_two_images_of_one_name_are_refused(weights, tmp_path, shapes_dataset):
    photos = photo_tree(tmp_path, shapes_dataset)
    status, log = run_predict(weights, tmp_path / "out", photos, extra=["--yolo-txt"])
    assert status == 2 and "a.jpg and" in log and "a.png would both be written as a.txt" in log
    assert not (tmp_path / "out").exists()


def test_max_picture_size_scales_pictures_down(weights, tmp_path, shapes_dataset):
    photo = os.path.join(shapes_dataset["val"][1], "00001.png")
    status, log = run_predict(weights, tmp_path / "out", photo, extra=["--max-picture-size", "64"])
    assert status == 0, log[-3000:]
    assert Image.open(tmp_path / "out" / "00001.png").size == (64, 64)


def test_results_of_a_registered_datasets_images_go_into_pycocotools(tmp_path, shapes_dataset):
    """Predicting the images of a registered COCO dataset gives its image and category ids: the
    file loads in pycocotools as it is, and gives the AP and the records of detectron2's own
    evaluation (its test loader and COCOEvaluator with pycocotools) with the same weights."""
    from conftest import pycocotools_ap
    from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader
    from detectron2.data.datasets import register_coco_instances
    from detectron2.evaluation import COCOEvaluator, inference_on_dataset

    val_json, val_root = shapes_dataset["val"]
    opts = [*SMALL, "TEST.DETECTIONS_PER_IMAGE", "100", "MODEL.RETINANET.NUM_CLASSES", "4"]
    cfg = plugin_cfg("retinanet_R18_GN_tiny.yaml", *opts)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    weights = str(tmp_path / "model.pth")
    torch.save({"model": model.state_dict()}, weights)
    argv = ["--config-file", TINY, "--input", val_root, "--output", tmp_path / "out"]
    argv += ["--register-coco", "pred_val", val_json, val_root, "--score-threshold", "0"]
    status, log = run_main(predict.main, [*argv, *opts, "MODEL.WEIGHTS", weights])
    assert status == 0, log[-3000:]
    assert "All 6 inputs are images of the dataset pred_val" in log
    results_file = str(tmp_path / "out" / "coco_results.json")
    predicted = json.loads(open(results_file).read())

    register_coco_instances("d2_val", {}, val_json, val_root)
    try:
        evaluator = COCOEvaluator(
            "d2_val", distributed=False, output_dir=str(tmp_path / "d2"), use_fast_impl=False
        )
        loader = build_detection_test_loader(cfg, "d2_val")
        with torch.no_grad():
            ap = inference_on_dataset(model, loader, evaluator)["bbox"]["AP"]
    finally:
        DatasetCatalog.remove("d2_val")
        MetadataCatalog.remove("d2_val")
    expected = json.loads((tmp_path / "d2" / "coco_instances_results.json").read_text())
    assert len(predicted) == len(expected) > 500  # up to 100 per image

    def key(record):
        return record["image_id"], -record["score"]

    for ours, theirs in zip(sorted(predicted, key=key), sorted(expected, key=key)):
        assert (ours["image_id"], ours["category_id"]) == (
            theirs["image_id"],
            theirs["category_id"],
        )
        assert ours["bbox"] == pytest.approx(theirs["bbox"], abs=1e-3)
        assert ours["score"] == pytest.approx(theirs["score"], abs=1e-5)
        assert ours["category_name"] == SHAPE_CLASSES[ours["category_id"] - 1]
    assert ap > 0 and pycocotools_ap(val_json, results_file) == pytest.approx(ap, abs=1e-6)


def _write_video(path, frames, fps=5.0):
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (128, 128))
    for frame in frames:
        writer.write(frame)
    writer.release()


def _decoded_frames(path):
    import cv2

    capture, frames = cv2.VideoCapture(str(path)), []
    while True:
        ok, frame = capture.read()
        if not ok:
            return frames
        frames.append(frame)


def test_a_video_is_predicted_frame_by_frame_as_its_frames_are_as_images(
    weights, tmp_path, shapes_dataset
):
    """The detections of each frame of a video are those of the same (decoded) frame given as
    an image file, and the annotated video has every frame at the input's size."""
    import cv2

    val_root = shapes_dataset["val"][1]
    shapes = [cv2.imread(os.path.join(val_root, n)) for n in sorted(os.listdir(val_root))[:5]]
    (tmp_path / "clips").mkdir()
    video = tmp_path / "clips" / "clip.avi"
    _write_video(video, shapes)
    decoded = _decoded_frames(video)
    assert len(decoded) == 5
    (tmp_path / "frames").mkdir()
    for index, frame in enumerate(decoded):
        cv2.imwrite(str(tmp_path / "frames" / f"{index}.png"), frame)
    output = tmp_path / "out"
    inputs = [tmp_path / "clips", tmp_path / "frames"]
    status, log = run_predict(weights, output, *inputs, extra=["--per-image-json"])
    assert status == 0, log[-3000:]
    assert "Predicted 5 images and 1 videos (5 frames)" in log
    annotated = _decoded_frames(output / "clips" / "clip.avi.mp4")
    assert len(annotated) == 5 and all(f.shape == (128, 128, 3) for f in annotated)
    results = json.loads((output / "coco_results.json").read_text())
    assert sorted({r["image_id"] for r in results}) == list(range(10))
    per_video = json.loads((output / "clips" / "clip.avi.json").read_text())
    assert [f["frame"] for f in per_video["frames"]] == list(range(5))
    fields = ("bbox", "score", "category_id", "category_name")
    for index in range(5):
        of_frame = [r for r in results if r["file_name"] == str(video) and r["frame"] == index]
        of_image = [
            r for r in results if r["file_name"] == str(tmp_path / "frames" / f"{index}.png")
        ]
        assert len(of_frame) == len(of_image) > 0
        # The run counts the video's frames, then the images.
        assert {r["image_id"] for r in of_frame} == {index}
        assert {r["image_id"] for r in of_image} == {5 + index}
        assert per_video["frames"][index]["detections"] == [
            {k: r[k] for k in fields} for r in of_frame
        ]
        for frame_record, image_record in zip(of_frame, of_image):
            assert frame_record["bbox"] == pytest.approx(image_record["bbox"], abs=1e-3)
            assert frame_record["score"] == pytest.approx(image_record["score"], abs=1e-5)
            assert frame_record["category_id"] == image_record["category_id"]
