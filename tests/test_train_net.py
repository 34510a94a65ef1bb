"""End to end through train_net.py: train, checkpoint, resume, evaluate with COCOEvaluator."""
import json
import os
import re
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_net(shapes_dataset, output_dir, *args):
    """Runs train_net.py on the generated dataset with the tiny config; returns its log text."""
    (train_json, train_root), (val_json, val_root) = shapes_dataset["train"], shapes_dataset["val"]
    command = [
        sys.executable, os.path.join(REPO, "train_net.py"),
        "--config-file", os.path.join(REPO, "configs", "retinanet_R18_GN_tiny.yaml"),
        "--register-coco", "shapes_train", train_json, train_root,
        "--register-coco", "shapes_val", val_json, val_root,
        *args,
        "DATASETS.TRAIN", "('shapes_train',)",
        "DATASETS.TEST", "('shapes_val',)",
        "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.CHECKPOINT_PERIOD", "2",
        "INPUT.MIN_SIZE_TRAIN", "(128,)",
        "INPUT.MAX_SIZE_TRAIN", "160",
        "INPUT.MIN_SIZE_TEST", "128",
        "INPUT.MAX_SIZE_TEST", "160",
        "DATALOADER.NUM_WORKERS", "0",
        "SEED", "1",
        "OUTPUT_DIR", str(output_dir),
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    return log


def copypaste_ap(log):
    """The AP line of detectron2's 'copypaste' evaluation summary."""
    header = re.search(r"copypaste: (AP,AP50.*)", log).group(1).split(",")
    values = re.search(r"copypaste: ([-\d.nan]+(?:,[-\d.nan]+)+)\s*$", log, re.M).group(1)
    return dict(zip(header, map(float, values.split(","))))


def test_train_resume_and_evaluate(shapes_dataset, tmp_path):
    """Trains 4 iterations, resumes to 6 from the checkpoint, then evaluates the final model."""
    output = tmp_path / "run"
    log = train_net(shapes_dataset, output, "SOLVER.MAX_ITER", "4")
    assert (output / "model_final.pth").is_file()
    assert (output / "last_checkpoint").read_text() == "model_final.pth"
    metrics = [json.loads(line) for line in (output / "metrics.json").read_text().splitlines()]
    losses = [m["loss_cls"] for m in metrics if "loss_cls" in m]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert "Evaluation results for bbox" in log  # evaluated after training

    checkpoint = torch.load(output / "model_final.pth", map_location="cpu", weights_only=True)
    assert checkpoint["iteration"] == 3
    assert "head.cls_score.weight" in checkpoint["model"]

    log = train_net(shapes_dataset, output, "--resume", "SOLVER.MAX_ITER", "6")
    assert "Starting training from iteration 4" in log
    resumed = torch.load(output / "model_final.pth", map_location="cpu", weights_only=True)
    assert resumed["iteration"] == 5

    log = train_net(
        shapes_dataset, output, "--eval-only", "MODEL.WEIGHTS", str(output / "model_final.pth")
    )
    ap = copypaste_ap(log)
    assert set(ap) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert 0.0 <= ap["AP"] <= 100.0
    assert "Per-category bbox AP" in log
    results = json.loads(
        (output / "inference" / "shapes_val" / "coco_instances_results.json").read_text()
    )
    assert results and {"image_id", "category_id", "bbox", "score"} <= set(results[0])
