"""The GPU checks in one short run (at most ``--time-limit``, 8 minutes): CUDA tests, AMP
training of the demo, and the benchmark cases with AMP, written to
``benchmarks/results/<gpu>.json``.

    python -m benchmarks.gpu_check                  # on a machine with a CUDA GPU
    python -m benchmarks.gpu_check --quick          # tiny sizes: a smoke run (any device)

Steps, each in its own process, each recorded (exit code, seconds, what it measured) even when
another fails:

1. ``tests``: the test suite's ``cuda``-marked tests (AMP trainer, fused focal loss and batched
   post-processing on the GPU against their references).
2. ``train``: ``tools/demo.py`` on the GPU with ``SOLVER.AMP.ENABLED`` (detectron2's
   AMPTrainer, through ``train_net.py`` with ``--num-gpus 1``): seconds per iteration (median of
   detectron2's ``time`` metric), data time, wall time and the validation AP.
3. ``dist``: two training processes started by torchrun (``--nproc-per-node 2``, NCCL on two
   GPUs; on a machine with one GPU they run on its CPU with gloo, as NCCL needs a GPU per
   process): SIGTERM to torchrun at iteration 3 (it passes it on), the checkpoint of the
   iteration the processes agreed on, then the same command with ``--resume`` to the end.
4. ``bench``: ``python -m benchmarks.run --devices cuda`` (every case; on CUDA the training
   steps are timed with and without AMP, and ``inference_contributions`` times the compiled
   backbone and head, its compile time included), which writes ``<gpu>.json`` and ``<gpu>.md``.

This script then adds its ``gpu_check`` record (the steps) to ``<gpu>.json``.
An offline GPU machine needs the packages of ``requirements.txt`` that it lacks and a detectron2
(``tools/install_detectron2.py --wheel-dir DIR`` builds a wheel to carry); see docs/testing.md.
"""

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(name: str, command: List[str], timeout_s: float) -> Dict:
    """Runs one step; returns its exit code, seconds and output tail."""
    print(f"[gpu_check] {name}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
        returncode, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        returncode = "timeout"
        output = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(
            errors="replace"
        )
    seconds = round(time.perf_counter() - start, 1)
    print(f"[gpu_check] {name}: exit {returncode} after {seconds} s", flush=True)
    if returncode != 0:
        print(output[-3000:], flush=True)
    return {"returncode": returncode, "seconds": seconds, "output_tail": output[-2000:]}


def pytest_counts(output: str) -> Dict[str, int]:
    """The counts of pytest's summary line ("3 passed, 1 skipped, 5 deselected in 2.0s")."""
    outcome = r"(\d+) (passed|failed|skipped|deselected|errors?|warnings?)"
    summaries = [
        line for line in output.splitlines() if re.search(outcome + r".* in [\d.]+s", line)
    ]
    if not summaries:
        return {}
    return {name: int(number) for number, name in re.findall(outcome, summaries[-1])}


def cuda_test_files() -> List[str]:
    """The test files with ``cuda``-marked tests (collecting only them is seconds faster)."""
    tests = os.path.join(REPO, "tests")
    return [
        os.path.join("tests", name)
        for name in sorted(os.listdir(tests))
        if name.startswith("test_")
        and name.endswith(".py")
        and "pytest.mark.cuda" in open(os.path.join(tests, name), encoding="utf-8").read()
    ]


def run_tests(timeout_s: float) -> Dict:
    command = [
        sys.executable,
        "-m",
        "pytest",
        *cuda_test_files(),
        "-m",
        "cuda",
        "-q",
        "-p",
        "no:cacheprovider",
    ]
    result = _run("tests", command, timeout_s)
    result["counts"] = pytest_counts(result["output_tail"])
    return result


def run_training(device: str, quick: bool, timeout_s: float) -> Dict:
    output = tempfile.mkdtemp(prefix="gpu_check_demo_")
    opts = ["MODEL.DEVICE", device, "DATALOADER.NUM_WORKERS", "0" if quick else "4"]
    if device == "cuda":
        opts += ["SOLVER.AMP.ENABLED", "True"]
    sizes = ["--num-train", "600", "--num-val", "100"]
    if quick:
        sizes = ["--num-train", "8", "--num-val", "4", "--num-pictures", "1"]
        opts += [
            "SOLVER.MAX_ITER",
            "2",
            "SOLVER.IMS_PER_BATCH",
            "2",
            "INPUT.MIN_SIZE_TRAIN",
            "(128,)",
            "INPUT.MIN_SIZE_TEST",
            "128",
            "MODEL.RETINANET.SCORE_THRESH_TEST",
            "0",
        ]
    command = [sys.executable, os.path.join("tools", "demo.py"), "--output", output, *sizes, *opts]
    result = _run("train", command, timeout_s)
    result["options"] = opts
    metrics = os.path.join(output, "metrics.json")
    if os.path.exists(metrics):
        with open(metrics) as f:
            records = [json.loads(line) for line in f if line.strip()]
        for key, name in (("time", "s_per_iter_median"), ("data_time", "data_s_per_iter_median")):
            values = [r[key] for r in records if key in r]
            if values:
                result[name] = round(statistics.median(values), 4)
    summary = os.path.join(output, "demo_results.json")
    if os.path.exists(summary):
        with open(summary) as f:
            demo = json.load(f)
        result["wall_time_s"] = demo["wall_time_s"]
        result["AP"], result["AP50"] = demo["bbox"]["AP"], demo["bbox"]["AP50"]
    return result


def run_bench(device: str, quick: bool, cases: str, output_dir: str, timeout_s: float) -> Dict:
    command = [
        sys.executable,
        "-m",
        "benchmarks.run",
        "--devices",
        device,
        "--output-dir",
        output_dir,
    ]
    if quick:
        command.append("--quick")
    if cases:
        command += ["--cases", cases]
    result = _run("bench", command, timeout_s)
    written = re.findall(r"wrote (\S+)\.json", result["output_tail"])
    result["report"] = written[-1] + ".json" if written else None
    return result


def _wait_for_iteration(proc: subprocess.Popen, metrics: str, iteration: int, deadline: float):
    """Whether metrics.json reached ``iteration`` while ``proc`` runs, before ``deadline``."""
    while proc.poll() is None and time.perf_counter() < deadline:
        if os.path.exists(metrics):
            with open(metrics) as f:
                if f'"iteration": {iteration},' in f.read():
                    return True
        time.sleep(0.1)
    return False


def run_two_processes(device: str, quick: bool, timeout_s: float) -> Dict:
    """The ``dist`` step: torchrun's 2 processes, stopped by SIGTERM, then resumed."""
    from retinanet_plugin.compat.private_api import find_free_port
    from retinanet_plugin.data import make_shapes_dataset

    gpus = torch.cuda.device_count() if device == "cuda" else 0
    on = "cuda" if gpus >= 2 else "cpu"
    work = tempfile.mkdtemp(prefix="gpu_check_dist_")
    train_json, train_root = make_shapes_dataset(
        os.path.join(work, "data"), num_train=16, num_val=2, image_size=128, seed=0
    )["train"]
    output = os.path.join(work, "out")
    max_iter = 8 if quick else 40
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1"]
    command += ["--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
    command += ["--master-port", str(find_free_port()), "train_net.py"]
    command += ["--config-file", os.path.join("configs", "retinanet_R18_GN_tiny.yaml")]
    command += ["--register-coco", "shapes_train", train_json, train_root]
    command += ["DATASETS.TRAIN", "('shapes_train',)", "DATASETS.TEST", "()", "MODEL.DEVICE", on]
    command += ["SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", str(max_iter)]
    command += ["SOLVER.CHECKPOINT_PERIOD", "1000", "INPUT.MIN_SIZE_TRAIN", "(128,)"]
    command += ["DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", output]
    result: Dict = {"device": on, "gpus": gpus, "max_iter": max_iter}
    deadline = time.perf_counter() + timeout_s
    print(f"[gpu_check] dist: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    stopped_log = os.path.join(work, "stopped.log")
    with open(stopped_log, "w") as log:
        proc = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        reached = _wait_for_iteration(proc, os.path.join(output, "metrics.json"), 3, deadline)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=max(1.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    with open(stopped_log, errors="replace") as f:
        stopped_output = f.read()
    pointer = os.path.join(output, "last_checkpoint")
    checkpoint = open(pointer).read().strip() if os.path.exists(pointer) else ""
    result["stopped"] = {
        "reached_iteration_3": reached,
        "torchrun_returncode": proc.returncode,
        "checkpoint": checkpoint,
        "seconds": round(time.perf_counter() - start, 1),
        "output_tail": stopped_output[-2000:],
    }
    resumed = _run("dist", [*command, "--resume"], max(1.0, deadline - time.perf_counter()))
    result["resumed"] = resumed
    final = os.path.join(output, "model_final.pth")
    if os.path.exists(final):
        state = torch.load(final, map_location="cpu", weights_only=True)
        result["final_iteration"] = state["iteration"]
    stopped_at = re.fullmatch(r"model_(\d+)\.pth", checkpoint)
    log_path = os.path.join(output, "log.txt")
    log_text = open(log_path, errors="replace").read() if os.path.exists(log_path) else ""
    ok = (
        reached
        and stopped_at is not None
        and f"Starting training from iteration {int(stopped_at.group(1)) + 1}" in log_text
        and resumed["returncode"] == 0
        and result.get("final_iteration") == max_iter - 1
    )
    result["returncode"] = 0 if ok else 1
    if not ok:
        print(stopped_output[-3000:], flush=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu for a dry run")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--cases", default="", help="benchmark cases (default: all)")
    parser.add_argument("--steps", default="tests,train,dist,bench", help="comma-separated steps")
    parser.add_argument("--output-dir", default=os.path.join(REPO, "benchmarks", "results"))
    parser.add_argument("--time-limit", type=float, default=480, help="seconds for all steps")
    args = parser.parse_args(argv)
    steps = [s for s in args.steps.split(",") if s]
    unknown = sorted(set(steps) - {"tests", "train", "dist", "bench"})
    if unknown:
        print(
            f"error: --steps {','.join(unknown)}: unknown; choose from tests, train, dist, bench",
            file=sys.stderr,
        )
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "error: --device cuda: no CUDA GPU is visible to torch here; run on a GPU "
            "machine, or pass --device cpu for a dry run",
            file=sys.stderr,
        )
        return 2
    from benchmarks.measure import device_label

    label = device_label(torch.device(args.device)) + ("-quick" if args.quick else "")
    deadline = time.perf_counter() + args.time_limit
    record: Dict = {"device": label, "torch": torch.__version__, "steps": {}}
    for step in steps:
        left = deadline - time.perf_counter()
        if left <= 0:
            record["steps"][step] = {"returncode": "not run: --time-limit reached"}
            continue
        if step == "tests":
            record["steps"][step] = run_tests(left)
        elif step == "train":
            record["steps"][step] = run_training(args.device, args.quick, left)
        elif step == "dist":
            record["steps"][step] = run_two_processes(args.device, args.quick, left)
        else:
            record["steps"][step] = run_bench(
                args.device, args.quick, args.cases, args.output_dir, left
            )
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, label + ".json")
    report = {}
    if os.path.exists(path):  # the benchmark report (just written, or an earlier one): add to it
        with open(path) as f:
            report = json.load(f)
    report["gpu_check"] = record
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    failed = [s for s, r in record["steps"].items() if r.get("returncode") != 0]
    print(f"[gpu_check] wrote {path}; " + (f"failed: {', '.join(failed)}" if failed else "all ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
