"""Bad-input cases: runs, their output folders and machines (see bad_input_env.py; run by
test_bad_inputs.py)."""

import os
from typing import Dict, List

from bad_input_env import Case, Env

from retinanet_plugin.engine.run_checks import lock_output_dir

# What a finished run leaves in OUTPUT_DIR, which a refused command must leave as it was.
_RUN_FILES = ("model_final.pth", "metrics.json", "config.yaml", "last_checkpoint")


def _finished_run(env: Env) -> None:
    os.makedirs(os.path.join(env.out, "inference"), exist_ok=True)
    with open(env.weights(), "rb") as f:
        env.path("out/model_final.pth", f.read())  # a loadable checkpoint
    env.path("out/last_checkpoint", "model_final.pth")
    env.path("out/metrics.json", '{"iteration": 0, "total_loss": 1.0}\n')
    env.path("out/config.yaml", "OUTPUT_DIR: out\n")
    env.path("out/inference/coco_instances_results.json", "[]")


def _kept(env: Env) -> List[str]:
    return [os.path.join(env.out, name) for name in _RUN_FILES + ("inference",)]


def _into_finished_run(*extra: str):
    def argv(env: Env) -> List[str]:
        _finished_run(env)
        return env.train(*extra)

    return argv


def _while_running(*extra: str):
    """A finished run's folder that another run holds (as a running train_net.py does)."""

    def argv(env: Env) -> List[str]:
        _finished_run(env)
        env.running = lock_output_dir(env.out)  # released when the test's Env goes
        env.running.__enter__()
        return env.train(*extra)

    return argv


CASES: Dict[str, Case] = {
    "runs-machine-rank-1-finished-run": Case(
        "train_net.py",
        "`--machine-rank 1` of 2 machines into a finished run (no `--resume`/`--overwrite`)",
        _into_finished_run("--num-machines", "2", "--machine-rank", "1"),
        ["holds an earlier run", "model_final.pth", "--resume", "--overwrite"],
        _kept,
    ),
    "runs-machine-rank-1-of-1": Case(
        "train_net.py",
        "`--machine-rank 1` with one machine, into a finished run",
        _into_finished_run("--machine-rank", "1"),
        ["--machine-rank 1", "--num-machines 1", "must be 0 ("],
        _kept,
    ),
    "runs-machine-rank-3-of-1": Case(
        "train_net.py",
        "`--machine-rank 3` with one machine",
        lambda e: e.train("--machine-rank", "3"),
        ["--machine-rank 3", "--num-machines 1", "must be 0 ("],
    ),
    "runs-machine-rank-negative": Case(
        "train_net.py",
        "negative `--machine-rank`",
        lambda e: e.train("--num-machines", "2", "--machine-rank", "-1"),
        ["--machine-rank -1", "from 0 to 1"],
    ),
    "runs-overwrite-deletes-weights": Case(
        "train_net.py",
        "`--overwrite` fine-tuning from `OUTPUT_DIR/model_final.pth` (the file it would delete)",
        lambda e: _into_finished_run(
            "--overwrite", "MODEL.WEIGHTS", os.path.join(e.out, "model_final.pth")
        )(e),
        ["MODEL.WEIGHTS", "model_final.pth", "--overwrite would delete", "copy it out"],
        _kept,
    ),
    "runs-second-run-at-once": Case(
        "train_net.py",
        "a second training into an `OUTPUT_DIR` that a running one holds (`--overwrite`)",
        _while_running("--overwrite"),
        ["is in use by another run", f"(process {os.getpid()})", ".train_net.lock"],
        _kept,
    ),
    "runs-resume-while-running": Case(
        "train_net.py",
        "`--resume` into an `OUTPUT_DIR` while the first run still runs",
        _while_running("--resume"),
        ["is in use by another run", f"(process {os.getpid()})"],
        _kept,
    ),
    "runs-eval-while-running": Case(
        "train_net.py",
        "`--eval-only` into an `OUTPUT_DIR` while a training runs there",
        lambda e: _while_running("--eval-only", "MODEL.WEIGHTS", e.weights())(e),
        ["is in use by another run"],
        _kept,
    ),
}
