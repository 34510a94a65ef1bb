"""Optimizers selected by ``SOLVER.OPTIMIZER``: detectron2's SGD, or AdamW."""
import torch

from detectron2.solver import build_optimizer as build_sgd_optimizer
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

__all__ = ["OPTIMIZERS", "build_optimizer"]

OPTIMIZERS = ("SGD", "AdamW")


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.SOLVER.OPTIMIZER``, with detectron2's gradient clipping.

    "SGD" is detectron2's own (momentum, weight decay, norm/bias overrides). "AdamW" uses
    ``SOLVER.BASE_LR``, ``SOLVER.ADAMW_BETAS`` and ``SOLVER.WEIGHT_DECAY`` with no weight decay
    on normalisation and bias parameters (the usual practice for AdamW).
    """
    name = cfg.SOLVER.OPTIMIZER
    if name == "SGD":
        return build_sgd_optimizer(cfg, model)
    if name != "AdamW":
        raise ValueError(f"SOLVER.OPTIMIZER must be one of {OPTIMIZERS}, got {name!r}")
    params = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay_norm=0.0,
        weight_decay_bias=0.0,
    )
    optimizer_class = maybe_add_gradient_clipping(cfg, torch.optim.AdamW)
    return optimizer_class(
        params,
        lr=cfg.SOLVER.BASE_LR,
        betas=tuple(cfg.SOLVER.ADAMW_BETAS),
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
    )
