"""Optimizers selected by ``SOLVER.OPTIMIZER`` and learning-rate schedules selected by
``SOLVER.LR_SCHEDULER_NAME``."""

import functools

import torch
from fvcore.common.param_scheduler import (
    ExponentialParamScheduler,
    ParamScheduler,
    PolynomialDecayParamScheduler,
)

from detectron2.solver import build_lr_scheduler as build_detectron2_lr_scheduler
from detectron2.solver import build_optimizer as build_sgd_optimizer
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.solver.lr_scheduler import LRMultiplier, WarmupParamScheduler

from ..config.option_rules import SOLVER_RULES
from ..config.rules import check_options

__all__ = [
    "build_lr_scheduler",
    "build_optimizer",
    "has_fused_adamw",
]


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.SOLVER.OPTIMIZER``, with detectron2's gradient clipping.

    "SGD" is detectron2's own (momentum, weight decay, norm/bias overrides). "AdamW" uses
    ``SOLVER.BASE_LR``, ``SOLVER.ADAMW_BETAS`` and ``SOLVER.WEIGHT_DECAY`` with no weight decay
    on normalization and bias parameters (the usual practice for AdamW), and torch's fused
    kernel where this torch has one for the parameters' device (the same update as the
    per-tensor loop, faster: docs/training.md).
    """
    name = cfg.SOLVER.OPTIMIZER
    check_options(SOLVER_RULES, optimizer=name)
    if name == "SGD":
        return build_sgd_optimizer(cfg, model)
    params = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay_norm=0.0,
        weight_decay_bias=0.0,
    )
    optimizer_class = maybe_add_gradient_clipping(cfg, torch.optim.AdamW)
    # Passed only when True: a torch before 1.13 has no ``fused`` argument at all.
    fused = all(has_fused_adamw(p.device.type) for p in model.parameters())
    return optimizer_class(
        params,
        lr=cfg.SOLVER.BASE_LR,
        betas=tuple(cfg.SOLVER.ADAMW_BETAS),
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        **({"fused": True} if fused else {}),
    )


@functools.lru_cache(maxsize=None)
def has_fused_adamw(device_type: str) -> bool:
    """Whether this torch has a fused AdamW kernel for float32 parameters on ``device_type``
    ("cpu", "cuda"; CUDA since torch 2.0, CPU since 2.4), asked of torch rather than of its
    version."""
    try:
        torch.optim.AdamW([torch.zeros(1, device=device_type, requires_grad=True)], fused=True)
    except (RuntimeError, TypeError):  # TypeError: a torch without the ``fused`` argument
        return False
    return True


def build_lr_scheduler(cfg, optimizer: torch.optim.Optimizer) -> LRMultiplier:
    """The schedule named by ``cfg.SOLVER.LR_SCHEDULER_NAME``, stepped once per iteration.

    With ``t`` = iteration / ``SOLVER.MAX_ITER``, every parameter group's LR is its initial LR
    times a multiplier, which after warmup is:

    - "WarmupMultiStepLR": ``SOLVER.GAMMA ** (number of SOLVER.STEPS <= iteration)``;
    - "WarmupCosineLR": ``(1 + cos(pi * t)) / 2``;
    - "WarmupPolyLR": ``(1 - t) ** SOLVER.POLY_LR_POWER``;
    - "WarmupExponentialLR": ``SOLVER.EXPONENTIAL_LR_FINAL_FACTOR ** t``, so the LR falls
      geometrically to that fraction of the initial LR at ``MAX_ITER``.

    During the first ``SOLVER.WARMUP_ITERS`` iterations ("linear" ``SOLVER.WARMUP_METHOD``) the
    multiplier rises linearly from ``SOLVER.WARMUP_FACTOR`` times the schedule's first value to
    its value at ``WARMUP_ITERS`` ("constant": stays at the former).

    The first two are detectron2's ``build_lr_scheduler``; the others are built the same way: an
    fvcore ``ParamScheduler`` in detectron2's ``WarmupParamScheduler`` and ``LRMultiplier``. An
    ``LRMultiplier`` is a torch LR scheduler, which detectron2's ``LRScheduler`` hook saves in
    checkpoints and restores on resume.

    Raises:
        ValueError: an unknown ``SOLVER.LR_SCHEDULER_NAME``.
    """
    solver = cfg.SOLVER
    name = solver.LR_SCHEDULER_NAME
    check_options(SOLVER_RULES, lr_scheduler_name=name, warmup_method=solver.WARMUP_METHOD)
    if name in ("WarmupMultiStepLR", "WarmupCosineLR"):
        return build_detectron2_lr_scheduler(cfg, optimizer)
    schedule: ParamScheduler
    if name == "WarmupPolyLR":
        schedule = PolynomialDecayParamScheduler(base_value=1.0, power=solver.POLY_LR_POWER)
    else:  # "WarmupExponentialLR"
        schedule = ExponentialParamScheduler(
            start_value=1.0, decay=solver.EXPONENTIAL_LR_FINAL_FACTOR
        )
    # As detectron2's build_lr_scheduler wraps its two schedules.
    schedule = WarmupParamScheduler(
        schedule,
        solver.WARMUP_FACTOR,
        min(solver.WARMUP_ITERS / solver.MAX_ITER, 1.0),
        solver.WARMUP_METHOD,
    )
    return LRMultiplier(optimizer, multiplier=schedule, max_iter=solver.MAX_ITER)
