"""Training runs of two CPU processes (gloo, on the loopback) started the ways clusters start
them: ``train_net.py --num-gpus 2``, two "machines" of one process each, torchrun, and srun (a
SLURM-like environment); for test_distributed.py and test_preemption.py. Every run is the tiny
config with 2 images per process and one thread per process, so that all start kinds compute
the same thing."""

import os
import signal
import subprocess
import sys
import time
from typing import Dict, List

import pytest
import torch
from train_runs import REPO, coco_args, train_net_argv

# The iterations of the two-process runs (one uninterrupted reference serves both test modules).
ITERATIONS = 6
# Seconds a run of a few iterations may take on a loaded 2-core machine.
TIMEOUT = 240
# Variables of a launcher in the test's own environment (a test run under torchrun or SLURM).
_LAUNCHER_VARIABLES = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS")


def free_port() -> int:
    """A free port on the loopback; skips the test where none can be bound."""
    from retinanet_plugin.compat.private_api import find_free_port

    try:
        return find_free_port()
    except OSError as e:
        pytest.skip(f"cannot bind a port on the loopback: {e}")


def _environment(**variables: str) -> Dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARIABLES}
    path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), REPO) if p)
    environ.update(OMP_NUM_THREADS="1", PYTHONPATH=path, **variables)
    return environ


def srun_variables(rank: int, port: int, restart: int = 0) -> Dict[str, str]:
    """What srun --ntasks-per-node 2 on one node sets for task ``rank`` (and MASTER_PORT)."""
    return {
        "SLURM_JOB_ID": "4242",
        "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": str(rank),
        "SLURM_NODEID": "0",
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_STEP_TASKS_PER_NODE": "2",
        "SLURM_STEP_NODELIST": "localhost",
        "SLURM_RESTART_COUNT": str(restart),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def train_args(output_dir, shapes_dataset, max_iter: int, *extra: str) -> List[str]:
    """train_net.py's arguments: ``max_iter`` iterations of 4 images, no periodic checkpoint."""
    opts = ["SOLVER.IMS_PER_BATCH", "4", "SOLVER.CHECKPOINT_PERIOD", "100"]
    opts += ["SOLVER.MAX_ITER", str(max_iter), *extra]
    return train_net_argv(output_dir, coco_args(shapes_dataset), *opts, test_sets="()")


class Run:
    """The processes of one start of ``train_net.py ARGV`` (each with its output in a file):
    "one" process, "spawn" (--num-gpus 2), two "machines", "torchrun" or "srun" of 2 processes.
    """

    def __init__(self, kind: str, output_dir, argv: List[str], restart: int = 0):
        self.output_dir = str(output_dir)
        script = [sys.executable, "train_net.py"]
        port = str(free_port())
        if kind == "one":  # one process, no launcher
            commands = [([*script, *argv], {})]
        elif kind == "spawn":
            commands = [([*script, "--num-gpus", "2", *argv], {})]
        elif kind == "machines":
            url = f"tcp://127.0.0.1:{port}"
            machines = ["--num-machines", "2", "--dist-url", url]
            commands = [([*script, *machines, "--machine-rank", str(r), *argv], {}) for r in (0, 1)]
        elif kind == "torchrun":
            torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1"]
            torchrun += ["--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
            commands = [([*torchrun, "--master-port", port, "train_net.py", *argv], {})]
        else:
            assert kind == "srun", kind
            commands = [([*script, *argv], srun_variables(r, int(port), restart)) for r in (0, 1)]
        self.logs = [f"{self.output_dir}.{i}.log" for i in range(len(commands))]
        self.processes = []
        for (command, variables), log in zip(commands, self.logs):
            with open(log, "w") as out:
                self.processes.append(
                    subprocess.Popen(
                        command,
                        cwd=REPO,
                        env=_environment(**variables),
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )

    def wait_for_iteration(self, iteration: int) -> None:
        """Until metrics.json (rank 0 writes a row every iteration) reaches ``iteration``."""
        metrics = os.path.join(self.output_dir, "metrics.json")
        deadline = time.monotonic() + TIMEOUT
        while True:
            if os.path.exists(metrics):
                with open(metrics) as f:
                    if f'"iteration": {iteration},' in f.read():
                        return
            assert all(p.poll() is None for p in self.processes), self.output()
            assert time.monotonic() < deadline, self.output()
            time.sleep(0.05)

    def signal(self, process: int, signum=signal.SIGTERM) -> None:
        self.processes[process].send_signal(signum)

    def finish(self) -> List[int]:
        """The exit statuses, once all processes ended."""
        try:
            return [p.wait(timeout=TIMEOUT) for p in self.processes]
        finally:
            for p in self.processes:
                if p.poll() is None:
                    p.kill()

    def output(self, tail: int = 4000) -> str:
        """The last ``tail`` characters of every process's output (None: all of it)."""
        text = ""
        for log in self.logs:
            with open(log, errors="replace") as f:
                text += f"----- {log}\n" + f.read()[-tail if tail else 0 :]
        return text


def final_weights(output_dir) -> Dict[str, torch.Tensor]:
    path = os.path.join(output_dir, "model_final.pth")
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def reference_weights(tmp_path_factory, shapes_dataset) -> Dict[str, torch.Tensor]:
    """Final weights of an uninterrupted ``--num-gpus 2`` run of :data:`ITERATIONS`, run once
    per pytest process."""
    output_dir = tmp_path_factory.getbasetemp() / "two_processes"
    if not (output_dir / "model_final.pth").exists():
        run = Run("spawn", str(output_dir), train_args(output_dir, shapes_dataset, ITERATIONS))
        assert run.finish() == [0], run.output()
    return final_weights(output_dir)


def assert_equal_weights(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
