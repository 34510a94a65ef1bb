"""Sigmoid focal loss (Lin et al. 2017, eq. 5) and its appendix variant FL*.

``sigmoid_focal_loss`` and ``focal_loss_from_labels`` compute the focal loss in one pass over
cache-sized chunks that produces the loss and its gradient together, so no full-size
intermediate is kept for backward: the extra memory is one gradient-sized tensor (fvcore's
``sigmoid_focal_loss_jit``, which detectron2 uses, keeps about ten). Both tails of the sigmoid are
computed directly, so any finite logit (+-100 in float16/bfloat16 included) gives a finite loss
and gradient, in at least float32 whatever the input dtype. The training loss of
:class:`FocalLossRetinaNet` uses ``focal_loss_from_labels``, which also never builds the one-hot
target matrix.

``sigmoid_focal_loss_star`` (FL*) is a plain autograd composition in log-sigmoid form.
"""

import math
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

__all__ = ["sigmoid_focal_loss", "sigmoid_focal_loss_star", "focal_loss_from_labels"]

# Elements per chunk of the fused loss: ~20 float32 temporaries of 64k elements stay in L2 cache
# on CPU; on GPUs, chunks only bound the temporaries' memory.
_CPU_CHUNK = 1 << 16
_GPU_CHUNK = 1 << 24

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


def _focal_loss_and_grad(
    x: Tensor, t: Tensor, alpha: float, gamma: float, need_grad: bool
) -> "tuple[Tensor, Optional[Tensor]]":
    """Focal loss and d loss / d x of one chunk.

    Args:
        x: logits of the chunk in the compute dtype, any shape.
        t: targets in [0, 1] of the same shape and dtype.

    Returns:
        (loss, grad), both shaped like ``x``; grad is None unless ``need_grad``.
    """
    # Both tails of the sigmoid are computed directly: 1 - sigmoid(x) loses all precision for
    # large x, and softplus(+-x) is -log sigmoid(-+x) without cancellation.
    p = torch.sigmoid(x)
    q = torch.sigmoid(-x)
    one_minus_t = 1.0 - t
    ce = t * F.softplus(-x) + one_minus_t * F.softplus(x)
    loss = ce
    if gamma != 0:
        one_minus_p_t = q * t + p * one_minus_t
        modulator = one_minus_p_t.pow(gamma)
        loss = ce * modulator
    if alpha >= 0:
        alpha_t = _alpha_weight(t, alpha)
        loss = loss * alpha_t
    if not need_grad:
        return loss, None
    # d ce / dx = p - t; d (1 - p_t)^gamma / dx = -gamma (1 - p_t)^(gamma - 1) p q (2t - 1).
    grad = p * one_minus_t - q * t
    if gamma != 0:
        grad.mul_(modulator)
        # (1 - p_t)^(gamma - 1) as modulator / (1 - p_t): where 1 - p_t = 0, p q = 0 as well and
        # the term's limit is 0; the clamp keeps 0 / 0 out.
        ratio = modulator.div_(one_minus_p_t.clamp_min_(torch.finfo(x.dtype).tiny))
        grad.sub_(ratio.mul_(ce).mul_(p).mul_(q).mul_(t.mul(2.0).sub_(1.0)).mul_(gamma))
    if alpha >= 0:
        grad.mul_(alpha_t)
    if not x.is_cuda:
        # Confident logits give gradients near or below the smallest normal float (~1e-38 in
        # float32); on CPUs arithmetic on subnormals is ~100x slower, which made the classifier
        # convolution's backward several times slower than detectron2's. Below tiny / eps
        # (1e-31 in float32) a gradient is far under the rounding of any sum it enters, and
        # flushing there leaves room for the loss normalizer's scaling: flush to 0.
        finfo = torch.finfo(x.dtype)
        grad.masked_fill_(grad.abs() < finfo.tiny / finfo.eps, 0.0)
    return loss, grad


class _FusedFocalLoss(torch.autograd.Function):
    """Focal loss whose forward also computes the gradient, chunk by chunk, and keeps only it.

    The chunks are rows of the (M, K) logits; ``make_targets(rows)`` gives the (r, K) targets of
    rows ``rows`` (a slice), so targets can be a dense matrix or built from labels per chunk.
    """

    @staticmethod
    def forward(ctx, logits, make_targets, row_weight, alpha, gamma, reduction):
        num_rows, num_classes = logits.shape
        dtype = _compute_dtype(logits)
        need_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(logits) if need_grad else None
        loss_out = torch.empty_like(logits, dtype=dtype) if reduction == "none" else None
        total = torch.zeros((), dtype=torch.float64, device=logits.device)
        chunk = _GPU_CHUNK if logits.is_cuda else _CPU_CHUNK
        rows_per_chunk = max(1, chunk // max(num_classes, 1))
        for start in range(0, num_rows, rows_per_chunk):
            rows = slice(start, start + rows_per_chunk)
            x = logits[rows].to(dtype)
            loss, grad_chunk = _focal_loss_and_grad(
                x, make_targets(rows).to(dtype), alpha, gamma, need_grad
            )
            if row_weight is not None:
                weight = row_weight[rows].to(dtype).unsqueeze(1)
                loss = loss * weight
                if need_grad:
                    grad_chunk.mul_(weight)
            if loss_out is not None:
                loss_out[rows] = loss
            else:
                total += loss.sum(dtype=torch.float64)
            if need_grad:
                grad[rows] = grad_chunk
        ctx.reduction = reduction
        ctx.numel = logits.numel()
        ctx.save_for_backward(grad)
        if reduction == "none":
            return loss_out
        total = total.to(dtype)
        return total / max(ctx.numel, 1) if reduction == "mean" else total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        if ctx.reduction == "mean":
            grad_output = grad_output / max(ctx.numel, 1)
        # The saved gradient is used once: scale it in place instead of allocating another.
        return grad.mul_(grad_output.to(grad.dtype)), None, None, None, None, None


def _check_fused_args(logits: Tensor, alpha: float, gamma: float, reduction: str) -> None:
    _check_reduction(reduction)
    if gamma < 0 or not math.isfinite(gamma):
        raise ValueError(f"focal loss gamma must be >= 0, got {gamma}")


def sigmoid_focal_loss(
    logits: Tensor,
    targets: Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
) -> Tensor:
    """Focal loss FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t), with p = sigmoid(logits).

    Values and first derivatives are those of the formula (to the compute dtype's rounding);
    there is no second derivative and no gradient to ``targets`` (they are labels).

    Args:
        logits: float tensor of any shape, e.g. (R, K) for R anchors and K classes; any float
            dtype (half precision is computed in float32).
        targets: tensor of the same shape with the target probability of each element: 1 for
            the anchor's class, 0 elsewhere (values in [0, 1] are accepted).
        alpha: weight of positives in [0, 1]; negatives get 1 - alpha. A negative value turns
            the weighting off.
        gamma: focusing parameter >= 0; 0 gives (alpha-balanced) binary cross-entropy.
        reduction: "none" (same shape as ``logits``), "mean" or "sum" (scalars).

    Returns:
        The loss in float32 (float64 for float64 logits).
    """
    _check_fused_args(logits, alpha, gamma, reduction)
    if targets.shape != logits.shape:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} differs from logits shape {tuple(logits.shape)}"
        )
    shape = logits.shape
    # Chunks are rows of a 2-D view; the last dimension (classes) stays whole.
    width = shape[-1] if logits.dim() >= 2 else 1
    rows = logits.reshape(-1, width)
    flat_targets = targets.detach().reshape(-1, width)
    loss = _FusedFocalLoss.apply(rows, lambda r: flat_targets[r], None, alpha, gamma, reduction)
    return loss.reshape(shape) if reduction == "none" else loss


def focal_loss_from_labels(
    logits: Tensor,
    labels: Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "sum",
) -> Tensor:
    """Focal loss of (M, K) logits against class labels, without a one-hot target matrix.

    Equal to ``sigmoid_focal_loss(logits, one_hot(labels))`` summed over valid rows, where label
    K (background) gives an all-zero target row and label -1 (ignored anchor) contributes
    nothing, neither loss nor gradient. detectron2's RetinaNet labels anchors this way.

    Args:
        logits: (M, K) float logits.
        labels: (M,) integer labels in {-1} U [0, K].
        alpha, gamma: as in :func:`sigmoid_focal_loss`.
        reduction: "sum" or "none" ((M, K), zero on ignored rows); "mean" averages over all
            M * K elements.

    Returns:
        The loss in float32 (float64 for float64 logits).
    """
    _check_fused_args(logits, alpha, gamma, reduction)
    if logits.dim() != 2:
        raise ValueError(f"takes (M, K) logits, got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match logits shape "
            f"{tuple(logits.shape)}: need one label per row"
        )
    classes = torch.arange(logits.shape[1], device=logits.device)
    valid = labels >= 0
    row_weight = None if bool(valid.all()) else valid
    return _FusedFocalLoss.apply(
        logits,
        lambda rows: labels[rows].unsqueeze(1) == classes,
        row_weight,
        alpha,
        gamma,
        reduction,
    )
