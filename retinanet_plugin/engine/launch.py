"""Starting one training process per device on every machine, after the machines have met.

detectron2 0.6's ``launch`` asserts CUDA and uses NCCL, so ``--num-gpus N`` cannot run CPU
processes, and its processes wait for the other machines inside ``init_process_group`` for 30
minutes without a word. Here the launching process of every machine first meets the others at
``--dist-url`` (a TCP store that machine rank 0's launching process hosts), saying what it waits
for and giving up after :data:`RENDEZVOUS_TIMEOUT_ENV` seconds with one clear line; then it
starts its processes (gloo on CPU, NCCL on CUDA), which join one process group through that
store and set up detectron2's ``comm`` state the way detectron2 does. One process in all runs
``main_func`` directly, as detectron2's ``launch`` does.

A process that torchrun or srun started (see :mod:`.cluster`) is already one of the processes:
it joins the others (torchrun: through its agent's store; srun: at a store that rank 0 hosts,
met the same time-limited way as machines meet) and runs ``main_func`` itself.
"""

import logging
import os
import socket
import time
from datetime import timedelta
from typing import NamedTuple, Optional, Tuple
from urllib.parse import urlparse

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detectron2.engine import launch as detectron2_launch
from detectron2.utils import comm

from ..compat.private_api import find_free_port, set_local_process_group
from ..errors import UserError
from .cluster import ClusterProcess
from .preemption import forward_stop_signals

__all__ = ["RENDEZVOUS_TIMEOUT_ENV", "RendezvousError", "launch"]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = timedelta(minutes=30)
# Seconds the machines wait for each other at --dist-url (default 10 minutes).
RENDEZVOUS_TIMEOUT_ENV = "RETINANET_PLUGIN_RENDEZVOUS_TIMEOUT"
_DEFAULT_RENDEZVOUS_TIMEOUT = 600.0
_REPORT_EVERY = 30.0  # seconds between "still waiting" lines
_JOINED_KEY = "retinanet_plugin/machines_joined"
# A worker that fails brings the others down after this many seconds; those that end by
# themselves within it (all ranks leave together at a stop signal) end cleanly.
_GRACE_PERIOD = 10.0


class _Meeting(NamedTuple):
    """Who meets at the rendezvous, in the words of the messages."""

    what: str  # "machine" or "process"
    whats: str  # "machine(s)" or "process(es)"
    total: str  # how the user gave their number, e.g. "--num-machines 2"
    address: str  # how the user gave the address, e.g. "--dist-url tcp://127.0.0.1:50152"
    start_first: str  # what to do when rank 0 does not answer
    come: str  # what to do when others do not come

    @classmethod
    def of_machines(cls, dist_url: str, num_machines: int) -> "_Meeting":
        ranks = "1" if num_machines == 2 else f"1 to {num_machines - 1}"
        return cls(
            "machine",
            "machine(s)",
            f"--num-machines {num_machines}",
            f"--dist-url {dist_url}",
            "start machine rank 0 first, with the same --dist-url and --num-machines",
            f"Start train_net.py on the other machine(s) with --machine-rank {ranks} and "
            f"--dist-url {dist_url}, or use --num-machines 1",
        )

    @classmethod
    def of_cluster(cls, process: ClusterProcess) -> "_Meeting":
        return cls(
            "process",
            "process(es)",
            f"{process.world_size} {process.launcher} processes",
            f"MASTER_ADDR:MASTER_PORT {process.master_addr}:{process.master_port}",
            "rank 0 runs on the first node; check that MASTER_ADDR is its address and "
            "MASTER_PORT a free port there",
            f"Check that {process.launcher} started all {process.world_size} tasks (one per GPU) "
            "and that they can reach MASTER_ADDR",
        )


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


def _meet(dist_url: str, parties: int, rank: int, meeting: _Meeting) -> dist.TCPStore:
    """Waits until all ``parties`` (the launching processes of the machines, or the processes of
    a cluster run) have reached the TCP store at ``dist_url``, which rank 0 hosts, logging what
    it waits for.

    Returns:
        The store (rank 0: the server, which must live as long as the processes).

    Raises:
        RendezvousError: the store cannot be hosted or reached, or a party did not come within
            the timeout.
    """
    host, port = _host_port(dist_url)
    timeout = _rendezvous_timeout()
    start = time.monotonic()
    who = f"{meeting.what.capitalize()} rank {rank}"
    if rank:
        logger.warning(
            "%s: joining %s rank 0 at %s (waiting up to %g s)",
            who,
            meeting.what,
            dist_url,
            timeout,
        )
        # Wait for the server here: torch's client logs every failed try with a C++ stack.
        while not _listening(host, port):
            if time.monotonic() - start >= timeout:
                raise RendezvousError(
                    f"{meeting.address}: {meeting.what} rank 0 did not answer within "
                    f"{timeout:g} s; {meeting.start_first}, and check that this machine can "
                    f"reach that address (the limit is {RENDEZVOUS_TIMEOUT_ENV})"
                )
            time.sleep(0.5)
    try:
        store = dist.TCPStore(
            host,
            port,
            world_size=None,
            is_master=rank == 0,
            timeout=timedelta(seconds=timeout),
            wait_for_workers=False,
        )
    except (RuntimeError, OSError) as e:  # DistNetworkError is a RuntimeError
        what = "cannot listen there" if rank == 0 else f"cannot join {meeting.what} rank 0 there"
        raise RendezvousError(
            f"{meeting.address}: {what} ({(str(e) or repr(e)).splitlines()[0]}); "
            + ("choose a free port" if rank == 0 else "check the address")
        ) from e
    joined = store.add(_JOINED_KEY, 1)
    reported = None
    while joined < parties:
        waited = time.monotonic() - start
        missing = parties - joined
        if waited >= timeout:
            raise RendezvousError(
                f"{meeting.total}: waiting for {missing} more {meeting.whats} at {dist_url}; "
                f"{'none' if joined == 1 else f'only {joined - 1}'} joined within {timeout:g} "
                f"s. {meeting.come} (the limit is {RENDEZVOUS_TIMEOUT_ENV})"
            )
        if reported is None or waited - reported >= _REPORT_EVERY:
            logger.warning(
                "%s: waiting for %d more %s to join at %s (%.0f s of %g s)",
                who,
                missing,
                meeting.whats,
                dist_url,
                waited,
                timeout,
            )
            reported = waited
        time.sleep(0.2)
        try:
            joined = store.add(_JOINED_KEY, 0)
        except RuntimeError as e:  # DistNetworkError: rank 0 gave up waiting
            raise RendezvousError(
                f"{meeting.address}: {meeting.what} rank 0 stopped before all {parties} "
                f"{meeting.whats} joined (see its messages)"
            ) from e
    if parties > 1:
        logger.warning("All %d %s joined at %s", parties, meeting.whats, dist_url)
    store.set_timeout(DEFAULT_TIMEOUT)  # from now on, the processes' own collectives' limit
    return store


def launch(
    main_func,
    num_processes_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str = None,
    args=(),
    device: str = "cuda",
    cluster: Optional[ClusterProcess] = None,
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
        cluster: this process's place in a run that torchrun or srun started (the other
            arguments but ``main_func``, ``args`` and ``device`` are then not used): it joins
            the run's process group and runs ``main_func`` itself.

    Raises:
        RendezvousError: see :func:`_meet`.
    """
    if cluster is not None:
        return _run_in_cluster(main_func, cluster, args, device == "cpu")
    world_size = num_machines * num_processes_per_machine
    if world_size == 1:
        return detectron2_launch(main_func, 1, args=args)
    if dist_url == "auto":
        if num_machines != 1:
            raise RendezvousError("--dist-url auto only works on one machine: give tcp://HOST:PORT")
        dist_url = f"tcp://127.0.0.1:{find_free_port()}"
    store = None
    if not dist_url.startswith("file://"):
        store = _meet(
            dist_url, num_machines, machine_rank, _Meeting.of_machines(dist_url, num_machines)
        )
    context = mp.start_processes(
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
        join=False,
    )
    with forward_stop_signals(context.processes):
        while not context.join(grace_period=_GRACE_PERIOD):
            pass
    del store  # machine rank 0's server lived until here: the processes met through it


def _run_in_cluster(main_func, process: ClusterProcess, args, cpu: bool):
    if process.agent_store:  # torchrun's agent hosts the store, and reads its own variables
        store = None
    else:
        url = process.dist_url
        store = _meet(url, process.world_size, process.rank, _Meeting.of_cluster(process))
    _join(
        process.rank,
        process.world_size,
        process.local_rank,
        process.local_world_size,
        dist.PrefixStore("default_pg", store) if store else None,
        "env://",
        cpu,
    )
    return main_func(*args)  # rank 0's store server (``store``) lives until the run ends


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


def _join(
    rank: int,
    world_size: int,
    local_rank: int,
    local_world_size: int,
    store: Optional[dist.Store],
    init_method: str,
    cpu: bool,
) -> None:
    """Joins this process to the run's process group (through ``store``, else ``init_method``)
    and sets up detectron2's ``comm`` (the group of this machine's processes)."""
    if not cpu:  # srun may show each task only its own GPU
        torch.cuda.set_device(local_rank if torch.cuda.device_count() > 1 else 0)
    dist.init_process_group(
        backend="gloo" if cpu else "nccl",
        init_method=None if store else init_method,
        store=store,
        world_size=world_size,
        rank=rank,
        timeout=DEFAULT_TIMEOUT,
    )
    _create_local_process_group(local_world_size)
    if cpu and not os.environ.get("OMP_NUM_THREADS"):
        # Share the machine's cores instead of every process using all of them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world_size))
    comm.synchronize()


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
    store: Optional[dist.Store] = None
    if not dist_url.startswith("file://"):
        host, port = _host_port(dist_url)
        client = dist.TCPStore(host, port, is_master=False, timeout=DEFAULT_TIMEOUT)
        store = dist.PrefixStore("default_pg", client)
    rank = machine_rank * num_processes_per_machine + local_rank
    _join(rank, world_size, local_rank, num_processes_per_machine, store, dist_url, cpu)
    main_func(*args)
