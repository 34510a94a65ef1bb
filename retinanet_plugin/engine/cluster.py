"""The place of this process in a run that a cluster launcher started: torchrun, or SLURM's srun
with one task per GPU.

Both start every training process themselves and say in the environment which one it is.
:func:`cluster_process` reads that (torchrun's variables first, as torchrun may itself run under
srun), checks it, and returns a :class:`ClusterProcess`; ``None`` means the usual
``--num-gpus``/``--num-machines`` start, where ``train_net.py`` starts the processes itself.

* torchrun: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``,
  ``MASTER_PORT`` (``GROUP_RANK``, the machine's rank, when set). Its agent hosts the
  rendezvous store. Recognized by ``LOCAL_RANK``: ``RANK`` and ``WORLD_SIZE`` without it (as
  some Kubernetes operators set them per pod, for torchrun to read) are not a torchrun start.
* srun: ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS`` (more than 1), ``SLURM_LOCALID``,
  ``SLURM_NODEID``, ``SLURM_STEP_TASKS_PER_NODE``; the rendezvous is at ``MASTER_ADDR``
  (default: the step's first node, from ``SLURM_STEP_NODELIST``) and ``MASTER_PORT`` (default:
  10000 + ``SLURM_JOB_ID`` mod 20000), hosted by rank 0. A batch script's own environment (no
  srun step) is not a multi-process start.

detectron2's per-machine process groups need the same number of processes on every machine and
ranks numbered machine by machine; a layout that breaks either is refused.
"""

import re
from typing import Mapping, NamedTuple, Optional, Tuple

from ..errors import UserError

__all__ = [
    "ClusterEnvironmentError",
    "ClusterProcess",
    "check_cluster_run",
    "cluster_process",
    "first_host",
    "restart_count",
]

# SLURM's requeues of a job, torchrun's restarts of its workers.
RESTART_VARIABLES = ("SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT")
_TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class ClusterEnvironmentError(UserError, ValueError):
    """The launcher's environment does not describe a run the plugin can join."""


class ClusterProcess(NamedTuple):
    """This process's place in the run, as the launcher gave it."""

    launcher: str  # "torchrun" or "srun"
    rank: int
    world_size: int
    local_rank: int  # the process's rank on its machine (its GPU there)
    local_world_size: int  # processes per machine
    master_addr: str
    master_port: int
    agent_store: bool  # torchrun's agent, not rank 0, hosts the store at the master address

    @property
    def num_machines(self) -> int:
        return self.world_size // self.local_world_size

    @property
    def machine_rank(self) -> int:
        return self.rank // self.local_world_size

    @property
    def dist_url(self) -> str:
        return f"tcp://{self.master_addr}:{self.master_port}"

    def describe(self) -> str:
        return (
            f"{self.launcher} process {self.rank} of {self.world_size} (machine "
            f"{self.machine_rank} of {self.num_machines}, local rank {self.local_rank} of "
            f"{self.local_world_size})"
        )


def _integer(environ: Mapping[str, str], name: str, default: Optional[int] = None) -> int:
    value = environ.get(name)
    if value is None and default is not None:
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ClusterEnvironmentError(
            f"{name}={value!r} in the environment: expected a whole number"
        ) from None


def _tasks_per_node(value: str) -> Tuple[int, ...]:
    """SLURM's compressed counts per node, e.g. "2(x3),1" -> (2, 2, 2, 1)."""
    counts = []
    for part in value.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            raise ClusterEnvironmentError(
                f"SLURM_STEP_TASKS_PER_NODE={value!r} in the environment: expected counts such "
                "as 8 or 8(x2)"
            )
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return tuple(counts)


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[07-09,12],cpu1" -> "gpu07"."""
    first = re.match(r"[^,\[]*(\[[^\]]*\][^,\[]*)*", nodelist.strip()).group(0)
    # In every bracket, the first name of its first range ("07" of "07-09,12").
    return re.sub(r"\[([^\]\-,]*)[^\]]*\]", r"\1", first)


def _check_layout(process: ClusterProcess, variables: str, machine: Optional[int]) -> None:
    if process.world_size < 1 or not 0 <= process.rank < process.world_size:
        raise ClusterEnvironmentError(
            f"{variables}: rank {process.rank} is not one of the {process.world_size} processes "
            "(0 to WORLD_SIZE - 1); start train_net.py through torchrun or srun, which set them"
        )
    if process.local_world_size < 1 or not 0 <= process.local_rank < process.local_world_size:
        raise ClusterEnvironmentError(
            f"{variables}: local rank {process.local_rank} is not one of the "
            f"{process.local_world_size} processes of this machine"
        )
    if process.world_size % process.local_world_size:
        raise ClusterEnvironmentError(
            f"{variables}: {process.world_size} processes do not fill machines of "
            f"{process.local_world_size}; start the same number of processes on every machine"
        )
    machine = process.machine_rank if machine is None else machine
    if machine >= process.num_machines or process.rank != (
        machine * process.local_world_size + process.local_rank
    ):
        raise ClusterEnvironmentError(
            f"{variables}: rank {process.rank} is not local rank {process.local_rank} of machine "
            f"{machine} with {process.local_world_size} processes per machine; the ranks must be "
            "numbered machine by machine (with srun: --distribution=block)"
        )


def _from_torchrun(environ: Mapping[str, str]) -> ClusterProcess:
    missing = [name for name in _TORCHRUN if not environ.get(name)]
    if missing:
        raise ClusterEnvironmentError(
            f"LOCAL_RANK is set but {', '.join(missing)} not: start train_net.py with torchrun "
            "(python -m torch.distributed.run), which sets RANK, WORLD_SIZE, LOCAL_RANK, "
            "LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT"
        )
    process = ClusterProcess(
        launcher="torchrun",
        rank=_integer(environ, "RANK"),
        world_size=_integer(environ, "WORLD_SIZE"),
        local_rank=_integer(environ, "LOCAL_RANK"),
        local_world_size=_integer(environ, "LOCAL_WORLD_SIZE"),
        master_addr=environ["MASTER_ADDR"],
        master_port=_integer(environ, "MASTER_PORT"),
        agent_store=environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true",
    )
    machine = _integer(environ, "GROUP_RANK") if "GROUP_RANK" in environ else None
    variables = (
        f"RANK={process.rank} WORLD_SIZE={process.world_size} LOCAL_RANK={process.local_rank} "
        f"LOCAL_WORLD_SIZE={process.local_world_size}"
        + (f" GROUP_RANK={machine}" if machine is not None else "")
    )
    _check_layout(process, variables, machine)
    return process


def _from_srun(environ: Mapping[str, str]) -> ClusterProcess:
    counts = _tasks_per_node(environ.get("SLURM_STEP_TASKS_PER_NODE", ""))
    if len(set(counts)) != 1:
        raise ClusterEnvironmentError(
            f"SLURM_STEP_TASKS_PER_NODE={environ['SLURM_STEP_TASKS_PER_NODE']}: srun started "
            "different numbers of tasks on the nodes; give --ntasks-per-node (one task per GPU)"
        )
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST", "")
    master_addr = environ.get("MASTER_ADDR") or first_host(nodelist)
    if not master_addr:
        raise ClusterEnvironmentError(
            "neither MASTER_ADDR nor SLURM_STEP_NODELIST is set: export MASTER_ADDR (the first "
            "node's address) before srun"
        )
    port_default = 10000 + _integer(environ, "SLURM_JOB_ID", 0) % 20000
    process = ClusterProcess(
        launcher="srun",
        rank=_integer(environ, "SLURM_PROCID"),
        world_size=_integer(environ, "SLURM_STEP_NUM_TASKS"),
        local_rank=_integer(environ, "SLURM_LOCALID"),
        local_world_size=counts[0],
        master_addr=master_addr,
        master_port=_integer(environ, "MASTER_PORT", port_default),
        agent_store=False,
    )
    machine = _integer(environ, "SLURM_NODEID")
    if sum(counts) != process.world_size:
        raise ClusterEnvironmentError(
            f"SLURM_STEP_NUM_TASKS={process.world_size} but SLURM_STEP_TASKS_PER_NODE="
            f"{environ['SLURM_STEP_TASKS_PER_NODE']} adds up to {sum(counts)} tasks"
        )
    variables = (
        f"SLURM_PROCID={process.rank} SLURM_STEP_NUM_TASKS={process.world_size} "
        f"SLURM_LOCALID={process.local_rank} SLURM_NODEID={machine}"
    )
    _check_layout(process, variables, machine)
    return process


def cluster_process(environ: Mapping[str, str]) -> Optional[ClusterProcess]:
    """This process's place in a run torchrun or srun started, from ``environ`` (``os.environ``);
    None when neither started it (one srun task counts as neither: ``--num-gpus`` applies).

    Raises:
        ClusterEnvironmentError: the variables are incomplete, not numbers, or describe a layout
            that does not work (see the module's docstring).
    """
    if "LOCAL_RANK" in environ:
        return _from_torchrun(environ)
    if "SLURM_PROCID" in environ and _integer(environ, "SLURM_STEP_NUM_TASKS", 1) > 1:
        return _from_srun(environ)
    return None


def restart_count(environ: Mapping[str, str]) -> Tuple[str, int]:
    """The first of :data:`RESTART_VARIABLES` above 0 and its value, or ("", 0): whether the
    launcher started this run again after it stopped (SLURM requeued the job, torchrun restarted
    its workers)."""
    for name in RESTART_VARIABLES:
        count = _integer(environ, name, 0)
        if count > 0:
            return name, count
    return "", 0


def check_cluster_run(
    process: ClusterProcess,
    options: Mapping[str, Tuple[object, object]],
    ims_per_batch: int,
    gpus_visible: int,
) -> None:
    """What the command asks for agrees with what the launcher started.

    Args:
        process: this process's place (:func:`cluster_process`).
        options: ``--num-gpus``, ``--num-machines``, ``--machine-rank`` and ``--dist-url``, each
            as (value given, default): a value other than its default must be the launcher's.
        ims_per_batch: SOLVER.IMS_PER_BATCH, which the processes share.
        gpus_visible: CUDA GPUs this process sees (0 on CPU): 1 (its own), or one per process
            of the machine.

    Raises:
        ClusterEnvironmentError: an option that contradicts the launcher, a batch that the
            processes cannot share, or fewer GPUs than processes.
    """
    started = {
        "--num-gpus": process.local_world_size,
        "--num-machines": process.num_machines,
        "--machine-rank": process.machine_rank,
        "--dist-url": process.dist_url,
    }
    for option, (value, default) in options.items():
        if value not in (default, started[option]):
            raise ClusterEnvironmentError(
                f"{option} {value}, but this is {process.describe()}, whose "
                f"{option.lstrip('-').replace('-', ' ')} is {started[option]}: "
                f"{process.launcher} starts the processes and says where they meet; leave "
                f"{option} out"
            )
    if ims_per_batch % process.world_size:
        raise ClusterEnvironmentError(
            f"SOLVER.IMS_PER_BATCH = {ims_per_batch} is not divisible by the "
            f"{process.world_size} processes {process.launcher} started; every process takes "
            "the same number of images per batch"
        )
    if 1 < gpus_visible < process.local_world_size:
        raise ClusterEnvironmentError(
            f"{process.launcher} started {process.local_world_size} processes on this machine, "
            f"which has {gpus_visible} GPUs; start one process per GPU"
        )
