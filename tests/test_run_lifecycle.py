"""A run's output folder over its life: what --overwrite removes, what --eval-only records, the
leftovers of a killed run, the space a checkpoint needs, and a checkpoint write that fails (full
disk) or is interrupted (Ctrl-C)."""

import json
import os
import shutil
import tempfile

import pytest
import torch
import yaml
from train_runs import coco_args, run, train_net, train_net_argv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def finished(shapes_dataset, tmp_path_factory):
    """A run of 2 iterations, evaluated on the val split: its OUTPUT_DIR."""
    output = tmp_path_factory.mktemp("finished")
    train_net(output, coco_args(shapes_dataset), "SOLVER.MAX_ITER", "2")
    assert (output / "inference" / "shapes_val" / "coco_instances_results.json").exists()
    return output


def _copy(finished, tmp_path):
    output = tmp_path / "run"
    shutil.copytree(finished, output)
    return output


def _leftover(directory, target):
    """The temporary file atomic_write leaves when killed while writing ``target``."""
    fd, path = tempfile.mkstemp(prefix=f".{target}.", suffix=".tmp", dir=directory)
    os.write(fd, b"half a checkpoint")
    os.close(fd)
    return os.path.basename(path)


def test_overwrite_removes_everything_the_earlier_run_wrote(finished, shapes_dataset, tmp_path):
    output = _copy(finished, tmp_path)
    (output / "inference" / "old_results.json").write_text("[]")
    with open(output / "log.txt", "a") as f:
        f.write("a line of the earlier run\n")
    (output / "notes.txt").write_text("the user's own file")
    earlier = {
        os.path.relpath(os.path.join(folder, name), output)
        for folder, _, names in os.walk(output)
        for name in names
    } - {"notes.txt", ".train_net.lock"}
    assert {"config.yaml", "log.txt", "metrics.json", "last_checkpoint"} <= earlier

    _, log = train_net(output, coco_args(shapes_dataset), "--overwrite", "SOLVER.MAX_ITER", "1")

    assert f"--overwrite: removed {len(earlier)} file(s) of the earlier run in {output}" in log
    assert not (output / "inference" / "old_results.json").exists()
    assert "a line of the earlier run" not in (output / "log.txt").read_text()
    assert (output / "notes.txt").read_text() == "the user's own file"
    rows = [json.loads(line) for line in (output / "metrics.json").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "total_loss" in r] == [0]


def test_eval_only_keeps_the_training_runs_config(finished, shapes_dataset, tmp_path):
    output = _copy(finished, tmp_path)
    config, log_txt = (output / "config.yaml").read_bytes(), (output / "log.txt").read_bytes()
    weights = str(output / "model_final.pth")
    argv = train_net_argv(
        output, coco_args(shapes_dataset), "--eval-only", "MODEL.WEIGHTS", weights
    )
    run("train_net.py", *argv)
    assert (output / "config.yaml").read_bytes() == config
    assert (output / "log.txt").read_bytes() == log_txt
    evaluation = yaml.safe_load((output / "inference" / "config.yaml").read_text())
    assert evaluation["MODEL"]["WEIGHTS"] == weights
    assert yaml.safe_load(config)["MODEL"]["WEIGHTS"] == ""
    assert "Evaluation results for bbox" in (output / "inference" / "log.txt").read_text()


def test_a_killed_writes_temporary_files_are_removed_at_the_next_start(
    finished, shapes_dataset, tmp_path
):
    output = _copy(finished, tmp_path)
    leftover = _leftover(output, "model_0000003.pth")
    (output / ".notes.tmp").write_text("not the plugin's")
    (output / "model.tmp").write_text("not the plugin's")
    _, log = train_net(output, coco_args(shapes_dataset), "--resume", "SOLVER.MAX_ITER", "2")
    assert f"Removed 1 temporary file(s) of writes that an earlier run in {output}" in log
    assert leftover in log and not (output / leftover).exists()
    assert (output / ".notes.tmp").exists() and (output / "model.tmp").exists()


def test_start_checks_room_for_a_checkpoint_with_adamw_state(shapes_dataset, tmp_path, monkeypatch):
    """The room asked for at the start covers the real checkpoint (weights and AdamW's two
    moments): with 1 byte less free space than the checkpoint a run takes, it is refused."""
    adamw = ("SOLVER.OPTIMIZER", "AdamW", "SOLVER.BASE_LR", "0.0001", "SOLVER.MAX_ITER", "1")
    train_net(tmp_path / "a", coco_args(shapes_dataset), *adamw)
    size = (tmp_path / "a" / "model_final.pth").stat().st_size
    weights = torch.load(tmp_path / "a" / "model_final.pth", weights_only=True)["model"]
    assert size > 2.5 * sum(t.numel() * t.element_size() for t in weights.values())

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=size - 1))
    code, log = train_net(tmp_path / "b", coco_args(shapes_dataset), *adamw, expect_ok=False)
    assert code == 2
    assert f"Output directory {tmp_path / 'b'} has " in log and "one checkpoint needs" in log
    assert "Starting training" not in log


def _fail_second_save(monkeypatch, failure):
    """Makes the second torch.save of the run write part of the file, then ``failure(f)``."""
    save, calls = torch.save, []

    def failing_save(data, f, *args, **kwargs):
        calls.append(f)
        if len(calls) != 2:
            return save(data, f, *args, **kwargs)
        f.write(b"the first bytes of a checkpoint")
        failure(data, f)

    monkeypatch.setattr(torch, "save", failing_save)


def _run_with_checkpoints_every_2(output, shapes_dataset):
    """6 iterations with a checkpoint after iterations 1, 3, 5: the second one fails."""
    argv = train_net_argv(output, coco_args(shapes_dataset), "SOLVER.MAX_ITER", "6", test_sets="()")
    return run("train_net.py", *argv, expect_ok=False)


def _assert_previous_checkpoint_intact(output):
    assert sorted(n for n in os.listdir(output) if ".pth" in n) == ["model_0000001.pth"]
    assert (output / "last_checkpoint").read_text() == "model_0000001.pth"
    assert torch.load(output / "model_0000001.pth", weights_only=True)["iteration"] == 1


def test_full_disk_at_a_later_checkpoint_stops_with_one_line(shapes_dataset, tmp_path, monkeypatch):
    def disk_full(data, f):
        with open("/dev/full", "wb") as full:  # writes fail with ENOSPC, as on a full disk
            save(data, full)

    save = torch.save
    _fail_second_save(monkeypatch, disk_full)
    code, log = _run_with_checkpoints_every_2(tmp_path, shapes_dataset)
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert code == 2, log[-3000:]
    assert errors == [
        f"error: Could not write checkpoint {tmp_path / 'model_0000003.pth'} (No space left on "
        f"device). The previous checkpoint {tmp_path / 'model_0000001.pth'} is intact; --resume "
        "starts from it."
    ]
    assert "Traceback" not in log and "inline_container" not in log
    _assert_previous_checkpoint_intact(tmp_path)


def test_ctrl_c_during_a_checkpoint_write_keeps_the_previous_one(
    shapes_dataset, tmp_path, monkeypatch
):
    def ctrl_c(data, f):
        raise KeyboardInterrupt

    _fail_second_save(monkeypatch, ctrl_c)
    code, log = _run_with_checkpoints_every_2(tmp_path, shapes_dataset)
    assert code == 130, log[-3000:]
    assert [line for line in log.splitlines() if line.startswith("error: ")] == [
        "error: interrupted"
    ]
    assert "Traceback" not in log
    assert f"Interrupted while writing {tmp_path / 'model_0000003.pth'}, which was removed" in log
    _assert_previous_checkpoint_intact(tmp_path)


def test_the_lock_of_a_killed_run_is_released(tmp_path):
    """Another process holding OUTPUT_DIR's lock (as a running train_net.py does) is named;
    once it is killed, the folder can be taken."""
    import signal
    import subprocess
    import sys

    from retinanet_plugin.engine.run_checks import LOCK_FILE, RunCheckError, lock_output_dir

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            f"f = open({str(tmp_path / LOCK_FILE)!r}, 'a+')\n"
            "fcntl.flock(f, fcntl.LOCK_EX)\n"
            "f.write(str(os.getpid())); f.flush(); print('locked', flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunCheckError, match=rf"in use by another run \(process {holder.pid}\)"):
            with lock_output_dir(str(tmp_path)):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with lock_output_dir(str(tmp_path)):
        assert (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    assert (tmp_path / LOCK_FILE).read_text() == ""


def test_a_folder_that_cannot_be_locked_is_used_with_a_warning(tmp_path, monkeypatch, caplog):
    """On a file system without locks the run goes on, warned; leftovers are then kept, since
    another run could be writing them."""
    import errno
    import fcntl

    from retinanet_plugin.engine.run_checks import lock_output_dir

    def no_locks(*args):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    leftover = _leftover(tmp_path, "model_final.pth")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level("WARNING", logger="retinanet_plugin.engine.run_checks"):
        with lock_output_dir(str(tmp_path)):
            ran = True
    assert ran and (tmp_path / leftover).exists()
    assert any("would not be refused" in r.getMessage() for r in caplog.records)
