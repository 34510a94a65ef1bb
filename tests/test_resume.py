"""--resume after a kill: the run continues from the last complete checkpoint with the optimizer
and the learning-rate schedule where they were."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from test_train_net import FAST, REPO, TINY, coco_args, train_net


def _checkpoint(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("schedule", ["WarmupMultiStepLR", "WarmupCosineLR"])
def test_schedule_and_optimizer_state_are_restored(schedule, shapes_dataset, tmp_path):
    """Resumed at iteration 4 of 6, the final scheduler and optimizer state (LR, momentum/Adam
    step counts) equal those of an uninterrupted run: the schedule did not restart."""
    opts = [
        "SOLVER.LR_SCHEDULER_NAME", schedule, "SOLVER.STEPS", "(3,)", "SOLVER.WARMUP_ITERS", "2",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_net(straight, coco_args(shapes_dataset), *opts, "SOLVER.MAX_ITER", "6")
    train_net(resumed, coco_args(shapes_dataset), *opts, "SOLVER.MAX_ITER", "4")
    _, log = train_net(
        resumed, coco_args(shapes_dataset), "--resume", *opts, "SOLVER.MAX_ITER", "6"
    )
    assert "Starting training from iteration 4" in log
    a, b = (_checkpoint(d / "model_final.pth")["trainer"] for d in (straight, resumed))
    assert a["iteration"] == b["iteration"] == 5
    # The schedule (detectron2's LRMultiplier hook state) continued instead of restarting.
    scheduler_a, scheduler_b = a["hooks"]["LRScheduler"], b["hooks"]["LRScheduler"]
    assert scheduler_a == scheduler_b
    assert scheduler_b["last_epoch"] == 6
    # The optimizer state was saved and restored: AdamW's step counts are 6, not 6 - 4.
    optimizer_a, optimizer_b = a["_trainer"]["optimizer"], b["_trainer"]["optimizer"]
    assert [g["lr"] for g in optimizer_a["param_groups"]] == [
        g["lr"] for g in optimizer_b["param_groups"]
    ]
    steps_b = {float(s["step"]) for s in optimizer_b["state"].values()}
    assert steps_b == {float(s["step"]) for s in optimizer_a["state"].values()} == {6.0}


def test_sigkill_after_a_checkpoint_then_resume_reaches_the_end(shapes_dataset, tmp_path):
    command = [
        sys.executable, "train_net.py", "--config-file", TINY, *coco_args(shapes_dataset),
        "DATASETS.TRAIN", "('shapes_train',)", "DATASETS.TEST", "()", *FAST,
        "SOLVER.MAX_ITER", "40", "OUTPUT_DIR", str(tmp_path),
    ]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (tmp_path / "model_0000003.pth").exists() and proc.poll() is None:
        assert time.time() < deadline, "no checkpoint written"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-3000:]
    last = (tmp_path / "last_checkpoint").read_text()
    start = _checkpoint(tmp_path / last)["iteration"] + 1
    assert start < 40

    _, log = train_net(tmp_path, coco_args(shapes_dataset), "--resume", "SOLVER.MAX_ITER", "40",
                       "DATASETS.TEST", "()")
    assert f"Starting training from iteration {start}" in log
    assert _checkpoint(tmp_path / "model_final.pth")["iteration"] == 39
