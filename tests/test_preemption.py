"""A stop signal (SIGTERM, SIGUSR1, Ctrl-C's SIGINT) ends training after an iteration that every
process agrees on, with a checkpoint of it and exit status 75; --resume, or a restart by the
launcher, then continues to the same weights as a run that nothing stopped."""

import os
import signal
import threading
import time

import pytest
import torch
from distributed_runs import (
    ITERATIONS,
    Run,
    assert_equal_weights,
    final_weights,
    reference_weights,
    train_args,
)
from train_runs import REPO, run

from retinanet_plugin.engine import preemption
from retinanet_plugin.engine.preemption import PREEMPTED_EXIT_STATUS, stop_on_signals

MAX_ITER = 8
ONE_PROCESS = ("SOLVER.IMS_PER_BATCH", "2")


def _checkpoint(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _stop_checkpoint(output_dir):
    """The checkpoint last_checkpoint names, which must be the only one."""
    names = sorted(n for n in os.listdir(output_dir) if n.endswith(".pth"))
    last = open(os.path.join(output_dir, "last_checkpoint")).read()
    assert names == [last], names
    return last, _checkpoint(os.path.join(output_dir, last))


def test_stop_signals_set_a_flag_inside_the_block_only():
    """Inside ``stop_on_signals`` SIGUSR1 and SIGTERM to this process set the flag (the first
    one's name is kept) instead of ending it; the earlier handlers come back after it."""
    before = {s: signal.getsignal(s) for s in preemption.STOP_SIGNALS}
    with stop_on_signals():
        assert preemption._received is None
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs in this thread between bytecodes
        assert preemption._received == "SIGUSR1"
    assert {s: signal.getsignal(s) for s in preemption.STOP_SIGNALS} == before
    assert preemption._received is None


@pytest.fixture(scope="module")
def uninterrupted(shapes_dataset, tmp_path_factory, single_thread):
    """Final weights of one process's run of MAX_ITER iterations that nothing stopped."""
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    run("train_net.py", *train_args(output_dir, shapes_dataset, MAX_ITER, *ONE_PROCESS))
    return final_weights(output_dir)


def _signal_at(output_dir, iteration: int, signum) -> threading.Thread:
    """Sends ``signum`` to this process once metrics.json reaches ``iteration``, if training
    (its stop handler) is still on."""

    def send():
        metrics = os.path.join(output_dir, "metrics.json")
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if os.path.exists(metrics) and f'"iteration": {iteration},' in open(metrics).read():
                if signal.getsignal(signum) is preemption._note:
                    os.kill(os.getpid(), signum)
                return
            time.sleep(0.02)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def _resume_and_compare(shapes_dataset, output_dir, stopped_at, uninterrupted, *flags):
    _, log = run(
        "train_net.py",
        *flags,
        *train_args(output_dir, shapes_dataset, MAX_ITER, *ONE_PROCESS),
    )
    assert f"Starting training from iteration {stopped_at + 1}" in log
    assert _checkpoint(os.path.join(output_dir, "model_final.pth"))["iteration"] == MAX_ITER - 1
    assert_equal_weights(final_weights(output_dir), uninterrupted)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGUSR1], ids=["SIGINT", "SIGUSR1"])
def test_signal_in_one_process_then_resume_equals_the_uninterrupted_run(
    signum, shapes_dataset, uninterrupted, tmp_path, single_thread
):
    """Ctrl-C (SIGINT) or SLURM's warning signal (SIGUSR1) at iteration 2 of 8: exit status
    75, a checkpoint of the iteration it stopped at (the only one: no periodic checkpoint is
    due), and --resume ends with bit-identical weights to the uninterrupted run."""
    output_dir = str(tmp_path / "out")
    sender = _signal_at(output_dir, 2, signum)
    code, log = run(
        "train_net.py",
        *train_args(output_dir, shapes_dataset, MAX_ITER, *ONE_PROCESS),
        expect_ok=False,
    )
    sender.join(timeout=10)
    assert code == PREEMPTED_EXIT_STATUS, log[-5000:]
    name, checkpoint = _stop_checkpoint(output_dir)
    stopped_at = checkpoint["iteration"]
    assert 2 <= stopped_at < MAX_ITER - 1 and name == f"model_{stopped_at:07d}.pth"
    assert f"Stopping after iteration {stopped_at}: {signal.Signals(signum).name}" in log
    assert "Traceback" not in log and "Exception during training" not in log
    assert not os.path.exists(os.path.join(output_dir, "model_final.pth"))
    _resume_and_compare(shapes_dataset, output_dir, stopped_at, uninterrupted, "--resume")


def test_sigterm_to_a_training_process_then_resume_equals_the_uninterrupted_run(
    shapes_dataset, uninterrupted, tmp_path, single_thread
):
    """SIGTERM, as SLURM and Kubernetes send before they kill a job, to a train_net.py process
    at iteration 2: exit status 75 with the checkpoint of the iteration it stopped at;
    --resume ends with bit-identical weights to the uninterrupted run."""
    output_dir = tmp_path / "out"
    argv = train_args(output_dir, shapes_dataset, MAX_ITER, *ONE_PROCESS)
    stopped = Run("one", output_dir, argv)
    stopped.wait_for_iteration(2)
    stopped.signal(0, signal.SIGTERM)
    assert stopped.finish() == [PREEMPTED_EXIT_STATUS], stopped.output()
    _, checkpoint = _stop_checkpoint(output_dir)
    stopped_at = checkpoint["iteration"]
    assert stopped_at >= 2
    assert "Training stopped by a signal after iteration" in stopped.output(None)
    _resume_and_compare(shapes_dataset, output_dir, stopped_at, uninterrupted, "--resume")


def test_sigterm_to_one_of_two_srun_tasks_stops_both_and_the_requeued_job_continues_exactly(
    shapes_dataset, tmp_path_factory, tmp_path
):
    """Two srun tasks (a SLURM-like environment, gloo on the loopback); SIGTERM to rank 1 only
    at iteration 1: both tasks stop after the same iteration with exit status 75, rank 0 having
    written its checkpoint with both ranks' training state. The job started again
    (SLURM_RESTART_COUNT=1, the same command without --resume) continues that checkpoint and
    ends with the weights of an uninterrupted ``--num-gpus 2`` run."""
    reference = reference_weights(tmp_path_factory, shapes_dataset)
    output_dir = tmp_path / "out"
    argv = train_args(output_dir, shapes_dataset, ITERATIONS)
    stopped = Run("srun", output_dir, argv)
    stopped.wait_for_iteration(1)
    stopped.signal(1, signal.SIGTERM)
    assert stopped.finish() == [PREEMPTED_EXIT_STATUS] * 2, stopped.output()
    _, checkpoint = _stop_checkpoint(output_dir)
    stopped_at = checkpoint["iteration"]
    assert 1 <= stopped_at < ITERATIONS - 1
    assert len(checkpoint["trainer"]["resume"]["per_rank"]) == 2
    logs = stopped.output(None) + (output_dir / "log.txt.rank1").read_text()
    assert f"Stopping after iteration {stopped_at}: SIGTERM received" in logs  # rank 1
    assert f"Stopping after iteration {stopped_at}: another process received" in logs  # rank 0

    requeued = Run("srun", output_dir, argv, restart=1)
    assert requeued.finish() == [0, 0], requeued.output()
    logs = requeued.output(None)
    assert "SLURM_RESTART_COUNT=1: the launcher started this run again" in logs
    assert f"Starting training from iteration {stopped_at + 1}" in logs
    assert_equal_weights(final_weights(output_dir), reference)


def test_sigterm_to_train_net_num_gpus_2_reaches_its_processes(shapes_dataset, tmp_path):
    """SIGTERM to ``train_net.py --num-gpus 2`` only (the process a scheduler started, not the
    training processes it started): it passes the signal on, both processes stop after the same
    iteration with a checkpoint of both ranks' state, and it exits with status 75."""
    output_dir = tmp_path / "out"
    stopped = Run("spawn", output_dir, train_args(output_dir, shapes_dataset, ITERATIONS))
    stopped.wait_for_iteration(1)
    stopped.signal(0, signal.SIGTERM)
    assert stopped.finish() == [PREEMPTED_EXIT_STATUS], stopped.output()
    _, checkpoint = _stop_checkpoint(output_dir)
    stopped_at = checkpoint["iteration"]
    assert 1 <= stopped_at < ITERATIONS - 1
    assert len(checkpoint["trainer"]["resume"]["per_rank"]) == 2
    for log in ("log.txt", "log.txt.rank1"):  # each training process got it
        assert (
            f"Stopping after iteration {stopped_at}: SIGTERM received"
            in (output_dir / log).read_text()
        )


def _fake_slurm(tmp_path, srun_status: int, srun_seconds: float = 0.0):
    """A PATH with an ``srun`` that records its arguments and MASTER_ADDR and exits with
    ``srun_status`` after ``srun_seconds``, and an ``scontrol`` that lists two nodes and records
    requeues."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        "#!/bin/sh\n"
        f'echo "$MASTER_ADDR $*" > {tmp_path}/srun.log\n'
        f"sleep {srun_seconds}\n"
        f"exit {srun_status}\n"
    )
    (bin_dir / "scontrol").write_text(
        "#!/bin/sh\n"
        'if [ "$1" = show ]; then printf "node1\\nnode2\\n"; exit 0; fi\n'
        f'echo "$*" >> {tmp_path}/scontrol.log\n'
    )
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    return dict(
        os.environ,
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        SLURM_JOB_ID="77",
        SLURM_JOB_NODELIST="node[1-2]",
    )


@pytest.mark.parametrize("srun_status, requeued", [(75, True), (0, False), (1, False)])
def test_slurm_script_requeues_the_job_only_when_training_stopped_with_a_checkpoint(
    srun_status, requeued, tmp_path
):
    """examples/slurm_train.sbatch (with stand-ins for srun and scontrol): the rendezvous on the
    first node, train_net.py with the config and OUTPUT_DIR, the tasks' exit status as its own,
    and a requeue of the job exactly when they stopped at a signal (status 75)."""
    import subprocess

    script = os.path.join(REPO, "examples", "slurm_train.sbatch")
    environ = _fake_slurm(tmp_path, srun_status)
    result = subprocess.run(
        ["bash", script, "configs/x.yaml", "out/x", "SOLVER.MAX_ITER", "9"],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == srun_status, result.stdout + result.stderr
    srun_line = (tmp_path / "srun.log").read_text()
    assert srun_line.startswith("node1 --distribution=block")
    assert (
        "python train_net.py --config-file configs/x.yaml SOLVER.MAX_ITER 9 OUTPUT_DIR out/x"
        in srun_line
    )
    requeues = (tmp_path / "scontrol.log").read_text() if requeued else ""
    assert os.path.exists(tmp_path / "scontrol.log") == requeued
    assert requeues == ("requeue 77\n" if requeued else "")


def test_slurm_script_outlives_sigterm_until_the_tasks_have_stopped(tmp_path):
    """SIGTERM to the batch script (as a preemption sends to every process of the job) while
    the tasks still write their checkpoint: the script waits for them, then requeues."""
    import subprocess

    script = os.path.join(REPO, "examples", "slurm_train.sbatch")
    environ = _fake_slurm(tmp_path, PREEMPTED_EXIT_STATUS, srun_seconds=3)
    batch = subprocess.Popen(
        ["bash", script, "configs/x.yaml", "out/x"],
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not (tmp_path / "srun.log").exists():
        assert time.monotonic() < deadline and batch.poll() is None
        time.sleep(0.05)
    batch.send_signal(signal.SIGTERM)
    output, _ = batch.communicate(timeout=60)
    assert batch.returncode == PREEMPTED_EXIT_STATUS, output
    assert "SIGTERM: waiting for the tasks" in output
    assert (tmp_path / "scontrol.log").read_text() == "requeue 77\n"
