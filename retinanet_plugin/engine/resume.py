"""The training state a checkpoint needs beyond detectron2's for ``--resume`` to continue exactly.

detectron2 saves the model, the iteration and its hooks' state (the LR scheduler). An exact resume
also needs the data stream (see :mod:`retinanet_plugin.data.resumable`), the loss normalizer's
moving average (a plain attribute of the model, not in its ``state_dict``) and the global RNGs
(Python's, numpy's, torch's CPU and CUDA generators). Each process has its own: with several
processes, :class:`GatherTrainingState` collects every rank's state into the checkpoint, and each
rank restores its own. Everything here is tensors, numbers, strings and containers, so checkpoints
still load with ``torch.load(weights_only=True)``.
"""

import logging
import random
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from detectron2.engine import HookBase
from detectron2.utils import comm

__all__ = ["GatherTrainingState", "checkpoint_training_state", "load_training_state"]

logger = logging.getLogger(__name__)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _rng_state() -> Dict[str, Any]:
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            logger.warning(
                "The checkpoint's CUDA RNG states are of %d GPUs, this process sees %d: the "
                "CUDA RNGs are not restored",
                len(cuda),
                torch.cuda.device_count(),
            )


def training_state(model: nn.Module, data_loader) -> Dict[str, Any]:
    """This process's state to save with a checkpoint.

    Args:
        model: the trained model (possibly wrapped in DistributedDataParallel).
        data_loader: the training loader; its state is saved if it has a ``state_dict``
            (:class:`~retinanet_plugin.data.resumable.ResumableTrainLoader`).
    """
    state: Dict[str, Any] = {"rng": _rng_state()}
    normalizer = getattr(_unwrap(model), "loss_normalizer", None)
    if isinstance(normalizer, (int, float)):
        state["loss_normalizer"] = float(normalizer)
    if hasattr(data_loader, "state_dict"):
        state["data_loader"] = data_loader.state_dict()
    return state


class GatherTrainingState(HookBase):
    """Collects every rank's :func:`training_state` at the iterations whose end writes a
    checkpoint (those of detectron2's ``PeriodicCheckpointer``, which only the main process
    runs), for the main process to save them all.

    Args:
        checkpoint_period: ``SOLVER.CHECKPOINT_PERIOD``.
    """

    def __init__(self, checkpoint_period: int):
        self.checkpoint_period = checkpoint_period
        # (iteration, every rank's state), for the checkpoint written at that iteration.
        self.gathered: Optional[Tuple[int, List[Dict[str, Any]]]] = None

    def after_step(self):
        iteration = self.trainer.iter
        if (iteration + 1) % self.checkpoint_period and iteration < self.trainer.max_iter - 1:
            return
        self.gather()

    def gather(self):
        """Collects every rank's state now, for a checkpoint of this iteration (every rank
        calls it)."""
        state = training_state(self.trainer.model, self.trainer.data_loader)
        self.gathered = self.trainer.iter, comm.all_gather(state)


def checkpoint_training_state(trainer, gather: Optional[GatherTrainingState]) -> Dict[str, Any]:
    """What the main process saves: every rank's state gathered for this iteration, or (one
    process, or a checkpoint written outside the periodic ones) its own."""
    if gather is not None and gather.gathered and gather.gathered[0] == trainer.iter:
        return {"per_rank": gather.gathered[1]}
    return {"per_rank": [training_state(trainer.model, trainer.data_loader)]}


def load_training_state(state: Dict[str, Any], model: nn.Module, data_loader) -> None:
    """Restores this rank's part of what :func:`checkpoint_training_state` saved (the parts
    this run has). A checkpoint of another number of processes gives every rank rank 0's state,
    with a warning; one written before per-rank states is one state for all."""
    per_rank = state.get("per_rank", [state])
    rank, world_size = comm.get_rank(), comm.get_world_size()
    if len(per_rank) == world_size:
        own = per_rank[rank]
    else:
        own = per_rank[0]
        if world_size > 1 or len(per_rank) > 1:
            logger.warning(
                "The checkpoint holds the training state of %d process(es), this run has %d: "
                "every process continues from rank 0's RNGs and loss normalizer",
                len(per_rank),
                world_size,
            )
    _set_rng_state(own["rng"])
    if "loss_normalizer" in own:
        _unwrap(model).loss_normalizer = own["loss_normalizer"]
    if "data_loader" in own and hasattr(data_loader, "load_state_dict"):
        data_loader.load_state_dict(own["data_loader"])
