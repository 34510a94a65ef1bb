"""The training state a checkpoint needs beyond detectron2's for ``--resume`` to continue exactly.

detectron2 saves the model, the iteration and its hooks' state (the LR scheduler). An exact resume
also needs the data stream (see :mod:`retinanet_plugin.data.resumable`), the loss normaliser's
moving average (a plain attribute of the model, not in its ``state_dict``) and the global RNGs.
Everything here is tensors, numbers, strings and containers, so checkpoints still load with
``torch.load(weights_only=True)``.
"""
import random
from typing import Any, Dict

import numpy as np
import torch
from torch import nn

__all__ = ["training_state", "load_training_state"]


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _rng_state() -> Dict[str, Any]:
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {
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


def training_state(model: nn.Module, data_loader) -> Dict[str, Any]:
    """The state to save with a checkpoint.

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


def load_training_state(state: Dict[str, Any], model: nn.Module, data_loader) -> None:
    """Restores what :func:`training_state` saved (the parts this run has)."""
    _set_rng_state(state["rng"])
    if "loss_normalizer" in state:
        _unwrap(model).loss_normalizer = state["loss_normalizer"]
    if "data_loader" in state and hasattr(data_loader, "load_state_dict"):
        data_loader.load_state_dict(state["data_loader"])

