"""Sigmoid focal loss (Lin et al. 2017, eq. 5) and its appendix variant FL*.

Both work on raw logits in log-sigmoid form, so they stay finite for any finite logit (including
+-100 in float16/bfloat16), and compute in at least float32 whatever the input dtype.
"""
import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["sigmoid_focal_loss", "sigmoid_focal_loss_star"]

_REDUCTIONS = ("none", "mean", "sum")


def _compute_dtype(logits: Tensor) -> torch.dtype:
    # float16 / bfloat16 logits are promoted; float64 stays float64 (used by gradcheck).
    return torch.promote_types(logits.dtype, torch.float32)


def _alpha_weight(targets: Tensor, alpha: float) -> Tensor:
    """alpha_t = alpha for positives, 1 - alpha for negatives (linear in soft targets)."""
    return alpha * targets + (1.0 - alpha) * (1.0 - targets)


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.mean()


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def sigmoid_focal_loss(
    logits: Tensor,
    targets: Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
) -> Tensor:
    """Focal loss FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t), with p = sigmoid(logits).

    Computed as ``alpha_t * exp(gamma * log(1 - p_t)) * CE`` where ``CE`` and ``log(1 - p_t)``
    come from ``logsigmoid``, which is finite and has finite gradients everywhere (a plain
    ``(1 - p_t) ** gamma`` has an infinite gradient at p_t = 1 when gamma < 1).

    Args:
        logits: float tensor of any shape, e.g. (R, K) for R anchors and K classes; any float
            dtype (half precision is computed in float32).
        targets: tensor of the same shape with the target probability of each element: 1 for
            the anchor's class, 0 elsewhere (values in [0, 1] are accepted). Treated as
            constants: gradients flow to ``logits`` only.
        alpha: weight of positives in [0, 1]; negatives get 1 - alpha. A negative value turns
            the weighting off.
        gamma: focusing parameter >= 0; 0 gives (alpha-balanced) binary cross-entropy.
        reduction: "none" (same shape as ``logits``), "mean" or "sum" (scalars).

    Returns:
        The loss in float32 (float64 for float64 logits).
    """
    _check_reduction(reduction)
    dtype = _compute_dtype(logits)
    x = logits.to(dtype)
    # Targets are labels: no gradient flows to them (log(t) below has infinite slope at 0 and 1).
    t = targets.detach().to(dtype)
    log_p = F.logsigmoid(x)  # log p
    log_one_minus_p = F.logsigmoid(-x)  # log (1 - p)
    loss = -(t * log_p + (1.0 - t) * log_one_minus_p)  # binary cross-entropy
    if gamma != 0:
        # log(1 - p_t) with 1 - p_t = t (1 - p) + (1 - t) p; log(0) = -inf terms vanish in
        # logaddexp, so hard 0/1 targets give exactly logsigmoid(-+x).
        log_one_minus_p_t = torch.logaddexp(
            torch.log(t) + log_one_minus_p, torch.log1p(-t) + log_p
        )
        loss = loss * torch.exp(gamma * log_one_minus_p_t)
    if alpha >= 0:
        loss = _alpha_weight(t, alpha) * loss
    return _reduce(loss, reduction)


def sigmoid_focal_loss_star(
    logits: Tensor,
    targets: Tensor,
    gamma: float = 4.0,
    beta: float = 0.0,
    alpha: float = -1.0,
    reduction: str = "none",
) -> Tensor:
    """FL* from the paper's appendix: FL* = -log(sigmoid(gamma * x_t + beta)) / gamma.

    With y = +1 for positives and -1 for negatives, x_t = y * x. gamma = 1, beta = 0 gives
    plain binary cross-entropy.

    Args:
        logits: float tensor of any shape, e.g. (R, K).
        targets: tensor of the same shape with values in {0, 1}.
        gamma: the paper's gamma* > 0 (sharpness of the loss around x_t = -beta / gamma).
        beta: the paper's beta (shift).
        alpha: weight of positives in [0, 1], negatives 1 - alpha; negative = off (the paper's
            FL* experiments use no alpha).
        reduction: "none", "mean" or "sum".

    Returns:
        The loss in float32 (float64 for float64 logits).
    """
    _check_reduction(reduction)
    if gamma <= 0:
        raise ValueError(f"FL* needs gamma > 0, got {gamma}")
    dtype = _compute_dtype(logits)
    x = logits.to(dtype)
    t = targets.to(dtype)
    x_t = (2.0 * t - 1.0) * x
    loss = -F.logsigmoid(gamma * x_t + beta) / gamma
    if alpha >= 0:
        loss = _alpha_weight(t, alpha) * loss
    return _reduce(loss, reduction)
