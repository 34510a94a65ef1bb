"""Data-parallel training in 2 CPU processes (gloo): ranks stay in sync, losses are finite."""

import json
import os
import sys

import torch

from retinanet_plugin.engine.launch import launch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train_and_dump(argv, dump_dir):
    """Runs in every process: the training command's setup and the Trainer for 3 iterations, then
    saves this rank's weights and losses."""
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
    rank = comm.get_rank()
    torch.save(trainer.model.module.state_dict(), os.path.join(dump_dir, f"rank{rank}.pth"))
    if comm.is_main_process():  # detectron2 gathers every rank's losses into rank 0's storage
        losses = [v for v, _ in trainer.storage.history("total_loss").values()]
        with open(os.path.join(dump_dir, "losses.json"), "w") as f:
            json.dump({"world_size": comm.get_world_size(), "losses": losses}, f)


def test_two_cpu_processes_stay_in_sync(shapes_dataset, tmp_path):
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

    # The ranks started from different seeds and saw different images; DDP broadcast rank 0's
    # initial weights and averaged every gradient, so their weights must be identical.
    rank0 = torch.load(tmp_path / "rank0.pth", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pth", weights_only=True)
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    # The checkpoint holds each rank's own training state (RNGs, loss normalizer).
    final = torch.load(tmp_path / "out" / "model_final.pth", weights_only=True)
    per_rank = final["trainer"]["resume"]["per_rank"]
    assert len(per_rank) == 2
    assert not torch.equal(per_rank[0]["rng"]["torch"], per_rank[1]["rng"]["torch"])
    record = json.loads((tmp_path / "losses.json").read_text())
    assert record["world_size"] == 2
    assert len(record["losses"]) == 3
    assert all(torch.isfinite(torch.tensor(record["losses"])))


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
        store = launch_module._meet(url, 2, rank)
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
