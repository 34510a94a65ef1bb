"""Data-parallel training in CPU processes (gloo): the same updates as one process, each rank's
state in the checkpoint, machines that meet or time out."""

import json
import os
import sys

import pytest
import torch

from conftest import isolated_process_state
from retinanet_plugin.engine.launch import launch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train_and_dump(argv, dump_dir):
    """Runs in every process: the training command's setup and the Trainer for 3 iterations,
    then saves this rank's torch RNG state."""
    from detectron2.utils import comm
    from retinanet_plugin.cli import train
    from retinanet_plugin.data import register_datasets_from_args
    from retinanet_plugin.engine import Trainer

    args = train.argument_parser().parse_args(argv)
    register_datasets_from_args(args)
    trainer = Trainer(train.setup(args))
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert isinstance(trainer.model, torch.nn.parallel.DistributedDataParallel)
    torch.save(torch.get_rng_state(), os.path.join(dump_dir, f"rank{comm.get_rank()}_rng.pth"))


def test_checkpoint_of_two_processes_holds_each_ranks_own_state(shapes_dataset, tmp_path):
    """The final checkpoint of a 2-process CPU run holds each rank's own training state: its
    torch RNG state is the one that rank had when training ended."""
    (train_json, train_root), (val_json, val_root) = shapes_dataset["train"], shapes_dataset["val"]
    argv = [
        "--config-file",
        os.path.join(REPO, "configs", "retinanet_R18_GN_tiny.yaml"),
        "--num-gpus",
        "2",
        "--register-coco",
        "shapes_train",
        train_json,
        train_root,
        "--register-coco",
        "shapes_val",
        val_json,
        val_root,
        "DATASETS.TRAIN",
        "('shapes_train',)",
        "DATASETS.TEST",
        "()",
        "SOLVER.MAX_ITER",
        "3",
        "SOLVER.IMS_PER_BATCH",
        "4",
        "INPUT.MIN_SIZE_TRAIN",
        "(128,)",
        "INPUT.MAX_SIZE_TRAIN",
        "160",
        "DATALOADER.NUM_WORKERS",
        "0",
        "SEED",
        "3",
        "OUTPUT_DIR",
        str(tmp_path / "out"),
    ]
    launch(_train_and_dump, 2, dist_url="auto", args=(argv, str(tmp_path)), device="cpu")

    final = torch.load(tmp_path / "out" / "model_final.pth", weights_only=True)
    per_rank = final["trainer"]["resume"]["per_rank"]
    assert len(per_rank) == 2
    for rank in (0, 1):
        at_end = torch.load(tmp_path / f"rank{rank}_rng.pth", weights_only=True)
        assert torch.equal(per_rank[rank]["rng"]["torch"], at_end), rank
    assert not torch.equal(per_rank[0]["rng"]["torch"], per_rank[1]["rng"]["torch"])


def _sgd_steps(argv, dump_path, steps):
    """Runs in every process: the plugin's Trainer (its model wrapped for data parallelism when
    there are several processes, its optimizer) takes ``steps`` SGD steps on fixed images, 2 per
    process: rank r the images 2r and 2r + 1 of the shapes training set (one process: half
    0 then half 1, each normalized on its own and the two losses averaged, which is what
    DistributedDataParallel's gradient averaging computes). Rank 0 saves the weights."""
    import detectron2.data.transforms as T
    from detectron2.data import DatasetCatalog, DatasetMapper
    from detectron2.utils import comm
    from detectron2.utils.events import EventStorage
    from retinanet_plugin.cli import train
    from retinanet_plugin.data import register_datasets_from_args
    from retinanet_plugin.engine import Trainer

    args = train.argument_parser().parse_args(argv)
    register_datasets_from_args(args)
    cfg = train.setup(args)
    torch.manual_seed(0)  # the same initial weights everywhere (DDP also broadcasts rank 0's)
    trainer = Trainer(cfg)
    mapper = DatasetMapper(cfg, is_train=True, augmentations=[T.ResizeShortestEdge(128, 160)])
    records = DatasetCatalog.get("shapes_train")[:4]
    halves = [[mapper(dict(r)) for r in records[i : i + 2]] for i in (0, 2)]
    mine = [halves[comm.get_rank()]] if comm.get_world_size() > 1 else halves
    model = getattr(trainer.model, "module", trainer.model)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same float summation order in every process
    try:
        with EventStorage():
            for _ in range(steps):
                trainer.optimizer.zero_grad()
                loss = sum(sum(trainer.model(batch).values()) for batch in mine) / len(mine)
                loss.backward()
                trainer.optimizer.step()
    finally:
        torch.set_num_threads(threads)  # one process runs in the test's own process
    if comm.is_main_process():
        torch.save({"initial": initial, "final": model.state_dict()}, dump_path)


def test_two_processes_equal_one_process_on_the_same_global_batch(shapes_dataset, tmp_path):
    """Two CPU processes (gloo) with 2 images each end with the weights of one process that
    takes the same 4 images per step, after 2 SGD steps with momentum and gradient clipping: the
    updates agree to 1e-2 of their size (the gradient sums run in another order, which these
    steps amplify: measured up to 1e-3; one thread per process, as more threads reorder the
    convolutions' sums too). Without the averaging of gradients they would differ by far more
    (each process would step with its own two images' gradient)."""
    train_json, train_root = shapes_dataset["train"]
    weights = {}
    for processes in (1, 2):
        argv = [
            "--config-file",
            os.path.join(REPO, "configs", "retinanet_R18_GN_tiny.yaml"),
            "--num-gpus",
            str(processes),
            "--register-coco",
            "shapes_train",
            train_json,
            train_root,
            "DATASETS.TRAIN",
            "('shapes_train',)",
            "DATASETS.TEST",
            "()",
            "SOLVER.IMS_PER_BATCH",
            "4",
            "SOLVER.BASE_LR",
            "0.01",
            "SOLVER.WARMUP_FACTOR",
            "1.0",
            "SOLVER.OPTIMIZER",
            "SGD",
            "MODEL.RETINANET.LOSS_NORMALIZER",
            "batch",
            "DATALOADER.NUM_WORKERS",
            "0",
            "OUTPUT_DIR",
            str(tmp_path / f"out{processes}"),
        ]
        dump = str(tmp_path / f"weights{processes}.pth")
        # One process runs in this one: its log handlers and datasets must not outlive the test.
        with isolated_process_state():
            launch(_sgd_steps, processes, dist_url="auto", args=(argv, dump, 2), device="cpu")
        weights[processes] = torch.load(dump, weights_only=True)
    initial = weights[1]["initial"]
    one, two = weights[1]["final"], weights[2]["final"]
    assert one.keys() == two.keys() == initial.keys()
    for key in one:
        assert torch.equal(weights[2]["initial"][key], initial[key]), key
        # The updates, not the weights, within float tolerance (the sums run in another order).
        update_one, update_two = one[key] - initial[key], two[key] - initial[key]
        scale = update_one.abs().max().item()
        assert (update_two - update_one).abs().max().item() <= 1e-2 * scale + 1e-9, key
    # Not a vacuous equality: the steps moved the weights.
    assert (one["head.cls_score.weight"] - initial["head.cls_score.weight"]).abs().max() > 1e-3


def test_bad_dataset_found_in_two_processes_is_one_error_line(shapes_dataset, tmp_path):
    """Bad input found inside the launched processes (here a COCO file with a repeated image id,
    read when each process loads its data): one `error: ...` line, exit status 2."""
    import subprocess

    train_json, train_root = shapes_dataset["train"]
    coco = json.loads(open(train_json).read())
    coco["images"][1]["id"] = coco["images"][0]["id"]
    bad_json = tmp_path / "bad.json"
    bad_json.write_text(json.dumps(coco))
    result = subprocess.run(
        [
            sys.executable,
            "train_net.py",
            "--config-file",
            os.path.join(REPO, "configs", "retinanet_R18_GN_tiny.yaml"),
            "--num-gpus",
            "2",
            "--register-coco",
            "bad_train",
            str(bad_json),
            train_root,
            "DATASETS.TRAIN",
            "('bad_train',)",
            "DATASETS.TEST",
            "()",
            "SOLVER.IMS_PER_BATCH",
            "2",
            "SOLVER.MAX_ITER",
            "1",
            "DATALOADER.NUM_WORKERS",
            "0",
            "OUTPUT_DIR",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "2 images have id" in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def _free_port() -> int:
    from retinanet_plugin.compat.private_api import find_free_port

    return find_free_port()


def test_a_missing_machine_is_named_within_the_rendezvous_timeout(
    shapes_dataset, tmp_path, monkeypatch
):
    """`--num-machines 2` with only this machine: the wait is logged, and after the timeout one
    line names the address and the machine that did not come, instead of a silent hang."""
    from bad_input_env import Env

    from conftest import run_main
    from retinanet_plugin.cli import train
    from retinanet_plugin.engine.launch import RENDEZVOUS_TIMEOUT_ENV

    monkeypatch.setenv(RENDEZVOUS_TIMEOUT_ENV, "1")
    url = f"tcp://127.0.0.1:{_free_port()}"
    env = Env(tmp_path, shapes_dataset, "rendezvous")
    code, log = run_main(train.main, env.train("--num-machines", "2", "--dist-url", url))
    assert code == 2, log[-3000:]
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in log, log[-3000:]
    assert f"waiting for 1 more machine(s) at {url}; none joined within 1 s" in errors[0]
    assert f"Machine rank 0: waiting for 1 more machine(s) to join at {url}" in log
    assert not os.path.exists(os.path.join(env.out, "config.yaml"))  # nothing started


def test_two_machines_meet_on_loopback(monkeypatch):
    """The launching processes of machine ranks 0 and 1 (threads here) meet at --dist-url: each
    returns once both have come, machine 1 arriving later than machine 0."""
    import threading
    import time

    from retinanet_plugin.engine import launch as launch_module

    monkeypatch.setenv(launch_module.RENDEZVOUS_TIMEOUT_ENV, "30")
    url = f"tcp://127.0.0.1:{_free_port()}"
    met = {}

    def machine(rank):
        store = launch_module._meet(url, 2, rank, launch_module._Meeting.of_machines(url, 2))
        met[rank] = (time.monotonic(), store.add("retinanet_plugin/machines_joined", 0), store)

    first = threading.Thread(target=machine, args=(0,))
    first.start()
    time.sleep(0.5)
    arrival = time.monotonic()
    machine(1)
    first.join(timeout=30)
    assert met[0][1] == met[1][1] == 2
    assert met[0][0] >= arrival  # machine 0 waited for machine 1


def test_machine_rank_1_without_machine_0_is_named_within_the_timeout(
    shapes_dataset, tmp_path, monkeypatch
):
    from bad_input_env import Env

    from conftest import run_main
    from retinanet_plugin.cli import train
    from retinanet_plugin.engine.launch import RENDEZVOUS_TIMEOUT_ENV

    monkeypatch.setenv(RENDEZVOUS_TIMEOUT_ENV, "1")
    url = f"tcp://127.0.0.1:{_free_port()}"
    env = Env(tmp_path, shapes_dataset, "rendezvous1")
    argv = env.train("--num-machines", "2", "--machine-rank", "1", "--dist-url", url)
    code, log = run_main(train.main, argv)
    assert code == 2, log[-3000:]
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in log, log[-3000:]
    assert f"--dist-url {url}: machine rank 0 did not answer within 1 s" in errors[0]
    assert f"Machine rank 1: joining machine rank 0 at {url}" in log


# ------------------------------------------------- starts by cluster launchers, on the loopback
@pytest.mark.parametrize("kind", ["machines", "torchrun", "srun"])
def test_cluster_starts_train_the_same_as_num_gpus_2(
    kind, shapes_dataset, tmp_path_factory, tmp_path
):
    """Two processes started as two "machines" of one process each (--num-machines 2
    --machine-rank 0/1 --dist-url tcp://127.0.0.1:PORT), by torchrun (--nproc-per-node 2), or
    as two srun tasks (a SLURM-like environment) end with bit-identical weights to
    ``--num-gpus 2`` (the same ranks, data shards and gradient averaging), with each rank's
    training state in the final checkpoint."""
    from distributed_runs import (
        ITERATIONS,
        Run,
        assert_equal_weights,
        final_weights,
        reference_weights,
        train_args,
    )

    reference = reference_weights(tmp_path_factory, shapes_dataset)
    output_dir = tmp_path / "out"
    started = Run(kind, output_dir, train_args(output_dir, shapes_dataset, ITERATIONS))
    assert set(started.finish()) == {0}, started.output()
    assert_equal_weights(final_weights(output_dir), reference)
    final = torch.load(output_dir / "model_final.pth", weights_only=True)
    assert len(final["trainer"]["resume"]["per_rank"]) == 2
    if kind != "machines":
        assert f"Started by {kind}: {kind} process 0 of 2 (machine 0 of 1" in started.output(None)


def _torchrun_variables(**changed):
    variables = dict(
        RANK="0",
        WORLD_SIZE="2",
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE="2",
        GROUP_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT="29500",
        TORCHELASTIC_USE_AGENT_STORE="True",
    )
    variables.update(changed)
    return {k: v for k, v in variables.items() if v is not None}


def _srun_variables(**changed):
    variables = dict(
        SLURM_JOB_ID="123456",
        SLURM_PROCID="5",
        SLURM_LOCALID="1",
        SLURM_NODEID="1",
        SLURM_STEP_NUM_TASKS="8",
        SLURM_STEP_TASKS_PER_NODE="4(x2)",
        SLURM_STEP_NODELIST="gpu[07-08]",
    )
    variables.update(changed)
    return {k: v for k, v in variables.items() if v is not None}


def test_launcher_environments_are_read():
    """torchrun's and srun's variables give the process's place; srun's rendezvous defaults to
    the step's first node and a port from the job id; one srun task, or none, is no cluster
    start; torchrun's variables win inside srun."""
    from retinanet_plugin.engine.cluster import cluster_process, first_host, restart_count

    torchrun = cluster_process(
        _torchrun_variables(RANK="3", LOCAL_RANK="1", WORLD_SIZE="4", GROUP_RANK="1")
    )
    assert torchrun == ("torchrun", 3, 4, 1, 2, "127.0.0.1", 29500, True)
    assert (torchrun.num_machines, torchrun.machine_rank) == (2, 1)
    srun = cluster_process(_srun_variables())
    assert srun == ("srun", 5, 8, 1, 4, "gpu07", 10000 + 123456 % 20000, False)
    assert (srun.num_machines, srun.machine_rank) == (2, 1)
    assert cluster_process(_srun_variables(MASTER_ADDR="10.0.0.1", MASTER_PORT="7000"))[5:7] == (
        "10.0.0.1",
        7000,
    )
    both = {**_srun_variables(), **_torchrun_variables()}
    assert cluster_process(both).launcher == "torchrun"
    one_task = _srun_variables(SLURM_PROCID="0", SLURM_STEP_NUM_TASKS="1", SLURM_LOCALID="0")
    assert cluster_process(one_task) is None
    assert cluster_process({"RANK": "1", "WORLD_SIZE": "2"}) is None  # machines, not processes
    assert first_host("gpu[07-09,12],cpu1") == "gpu07"
    assert first_host("node-a,node-b") == "node-a"
    assert first_host("rack[2-3]-n[010-012]") == "rack2-n010"
    assert restart_count({"SLURM_RESTART_COUNT": "0"}) == ("", 0)
    assert restart_count({"TORCHELASTIC_RESTART_COUNT": "2"}) == ("TORCHELASTIC_RESTART_COUNT", 2)


@pytest.mark.parametrize(
    "environ, expected",
    [
        (_torchrun_variables(RANK="2"), ["RANK=2 WORLD_SIZE=2", "not one of the 2 processes"]),
        (_torchrun_variables(LOCAL_RANK="2"), ["local rank 2 is not one of the 2"]),
        (_torchrun_variables(WORLD_SIZE="3"), ["3 processes do not fill machines of 2"]),
        (_torchrun_variables(MASTER_PORT=None), ["LOCAL_RANK is set but MASTER_PORT not"]),
        (_torchrun_variables(RANK="one"), ["RANK='one'", "whole number"]),
        (
            _torchrun_variables(RANK="1", GROUP_RANK="1"),
            ["rank 1 is not local rank 0 of machine 1"],
        ),
        (_srun_variables(SLURM_PROCID="2"), ["SLURM_PROCID=2", "--distribution=block"]),
        (
            _srun_variables(SLURM_STEP_TASKS_PER_NODE="5,3"),
            ["different numbers of tasks", "--ntasks-per-node"],
        ),
        (
            _srun_variables(SLURM_STEP_TASKS_PER_NODE="4(x3)"),
            ["SLURM_STEP_NUM_TASKS=8", "adds up to 12"],
        ),
        (_srun_variables(SLURM_STEP_NODELIST=None), ["MASTER_ADDR"]),
    ],
    ids=[
        "rank-out-of-range",
        "local-rank-out-of-range",
        "world-not-whole-machines",
        "master-port-missing",
        "rank-not-a-number",
        "rank-not-of-its-machine",
        "srun-cyclic-distribution",
        "srun-uneven-tasks",
        "srun-task-counts-disagree",
        "srun-no-address",
    ],
)
def test_inconsistent_launcher_environments_are_refused(environ, expected):
    from retinanet_plugin.engine.cluster import ClusterEnvironmentError, cluster_process

    with pytest.raises(ClusterEnvironmentError) as error:
        cluster_process(environ)
    for fragment in expected:
        assert fragment in str(error.value)


@pytest.mark.parametrize(
    "options, expected",
    [
        (["--num-gpus", "4"], ["--num-gpus 4", "torchrun process 0 of 2", "leave --num-gpus out"]),
        (["--num-machines", "2"], ["--num-machines 2", "num machines is 1"]),
        (
            ["--dist-url", "tcp://10.0.0.1:1234"],
            ["--dist-url tcp://10.0.0.1:1234", "tcp://127.0.0.1:29500"],
        ),
        (
            ["SOLVER.IMS_PER_BATCH", "3"],
            ["SOLVER.IMS_PER_BATCH = 3", "2 processes torchrun started"],
        ),
    ],
    ids=["num-gpus", "num-machines", "dist-url", "batch"],
)
def test_options_that_contradict_torchrun_are_refused_before_anything_starts(
    options, expected, shapes_dataset, tmp_path, monkeypatch
):
    """Under torchrun (its variables in the environment), an option that says otherwise, or a
    batch the processes cannot share, is one error line, before any process group or file."""
    from bad_input_env import Env

    from conftest import run_main
    from retinanet_plugin.cli import train

    for name, value in _torchrun_variables().items():
        monkeypatch.setenv(name, value)
    env = Env(tmp_path, shapes_dataset, "torchrun_options")
    code, log = run_main(train.main, env.train(*options))
    assert code == 2, log[-3000:]
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in log, log[-3000:]
    for fragment in expected:
        assert fragment in errors[0]
    assert not os.path.exists(env.out)


@pytest.mark.parametrize("rank", [0, 1])
def test_an_srun_task_alone_is_named_within_the_rendezvous_timeout(
    rank, shapes_dataset, tmp_path, monkeypatch
):
    """One of two srun tasks started (the other never comes, or rank 0 is unreachable): after
    the rendezvous timeout one line says what was waited for, instead of a silent hang."""
    from bad_input_env import Env
    from distributed_runs import srun_variables

    from conftest import run_main
    from retinanet_plugin.cli import train
    from retinanet_plugin.engine.launch import RENDEZVOUS_TIMEOUT_ENV

    port = _free_port()
    for name, value in srun_variables(rank, port).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv(RENDEZVOUS_TIMEOUT_ENV, "1")
    env = Env(tmp_path, shapes_dataset, f"srun_alone{rank}")
    code, log = run_main(train.main, env.train())
    assert code == 2, log[-3000:]
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in log, log[-3000:]
    address = f"tcp://127.0.0.1:{port}"
    if rank:
        assert (
            f"MASTER_ADDR:MASTER_PORT 127.0.0.1:{port}: process rank 0 did not answer within 1 s"
            in errors[0]
        )
        assert f"Process rank 1: joining process rank 0 at {address}" in log
    else:
        assert (
            f"2 srun processes: waiting for 1 more process(es) at {address}; none joined within 1 s"
            in errors[0]
        )
        assert f"Process rank 0: waiting for 1 more process(es) to join at {address}" in log
