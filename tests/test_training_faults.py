"""Training faults: a NaN loss, an unwritable output directory, a full disk at checkpoint time."""

import errno
import os
import re

import pytest
import torch
from train_runs import coco_args, train_net

from retinanet_plugin.checkpoint.checkpointer import CheckpointWriteError, RetinaNetCheckpointer

# A valid but absurd pixel std: inputs of ~1e32 overflow the first convolution, so the loss is
# infinite or NaN at once (also on --resume, which restores the optimizer's learning rate).
DIVERGING = ["MODEL.PIXEL_STD", "[1e-30, 1e-30, 1e-30]"]


def test_nan_loss_stops_with_iteration_loss_terms_and_resumable_checkpoint(
    shapes_dataset, tmp_path
):
    train_net(tmp_path, coco_args(shapes_dataset), "SOLVER.MAX_ITER", "4")
    code, log = train_net(
        tmp_path,
        coco_args(shapes_dataset),
        "--resume",
        "SOLVER.MAX_ITER",
        "8",
        *DIVERGING,
        expect_ok=False,
    )
    assert code == 2
    assert "Loss became infinite or NaN at iteration=4!" in log, log[-3000:]
    assert "loss_cls" in log and "loss_box_reg" in log
    last = tmp_path / "model_final.pth"  # what --resume started from
    assert f"The last checkpoint of this run, safe to resume from with --resume, is {last}." in log
    checkpoint = torch.load(last, weights_only=True)
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values())


def test_nan_loss_before_any_checkpoint_says_so(shapes_dataset, tmp_path):
    code, log = train_net(
        tmp_path, coco_args(shapes_dataset), "SOLVER.MAX_ITER", "4", *DIVERGING, expect_ok=False
    )
    assert code == 2
    assert "Loss became infinite or NaN at iteration=0!" in log, log[-3000:]
    assert "This run wrote no checkpoint before it." in log


def test_unwritable_output_dir_fails_before_training(shapes_dataset, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    code, log = train_net(
        blocker / "out", coco_args(shapes_dataset), "SOLVER.MAX_ITER", "2", expect_ok=False
    )
    assert code != 0
    assert f"Output directory {blocker / 'out'} is not writable" in log
    assert "Starting training" not in log


def _checkpointer(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return RetinaNetCheckpointer(model, str(tmp_path), optimizer=optimizer)


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    checkpointer = _checkpointer(tmp_path)
    checkpointer.save("model_0000001", iteration=1)
    previous = torch.load(tmp_path / "model_0000001.pth", weights_only=True)

    def full_disk(data, f):
        f.write(b"partial checkpoint bytes")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    with torch.no_grad():
        checkpointer.model.weight.add_(1.0)
    message = f"previous checkpoint {tmp_path / 'model_0000001.pth'} is intact"
    with pytest.raises(CheckpointWriteError, match=re.escape(message)):
        checkpointer.save("model_0000002", iteration=2)
    monkeypatch.undo()

    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]
    assert checkpointer.get_checkpoint_file() == str(tmp_path / "model_0000001.pth")
    resumed = _checkpointer(tmp_path)
    assert resumed.resume_or_load("", resume=True)["iteration"] == 1
    torch.testing.assert_close(resumed.model.state_dict(), previous["model"])


def test_checkpoint_and_pointer_are_written_complete(tmp_path):
    checkpointer = _checkpointer(tmp_path)
    checkpointer.save("model_0000003", iteration=3)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000003.pth"
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000003.pth"]
    assert torch.load(tmp_path / "model_0000003.pth", weights_only=True)["iteration"] == 3
