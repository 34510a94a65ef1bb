"""Stopping a training run cleanly on the signals that come before a kill.

SLURM and Kubernetes send SIGTERM to a job they preempt and kill it a grace period later; SLURM
sends a chosen signal (``--signal=USR1@120``) before the time limit; Ctrl-C sends SIGINT. While
:func:`stop_on_signals` is active (the training command activates it around training; importing
the plugin changes no signal handler) each of these only sets a flag. :class:`StopOnSignal`, a
trainer hook, then has all processes agree after every iteration whether any of them got a
signal (an all-reduce over the process group), so they stop at the same iteration: the main
process writes a checkpoint of that iteration, every rank's training state gathered into it as
for the periodic ones, and every rank raises :class:`TrainingPreempted`. The training command
exits with :data:`PREEMPTED_EXIT_STATUS`; ``--resume`` (automatic when the launcher restarts the
job) continues from that checkpoint exactly.

Repeated signals while stopping change nothing (torchrun and ``train_net.py --num-gpus N``
forward a terminal's Ctrl-C that their workers already received); SIGKILL stops at once. A
signal during the last iteration lets the run end as usual.
"""

import contextlib
import logging
import os
import signal
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from detectron2.engine import HookBase
from detectron2.utils import comm

from .resume import GatherTrainingState

__all__ = [
    "PREEMPTED_EXIT_STATUS",
    "STOP_SIGNALS",
    "StopOnSignal",
    "TrainingPreempted",
    "forward_stop_signals",
    "stop_on_signals",
]

logger = logging.getLogger(__name__)

# The exit status of a run stopped by a signal after its checkpoint: EX_TEMPFAIL of sysexits.h,
# "a temporary failure; try again" (the SLURM script of docs/training.md requeues on it).
PREEMPTED_EXIT_STATUS = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

# The name of the first stop signal this process received while stop_on_signals was active.
_received: Optional[str] = None


class TrainingPreempted(BaseException):
    """Training stopped at a signal, after the checkpoint of ``iteration``. Not an
    ``Exception``: detectron2's training loop logs those as failures, with their traceback.

    Args:
        iteration: the last iteration done (the checkpoint's).
        checkpoint: the checkpoint file (on the main process; "" on the others).
    """

    def __init__(self, iteration: int, checkpoint: str = ""):
        super().__init__(f"training stopped by a signal after iteration {iteration}")
        self.iteration = iteration
        self.checkpoint = checkpoint


def _note(signum, frame) -> None:
    global _received
    if _received is None:
        _received = signal.Signals(signum).name


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, :data:`STOP_SIGNALS` set a flag that :class:`StopOnSignal` acts on
    instead of ending the process; the previous handlers come back after it. Main thread only
    (Python's rule for signal handlers)."""
    global _received
    _received = None
    previous = {s: signal.signal(s, _note) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _received = None


@contextlib.contextmanager
def forward_stop_signals(processes: Sequence) -> Iterator[None]:
    """Within the block, :data:`STOP_SIGNALS` sent to this process (the one that started the
    training processes of this machine and waits for them) go on to ``processes``
    (``multiprocessing.Process``) that still run, instead of ending it: a scheduler may signal
    only the process it started."""

    def forward(signum, frame):
        for process in processes:
            if process.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signum)

    previous = {s: signal.signal(s, forward) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _any_rank(flag: bool) -> bool:
    """Whether ``flag`` is set on any rank (every rank calls it, with its own flag)."""
    if comm.get_world_size() == 1:
        return flag
    on_gpu = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    value = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


class StopOnSignal(HookBase):
    """After every iteration: if any rank got a stop signal, the main process writes the
    checkpoint of this iteration (unless the periodic checkpointer just wrote it) and every rank
    raises :class:`TrainingPreempted`. It runs after the hooks that change the training state
    (so that the checkpoint has what they did at this iteration), and before detectron2's
    ``PeriodicWriter``, which writes this iteration's metrics when training ends.

    Args:
        gather: the trainer's :class:`GatherTrainingState` (every rank's state for the
            checkpoint).
        checkpoint_period: ``SOLVER.CHECKPOINT_PERIOD``.
    """

    def __init__(self, gather: GatherTrainingState, checkpoint_period: int):
        self._gather = gather
        self._period = checkpoint_period

    def after_step(self):
        if not _any_rank(_received is not None):
            return
        iteration = self.trainer.iter
        if iteration >= self.trainer.max_iter - 1:
            return  # the last iteration: the run ends as usual
        logger.warning(
            "Stopping after iteration %d: %s",
            iteration,
            f"{_received} received" if _received else "another process received a stop signal",
        )
        name = f"model_{iteration:07d}"
        if (iteration + 1) % self._period:  # not written by PeriodicCheckpointer just now
            if not (self._gather.gathered and self._gather.gathered[0] == iteration):
                self._gather.gather()
            if comm.is_main_process():
                self.trainer.checkpointer.save(name, iteration=iteration)
        comm.synchronize()  # the checkpoint is complete before any process exits
        checkpoint = ""
        if comm.is_main_process():
            checkpoint = os.path.join(self.trainer.checkpointer.save_dir, name + ".pth")
        raise TrainingPreempted(iteration, checkpoint)
