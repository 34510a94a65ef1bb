"""Runs the benchmark cases and writes ``benchmarks/results/<device>.{json,md}`` (``make bench``).

Each case runs in its own process: one process times all of the case's implementations, taking
turns (median of ``--reps`` calls after ``--warmup``), then one process per implementation
measures its peak memory, so that cases and implementations do not share allocator state.
Ratios are implementation / reference, so below 1 is faster or leaner than the reference.

    python -m benchmarks.run                      # every case on CPU (and CUDA if present)
    python -m benchmarks.run --cases focal_loss,postprocess --reps 9
    python -m benchmarks.run --quick              # tiny sizes: checks that everything runs
    python -m benchmarks.run --cases train_step,inference_latency,inference_contributions,\
        train_contributions                       # the speed-ups and what each contributes
"""

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
from typing import Dict, List, Optional

import torch

RESULT_PREFIX = "BENCHMARK_RESULT "
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PERFORMANCE_DOC = os.path.join(REPO, "docs", "performance.md")

# name: (default, --quick value, help)
SIZES = {
    "train_size": (512, 128, "training image side (square)"),
    "train_batch": (2, 2, "training batch size"),
    "infer_height": (800, 128, "inference image height"),
    "infer_width": (1216, 192, "inference image width"),
    "throughput_batch": (4, 2, "batch size of the throughput and batched post-processing cases"),
    "loss_images": (2, 2, "images in the focal-loss case"),
    "loss_anchors": (100000, 2000, "anchors per image in the focal-loss case"),
    "num_classes": (80, 80, "classes of the focal-loss and post-processing cases"),
    "candidate_fraction": (1e-3, 1e-3, "fraction of post-processing scores above 0.05"),
    "calibrated_fraction": (
        2e-4,
        2e-4,
        "fraction of the calibrated R50-FPN's (anchor, class) scores above 0.05",
    ),
    "eval_images": (2000, 50, "images of the COCO-evaluation case"),
    "reps": (5, 2, "timed repetitions per implementation (at most 3 for the slow cases)"),
    "warmup": (1, 1, "untimed calls per implementation first"),
}


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    parser.add_argument(
        "--devices",
        default="",
        help="comma-separated: cpu, cuda (default: cpu, plus cuda if present)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--output-dir", default=os.path.join(REPO, "benchmarks", "results"))
    parser.add_argument(
        "--update-docs",
        action="store_true",
        help="replace the table between docs/performance.md's <!-- bench:DEVICE --> markers",
    )
    for name, (default, _, help_text) in SIZES.items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(default), help=help_text)
    # Internal: run one case in this process.
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("time", "memory"), help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    return parser


def resolve_sizes(args: argparse.Namespace) -> argparse.Namespace:
    for name, (default, quick, _) in SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else default)
    return args


def size_arguments(args: argparse.Namespace) -> List[str]:
    out = []
    for name in SIZES:
        out += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    return out


# ---------------------------------------------------------------------------- worker
def run_worker(args: argparse.Namespace) -> None:
    from benchmarks.cases import build_cases
    from benchmarks.measure import interleaved_times, peak_memory_mib, stage_medians

    device = torch.device(args.device)
    case = build_cases(device)[args.worker]
    if args.mode == "time":
        fns = {name: factory(args, device) for name, factory in case.impls.items()}
        reps = min(args.reps, 3) if case.slow else args.reps
        result = {"times_s": interleaved_times(fns, device, args.warmup, reps)}
        stagers = {name: fn.stages for name, fn in fns.items() if hasattr(fn, "stages")}
        if stagers:
            result["stages"] = stage_medians(stagers, reps)
            result["setup_s"] = {name: fn.setup_s for name, fn in fns.items()}
    else:
        fn = case.impls[args.impl](args, device)
        result = {"peak_mib": peak_memory_mib(fn, device, calls=1 if case.slow else 2)}
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def _run_subprocess(args: argparse.Namespace, *extra: str) -> dict:
    command = [sys.executable, "-m", "benchmarks.run", *extra, *size_arguments(args)]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return {"error": f"exit code {proc.returncode}: " + " | ".join(tail)}


# ------------------------------------------------------------------------ orchestrator
def run_case(args, device: str, name: str, case) -> dict:
    from benchmarks.measure import median

    print(f"[{device}] {name}: timing {len(case.impls)} implementations", flush=True)
    timing = _run_subprocess(args, "--worker", name, "--mode", "time", "--device", device)
    results: Dict[str, dict] = {impl: {} for impl in case.impls}
    if "error" in timing:
        for impl in results:
            results[impl]["error"] = timing["error"]
    else:
        for impl, times in timing["times_s"].items():
            results[impl].update(times_s=times, median_s=median(times))
        for impl, stages in timing.get("stages", {}).items():
            results[impl].update(stages=stages, first_call_s=timing["setup_s"][impl])
    for impl in case.impls if case.memory else ():
        print(f"[{device}] {name}: peak memory of {impl}", flush=True)
        memory = _run_subprocess(
            args, "--worker", name, "--mode", "memory", "--impl", impl, "--device", device
        )
        results[impl].update(memory if "error" not in memory else {"memory_error": memory["error"]})
    reference = results[case.reference]
    for impl, r in results.items():
        if "median_s" in r and "median_s" in reference:
            r["time_ratio"] = r["median_s"] / reference["median_s"]
        if "peak_mib" in r and reference.get("peak_mib"):
            r["memory_ratio"] = r["peak_mib"] / reference["peak_mib"]
    return {
        "description": case.description.format(**vars(args)),
        "reference": case.reference,
        "images_per_call": case.images_per_call(args),
        "results": results,
    }


def _versions() -> dict:
    import torchvision

    import detectron2

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "detectron2": detectron2.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def markdown_table(report: dict) -> str:
    lines = [
        f"Machine: `{report['device']}`; torch {report['versions']['torch']}, detectron2 "
        f"{report['versions']['detectron2']}, {report['versions']['torch_threads']} threads; "
        f"{report['date']}. Ratios are implementation / reference (below 1: faster or leaner); "
        "times are medians, peak memory is above what the process held before the case.",
        "",
        "| Case | Implementation | Time ratio | Memory ratio | Median time | Peak memory |",
        "|---|---|---|---|---|---|",
    ]
    for name, case in report["cases"].items():
        for impl, r in case["results"].items():
            is_reference = impl == case["reference"]
            time_ratio = "reference" if is_reference else _fmt(r.get("time_ratio"), "{:.2f}x")
            memory_ratio = "reference" if is_reference else _fmt(r.get("memory_ratio"), "{:.2f}x")
            median_s = r.get("median_s")
            time_text = _fmt(median_s, "{:.3f} s")
            if median_s and case["images_per_call"] > 1:
                time_text += f" ({case['images_per_call'] / median_s:.2f} img/s)"
            time_text = time_text if "error" not in r else "failed"
            memory_text = _fmt(r.get("peak_mib"), "{:.0f} MiB")
            lines.append(
                f"| {name} | {impl} | {time_ratio} | {memory_ratio} | {time_text} | {memory_text} |"
            )
    lines += stage_table(report) + contributions_table(report)
    lines.append("")
    lines.append(
        "Cases: "
        + "; ".join(f"`{n}`: {c['description']}" for n, c in report["cases"].items())
        + "."
    )
    return "\n".join(lines) + "\n"


STAGES = ("preprocess", "backbone", "head", "backbone + head", "post-processing")
COUNTS = ("above_threshold", "after_topk", "detections")


def stage_table(report: dict) -> List[str]:
    """Per-stage median seconds and candidates per image of the cases that record them."""
    lines = [
        "",
        "Per stage (median seconds; candidates per image: scores above the threshold, after the "
        "per-level top-k; detections per image; first call: the untimed first inference, which "
        "compiles where compile is on):",
        "",
        "| Case | Implementation | " + " | ".join(STAGES) + " | candidates | after top-k "
        "| detections | first call |",
        "|---|---|" + "---|" * (len(STAGES) + 4),
    ]
    rows = 0
    for name, case in report["cases"].items():
        for impl, r in case["results"].items():
            if "stages" not in r:
                continue
            stages = r["stages"]
            cells = [_fmt(stages.get(s), "{:.3f}") for s in STAGES]
            cells += [_fmt(stages.get(c), "{:.0f}") for c in COUNTS]
            cells.append(_fmt(r.get("first_call_s"), "{:.1f} s"))
            lines.append(f"| {name} | {impl} | " + " | ".join(cells) + " |")
            rows += 1
    return lines if rows else []


def contributions_table(report: dict) -> List[str]:
    """What each speed-up contributes: its time ratio against detectron2 at inference and in
    training (the inference_contributions and train_contributions cases)."""
    cases = report["cases"]
    inference = cases.get("inference_contributions", {}).get("results", {})
    training = cases.get("train_contributions", {}).get("results", {})
    changes = [name for name in list(inference) + list(training) if name != "detectron2 RetinaNet"]
    if not changes:
        return []
    lines = [
        "",
        "Contributions (time / detectron2's RetinaNet's, same weights and inputs, same run):",
        "",
        "| Change | Inference ratio | Training ratio |",
        "|---|---|---|",
    ]
    for name in dict.fromkeys(changes):
        cells = [
            _fmt(results.get(name, {}).get("time_ratio"), "{:.2f}x")
            for results in (inference, training)
        ]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    return lines


def _fmt(value: Optional[float], pattern: str) -> str:
    return "n/a" if value is None else pattern.format(value)


def update_docs_table(label: str, table: str, doc: str = PERFORMANCE_DOC) -> bool:
    """Replaces the text between ``<!-- bench:LABEL -->`` and ``<!-- /bench:LABEL -->``."""
    with open(doc) as f:
        text = f.read()
    pattern = re.compile(
        rf"(<!-- bench:{re.escape(label)} -->\n).*?(<!-- /bench:{re.escape(label)} -->)", re.DOTALL
    )
    if not pattern.search(text):
        return False
    with open(doc, "w") as f:
        f.write(pattern.sub(lambda m: m.group(1) + table + m.group(2), text))
    return True


def main(argv=None) -> None:
    args = resolve_sizes(argument_parser().parse_args(argv))
    if args.worker:
        run_worker(args)
        return
    from benchmarks.cases import build_cases
    from benchmarks.measure import device_label

    devices = [d for d in args.devices.split(",") if d] or (
        ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    )
    os.makedirs(args.output_dir, exist_ok=True)
    for device in devices:
        cases = build_cases(torch.device(device))
        selected = [c for c in args.cases.split(",") if c] or list(cases)
        unknown = sorted(set(selected) - set(cases))
        if unknown:
            raise SystemExit(f"unknown case(s) {unknown}; known: {sorted(cases)}")
        label = device_label(torch.device(device)) + ("-quick" if args.quick else "")
        report = {
            "device": label,
            "date": datetime.date.today().isoformat(),
            "versions": _versions(),
            "arguments": {name: getattr(args, name) for name in SIZES},
            "cases": {name: run_case(args, device, name, cases[name]) for name in selected},
        }
        path = os.path.join(args.output_dir, label)
        with open(path + ".json", "w") as f:
            json.dump(report, f, indent=1)
        table = markdown_table(report)
        with open(path + ".md", "w") as f:
            f.write(table)
        print(table)
        print(f"wrote {path}.json and {path}.md")
        if args.update_docs:
            updated = update_docs_table(label, table)
            print(
                ("updated " if updated else f"no <!-- bench:{label} --> block in ")
                + PERFORMANCE_DOC
            )


if __name__ == "__main__":
    main()
