"""The benchmark suite runs, compares like with like, and writes its report (no timing here)."""

import json
import math
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks import cases as bench_cases  # noqa: E402
from benchmarks.run import SIZES, markdown_table, update_docs_table  # noqa: E402

CPU = torch.device("cpu")


def _quick_args(**overrides):
    args = {name: quick for name, (_, quick, _) in SIZES.items()}
    args.update(overrides)
    return SimpleNamespace(**args)


def test_focal_loss_implementations_compute_the_same_loss():
    """Every implementation of the focal-loss case gives the same loss and gradient on the
    case's inputs, so the case compares speed and memory of one computation."""
    args = _quick_args(loss_anchors=300)
    case = bench_cases.build_cases(CPU)["focal_loss"]
    assert set(case.impls) == set(bench_cases.FOCAL_LOSSES)
    losses, grads = {}, {}
    for name, (loss_fn, uses_labels) in bench_cases.FOCAL_LOSSES.items():
        case.impls[name](args, CPU)()  # the timed call runs
        logits, targets, labels = bench_cases.focal_loss_inputs(args, CPU)
        loss = loss_fn(
            logits, labels if uses_labels else targets, alpha=0.25, gamma=2.0, reduction="sum"
        )
        loss.backward()
        losses[name], grads[name] = loss.detach(), logits.grad
    reference = case.reference
    for name in losses:
        torch.testing.assert_close(losses[name], losses[reference], rtol=1e-5, atol=0)
        torch.testing.assert_close(grads[name], grads[reference], rtol=1e-4, atol=1e-9)


def test_postprocess_case_gives_detectron2_detections():
    args = _quick_args()
    case = bench_cases.build_cases(CPU)["postprocess_batch"]
    results = {name: factory(args, CPU)() for name, factory in case.impls.items()}
    ours, theirs = results[bench_cases.PLUGIN], results[bench_cases.DETECTRON2]
    assert sum(len(x) for x in ours) > 0
    for a, b in zip(ours, theirs):
        assert torch.equal(a.pred_classes, b.pred_classes)
        assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)


def test_inference_case_models_share_calibrated_weights_and_detections():
    """detectron2's model and the plugin's (speed-ups on) in the inference case get the same
    calibrated weights: about --calibrated-fraction of the (anchor, class) scores pass the 0.05
    threshold, counted here from the anchors of the image size, and the detections agree."""
    args = _quick_args()
    case = bench_cases.build_cases(CPU)["inference_latency"]
    fns = {
        name: case.impls[name](args, CPU) for name in (bench_cases.DETECTRON2, bench_cases.PLUGIN)
    }
    theirs, ours = fns[bench_cases.DETECTRON2](), fns[bench_cases.PLUGIN]()
    locations = sum(
        math.ceil(args.infer_height / s) * math.ceil(args.infer_width / s)
        for s in bench_cases.STRIDES
    )
    expected = locations * 9 * 80 * args.calibrated_fraction
    counts = {name: fn.stages() for name, fn in fns.items()}
    assert counts[bench_cases.DETECTRON2]["above_threshold"] == pytest.approx(expected, rel=0.1)
    assert counts[bench_cases.PLUGIN]["above_threshold"] == pytest.approx(expected, rel=0.1)
    (a,), (b,) = ours, theirs
    a, b = a["instances"], b["instances"]
    assert len(a) == len(b) > 10
    # The tolerances of tests/test_inference_optimization.py.
    torch.testing.assert_close(a.scores, b.scores, atol=1e-4, rtol=0)
    torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor, atol=5e-3, rtol=0)


def _report(cases: dict) -> dict:
    """A benchmark report of machine "cpu-test" with ``cases``."""
    return {
        "device": "cpu-test",
        "date": "2026-01-01",
        "versions": {"torch": "t", "detectron2": "d", "torch_threads": 2},
        "cases": cases,
    }


def test_contributions_and_stage_tables():
    def result(ratio, **extra):
        return {"median_s": ratio, "time_ratio": ratio, **extra}

    stages = {"preprocess": 0.1, "backbone": 1.5, "head": 0.5, "post-processing": 0.25}
    stages.update(above_threshold=2900.4, after_topk=2100.0, detections=100.0)
    report = _report(
        {
            "inference_contributions": {
                "description": "d",
                "reference": "detectron2 RetinaNet",
                "images_per_call": 1,
                "results": {
                    "detectron2 RetinaNet": result(1.0),
                    "plugin + compile": result(0.7, stages=stages, first_call_s=120.04),
                },
            },
            "train_contributions": {
                "description": "d",
                "reference": "detectron2 RetinaNet",
                "images_per_call": 1,
                "results": {
                    "detectron2 RetinaNet": result(1.0),
                    "plugin + channels-last": result(0.9),
                },
            },
        }
    )
    table = markdown_table(report)
    assert "| plugin + compile | 0.70x | n/a |" in table
    assert "| plugin + channels-last | n/a | 0.90x |" in table
    row = "| inference_contributions | plugin + compile | 0.100 | 1.500 | 0.500 | n/a | 0.250 "
    assert row + "| 2900 | 2100 | 100 | 120.0 s |" in table


def test_coco_eval_case_backends_agree():
    args = _quick_args(eval_images=30)
    case = bench_cases.build_cases(CPU)["coco_eval"]
    stats = {name: factory(args, CPU)() for name, factory in case.impls.items()}
    assert stats["pycocotools"][0] > 0
    for name, value in stats.items():
        assert value == pytest.approx(stats["pycocotools"], abs=1e-4), name


def test_report_table_and_docs_block(tmp_path):
    report = _report(
        {
            "case_a": {
                "description": "something",
                "reference": "ref",
                "images_per_call": 4,
                "results": {
                    "ref": {
                        "median_s": 2.0,
                        "peak_mib": 100.0,
                        "time_ratio": 1.0,
                        "memory_ratio": 1.0,
                    },
                    "ours": {
                        "median_s": 1.0,
                        "peak_mib": 50.0,
                        "time_ratio": 0.5,
                        "memory_ratio": 0.5,
                    },
                    "broken": {"error": "exit code 1"},
                },
            }
        }
    )
    table = markdown_table(report)
    assert "| case_a | ref | reference | reference | 2.000 s (2.00 img/s) | 100 MiB |" in table
    assert "| case_a | ours | 0.50x | 0.50x | 1.000 s (4.00 img/s) | 50 MiB |" in table
    assert "| case_a | broken | n/a | n/a | failed | n/a |" in table
    doc = tmp_path / "performance.md"
    doc.write_text("before\n<!-- bench:cpu-test -->\nold\n<!-- /bench:cpu-test -->\nafter\n")
    assert update_docs_table("cpu-test", table, str(doc))
    text = doc.read_text()
    assert text.startswith("before\n<!-- bench:cpu-test -->\n" + table)
    assert text.endswith("<!-- /bench:cpu-test -->\nafter\n") and "old" not in text
    assert not update_docs_table("other-machine", table, str(doc))


def _gpu_check(*args):
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_gpu_check_refuses_bad_input_before_running_anything(tmp_path):
    if not torch.cuda.is_available():
        result = _gpu_check("--output-dir", str(tmp_path))
        assert result.returncode == 2
        assert result.stderr.startswith("error: --device cuda: no CUDA GPU")
    result = _gpu_check("--device", "cpu", "--steps", "tests,fly", "--output-dir", str(tmp_path))
    assert result.returncode == 2
    assert "error: --steps fly: unknown" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.iterdir())


def test_gpu_check_runs_the_cuda_tests_and_adds_its_record_to_the_report(tmp_path):
    """The tests step runs exactly the cuda-marked tests (skipped on a CPU machine) and its
    record goes into <device>.json next to what a benchmark run wrote there."""
    from benchmarks.measure import device_label

    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = tmp_path / f"{device_label(torch.device(device))}.json"
    report.write_text(json.dumps({"cases": {"focal_loss": {}}}))
    result = _gpu_check("--device", device, "--steps", "tests", "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    written = json.loads(report.read_text())
    assert written["cases"] == {"focal_loss": {}}  # the benchmark results are kept
    counts = written["gpu_check"]["steps"]["tests"]["counts"]
    collected = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "tests",
            "-m",
            "cuda",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:xdist",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    num_cuda_tests = int(re.search(r"(\d+)/\d+ tests collected", collected.stdout).group(1))
    assert num_cuda_tests >= 5
    outcome = "passed" if torch.cuda.is_available() else "skipped"
    assert counts[outcome] == num_cuda_tests
