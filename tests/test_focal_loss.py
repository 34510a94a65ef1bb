"""Tests for retinanet_plugin.sigmoid_focal_loss and sigmoid_focal_loss_star against the paper's
formulas, hand-computed values and fvcore; and of the float64 reference the other focal-loss
tests use (tests/focal_reference.py)."""

import math
import re

import pytest
import torch
from fvcore.nn import sigmoid_focal_loss as fvcore_focal_loss
from fvcore.nn import sigmoid_focal_loss_jit as fvcore_focal_loss_jit
from fvcore.nn import sigmoid_focal_loss_star as fvcore_focal_loss_star
from torch.nn import functional as F

import retinanet_plugin  # noqa: F401  (registers the plugin's components)
from retinanet_plugin import sigmoid_focal_loss, sigmoid_focal_loss_star

SHAPE = (500, 7)
REDUCTIONS = ("none", "mean", "sum")
ALPHA_GAMMA = [
    (0.25, 2.0),
    (-1.0, 2.0),
    (0.25, 0.0),
    (-1.0, 0.0),
    (0.5, 0.5),
    (0.75, 5.0),
    (-1.0, 0.5),
    (0.0, 1.0),
    (1.0, 3.0),
]


pytestmark = pytest.mark.usefixtures("single_thread")


def _inputs(seed=0, shape=SHAPE, soft=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype)
    if soft:
        targets = torch.rand(shape, generator=g, dtype=torch.float64).to(dtype)
    else:
        targets = (torch.rand(shape, generator=g) < 0.3).to(dtype)
    return logits, targets


def _reduce(loss, reduction):
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    return loss


def _paper_focal_loss(logits, targets, alpha, gamma, reduction="none"):
    """FL = -alpha_t (1 - p_t)^gamma log(p_t), straight from the paper, in float64."""
    x = logits.double()
    t = targets.double()
    p = torch.sigmoid(x)
    p_t = p * t + (1 - p) * (1 - t)
    alpha_t = alpha * t + (1 - alpha) * (1 - t) if alpha >= 0 else torch.ones_like(t)
    loss = -alpha_t * (1 - p_t) ** gamma * torch.log(p_t)
    return _reduce(loss, reduction)


def _stable_focal_loss(logits, targets, alpha, gamma):
    """The same loss for hard 0/1 targets, via float64 logsigmoid (finite for |x| = 100)."""
    x = logits.double()
    t = targets.double()
    log_p, log_1mp = F.logsigmoid(x), F.logsigmoid(-x)
    log_p_t = torch.where(t > 0.5, log_p, log_1mp)
    log_1m_p_t = torch.where(t > 0.5, log_1mp, log_p)
    alpha_t = alpha * t + (1 - alpha) * (1 - t) if alpha >= 0 else torch.ones_like(t)
    return -alpha_t * torch.exp(gamma * log_1m_p_t) * log_p_t


# ---------------------------------------------------------------------------------------------
# sigmoid_focal_loss
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("alpha,gamma", ALPHA_GAMMA)
def test_focal_loss_matches_paper_formula(alpha, gamma, reduction):
    """The loss equals the paper's formula evaluated in float64, for every reduction."""
    logits, targets = _inputs(seed=1)
    out = sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction=reduction)
    ref = _paper_focal_loss(logits, targets, alpha, gamma, reduction)
    assert out.dtype == torch.float32
    assert out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("alpha,gamma", ALPHA_GAMMA)
def test_focal_loss_float64_input_matches_paper_formula_tightly(alpha, gamma):
    """float64 logits are computed in float64 and match the reference to near machine precision."""
    logits, targets = _inputs(seed=2, dtype=torch.float64)
    out = sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, _paper_focal_loss(logits, targets, alpha, gamma))


def test_default_arguments_are_alpha_025_gamma_2_no_reduction():
    """Defaults are the paper's alpha=0.25, gamma=2 and elementwise output."""
    logits, targets = _inputs(seed=3)
    out = sigmoid_focal_loss(logits, targets)
    assert out.shape == SHAPE
    torch.testing.assert_close(
        out.double(), _paper_focal_loss(logits, targets, 0.25, 2.0), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gamma_zero_without_alpha_is_bce_with_logits(reduction):
    """gamma=0 and alpha<0 is exactly binary cross-entropy with logits."""
    logits, targets = _inputs(seed=4)
    out = sigmoid_focal_loss(logits, targets, alpha=-1.0, gamma=0.0, reduction=reduction)
    ref = F.binary_cross_entropy_with_logits(logits, targets, reduction=reduction)
    # torch's float32 BCE loses relative precision on tiny losses, hence the absolute tolerance;
    # against float64 BCE the relative error is at float32 rounding level.
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    ref64 = F.binary_cross_entropy_with_logits(
        logits.double(), targets.double(), reduction=reduction
    )
    torch.testing.assert_close(out.double(), ref64, rtol=1e-6, atol=0)


def test_gamma_zero_with_alpha_is_alpha_weighted_bce():
    """gamma=0 with alpha gives alpha-balanced BCE (alpha on positives, 1-alpha on negatives)."""
    logits, targets = _inputs(seed=5)
    out = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=0.0)
    weight = torch.where(targets > 0, 0.25, 0.75)
    ref = F.binary_cross_entropy_with_logits(
        logits.double(), targets.double(), weight=weight.double(), reduction="none"
    )
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=0)


def test_hand_computed_values():
    """A few elements checked against values computed by hand."""
    logits = torch.tensor([0.0, 0.0, math.log(3.0), math.log(3.0)])
    targets = torch.tensor([1.0, 0.0, 1.0, 0.0])
    # x=0: p=1/2, p_t=1/2 -> FL = alpha_t * 1/4 * log 2.
    # x=log 3: p=3/4; t=1: p_t=3/4 -> 0.25 * 1/16 * log(4/3); t=0: p_t=1/4 -> 0.75 * 9/16 * log 4.
    expected = torch.tensor(
        [
            0.25 * 0.25 * math.log(2.0),
            0.75 * 0.25 * math.log(2.0),
            0.25 / 16 * math.log(4.0 / 3.0),
            0.75 * 9 / 16 * math.log(4.0),
        ]
    )
    out = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (-1.0, 2.0), (0.4, 0.5), (-1.0, 0.0)])
@pytest.mark.parametrize("soft", [False, True], ids=["binary", "soft"])
@pytest.mark.parametrize("fvcore_fn", [fvcore_focal_loss, fvcore_focal_loss_jit], ids=["py", "jit"])
def test_matches_fvcore(fvcore_fn, soft, alpha, gamma, reduction):
    """Equal to fvcore's sigmoid_focal_loss (and its TorchScript version), hard or soft targets."""
    logits, targets = _inputs(seed=6, soft=soft)
    out = sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction=reduction)
    ref = fvcore_fn(logits, targets, alpha=alpha, gamma=gamma, reduction=reduction)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.5, 0.5), (-1.0, 3.0), (0.25, 0.0)])
def test_soft_targets_match_float64_reference(alpha, gamma):
    """Soft targets in [0, 1] (including exact 0 and 1) give alpha_t (1 - p_t)^gamma CE(x, t),
    with CE the soft binary cross-entropy and p_t = p t + (1 - p)(1 - t), as in fvcore."""
    logits, targets = _inputs(seed=7, soft=True)
    targets[:10] = 0.0
    targets[10:20] = 1.0
    out = sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma)
    assert torch.isfinite(out).all()
    x, t = logits.double(), targets.double()
    p = torch.sigmoid(x)
    p_t = p * t + (1 - p) * (1 - t)
    ce = -(t * torch.log(p) + (1 - t) * torch.log(1 - p))
    alpha_t = alpha * t + (1 - alpha) * (1 - t) if alpha >= 0 else torch.ones_like(t)
    ref = alpha_t * (1 - p_t) ** gamma * ce
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    # For hard targets this is the paper's formula.
    torch.testing.assert_close(
        out[:20].double(),
        _paper_focal_loss(logits[:20], targets[:20], alpha, gamma),
        rtol=1e-5,  # float32 computation against a float64 reference
        atol=1e-6,
    )


@pytest.mark.parametrize("target_dtype", [torch.int64, torch.bool, torch.float16])
def test_non_float32_targets_give_same_loss(target_dtype):
    """One-hot integer / bool / half targets give the same loss as float32 targets."""
    logits, targets = _inputs(seed=8)
    ref = sigmoid_focal_loss(logits, targets)
    out = sigmoid_focal_loss(logits, targets.to(target_dtype))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_empty_input_sum_is_zero():
    """An empty input gives an empty 'none' loss and a zero 'sum'."""
    logits = torch.zeros(0, 7)
    targets = torch.zeros(0, 7)
    assert sigmoid_focal_loss(logits, targets).shape == (0, 7)
    assert sigmoid_focal_loss(logits, targets, reduction="sum").item() == 0.0


EXTREME_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("gamma", [0.0, 0.1, 0.5, 2.0])
@pytest.mark.parametrize("alpha", [0.25, -1.0])
@pytest.mark.parametrize("dtype", EXTREME_DTYPES, ids=str)
def test_focal_loss_extreme_logits_are_finite_and_accurate(dtype, alpha, gamma):
    """Logits of +-100 in any float dtype give finite float32 losses and gradients that match a
    float64 logsigmoid reference."""
    logits = torch.tensor([100.0, 100.0, -100.0, -100.0, 0.0, 3.0], dtype=dtype)
    targets = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    logits.requires_grad_(True)
    loss = sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma)
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss).all(), loss
    loss.sum().backward()
    assert logits.grad.dtype == dtype
    assert torch.isfinite(logits.grad).all(), logits.grad

    ref_x = logits.detach().double().requires_grad_(True)
    ref = _stable_focal_loss(ref_x, targets, alpha, gamma)
    ref.sum().backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    grad_tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(
        logits.grad.double(), ref_x.grad.to(dtype).double(), rtol=grad_tol, atol=1e-6
    )


@pytest.mark.parametrize("gamma", [0.0, 0.1, 0.5, 2.0])
def test_focal_loss_extreme_logits_hand_values(gamma):
    """Confidently wrong logits give alpha_t * 100 (log p_t = -100, 1 - p_t = 1); confidently
    right ones give a loss that underflows to ~0."""
    logits = torch.tensor([100.0, -100.0, 100.0, -100.0])
    targets = torch.tensor([0.0, 1.0, 1.0, 0.0])
    out = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=gamma)
    torch.testing.assert_close(out, torch.tensor([75.0, 25.0, 0.0, 0.0]), rtol=1e-6, atol=1e-30)


def _check_gradient_by_finite_differences(fn, logits, eps=1e-6):
    """The loss's gradient (one backward call, as in training) against central differences of
    the loss itself, in float64, for a random weighting of its outputs."""
    weights = torch.randn(
        fn(logits).shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    x = logits.detach().clone().requires_grad_(True)
    (fn(x) * weights).sum().backward()
    numeric = torch.zeros_like(logits)
    flat = logits.detach().reshape(-1)
    for i in range(flat.numel()):
        step = torch.zeros_like(flat)
        step[i] = eps
        plus = (fn((flat + step).view_as(logits)) * weights).sum()
        minus = (fn((flat - step).view_as(logits)) * weights).sum()
        numeric.view(-1)[i] = (plus - minus) / (2 * eps)
    torch.testing.assert_close(x.grad, numeric, rtol=1e-3, atol=1e-5)  # gradcheck's tolerances


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 3.5])
@pytest.mark.parametrize("alpha", [0.25, -1.0])
def test_focal_loss_gradient_equals_finite_differences(alpha, gamma):
    """The analytic gradient w.r.t. the logits agrees with finite differences (float64)."""
    logits, targets = _inputs(seed=9, shape=(6, 3), dtype=torch.float64)
    for reduction in REDUCTIONS:
        _check_gradient_by_finite_differences(
            lambda x: sigmoid_focal_loss(x, targets, alpha=alpha, gamma=gamma, reduction=reduction),
            logits,
        )


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_focal_loss_gradient_with_soft_targets_equals_finite_differences(gamma):
    """With soft targets strictly inside (0, 1), too."""
    g = torch.Generator().manual_seed(10)
    logits = torch.randn(5, 3, generator=g, dtype=torch.float64) * 2
    targets = 0.05 + 0.9 * torch.rand(5, 3, generator=g, dtype=torch.float64)
    _check_gradient_by_finite_differences(
        lambda x: sigmoid_focal_loss(x, targets, alpha=0.25, gamma=gamma), logits
    )


def test_focal_loss_gradient_matches_reference_autograd():
    """Gradients in float32 match the float64 paper-formula gradients."""
    logits, targets = _inputs(seed=11)
    logits.requires_grad_(True)
    sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0, reduction="sum").backward()
    ref_x = logits.detach().double().requires_grad_(True)
    _paper_focal_loss(ref_x, targets, 0.25, 2.0, "sum").backward()
    torch.testing.assert_close(logits.grad.double(), ref_x.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fn", [sigmoid_focal_loss, sigmoid_focal_loss_star])
@pytest.mark.parametrize("bad", ["avg", "", "None", "MEAN"])
def test_invalid_reduction_raises(fn, bad):
    """An unknown reduction raises ValueError naming the bad value."""
    logits, targets = _inputs(seed=12, shape=(4, 2))
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        fn(logits, targets, reduction=bad)


# ---------------------------------------------------------------------------------------------
# sigmoid_focal_loss_star
# ---------------------------------------------------------------------------------------------


# (logit x, target t, gamma, beta, alpha, FL*) with FL* = log(1 + exp(-(gamma x_t + beta))) / gamma,
# x_t = (2t - 1) x, times alpha t + (1 - alpha)(1 - t) if alpha >= 0, worked out by hand:
# log(2) / 4; log(1 + e^3) / 2; log(1 + e^4) / 4; (60 + log(1 + e^-60)) / 2 (float32 overflows
# exp(60) in a naive log(sigmoid)); 0.25 log(2) / 4; 0.75 log(1 + e^2) / 4.
FL_STAR_BY_HAND = [
    (0.0, 1.0, 4.0, 0.0, -1.0, 0.17328679513998632),
    (2.0, 0.0, 2.0, 1.0, -1.0, 1.524293675786871),
    (-1.0, 1.0, 4.0, 0.0, -1.0, 1.0045374819794524),
    (30.0, 0.0, 2.0, 0.0, -1.0, 30.0),
    (0.0, 1.0, 4.0, 0.0, 0.25, 0.04332169878499658),
    (0.5, 0.0, 4.0, 0.0, 0.25, 0.3987990020705574),
]


@pytest.mark.parametrize("x, t, gamma, beta, alpha, expected", FL_STAR_BY_HAND)
def test_focal_loss_star_hand_computed_values(x, t, gamma, beta, alpha, expected):
    """FL* at single points worked out by hand, in float32 and float64."""
    for dtype in (torch.float32, torch.float64):
        out = sigmoid_focal_loss_star(
            torch.tensor([x], dtype=dtype),
            torch.tensor([t], dtype=dtype),
            gamma=gamma,
            beta=beta,
            alpha=alpha,
        )
        assert out.dtype == dtype
        assert out.item() == pytest.approx(expected, rel=1e-6 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("reduction, combine", [("sum", sum), ("mean", lambda v: sum(v) / len(v))])
def test_focal_loss_star_reductions_of_hand_computed_values(reduction, combine):
    """Sum and mean over elements with one gamma and beta (gamma 4, beta 0, no alpha)."""
    rows = [r for r in FL_STAR_BY_HAND if r[2] == 4.0 and r[3] == 0.0 and r[4] < 0]
    logits = torch.tensor([r[0] for r in rows], dtype=torch.float64)
    targets = torch.tensor([r[1] for r in rows], dtype=torch.float64)
    out = sigmoid_focal_loss_star(logits, targets, gamma=4.0, beta=0.0, reduction=reduction)
    assert out.item() == pytest.approx(combine([r[5] for r in rows]), rel=1e-12)


def test_focal_loss_star_defaults_are_gamma_4_beta_0_no_alpha():
    """Defaults are the appendix's best setting gamma*=4, beta=0, without alpha weighting."""
    logits, targets = _inputs(seed=14)
    out = sigmoid_focal_loss_star(logits, targets)
    explicit = sigmoid_focal_loss_star(logits, targets, gamma=4.0, beta=0.0, alpha=-1.0)
    assert torch.equal(out, explicit)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_focal_loss_star_gamma_one_is_bce(reduction):
    """FL* with gamma=1, beta=0 is binary cross-entropy with logits."""
    logits, targets = _inputs(seed=15)
    out = sigmoid_focal_loss_star(logits, targets, gamma=1.0, beta=0.0, reduction=reduction)
    ref = F.binary_cross_entropy_with_logits(logits, targets, reduction=reduction)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    ref64 = F.binary_cross_entropy_with_logits(
        logits.double(), targets.double(), reduction=reduction
    )
    torch.testing.assert_close(out.double(), ref64, rtol=1e-6, atol=0)


@pytest.mark.parametrize("alpha,gamma", [(-1.0, 4.0), (0.25, 2.0), (0.5, 1.0)])
def test_focal_loss_star_matches_fvcore_with_beta_zero(alpha, gamma):
    """With beta=0, FL* equals fvcore's sigmoid_focal_loss_star."""
    logits, targets = _inputs(seed=16)
    out = sigmoid_focal_loss_star(logits, targets, gamma=gamma, beta=0.0, alpha=alpha)
    ref = fvcore_focal_loss_star(logits, targets, alpha=alpha, gamma=gamma)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gamma", [0.0, -1.0, -4.0])
def test_focal_loss_star_nonpositive_gamma_raises(gamma):
    """gamma <= 0 is rejected with ValueError."""
    logits, targets = _inputs(seed=17, shape=(3, 2))
    with pytest.raises(ValueError, match="gamma"):
        sigmoid_focal_loss_star(logits, targets, gamma=gamma)


@pytest.mark.parametrize("gamma", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("dtype", EXTREME_DTYPES, ids=str)
def test_focal_loss_star_extreme_logits_are_finite(dtype, gamma):
    """FL* on logits of +-100 in any float dtype is finite, float32, with finite gradients."""
    logits = torch.tensor([100.0, 100.0, -100.0, -100.0], dtype=dtype, requires_grad=True)
    targets = torch.tensor([0.0, 1.0, 0.0, 1.0])
    loss = sigmoid_focal_loss_star(logits, targets, gamma=gamma, beta=0.5)
    assert loss.dtype == torch.float32
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(logits.grad).all()
    x = logits.detach().double()
    ref = -F.logsigmoid(gamma * (2 * targets.double() - 1) * x + 0.5) / gamma
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gamma,beta", [(4.0, 0.0), (0.5, 1.0), (2.0, -0.5)])
@pytest.mark.parametrize("alpha", [-1.0, 0.25])
def test_focal_loss_star_gradcheck(gamma, beta, alpha):
    """Analytic FL* gradients w.r.t. the logits agree with finite differences (float64)."""
    logits, targets = _inputs(seed=18, shape=(6, 3), dtype=torch.float64)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: sigmoid_focal_loss_star(
            x, targets, gamma=gamma, beta=beta, alpha=alpha, reduction="sum"
        ),
        (logits,),
    )


def test_targets_are_constants():
    """Gradients flow to the logits only; targets that require grad do not produce NaN."""
    logits = torch.tensor([0.3, -1.0, 2.0], requires_grad=True)
    targets = torch.tensor([0.0, 1.0, 0.5], requires_grad=True)
    sigmoid_focal_loss(logits, targets, reduction="sum").backward()
    assert targets.grad is None
    assert torch.isfinite(logits.grad).all()
