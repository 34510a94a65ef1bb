"""SOLVER.LR_SCHEDULER_NAME: each schedule's LR per iteration equals its closed form, and the real
Trainer saves and restores it on resume."""

import math
import shutil
from pathlib import Path

import pytest
import torch

from detectron2.data import DatasetCatalog
from detectron2.data.datasets import register_coco_instances
from retinanet_plugin.config.loading import ConfigError, load_config
from retinanet_plugin.config.option_rules import LR_SCHEDULERS
from retinanet_plugin.engine import Trainer
from retinanet_plugin.engine.solver import build_lr_scheduler

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "retinanet_R18_GN_tiny.yaml")

MAX_ITER, WARMUP_ITERS, WARMUP_FACTOR, STEPS, GAMMA = 20, 5, 0.1, (8, 14), 0.1
POWER, FINAL_FACTOR = 0.9, 0.05
SCHEDULE_OPTS = [
    "SOLVER.MAX_ITER",
    str(MAX_ITER),
    "SOLVER.WARMUP_ITERS",
    str(WARMUP_ITERS),
    "SOLVER.WARMUP_FACTOR",
    str(WARMUP_FACTOR),
    "SOLVER.STEPS",
    str(STEPS),
    "SOLVER.GAMMA",
    str(GAMMA),
    "SOLVER.POLY_LR_POWER",
    str(POWER),
    "SOLVER.EXPONENTIAL_LR_FINAL_FACTOR",
    str(FINAL_FACTOR),
]


def expected_multiplier(
    name,
    iteration,
    warmup_method="linear",
    max_iter=MAX_ITER,
    warmup_iters=WARMUP_ITERS,
    steps=STEPS,
):
    """The LR multiplier at ``iteration``, in float64 from the schedules' definitions."""

    def schedule(i):
        t = i / max_iter
        if name == "WarmupMultiStepLR":
            return GAMMA ** sum(s <= i for s in steps)
        if name == "WarmupCosineLR":
            return 0.5 * (1.0 + math.cos(math.pi * t))
        if name == "WarmupPolyLR":
            return (1.0 - t) ** POWER
        assert name == "WarmupExponentialLR"
        return FINAL_FACTOR**t

    if iteration >= warmup_iters:
        return schedule(iteration)
    start = WARMUP_FACTOR * schedule(0)
    if warmup_method == "constant":
        return start
    # Linear from WARMUP_FACTOR x the first value to the schedule's value where warmup ends.
    return start + (schedule(warmup_iters) - start) * iteration / warmup_iters


@pytest.mark.parametrize("warmup_method", ["linear", "constant"])
@pytest.mark.parametrize("name", LR_SCHEDULERS)
def test_lr_per_iteration_equals_closed_form(name, warmup_method):
    cfg = load_config(
        TINY,
        ["SOLVER.LR_SCHEDULER_NAME", name, "SOLVER.WARMUP_METHOD", warmup_method, *SCHEDULE_OPTS],
    )
    # Two groups with different LRs (as with bias/norm LR factors): both follow the multiplier.
    base_lrs = [0.1, 0.02]
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in base_lrs]
    optimizer = torch.optim.SGD(
        [{"params": [p], "lr": lr} for p, lr in zip(params, base_lrs)], lr=base_lrs[0]
    )
    scheduler = build_lr_scheduler(cfg, optimizer)
    for iteration in range(MAX_ITER):
        multiplier = expected_multiplier(name, iteration, warmup_method)
        for group, base_lr in zip(optimizer.param_groups, base_lrs):
            assert group["lr"] == pytest.approx(base_lr * multiplier, rel=1e-12, abs=0), iteration
        optimizer.step()
        scheduler.step()


def test_unknown_schedule_is_a_clear_error():
    cfg = load_config(TINY)
    cfg.SOLVER.LR_SCHEDULER_NAME = "WarmupLinearLR"
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    expected = r"\(SOLVER.LR_SCHEDULER_NAME\) = 'WarmupLinearLR': must be one of .*WarmupPolyLR"
    with pytest.raises(ValueError, match=expected):
        build_lr_scheduler(cfg, optimizer)


@pytest.mark.parametrize(
    "key, value, rule",
    [
        ("SOLVER.LR_SCHEDULER_NAME", "WarmupLinearLR", "must be one of"),
        ("SOLVER.WARMUP_METHOD", "quadratic", "must be one of"),
        ("SOLVER.POLY_LR_POWER", "0.0", "must be > 0"),
        ("SOLVER.EXPONENTIAL_LR_FINAL_FACTOR", "1.5", r"must be in \(0, 1\]"),
        ("SOLVER.EXPONENTIAL_LR_FINAL_FACTOR", "0.0", r"must be in \(0, 1\]"),
        ("SOLVER.WARMUP_ITERS", "-1", "must be >= 0"),
    ],
)
def test_invalid_schedule_values_are_config_errors(key, value, rule):
    with pytest.raises(ConfigError, match=f"{key} = .*{rule}"):
        load_config(TINY, [key, value])


# --------------------------------------------------------------------------------------------
# Resume with the real Trainer

RESUME_MAX_ITER, RESUME_WARMUP_ITERS, RESUME_STEPS = 6, 2, (3,)


@pytest.fixture(scope="module")
def train_dataset(shapes_dataset):
    name = "test_schedules_shapes_train"
    if name not in DatasetCatalog.list():
        register_coco_instances(name, {}, *shapes_dataset["train"])
    return name


def trainer_cfg(output_dir, dataset, schedule):
    cfg = load_config(
        TINY,
        [
            "SOLVER.LR_SCHEDULER_NAME",
            schedule,
            "SOLVER.MAX_ITER",
            str(RESUME_MAX_ITER),
            "SOLVER.WARMUP_ITERS",
            str(RESUME_WARMUP_ITERS),
            "SOLVER.WARMUP_FACTOR",
            str(WARMUP_FACTOR),
            "SOLVER.STEPS",
            str(RESUME_STEPS),
            "SOLVER.POLY_LR_POWER",
            str(POWER),
            "SOLVER.EXPONENTIAL_LR_FINAL_FACTOR",
            str(FINAL_FACTOR),
            "SOLVER.CHECKPOINT_PERIOD",
            "4",  # a checkpoint after iteration 3, and the final one
            "SOLVER.IMS_PER_BATCH",
            "2",
            "DATASETS.TRAIN",
            f"('{dataset}',)",
            "DATASETS.TEST",
            "()",
            "MODEL.RETINANET.NUM_CLASSES",
            "4",
            # Tiny model and images, SGD, the ResNet frozen: the schedule is under test.
            "SOLVER.OPTIMIZER",
            "SGD",
            "MODEL.BACKBONE.FREEZE_AT",
            "5",
            "MODEL.FPN.OUT_CHANNELS",
            "32",
            "MODEL.RETINANET.NUM_CONVS",
            "1",
            "INPUT.MIN_SIZE_TRAIN",
            "(64,)",
            "INPUT.MAX_SIZE_TRAIN",
            "96",
            "SEED",
            "1",
            "OUTPUT_DIR",
            str(output_dir),
        ],
    )
    cfg.freeze()
    return cfg


def train(cfg, resume=False):
    """Runs the Trainer; returns {iteration: LR} as its LRScheduler hook recorded them."""
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=resume)
    trainer.train()
    return {iteration: lr for lr, iteration in trainer.storage.history("lr").values()}


@pytest.mark.parametrize("schedule", LR_SCHEDULERS)
def test_resume_continues_the_schedule(schedule, train_dataset, tmp_path, single_thread):
    """A run stopped after its checkpoint at iteration 3 and resumed in a fresh Trainer uses the
    LRs of the uninterrupted run for iterations 4 and 5 (a restarted schedule would use the
    warmup's again)."""
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    straight = train(trainer_cfg(straight_dir, train_dataset, schedule))
    base_lr = load_config(TINY).SOLVER.BASE_LR
    assert sorted(straight) == list(range(RESUME_MAX_ITER))
    for iteration, lr in straight.items():
        multiplier = expected_multiplier(
            schedule,
            iteration,
            max_iter=RESUME_MAX_ITER,
            warmup_iters=RESUME_WARMUP_ITERS,
            steps=RESUME_STEPS,
        )
        assert lr == pytest.approx(base_lr * multiplier, rel=1e-12, abs=0), iteration

    # What a run killed after the checkpoint of iteration 3 leaves behind.
    resumed_dir.mkdir()
    shutil.copy(straight_dir / "model_0000003.pth", resumed_dir)
    (resumed_dir / "last_checkpoint").write_text("model_0000003.pth")
    resumed = train(trainer_cfg(resumed_dir, train_dataset, schedule), resume=True)
    assert resumed == {4: straight[4], 5: straight[5]}
    # A schedule restarted at 0 would differ:
    assert (straight[4], straight[5]) != (straight[0], straight[1])
