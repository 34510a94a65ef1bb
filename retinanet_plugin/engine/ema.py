"""An exponential moving average (EMA) of the model's weights (``MODEL_EMA.*``).

After every training step each floating-point parameter and buffer ``w`` of the model moves the
average's copy ``e`` of it by ``e = DECAY * e + (1 - DECAY) * w`` (computed as
``e.lerp_(w, 1 - DECAY)``, which leaves a tensor that does not change, e.g. a frozen layer or the
pixel mean, exactly as it is); other buffers (counters) are copied. The average lives in a copy of
the model in evaluation mode that the trainer evaluates beside the model and saves (the
``"EMAHook"`` entry of every checkpoint's training state, so that ``--resume`` continues it
exactly, and ``model_final_ema.pth``). detectron2 has no EMA; the config section has the name
and the two main keys of d2go's.
"""

import copy
import logging
from typing import Any, Dict

import torch
from torch import nn

from detectron2.engine import HookBase

__all__ = ["EMA_PREFIX", "EMAHook", "ModelEMA"]

logger = logging.getLogger(__name__)

# The EMA's evaluation metrics are the model's with this prefix: "ema/bbox/AP".
EMA_PREFIX = "ema"


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class ModelEMA:
    """A copy of a model whose weights are the exponential moving average of the model's.

    Args:
        model: the trained model (possibly in DistributedDataParallel); copied, on its device.
        decay: ``MODEL_EMA.DECAY``, in [0, 1).

    Attributes:
        model: the average, a module of the model's class in evaluation mode, without gradients.
        updates: the number of updates since :meth:`reset`.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(_unwrap(model)).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        """Starts the average at ``model``'s current weights."""
        self.model.load_state_dict(_unwrap(model).state_dict())
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step of the average towards ``model``'s current weights."""
        model = _unwrap(model)
        tensors = [(self.model.named_parameters(), model.named_parameters())]
        tensors.append((self.model.named_buffers(), model.named_buffers()))
        for ours, theirs in tensors:
            for (name, average), (other, value) in zip(ours, theirs):
                assert name == other, (name, other)  # the same module tree
                if average.is_floating_point():
                    average.lerp_(value.detach(), 1.0 - self.decay)
                else:
                    average.copy_(value)
        self.updates += 1

    def state_dict(self) -> Dict[str, Any]:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])


class EMAHook(HookBase):
    """Updates a :class:`ModelEMA` of the trainer's model after every step; its state is part
    of the trainer's (detectron2 saves the hooks' ``state_dict`` in checkpoints and restores it
    on ``--resume``). A run that does not resume an average starts it at the weights training
    starts from (MODEL.WEIGHTS, or a checkpoint of a run without EMA).

    Args:
        model: the trained model.
        decay: ``MODEL_EMA.DECAY``.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.ema = ModelEMA(model, decay)
        self._restored = False

    def before_train(self):
        if self._restored:
            logger.info(
                "EMA of the weights (MODEL_EMA.DECAY %g) continued from the checkpoint (%d "
                "updates)",
                self.ema.decay,
                self.ema.updates,
            )
            return
        self.ema.reset(self.trainer.model)
        logger.info(
            "EMA of the weights (MODEL_EMA.DECAY %g) starts at the weights of iteration %d",
            self.ema.decay,
            self.trainer.start_iter,
        )

    def after_step(self):
        self.ema.update(self.trainer.model)

    def state_dict(self) -> Dict[str, Any]:
        return self.ema.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.ema.load_state_dict(state)
        self._restored = True
