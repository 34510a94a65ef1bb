"""Starting one training process per device: detectron2's ``launch``, plus CPU processes.

detectron2 0.6's ``launch`` asserts CUDA and uses NCCL, so ``--num-gpus N`` cannot run CPU
processes. With ``device="cpu"`` and more than one process this starts the processes itself with
the gloo backend and sets up detectron2's ``comm`` state the way detectron2 does; everything
else goes to detectron2's ``launch`` unchanged.
"""

import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detectron2.engine import launch as detectron2_launch
from detectron2.utils import comm

from .compat.private_api import find_free_port

__all__ = ["launch"]


DEFAULT_TIMEOUT = timedelta(minutes=30)


def launch(
    main_func,
    num_processes_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str = None,
    args=(),
    device: str = "cuda",
):
    """Runs ``main_func(*args)`` in ``num_processes_per_machine`` processes on each machine.

    Args:
        main_func: the function every process runs.
        num_processes_per_machine: processes per machine (``--num-gpus``).
        num_machines, machine_rank, dist_url: as detectron2's ``launch`` ("auto" picks a free
            local port).
        args: arguments of ``main_func``.
        device: ``MODEL.DEVICE``; "cpu" with more than one process uses gloo CPU processes.
    """
    world_size = num_machines * num_processes_per_machine
    if device != "cpu" or world_size == 1:
        return detectron2_launch(
            main_func, num_processes_per_machine, num_machines, machine_rank, dist_url, args=args
        )
    if dist_url == "auto":
        if num_machines != 1:
            raise ValueError("--dist-url auto only works on one machine")
        dist_url = f"tcp://127.0.0.1:{find_free_port()}"
    mp.start_processes(
        _cpu_worker,
        nprocs=num_processes_per_machine,
        args=(main_func, world_size, num_processes_per_machine, machine_rank, dist_url, args),
        daemon=False,
        start_method="spawn",
    )


def _create_local_process_group(num_processes_per_machine: int) -> None:
    if hasattr(comm, "create_local_process_group"):  # detectron2 after 0.6
        comm.create_local_process_group(num_processes_per_machine)
        return
    num_machines = dist.get_world_size() // num_processes_per_machine
    machine_rank = dist.get_rank() // num_processes_per_machine
    for i in range(num_machines):
        group = dist.new_group(
            list(range(i * num_processes_per_machine, (i + 1) * num_processes_per_machine))
        )
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group


def _cpu_worker(
    local_rank, main_func, world_size, num_processes_per_machine, machine_rank, dist_url, args
):
    dist.init_process_group(
        backend="gloo",
        init_method=dist_url,
        world_size=world_size,
        rank=machine_rank * num_processes_per_machine + local_rank,
        timeout=DEFAULT_TIMEOUT,
    )
    _create_local_process_group(num_processes_per_machine)
    # Share the machine's cores instead of every process using all of them.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_processes_per_machine))
    comm.synchronize()
    main_func(*args)
