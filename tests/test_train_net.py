"""End to end through the command line: train_net.py (COCO and VOC datasets, checkpoint, resume,
COCOEvaluator, fine-tuning to other classes) and retinanet_plugin.cli.predict."""

import json
import os
import re
import shutil

import cv2
import numpy as np
import pytest
import torch
from train_runs import TINY, coco_args, predict, train_net

from conftest import keep_classes, pycocotools_ap


def copypaste_ap(log):
    """The metrics of detectron2's 'copypaste' evaluation summary."""
    header = re.search(r"copypaste: (AP,AP50.*)", log).group(1).split(",")
    values = re.search(r"copypaste: ([-\d.nan]+(?:,[-\d.nan]+)+)\s*$", log, re.M).group(1)
    return dict(zip(header, map(float, values.split(","))))


@pytest.fixture(scope="module")
def trained(shapes_dataset, tmp_path_factory):
    """A tiny model trained 4 iterations on the COCO shapes dataset: (output dir, log)."""
    output = tmp_path_factory.mktemp("trained")
    _, log = train_net(output, coco_args(shapes_dataset), "SOLVER.MAX_ITER", "4")
    return output, log


def test_train_writes_checkpoints_metrics_and_evaluates(trained):
    output, log = trained
    assert (output / "last_checkpoint").read_text() == "model_final.pth"
    checkpoint = torch.load(output / "model_final.pth", map_location="cpu", weights_only=True)
    assert checkpoint["iteration"] == 3
    assert checkpoint["model"]["head.cls_score.weight"].shape[0] == 9 * 4  # 4 shape classes
    assert "NUM_CLASSES set to 4" in log
    metrics = [json.loads(line) for line in (output / "metrics.json").read_text().splitlines()]
    losses = [m["loss_cls"] for m in metrics if "loss_cls" in m]
    # A short run logs every iteration (detectron2 alone would log only the last of the 4).
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(output))
    assert set(copypaste_ap(log)) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}


def test_resume_continues_from_the_checkpoint(trained, shapes_dataset, tmp_path):
    output = tmp_path / "run"
    shutil.copytree(trained[0], output)
    _, log = train_net(output, coco_args(shapes_dataset), "--resume", "SOLVER.MAX_ITER", "6")
    assert "Starting training from iteration 4" in log
    resumed = torch.load(output / "model_final.pth", map_location="cpu", weights_only=True)
    assert resumed["iteration"] == 5


def test_eval_only_reports_coco_metrics_per_category(trained, shapes_dataset, tmp_path):
    weights = str(trained[0] / "model_final.pth")
    _, log = train_net(tmp_path, coco_args(shapes_dataset), "--eval-only", "MODEL.WEIGHTS", weights)
    ap = copypaste_ap(log)
    assert "Per-category bbox AP" in log and "rectangle" in log
    results_file = tmp_path / "inference" / "shapes_val" / "coco_instances_results.json"
    results = json.loads(results_file.read_text())
    assert results and {"image_id", "category_id", "bbox", "score"} <= set(results[0])
    # The official pycocotools evaluation of those predictions gives the reported AP.
    reference = pycocotools_ap(shapes_dataset["val"][0], str(results_file))
    assert ap["AP"] == pytest.approx(reference, abs=1e-3)  # the log prints 4 decimals


def test_voc_dataset_trains_and_evaluates(voc_dataset, tmp_path):
    voc = [
        "--register-voc",
        "shapes_train",
        voc_dataset,
        "train",
        "--register-voc",
        "shapes_val",
        voc_dataset,
        "val",
    ]
    _, log = train_net(tmp_path, voc, "SOLVER.MAX_ITER", "2")
    ap = copypaste_ap(log)
    metrics = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    final_ap = [m for m in metrics if "bbox/AP" in m][-1]["bbox/AP"]
    assert ap["AP"] == pytest.approx(final_ap, abs=1e-3)
    assert "Per-category bbox AP" in log and "ellipse" in log


def test_num_classes_mismatch_is_an_error_before_training(shapes_dataset, tmp_path):
    code, log = train_net(
        tmp_path,
        coco_args(shapes_dataset),
        "MODEL.RETINANET.NUM_CLASSES",
        "3",
        "SOLVER.MAX_ITER",
        "2",
        expect_ok=False,
    )
    assert code != 0
    assert "NUM_CLASSES is 3, but dataset 'shapes_train' has 4 classes" in log
    assert "Starting training" not in log


def test_finetune_to_fewer_classes(trained, shapes_dataset, tmp_path):
    """A 4-class checkpoint fine-tunes on a 2-class dataset: compatible weights load, the
    classification layer is re-initialized, and the log names the skipped tensors."""
    two_classes = keep_classes(shapes_dataset["train"][0], str(tmp_path / "two.json"), {1, 2})
    dataset_args = coco_args(shapes_dataset, train_json=two_classes)
    dataset_args[-3:] = ["shapes_val", two_classes, shapes_dataset["train"][1]]
    weights = str(trained[0] / "model_final.pth")
    _, log = train_net(tmp_path, dataset_args, "MODEL.WEIGHTS", weights, "SOLVER.MAX_ITER", "2")
    assert "NUM_CLASSES set to 2" in log
    assert "Fine-tuning: skipped head.cls_score.weight, head.cls_score.bias" in log
    assert "re-initialized the classification layer with prior probability 0.01" in log
    model = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=True)
    base = torch.load(weights, map_location="cpu", weights_only=True)
    assert model["model"]["head.cls_score.weight"].shape[0] == 9 * 2
    # Everything else was loaded (then trained 2 iterations from there: close, not random).
    before, after = base["model"]["head.bbox_pred.weight"], model["model"]["head.bbox_pred.weight"]
    assert (after - before).abs().max() < 0.1 * before.abs().max()


def test_predict_skips_a_corrupt_file_and_writes_the_rest(trained, shapes_dataset, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    val_root = shapes_dataset["val"][1]
    for name in sorted(os.listdir(val_root))[:3]:
        shutil.copy(os.path.join(val_root, name), images / name)
    (images / "corrupt.jpg").write_bytes(b"not an image at all")
    output = tmp_path / "predictions"
    code, log = predict(
        str(images),
        str(output),
        trained,
        "--score-threshold",
        "0.0",
        "--batch-size",
        "2",
        *coco_args(shapes_dataset),
        expect_ok=False,
    )
    assert code == 1
    assert "corrupt.jpg" in log
    written = sorted(p.name for p in output.glob("*.png"))
    assert written == ["00001.png", "00002.png", "00003.png"]
    assert cv2.imread(str(output / "00001.png")).shape == (128, 128, 3)  # the image's size
    results = json.loads((output / "coco_results.json").read_text())
    assert results and {r["file_name"] for r in results} <= {str(images / n) for n in written}
    assert {r["category_id"] for r in results} <= {1, 2, 3, 4}  # the dataset's category ids


def test_predict_refuses_a_checkpoint_with_other_classes(trained, shapes_dataset, tmp_path):
    """A model of 80 classes, the checkpoint of 4: a clear error instead of predictions from a
    randomly initialized classifier, from the checkpoint's config or, if it is ignored, from
    its tensors."""
    eighty = ["MODEL.RETINANET.NUM_CLASSES", "80"]
    code, log = predict(shapes_dataset["val"][1], tmp_path, trained, *eighty, expect_ok=False)
    assert code == 2
    assert "MODEL.RETINANET.NUM_CLASSES is 80 here, 4 in the checkpoint" in log
    ignore = [*eighty, "--ignore-checkpoint-config"]
    code, log = predict(shapes_dataset["val"][1], tmp_path, trained, *ignore, expect_ok=False)
    assert code == 2
    assert "made for different numbers of classes" in log


def test_overwrite_replaces_an_earlier_run_and_its_metrics(trained, shapes_dataset, tmp_path):
    """--overwrite deletes the earlier run's checkpoints, metrics and events, so the new
    metrics.json holds only the new run's rows; the run's own files are then the new ones."""
    output = tmp_path / "run"
    shutil.copytree(trained[0], output)
    (output / "model_0000999.pth").write_bytes(b"an earlier run's checkpoint")
    old_events = [p.name for p in output.glob("events.out.tfevents.*")]
    _, log = train_net(output, coco_args(shapes_dataset), "--overwrite", "SOLVER.MAX_ITER", "2")
    assert "--overwrite: removed" in log and "model_0000999.pth" in log
    assert not (output / "model_0000999.pth").exists()
    assert not any((output / name).exists() for name in old_events)
    rows = [json.loads(line) for line in (output / "metrics.json").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "total_loss" in r] == [0, 1]
    final = torch.load(output / "model_final.pth", map_location="cpu", weights_only=True)
    assert final["iteration"] == 1
    mode = (output / "model_final.pth").stat().st_mode & 0o777
    assert mode == (output / "metrics.json").stat().st_mode & 0o777  # not mkstemp's 0600


def test_predict_summary_and_warning_when_nothing_passes_the_threshold(
    trained, shapes_dataset, tmp_path
):
    code, log = predict(
        shapes_dataset["val"][1],
        str(tmp_path),
        trained,
        "--score-threshold",
        "1.0",
        *coco_args(shapes_dataset),
    )
    assert re.search(r"Predicted 6 images: 0 detections with score >= 1, 0 images skipped", log)
    assert "No detection reached --score-threshold 1 (the highest score was 0." in log
    assert json.loads((tmp_path / "coco_results.json").read_text()) == []


def test_predict_in_tiles(trained, shapes_dataset, tmp_path):
    """--tile: 96 px tiles overlapping by half; detections in image coordinates, inside it."""
    args = ["--tile", "96", "--tile-overlap", "0.5", "--score-threshold", "0.0"]
    code, log = predict(
        shapes_dataset["val"][1], tmp_path, trained, *args, *coco_args(shapes_dataset)
    )
    assert "Predicting in 96 px tiles overlapping by 0.5" in log
    results = json.loads((tmp_path / "coco_results.json").read_text())
    assert results and {r["category_id"] for r in results} <= {1, 2, 3, 4}
    for r in results:
        x, y, w, h = r["bbox"]
        assert x >= 0 and y >= 0 and x + w <= 192 + 1e-3 and y + h <= 192 + 1e-3


def test_predict_on_an_image_only_coco_test_set(trained, shapes_dataset, tmp_path):
    """A COCO JSON with images and categories but no annotations registers for prediction; its
    category names and ids label the results."""
    val_json, val_root = shapes_dataset["val"]
    coco = json.loads(open(val_json).read())
    del coco["annotations"]
    image_only = tmp_path / "test_images.json"
    image_only.write_text(json.dumps(coco))
    code, log = predict(
        val_root,
        str(tmp_path / "out"),
        trained,
        "--score-threshold",
        "0.0",
        "--register-coco",
        "image_only_test",
        str(image_only),
        val_root,
    )
    results = json.loads((tmp_path / "out" / "coco_results.json").read_text())
    assert results
    assert {r["category_id"] for r in results} <= {c["id"] for c in coco["categories"]}


def test_predict_scales_16_bit_images(trained, shapes_dataset, tmp_path):
    """A 16-bit PNG is scaled to 8 bits (value / 257) rather than clipped at 255."""
    from PIL import Image

    from retinanet_plugin.data.images import read_image

    values = (np.arange(48 * 64, dtype=np.float64).reshape(48, 64) * 21).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode in ("I;16", "I")
    image = read_image(str(path), "BGR")
    assert image.shape == (48, 64, 3) and image.dtype == np.uint8
    expected = np.round(values / 257.0)
    assert np.array_equal(image[..., 0], expected) and np.array_equal(image[..., 2], expected)
    code, log = predict(str(path), str(tmp_path / "out"), trained, *coco_args(shapes_dataset))
    assert "Predicted 1 images" in log and (tmp_path / "out" / "deep.png").exists()


def test_predict_main_runs_twice_in_one_process_with_other_classes(shapes_dataset, tmp_path):
    """Without a dataset the class names are made up per run; a second run with another class
    count must not collide with the first's."""
    from conftest import plugin_cfg
    from detectron2.modeling import build_model
    from retinanet_plugin.cli import predict

    image = os.path.join(shapes_dataset["val"][1], sorted(os.listdir(shapes_dataset["val"][1]))[0])
    for num_classes in (2, 3):
        weights = tmp_path / f"weights{num_classes}.pth"
        cfg = plugin_cfg("retinanet_R18_GN_tiny.yaml", "MODEL.RETINANET.NUM_CLASSES", num_classes)
        torch.save({"model": build_model(cfg).state_dict()}, weights)
        status = predict.main(
            [
                "--config-file",
                TINY,
                "--input",
                image,
                "--output",
                str(tmp_path / f"o{num_classes}"),
                "MODEL.RETINANET.NUM_CLASSES",
                str(num_classes),
                "MODEL.WEIGHTS",
                str(weights),
            ]
        )
        assert status == 0
        assert (tmp_path / f"o{num_classes}" / "coco_results.json").exists()
