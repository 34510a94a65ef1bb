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
3. ``bench``: ``python -m benchmarks.run --devices cuda`` (every case; on CUDA the training
   steps are timed with and without AMP, and ``inference_contributions`` times the compiled
   backbone and head, its compile time included), which writes ``<gpu>.json`` and ``<gpu>.md``.

This script then adds its ``gpu_check`` record (the three steps) to ``<gpu>.json``. More than
one process per GPU is not checked: detectron2's ``launch`` (NCCL) needs one GPU per process.
An offline GPU machine needs the packages of ``requirements.txt`` that it lacks and a detectron2
(``tools/install_detectron2.py --wheel-dir DIR`` builds a wheel to carry); see docs/testing.md.
"""

import argparse
import json
import os
import re
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu for a dry run")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--cases", default="", help="benchmark cases (default: all)")
    parser.add_argument("--steps", default="tests,train,bench", help="comma-separated steps")
    parser.add_argument("--output-dir", default=os.path.join(REPO, "benchmarks", "results"))
    parser.add_argument("--time-limit", type=float, default=480, help="seconds for all steps")
    args = parser.parse_args(argv)
    steps = [s for s in args.steps.split(",") if s]
    unknown = sorted(set(steps) - {"tests", "train", "bench"})
    if unknown:
        print(
            f"error: --steps {','.join(unknown)}: unknown; choose from tests, train, bench",
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
