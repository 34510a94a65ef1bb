"""Starting one training process per device on every machine, after the machines have met.

detectron2 0.6's ``launch`` asserts CUDA and uses NCCL, so ``--num-gpus N`` cannot run CPU
processes, and its processes wait for the other machines inside ``init_process_group`` for 30
minutes without a word. Here the launching process of every machine first meets the others at
``--dist-url`` (a TCP store that machine rank 0's launching process hosts), saying what it waits
for and giving up after :data:`RENDEZVOUS_TIMEOUT_ENV` seconds with one clear line; then it
starts its processes (gloo on CPU, NCCL on CUDA), which join one process group through that
store and set up detectron2's ``comm`` state the way detectron2 does. One process in all runs
``main_func`` directly, as detectron2's ``launch`` does.
"""

import logging
import os
import socket
import time
from datetime import timedelta
from typing import Optional, Tuple
from urllib.parse import urlparse

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detectron2.engine import launch as detectron2_launch
from detectron2.utils import comm

from ..compat.private_api import find_free_port, set_local_process_group
from ..errors import UserError

__all__ = ["RENDEZVOUS_TIMEOUT_ENV", "RendezvousError", "launch"]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = timedelta(minutes=30)
# Seconds the machines wait for each other at --dist-url (default 10 minutes).
RENDEZVOUS_TIMEOUT_ENV = "RETINANET_PLUGIN_RENDEZVOUS_TIMEOUT"
_DEFAULT_RENDEZVOUS_TIMEOUT = 600.0
_REPORT_EVERY = 30.0  # seconds between "still waiting" lines
_JOINED_KEY = "retinanet_plugin/machines_joined"


class RendezvousError(UserError, RuntimeError):
    """The machines of a multi-machine run did not all meet at --dist-url."""


def _rendezvous_timeout() -> float:
    value = os.environ.get(RENDEZVOUS_TIMEOUT_ENV, "")
    if not value:
        return _DEFAULT_RENDEZVOUS_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise RendezvousError(
            f"{RENDEZVOUS_TIMEOUT_ENV}={value!r}: must be a number of seconds > 0"
        )
    return seconds


def _host_port(dist_url: str) -> Tuple[str, int]:
    url = urlparse(dist_url)
    try:
        port = url.port
    except ValueError:
        port = None
    if not url.hostname or port is None:
        raise RendezvousError(
            f"--dist-url {dist_url}: expected tcp://HOST:PORT, HOST being machine rank 0's "
            "address (e.g. tcp://127.0.0.1:50152 on one machine)"
        )
    return url.hostname, port


def _listening(host: str, port: int) -> bool:
    """Whether a server accepts connections at host:port."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _meet(dist_url: str, num_machines: int, machine_rank: int) -> dist.TCPStore:
    """Waits until the launching processes of all ``num_machines`` machines have reached the TCP
    store at ``dist_url`` (hosted here on machine rank 0), logging what it waits for.

    Returns:
        The store (machine rank 0: the server, which must live as long as the processes).

    Raises:
        RendezvousError: the store cannot be hosted or reached, or a machine did not come within
            the timeout.
    """
    host, port = _host_port(dist_url)
    timeout = _rendezvous_timeout()
    start = time.monotonic()
    if machine_rank:
        logger.warning(
            "Machine rank %d: joining machine rank 0 at %s (waiting up to %g s)",
            machine_rank,
            dist_url,
            timeout,
        )
        # Wait for the server here: torch's client logs every failed try with a C++ stack.
        while not _listening(host, port):
            if time.monotonic() - start >= timeout:
                raise RendezvousError(
                    f"--dist-url {dist_url}: machine rank 0 did not answer within {timeout:g} s; "
                    "start machine rank 0 first, with the same --dist-url and --num-machines, "
                    f"and check that this machine can reach that address (the limit is "
                    f"{RENDEZVOUS_TIMEOUT_ENV})"
                )
            time.sleep(0.5)
    try:
        store = dist.TCPStore(
            host,
            port,
            world_size=None,
            is_master=machine_rank == 0,
            timeout=timedelta(seconds=timeout),
            wait_for_workers=False,
        )
    except (RuntimeError, OSError) as e:  # DistNetworkError is a RuntimeError
        what = "cannot listen there" if machine_rank == 0 else "cannot join machine rank 0 there"
        raise RendezvousError(
            f"--dist-url {dist_url}: {what} ({(str(e) or repr(e)).splitlines()[0]}); "
            + ("choose a free port" if machine_rank == 0 else "check the address")
        ) from e
    joined = store.add(_JOINED_KEY, 1)
    reported = None
    while joined < num_machines:
        waited = time.monotonic() - start
        missing = num_machines - joined
        if waited >= timeout:
            ranks = "1" if num_machines == 2 else f"1 to {num_machines - 1}"
            raise RendezvousError(
                f"--num-machines {num_machines}: waiting for {missing} more machine(s) at "
                f"{dist_url}; {'none' if joined == 1 else f'only {joined - 1}'} joined within "
                f"{timeout:g} s. Start train_net.py on the other machine(s) with --machine-rank "
                f"{ranks} and --dist-url {dist_url}, or use --num-machines 1 (the limit is "
                f"{RENDEZVOUS_TIMEOUT_ENV})"
            )
        if reported is None or waited - reported >= _REPORT_EVERY:
            logger.warning(
                "Machine rank %d: waiting for %d more machine(s) to join at %s (%.0f s of %g s)",
                machine_rank,
                missing,
                dist_url,
                waited,
                timeout,
            )
            reported = waited
        time.sleep(0.2)
        try:
            joined = store.add(_JOINED_KEY, 0)
        except RuntimeError as e:  # DistNetworkError: machine rank 0 gave up waiting
            raise RendezvousError(
                f"--dist-url {dist_url}: machine rank 0 stopped before all {num_machines} "
                "machines joined (see its messages)"
            ) from e
    if num_machines > 1:
        logger.warning("All %d machines joined at %s", num_machines, dist_url)
    return store


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
            local port); a ``file://`` URL skips the meeting of the machines.
        args: arguments of ``main_func``.
        device: ``MODEL.DEVICE``: "cpu" runs gloo CPU processes, otherwise one NCCL process per
            GPU.

    Raises:
        RendezvousError: see :func:`_meet`.
    """
    world_size = num_machines * num_processes_per_machine
    if world_size == 1:
        return detectron2_launch(main_func, 1, args=args)
    if dist_url == "auto":
        if num_machines != 1:
            raise RendezvousError("--dist-url auto only works on one machine: give tcp://HOST:PORT")
        dist_url = f"tcp://127.0.0.1:{find_free_port()}"
    store = None
    if not dist_url.startswith("file://"):
        store = _meet(dist_url, num_machines, machine_rank)
    mp.start_processes(
        _worker,
        nprocs=num_processes_per_machine,
        args=(
            main_func,
            world_size,
            num_processes_per_machine,
            machine_rank,
            dist_url,
            args,
            device == "cpu",
        ),
        daemon=False,
        start_method="spawn",
    )
    del store  # machine rank 0's server lived until here: the processes met through it


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
            set_local_process_group(group)


def _worker(
    local_rank,
    main_func,
    world_size,
    num_processes_per_machine,
    machine_rank,
    dist_url,
    args,
    cpu,
):
    rank = machine_rank * num_processes_per_machine + local_rank
    if not cpu:
        torch.cuda.set_device(local_rank)
    store: Optional[dist.Store] = None
    if not dist_url.startswith("file://"):
        host, port = _host_port(dist_url)
        client = dist.TCPStore(host, port, is_master=False, timeout=DEFAULT_TIMEOUT)
        store = dist.PrefixStore("default_pg", client)
    dist.init_process_group(
        backend="gloo" if cpu else "nccl",
        init_method=None if store else dist_url,
        store=store,
        world_size=world_size,
        rank=rank,
        timeout=DEFAULT_TIMEOUT,
    )
    _create_local_process_group(num_processes_per_machine)
    if cpu:  # share the machine's cores instead of every process using all of them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_processes_per_machine))
    comm.synchronize()
    main_func(*args)
