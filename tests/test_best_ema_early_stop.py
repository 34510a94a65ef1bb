"""The files a user keeps: the EMA of the weights (MODEL_EMA), model_best.pth chosen by the
validation metric, early stopping (TEST.EARLY_STOPPING_PATIENCE), the weights-only files, and an
exact --resume of all of them."""

import json
import math

import pytest
import torch
from torch import nn
from train_runs import assert_equal_weights, coco_args, run, train_net, train_net_argv

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from retinanet_plugin.checkpoint.metadata import config_for_weights, read_metadata
from retinanet_plugin.engine.ema import ModelEMA

DECAY = 0.5
PATIENCE = 1
MAX_ITER = 10
# An evaluation and a checkpoint after every iteration (the checkpoint after the evaluation):
# the run stops at the first evaluation that is not a new best.
OPTS = [
    *("MODEL_EMA.ENABLED", "True", "MODEL_EMA.DECAY", str(DECAY)),
    *("TEST.EVAL_PERIOD", "1", "SOLVER.CHECKPOINT_PERIOD", "1"),
    *("TEST.EARLY_STOPPING_PATIENCE", str(PATIENCE), "SOLVER.WARMUP_ITERS", "2"),
    *("SOLVER.MAX_ITER", str(MAX_ITER)),
]


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _evaluations(output):
    """The evaluations of metrics.json ("iteration" and the "bbox/..." metrics), in order."""
    rows = [json.loads(line) for line in (output / "metrics.json").read_text().splitlines()]
    return [
        {k: v for k, v in r.items() if k == "iteration" or "bbox/" in k}
        for r in rows
        if "bbox/AP" in r
    ]


@pytest.fixture(scope="module")
def straight(shapes_dataset, tmp_path_factory):
    """The OUTPUT_DIR of a run with EMA, evaluations, model_best.pth and early stopping."""
    output = tmp_path_factory.mktemp("straight")
    train_net(output, coco_args(shapes_dataset), *OPTS)
    return output


def _expected_stop(evaluations):
    """(iteration of the best evaluation, iteration at which the patience runs out or None),
    from the AP of each evaluation."""
    best, best_iteration, since = -math.inf, None, 0
    for row in evaluations:
        if row["bbox/AP"] > best:
            best, best_iteration, since = row["bbox/AP"], row["iteration"], 0
        else:
            since += 1
            if since == PATIENCE:
                return best_iteration, row["iteration"]
    return best_iteration, None


def test_ema_update_is_the_moving_average_of_the_weights():
    """Three updates against the float64 formula e = d e + (1 - d) w; a frozen parameter and
    integer buffers are left exactly as the model's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model[2].bias.requires_grad_(False)
    ema = ModelEMA(model, decay=0.9)
    reference = {k: v.double().clone() for k, v in model.state_dict().items()}
    for _ in range(3):
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.add_(torch.randn_like(parameter))
        model(torch.randn(5, 3))  # training mode: the batch-norm statistics move too
        ema.update(model)
        for name, value in model.state_dict().items():
            if value.is_floating_point():
                reference[name] = 0.9 * reference[name] + 0.1 * value.double()
    assert ema.updates == 3
    for name, value in ema.model.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value.double(), reference[name], rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(value, model.state_dict()[name]), name  # num_batches_tracked
    assert torch.equal(ema.model[2].bias, model[2].bias)
    assert not any(p.requires_grad for p in ema.model.parameters()) and not ema.model.training


def test_ema_in_training_follows_the_weights_of_every_step(straight):
    """Between two checkpoints of consecutive iterations, the saved EMA moved by the formula
    towards the weights of the later one; the final EMA is model_final_ema.pth."""
    before, after = (_load(straight / f"model_000000{i}.pth") for i in (0, 1))
    ema_before = before["trainer"]["hooks"]["EMAHook"]["model"]
    ema_after = after["trainer"]["hooks"]["EMAHook"]["model"]
    moved = 0
    for name, value in after["model"].items():
        if value.is_floating_point():
            expected = DECAY * ema_before[name].double() + (1 - DECAY) * value.double()
            torch.testing.assert_close(ema_after[name].double(), expected, rtol=1e-6, atol=1e-7)
            moved += not torch.equal(ema_after[name], value)
    assert moved  # the average is not the weights
    final = _load(straight / "model_final.pth")
    final_ema = _load(straight / "model_final_ema.pth")
    assert_equal_weights(final_ema["model"], final["trainer"]["hooks"]["EMAHook"]["model"])
    assert final_ema["weights_info"] == {"iteration": final["iteration"], "ema_decay": DECAY}


def test_model_best_is_the_evaluation_with_the_highest_ap(straight):
    evaluations = _evaluations(straight)
    assert all("ema/bbox/AP" in row for row in evaluations)  # the EMA is evaluated too
    assert (straight / "inference" / "ema" / "shapes_val" / "coco_instances_results.json").exists()
    best_iteration, _ = _expected_stop(evaluations)
    best = _load(straight / "model_best.pth")
    value = max(row["bbox/AP"] for row in evaluations)
    info = {"iteration": best_iteration, "metric": "bbox/AP", "value": value}
    assert best["weights_info"] == info
    # Weights only: the model's weights of that iteration, the run's metadata, no training state.
    assert set(best) == {"model", "weights_info", "retinanet_plugin"}
    assert_equal_weights(
        best["model"], _load(straight / f"model_{best_iteration:07d}.pth")["model"]
    )
    assert best["retinanet_plugin"] == _load(straight / "model_final.pth")["retinanet_plugin"]


def test_early_stopping_stops_where_the_patience_says(straight, shapes_dataset):
    evaluations = _evaluations(straight)
    _, stop = _expected_stop(evaluations)
    assert stop is not None and stop < MAX_ITER - 1  # this run stops early
    assert evaluations[-1]["iteration"] == stop
    final = _load(straight / "model_final.pth")
    assert final["iteration"] == stop
    assert final["trainer"]["hooks"]["BestModelHook"]["evaluations_since_best"] == PATIENCE
    assert_equal_weights(final["model"], _load(straight / f"model_{stop:07d}.pth")["model"])
    assert not (straight / f"model_{stop + 1:07d}.pth").exists()
    weights = _load(straight / "model_final_weights.pth")
    assert set(weights) == {"model", "weights_info", "retinanet_plugin"}
    assert_equal_weights(weights["model"], final["model"])
    # --resume of the stopped run trains nothing and leaves its checkpoint as it was.
    written = (straight / "model_final.pth").read_bytes()
    _, log = train_net(straight, coco_args(shapes_dataset), "--resume", *OPTS)
    assert "Early stopping ended this run" in log
    assert (straight / "model_final.pth").read_bytes() == written


def test_resume_continues_ema_best_and_patience_exactly(straight, shapes_dataset, tmp_path):
    """--resume-from the checkpoint written after the first evaluation: the run stops at the
    same iteration with the same EMA, best value and patience count as the uninterrupted run."""
    source = straight / "model_0000000.pth"
    argv = train_net_argv(tmp_path, coco_args(shapes_dataset), *OPTS)
    _, log = run("train_net.py", "--resume-from", str(source), *argv)
    assert "EMA of the weights (MODEL_EMA.DECAY 0.5) continued from the checkpoint" in log
    a, b = _load(straight / "model_final.pth"), _load(tmp_path / "model_final.pth")
    assert a["iteration"] == b["iteration"]
    assert_equal_weights(a["model"], b["model"])
    assert a["trainer"]["hooks"]["BestModelHook"] == b["trainer"]["hooks"]["BestModelHook"]
    assert_equal_weights(
        _load(straight / "model_final_ema.pth")["model"],
        _load(tmp_path / "model_final_ema.pth")["model"],
    )
    # The evaluations after the checkpoint give the same metrics.
    resumed = _evaluations(tmp_path)
    assert resumed == [r for r in _evaluations(straight) if r["iteration"] > 0]


def test_weights_files_load_in_detectron2_and_evaluate_alone(straight, shapes_dataset, tmp_path):
    """detectron2's DetectionCheckpointer loads model_best.pth; --eval-only from
    model_final_ema.pth alone (no --config-file) gives the AP of the EMA's last evaluation."""
    best = str(straight / "model_best.pth")
    cfg = config_for_weights("", ["MODEL.WEIGHTS", best])
    model = build_model(cfg)
    DetectionCheckpointer(model).load(best)
    assert_equal_weights(model.state_dict(), _load(best)["model"])
    assert read_metadata(best)["config"] == (straight / "config.yaml").read_text()

    weights = ["MODEL.WEIGHTS", str(straight / "model_final_ema.pth")]
    argv = [*coco_args(shapes_dataset), "--eval-only", *weights, "OUTPUT_DIR", str(tmp_path)]
    _, log = run("train_net.py", *argv)
    results = [line for line in log.splitlines() if "copypaste: " in line]
    ap = float(results[-1].split("copypaste: ")[1].split(",")[0])
    assert ap == pytest.approx(_evaluations(straight)[-1]["ema/bbox/AP"], abs=1e-4)


def test_predict_from_the_final_weights_alone(straight, shapes_dataset, tmp_path):
    """predict with model_final_weights.pth alone gives the detections of predict with the
    run's config and model_final.pth (the same weights in the resumable checkpoint)."""
    images = ["--input", shapes_dataset["val"][1], "--score-threshold", "0"]
    full = ["--config-file", str(straight / "config.yaml")]
    full += ["MODEL.WEIGHTS", str(straight / "model_final.pth")]
    alone = ["MODEL.WEIGHTS", str(straight / "model_final_weights.pth")]
    for name, args in (("full", full), ("alone", alone)):
        run("-m", "retinanet_plugin.predict", *images, "--output", str(tmp_path / name), *args)
    expected, got = (
        json.loads((tmp_path / n / "coco_results.json").read_text()) for n in ("full", "alone")
    )
    assert expected and got == expected
