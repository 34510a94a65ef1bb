"""The float64 reference of the focal loss that the tests hold the plugin's loss to.

An autograd composition in log-sigmoid form (finite for any finite logit, differentiable to any
order), evaluated in float64; ``tests/test_focal_loss.py`` checks it against the paper's
formula, hand-computed values and fvcore.
"""

import torch
from torch import Tensor
from torch.nn import functional as F


def reference_focal_loss(
    logits: Tensor,
    targets: Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
) -> Tensor:
    """Focal loss FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t), with p = sigmoid(logits), in
    float64 whatever the input dtype.

    Computed as ``alpha_t * exp(gamma * log(1 - p_t)) * CE`` where ``CE`` and ``log(1 - p_t)``
    come from ``logsigmoid``, which is finite and has finite gradients everywhere (a plain
    ``(1 - p_t) ** gamma`` has an infinite gradient at p_t = 1 when gamma < 1).

    Args:
        logits: float tensor of any shape, e.g. (R, K) for R anchors and K classes.
        targets: tensor of the same shape with the target probability of each element: 1 for
            the anchor's class, 0 elsewhere (values in [0, 1] are accepted). Treated as
            constants: gradients flow to ``logits`` only.
        alpha: weight of positives in [0, 1]; negatives get 1 - alpha. A negative value turns
            the weighting off.
        gamma: focusing parameter >= 0; 0 gives (alpha-balanced) binary cross-entropy.
        reduction: "none" (same shape as ``logits``), "mean" or "sum" (scalars).

    Returns:
        The loss in float64.
    """
    x = logits.double()
    # Targets are labels: no gradient flows to them (log(t) below has infinite slope at 0 and 1).
    t = targets.detach().double()
    log_p = F.logsigmoid(x)  # log p
    log_one_minus_p = F.logsigmoid(-x)  # log (1 - p)
    loss = -(t * log_p + (1.0 - t) * log_one_minus_p)  # binary cross-entropy
    if gamma != 0:
        # log(1 - p_t) with 1 - p_t = t (1 - p) + (1 - t) p; log(0) = -inf terms vanish in
        # logaddexp, so hard 0/1 targets give exactly logsigmoid(-+x).
        log_one_minus_p_t = torch.logaddexp(torch.log(t) + log_one_minus_p, torch.log1p(-t) + log_p)
        loss = loss * torch.exp(gamma * log_one_minus_p_t)
    if alpha >= 0:
        loss = (alpha * t + (1.0 - alpha) * (1.0 - t)) * loss
    if reduction == "sum":
        return loss.sum()
    return loss.mean() if reduction == "mean" else loss
