"""--resume after a kill: the run continues from the last complete checkpoint exactly where it was
(optimizer, learning-rate schedule, data stream), so its final weights equal an uninterrupted
run's."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from train_runs import REPO, assert_equal_weights, coco_args, run, train_net, train_net_argv


def _checkpoint(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_schedule_and_optimizer_state_are_restored(shapes_dataset, tmp_path):
    """Resumed at iteration 4 of 6, the final scheduler and optimizer state (LR, momentum/Adam
    step counts) equal those of an uninterrupted run: the schedule did not restart (every
    schedule is resumed in test_schedules.py)."""
    schedule = "WarmupCosineLR"
    opts = [
        "SOLVER.LR_SCHEDULER_NAME",
        schedule,
        *"SOLVER.STEPS (3,) SOLVER.WARMUP_ITERS 2".split(),
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_net(straight, coco_args(shapes_dataset), *opts, "SOLVER.MAX_ITER", "6")
    train_net(resumed, coco_args(shapes_dataset), *opts, "SOLVER.MAX_ITER", "4")
    _, log = train_net(
        resumed, coco_args(shapes_dataset), "--resume", *opts, "SOLVER.MAX_ITER", "6"
    )
    assert "Starting training from iteration 4" in log
    a, b = (_checkpoint(d / "model_final.pth")["trainer"] for d in (straight, resumed))
    assert a["iteration"] == b["iteration"] == 5
    # The schedule (detectron2's LRMultiplier hook state) continued instead of restarting.
    scheduler_a, scheduler_b = a["hooks"]["LRScheduler"], b["hooks"]["LRScheduler"]
    assert scheduler_a == scheduler_b
    assert scheduler_b["last_epoch"] == 6
    # The optimizer state was saved and restored: AdamW's step counts are 6, not 6 - 4.
    optimizer_a, optimizer_b = a["_trainer"]["optimizer"], b["_trainer"]["optimizer"]
    assert [g["lr"] for g in optimizer_a["param_groups"]] == [
        g["lr"] for g in optimizer_b["param_groups"]
    ]
    steps_b = {float(s["step"]) for s in optimizer_b["state"].values()}
    assert steps_b == {float(s["step"]) for s in optimizer_a["state"].values()} == {6.0}


# Random augmentations on, so that their draws have to be restored too.
AUGMENTED = (
    "INPUT.AUG.ROTATION.ENABLED True INPUT.AUG.MIXUP.ENABLED True "
    "INPUT.AUG.COLOR_JITTER.ENABLED True"
).split()


def _train_command(shapes_dataset, output_dir, max_iter, *opts, resume=False):
    flags = ["--resume"] if resume else []
    options = [*flags, *AUGMENTED, "SOLVER.MAX_ITER", str(max_iter), *opts]
    argv = train_net_argv(output_dir, coco_args(shapes_dataset), *options, test_sets="()")
    return [sys.executable, "train_net.py", *argv]


def _start(command):
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _final_weights(output_dir):
    return _checkpoint(output_dir / "model_final.pth")["model"]


@pytest.fixture(scope="module")
def uninterrupted(shapes_dataset, tmp_path_factory):
    """Final weights of a 10-iteration run that nothing interrupted."""
    output = tmp_path_factory.mktemp("uninterrupted")
    subprocess.run(
        _train_command(shapes_dataset, output, 10), cwd=REPO, check=True, capture_output=True
    )
    return _final_weights(output)


def test_sigkill_after_a_checkpoint_then_resume_equals_the_uninterrupted_run(
    shapes_dataset, uninterrupted, tmp_path
):
    """Bit-exact on CPU: same data order, augmentations, optimizer, schedule, loss normalizer."""
    proc = _start(_train_command(shapes_dataset, tmp_path, 10))
    deadline = time.time() + 300
    while not (tmp_path / "model_0000003.pth").exists() and proc.poll() is None:
        assert time.time() < deadline, "no checkpoint written"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-3000:]
    last = (tmp_path / "last_checkpoint").read_text()
    start = _checkpoint(tmp_path / last)["iteration"] + 1
    assert start < 10

    resumed = subprocess.run(
        _train_command(shapes_dataset, tmp_path, 10, resume=True),
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Starting training from iteration {start}" in resumed.stderr + resumed.stdout
    assert _checkpoint(tmp_path / "model_final.pth")["iteration"] == 9
    assert_equal_weights(_final_weights(tmp_path), uninterrupted)


def test_killed_before_model_final_was_written_resume_writes_it(shapes_dataset, tmp_path):
    """All iterations done and checkpointed, model_final.pth not yet written: --resume has no
    step left to run, and still leaves model_final.pth (detectron2 would never write it)."""
    no_evaluation = "SOLVER.MAX_ITER 4 DATASETS.TEST ()".split()
    train_net(tmp_path, coco_args(shapes_dataset), *no_evaluation)
    (tmp_path / "model_final.pth").unlink()
    (tmp_path / "last_checkpoint").write_text("model_0000003.pth")
    _, log = train_net(tmp_path, coco_args(shapes_dataset), "--resume", *no_evaluation)
    assert "writing the missing" in log
    assert_equal_weights(
        _final_weights(tmp_path), _checkpoint(tmp_path / "model_0000003.pth")["model"]
    )
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"


def test_resume_from_a_checkpoint_into_another_folder_continues_it_exactly(
    shapes_dataset, tmp_path
):
    """--resume-from PATH continues PATH's run (iteration, optimizer, schedule, data stream,
    RNGs) in a new OUTPUT_DIR: the final weights equal those of the run that wrote PATH, which
    is left unchanged."""
    straight, branch = tmp_path / "straight", tmp_path / "branch"
    opts = [*AUGMENTED, "SOLVER.MAX_ITER", "3"]
    datasets = coco_args(shapes_dataset)
    run("train_net.py", *train_net_argv(straight, datasets, *opts, test_sets="()"))
    source = straight / "model_0000001.pth"  # SOLVER.CHECKPOINT_PERIOD 2: after iteration 1
    written = source.read_bytes()
    _, log = run(
        "train_net.py",
        "--resume-from",
        str(source),
        *train_net_argv(branch, datasets, *opts, test_sets="()"),
    )
    assert "Starting training from iteration 2" in log
    assert _checkpoint(branch / "model_final.pth")["iteration"] == 2
    assert_equal_weights(_final_weights(branch), _final_weights(straight))
    assert source.read_bytes() == written


@pytest.mark.slow
def test_random_kills_including_during_checkpoint_writes_never_lose_the_run(
    shapes_dataset, uninterrupted, tmp_path
):
    """Kills the run at random moments (a checkpoint is written every iteration, so many kills
    land in a write) and resumes each time: every resume starts from a complete checkpoint, the
    run reaches its last iteration, and its weights equal the uninterrupted run's."""
    import random

    rng = random.Random(0)
    command = _train_command(
        shapes_dataset, tmp_path, 10, "SOLVER.CHECKPOINT_PERIOD", "1", resume=True
    )
    pointer = tmp_path / "last_checkpoint"
    kills = resumes = 0
    while not (tmp_path / "model_final.pth").exists():
        before = pointer.read_text() if pointer.exists() else None
        proc = _start(command)
        # Once this life has written a checkpoint (start-up done, training going), kill it: the
        # first three lives at once (so that at least three kills happen, whatever the speed of
        # the machine), later ones a random fraction of an iteration or two later, in a step or
        # in a checkpoint write.
        while proc.poll() is None and (pointer.read_text() if pointer.exists() else None) == before:
            time.sleep(0.005)
        if resumes >= 3:
            time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        error = proc.stderr.read().decode()
        assert proc.returncode in (0, -signal.SIGKILL), error[-3000:]
        resumes += 1
        assert resumes < 40, "the run does not progress"
    assert kills >= 3
    assert _checkpoint(tmp_path / "model_final.pth")["iteration"] == 9
    assert_equal_weights(_final_weights(tmp_path), uninterrupted)


# ---------------------------------------------------------------- the resumable data stream
class _RecordingMapper:
    """Maps a record to its file name and draws from every global RNG, like an augmentation."""

    def __call__(self, record):
        import random

        import numpy as np

        return {
            "file_name": record["file_name"],
            "width": record["width"],
            "height": record["height"],
            "draws": (random.random(), float(np.random.rand()), float(torch.rand(()))),
        }


def _records(count=23):
    # Mixed landscape and portrait images, so that aspect-ratio buckets hold images over batches.
    return [
        {"file_name": f"{i}.jpg", "width": 40 if i % 3 else 30, "height": 30 if i % 3 else 40}
        for i in range(count)
    ]


def _loader(records, grouping, workers, seed=7):
    from detectron2.data.samplers import TrainingSampler
    from retinanet_plugin.data.resumable import ResumableTrainLoader

    sampler = TrainingSampler(len(records), seed=seed)
    return ResumableTrainLoader(
        records,
        _RecordingMapper(),
        sampler,
        batch_size=3,
        aspect_ratio_grouping=grouping,
        num_workers=workers,
    )


def _take(loader, count):
    iterator = iter(loader)
    return [next(iterator) for _ in range(count)]


@pytest.mark.parametrize("grouping", [True, False])
@pytest.mark.parametrize("workers", [0, 2])
def test_stream_started_at_an_iteration_continues_the_uninterrupted_stream(grouping, workers):
    records = _records()
    straight = _take(_loader(records, grouping, workers), 14)
    for start in (1, 5, 9):
        resumed = _loader(records, grouping, workers)
        resumed.start_iter = start
        assert _take(resumed, 14 - start) == straight[start:]


def test_stream_follows_detectron2_sampler_order_and_groups_like_detectron2():
    """Same images in the same batches as detectron2's own loader pieces (augmentation draws
    aside, which detectron2 takes from whichever process maps the image)."""
    from detectron2.data.common import AspectRatioGroupedDataset
    from detectron2.data.samplers import TrainingSampler

    records = _records()
    ours = _take(_loader(records, grouping=True, workers=0), 10)
    theirs = AspectRatioGroupedDataset((records[i] for i in TrainingSampler(23, seed=7)), 3)
    reference = [next(iter_) for iter_ in [iter(theirs)] for _ in range(10)]
    names = [[d["file_name"] for d in batch] for batch in ours]
    assert names == [[d["file_name"] for d in batch] for batch in reference]


def test_stream_leaves_the_global_rngs_alone_and_differs_by_seed():
    import random

    import numpy as np

    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    batches = _take(_loader(_records(), True, 0), 4)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected
    assert batches != _take(_loader(_records(), True, 0, seed=8), 4)
    # Every image of the stream gets its own draws.
    draws = [d["draws"] for batch in batches for d in batch]
    assert len(set(draws)) == len(draws)


def test_state_dict_carries_the_seed():
    loader, other = _loader(_records(), True, 0, seed=7), _loader(_records(), True, 0, seed=99)
    other.load_state_dict(loader.state_dict())
    assert _take(other, 3) == _take(loader, 3)


def test_stream_with_repeat_factor_sampler_continues_exactly():
    """detectron2's RepeatFactorTrainingSampler (LVIS-style): epochs of varying length."""
    from detectron2.data.samplers import RepeatFactorTrainingSampler
    from retinanet_plugin.data.resumable import ResumableTrainLoader

    records = _records()

    def loader():
        factors = torch.tensor([1.0 + (i % 4) * 0.7 for i in range(len(records))])
        sampler = RepeatFactorTrainingSampler(factors, seed=5)
        return ResumableTrainLoader(records, _RecordingMapper(), sampler, batch_size=3)

    straight = _take(loader(), 30)
    resumed = loader()
    resumed.start_iter = 17
    assert _take(resumed, 13) == straight[17:]


@pytest.mark.parametrize("sampler_seed", [-1, None])
def test_unset_sampler_seed_draws_a_shared_seed_that_resume_restores(sampler_seed):
    """detectron2 after 0.6 passes SEED -1 on to the sampler (0.6 passes None): the loader draws
    the seed as detectron2 0.6's TrainingSampler does (comm.shared_random_seed, from numpy's
    global RNG in one process), and its stream is detectron2's for that seed."""
    import numpy as np

    from detectron2.data.samplers import TrainingSampler
    from retinanet_plugin.data.resumable import ResumableTrainLoader

    records = _records()
    sampler = TrainingSampler(len(records), seed=0)
    sampler._seed = sampler_seed  # as detectron2 main's TrainingSampler(seed=-1) leaves it
    np.random.seed(11)
    loader = ResumableTrainLoader(records, _RecordingMapper(), sampler, batch_size=3)
    expected_seed = int(np.random.RandomState(11).randint(2**31))
    assert loader.state_dict() == {"seed": expected_seed}
    reference = _loader(records, grouping=True, workers=0, seed=expected_seed)
    assert _take(loader, 4) == _take(reference, 4)


@pytest.mark.parametrize("world_size, rank, expected", [(2, 1, 1), (2, 0, 0), (3, 2, 0), (1, 0, 0)])
def test_each_rank_restores_its_own_training_state(monkeypatch, world_size, rank, expected):
    """A checkpoint of 2 processes: each of 2 ranks gets its own RNGs and loss normalizer; any
    other number of processes gets rank 0's."""
    import random

    from detectron2.utils import comm
    from retinanet_plugin.engine.resume import load_training_state, training_state

    model = torch.nn.Linear(1, 1)
    states = []
    for seed in (10, 11):
        random.seed(seed)
        model.loss_normalizer = float(seed)
        states.append(training_state(model, None))
    monkeypatch.setattr(comm, "get_rank", lambda: rank)
    monkeypatch.setattr(comm, "get_world_size", lambda: world_size)
    load_training_state({"per_rank": states}, model, None)
    assert model.loss_normalizer == float(10 + expected)
    # Python's RNG continues from the state saved right after seeding that rank's generator.
    assert random.random() == random.Random(10 + expected).random()
