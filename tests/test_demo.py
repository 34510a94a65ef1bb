"""The demo pipeline, shortened (tiny dataset, 3 iterations), and the metrics plot."""

import json
import os
import subprocess
import sys
import time

import pytest
from PIL import Image

from conftest import TINY_RUN, pycocotools_ap
from retinanet_plugin.cli.plot_metrics import plot_metrics, read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_shortened_demo_writes_every_output(tmp_path):
    """tools/demo.py as make demo runs it (a script; it trains in a train_net.py process). Its
    wall time counts from the start of its process, imports included."""
    sizes = "--num-train 8 --num-val 4 --num-pictures 2 DATALOADER.NUM_WORKERS 0".split()
    argv = ["--output", str(tmp_path), *sizes, *TINY_RUN]
    start = time.perf_counter()
    run = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "demo.py"), *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    elapsed = time.perf_counter() - start
    output = run.stdout
    assert run.returncode == 0, output[-5000:]
    summary = json.loads((tmp_path / "demo_results.json").read_text())
    # The AP reported is COCOEvaluator's on the validation split: the official pycocotools
    # evaluation of the predictions it wrote gives the same number.
    predictions = tmp_path / "inference" / "retinanet_demo_val" / "coco_instances_results.json"
    reference = pycocotools_ap(str(tmp_path / "data" / "val.json"), str(predictions))
    assert summary["bbox"]["AP"] == pytest.approx(reference, abs=1e-6)
    assert f"Validation box AP: {summary['bbox']['AP']:.1f}" in output
    assert {"AP-ellipse", "AP-cross"} <= set(summary["bbox"])  # per-category AP
    assert 0 < summary["wall_time_s"] <= elapsed + 0.05  # rounded to 0.1 s
    assert summary["start_up_s"] > 0.5  # importing torch and detectron2
    phases = (
        "start_up_s",
        "data_generation_s",
        "training_and_evaluation_s",
        "drawing_and_report_s",
    )
    assert sum(summary[p] for p in phases) == pytest.approx(summary["wall_time_s"], abs=0.2)
    # The median of detectron2's logged iteration times, the first (start-up) window left out.
    rows = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    times = [r["time"] for r in rows if "time" in r]
    times = sorted(times[1:] or times)
    assert summary["seconds_per_iteration"] == round(times[len(times) // 2], 3)
    assert 0 <= summary["data_seconds_per_iteration"] <= summary["seconds_per_iteration"]
    assert "s per iteration, of which" in output
    # With the AP and the AP-per-class panels.
    assert Image.open(tmp_path / "training_curves.png").size == (2000, 400)
    # The evaluator's diagnostics beside its results, with detectron2's per-class AP.
    class_metrics = json.loads((predictions.parent / "class_metrics.json").read_text())
    for c in class_metrics["classes"]:
        assert c["AP"] == pytest.approx(summary["bbox"][f"AP-{c['name']}"], abs=1e-6, nan_ok=True)
    for name in ("precision_recall.png", "ap_per_class.png", "confusion_matrix.png"):
        assert Image.open(predictions.parent / name).format == "PNG"
    assert len(list((tmp_path / "predictions").glob("*.png"))) == 2
    assert list(tmp_path.glob("events.out.tfevents.*"))
    assert (tmp_path / "model_final.pth").is_file()
    assert json.loads((tmp_path / "data" / "train.json").read_text())["images"]


def test_plot_metrics_draws_losses_lr_and_ap(tmp_path):
    metrics = tmp_path / "metrics.json"
    records = [
        {
            "iteration": i,
            "total_loss": 2.0 / (i + 1),
            "loss_cls": 1.0 / (i + 1),
            "loss_box_reg": 1.0 / (i + 1),
            "lr": 0.01 * min(1.0, (i + 1) / 10),
        }
        for i in range(19, -1, -1)  # written out of order on purpose
    ]
    records.append({"iteration": 19, "bbox/AP": 12.5, "bbox/AP50": 30.0, "bbox/AP75": 10.0})
    metrics.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert [r["iteration"] for r in read_metrics(str(metrics))][:3] == [0, 1, 2]
    output = plot_metrics(str(metrics), str(tmp_path / "curves.png"))
    width, height = Image.open(output).size
    assert width == 1500 and height == 400  # three panels (AP present) at 100 dpi


def test_plot_metrics_skips_a_cut_off_last_line_and_notes_too_few_rows(tmp_path, caplog):
    """A run killed while writing leaves a partial last line: the complete rows are plotted,
    with a warning. One training row is too few for a curve: the panel says so."""
    metrics = tmp_path / "metrics.json"
    metrics.write_text('{"iteration": 0, "total_loss": 2.0, "lr": 0.01}\n{"iteration": 1, "to')
    with caplog.at_level("WARNING", logger="retinanet_plugin.cli.plot_metrics"):
        records = read_metrics(str(metrics))
    assert records == [{"iteration": 0, "total_loss": 2.0, "lr": 0.01}]
    assert "skipped its last line 2, cut short" in caplog.text
    output = plot_metrics(str(metrics), str(tmp_path / "curves.png"))
    assert Image.open(output).size == (1000, 400)  # two panels, each with its note
    result = subprocess.run(
        [sys.executable, "-m", "retinanet_plugin.plot_metrics", str(metrics)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "training_curves.png" in result.stdout
    assert "cut short" in result.stderr


def test_plot_metrics_replaces_an_existing_picture_only_with_overwrite(tmp_path, capsys):
    from retinanet_plugin.cli import defaults as cli
    from retinanet_plugin.cli.plot_metrics import main

    metrics = tmp_path / "metrics.json"
    metrics.write_text('{"iteration": 0, "total_loss": 2.0}\n{"iteration": 1, "total_loss": 1.0}\n')
    output = tmp_path / "curves.svg"
    output.write_text("an earlier plot")
    assert cli.run(main, [str(metrics), "--output", str(output)]) == 2
    assert "curves.svg exists; pass --overwrite" in capsys.readouterr().err
    assert output.read_text() == "an earlier plot"
    assert cli.run(main, [str(metrics), "--output", str(output), "--overwrite"]) == 0
    assert output.read_text().lstrip().startswith("<?xml")  # the format of the extension
