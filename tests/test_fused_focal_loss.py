"""The focal loss (computed fused: loss and gradient in one chunked pass) equals the float64
reference formula (values and gradients), chunk boundaries included."""

import pytest
import torch
from torch.nn import functional as F

import retinanet_plugin  # noqa: F401  (registers the plugin's components)
from focal_reference import reference_focal_loss
from retinanet_plugin import focal_loss_from_labels, sigmoid_focal_loss
from retinanet_plugin.modeling.losses import focal_loss

# 3000 x 80 = 240k elements: four CPU chunks of 819 rows, the last one partial.
SHAPE = (3000, 80)
ALPHA_GAMMA = [(0.25, 2.0), (-1.0, 2.0), (0.25, 0.0), (0.5, 0.5), (0.75, 5.0), (0.0, 1.0)]

pytestmark = pytest.mark.usefixtures("single_thread")


def _inputs(seed, soft=False, shape=SHAPE):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g, dtype=torch.float64) * 4
    if soft:
        targets = torch.rand(shape, generator=g, dtype=torch.float64)
    else:
        targets = (torch.rand(shape, generator=g) < 0.05).double()
    return logits, targets


def _loss_and_grad(fn, logits, targets, alpha, gamma, reduction, upstream):
    x = logits.clone().requires_grad_(True)
    loss = fn(x, targets, alpha=alpha, gamma=gamma, reduction=reduction)
    (loss * upstream).sum().backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("soft", [False, True], ids=["binary", "soft"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("alpha,gamma", ALPHA_GAMMA)
def test_fused_equals_plain_float64_reference(alpha, gamma, reduction, soft):
    """float32 fused loss and gradient match the plain loss evaluated in float64."""
    logits, targets = _inputs(seed=0, soft=soft)
    upstream = torch.randn(SHAPE, dtype=torch.float64) if reduction == "none" else 1.7
    ref_loss, ref_grad = _loss_and_grad(
        reference_focal_loss, logits, targets, alpha, gamma, reduction, upstream
    )
    loss, grad = _loss_and_grad(
        sigmoid_focal_loss,
        logits.float(),
        targets.float(),
        alpha,
        gamma,
        reduction,
        upstream.float() if reduction == "none" else upstream,
    )
    assert loss.dtype == grad.dtype == torch.float32
    assert loss.shape == ref_loss.shape
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6 * ref_grad.abs().max())


@pytest.mark.parametrize("alpha,gamma", ALPHA_GAMMA)
def test_fused_float64_matches_plain_tightly(alpha, gamma):
    """In float64 the analytic gradient equals autograd's of the plain formula to ~1e-12."""
    logits, targets = _inputs(seed=1, soft=True, shape=(500, 7))
    upstream = torch.randn(500, 7, dtype=torch.float64)
    ref = _loss_and_grad(reference_focal_loss, logits, targets, alpha, gamma, "none", upstream)
    out = _loss_and_grad(sigmoid_focal_loss, logits, targets, alpha, gamma, "none", upstream)
    torch.testing.assert_close(out[0], ref[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out[1], ref[1], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("gamma", [0.0, 0.1, 0.5, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_fused_extreme_logits_finite_and_equal_to_plain(dtype, gamma):
    """Logits of +-100 (where 1 - p_t underflows to 0) give finite, plain-equal results."""
    logits = torch.tensor([[100.0, 100.0, -100.0, -100.0, 0.0, 3.0, -30.0]], dtype=dtype)
    targets = torch.tensor([[0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0]])
    ref_loss, ref_grad = _loss_and_grad(
        reference_focal_loss, logits, targets, 0.25, gamma, "none", 1.0
    )
    loss, grad = _loss_and_grad(sigmoid_focal_loss, logits, targets, 0.25, gamma, "none", 1.0)
    assert grad.dtype == dtype
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=1e-30)
    torch.testing.assert_close(
        grad, ref_grad, rtol=1e-2 if dtype != torch.float32 else 1e-6, atol=1e-30
    )


def test_from_labels_equals_plain_on_one_hot_of_valid_rows():
    """Label K is an all-zero target row; label -1 rows add no loss and get zero gradient."""
    g = torch.Generator().manual_seed(2)
    num_classes = 80
    logits = torch.randn(SHAPE, generator=g) * 4
    labels = torch.randint(-1, num_classes + 1, (SHAPE[0],), generator=g)
    valid = labels >= 0
    targets = F.one_hot(labels[valid], num_classes + 1)[:, :-1].float()

    x = logits.clone().requires_grad_(True)
    loss = focal_loss_from_labels(x, labels, alpha=0.25, gamma=2.0)
    loss.backward()
    ref_x = logits.double().requires_grad_(True)
    ref = reference_focal_loss(ref_x[valid], targets, alpha=0.25, gamma=2.0, reduction="sum")
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(x.grad.double(), ref_x.grad, rtol=1e-4, atol=1e-7)
    assert (x.grad[~valid] == 0).all()


def test_from_labels_all_ignored_is_zero():
    x = torch.randn(10, 3, requires_grad=True)
    loss = focal_loss_from_labels(x, torch.full((10,), -1))
    loss.backward()
    assert loss.item() == 0.0 and (x.grad == 0).all()


def test_fused_without_grad_gives_same_value():
    logits, targets = _inputs(seed=3)
    with torch.no_grad():
        value = sigmoid_focal_loss(logits.float(), targets.float(), reduction="sum")
    ref = reference_focal_loss(logits, targets, reduction="sum")
    torch.testing.assert_close(value.double(), ref, rtol=1e-6, atol=0)


def test_fused_gives_no_gradient_to_targets():
    logits = torch.randn(4, 3, requires_grad=True)
    targets = torch.rand(4, 3, requires_grad=True)
    sigmoid_focal_loss(logits, targets, reduction="sum").backward()
    assert targets.grad is None and logits.grad is not None


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: focal_loss_from_labels(torch.zeros(5), torch.zeros(5)), r"\(M, K\) logits"),
        (lambda: sigmoid_focal_loss(torch.zeros(5, 2), torch.zeros(5, 3)), "differs"),
        (lambda: focal_loss_from_labels(torch.zeros(5, 2), torch.zeros(4)), "one label per row"),
        (lambda: focal_loss_from_labels(torch.zeros(5, 2), torch.zeros(5), gamma=-1), "gamma"),
        (
            lambda: sigmoid_focal_loss(torch.zeros(5, 2), torch.zeros(5, 2), reduction="x"),
            "reduction",
        ),
    ],
)
def test_fused_bad_arguments_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_fused_cpu_gradient_has_no_subnormals():
    """Gradients of confident logits are flushed to 0 below tiny / eps (CPU arithmetic on
    subnormals is ~100x slower); larger ones equal the float64 reference."""
    logits = torch.linspace(-90.0, 90.0, 4000).view(500, 8)
    targets = (torch.arange(4000).view(500, 8) % 3 == 0).float()
    _, grad = _loss_and_grad(sigmoid_focal_loss, logits, targets, 0.25, 2.0, "sum", 1e-3)
    _, ref = _loss_and_grad(
        reference_focal_loss, logits.double(), targets.double(), 0.25, 2.0, "sum", 1e-3
    )
    finfo = torch.finfo(torch.float32)
    assert not ((grad != 0) & (grad.abs() < finfo.tiny)).any()
    assert ((ref != 0) & (ref.abs() < finfo.tiny)).any()  # the reference does have them
    kept = ref.abs() >= 1e-3 * finfo.tiny / finfo.eps  # clear of the flush threshold
    torch.testing.assert_close(grad.double()[kept], ref[kept], rtol=1e-4, atol=0)
    assert (grad[ref.abs() < 1e-3 * finfo.tiny] == 0).all()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_on_cuda_equals_float64_reference(dtype):
    """On the GPU the fused loss and gradient match the plain loss evaluated in float64 on the
    CPU, within the input dtype's precision."""
    logits, targets = _inputs(seed=2)
    rounded = logits.to(dtype).double()  # the reference sees the same rounded inputs
    ref_loss, ref_grad = _loss_and_grad(
        reference_focal_loss, rounded, targets, 0.25, 2.0, "sum", 1.0
    )
    loss, grad = _loss_and_grad(
        sigmoid_focal_loss,
        logits.to("cuda", dtype),
        targets.to("cuda", dtype),
        0.25,
        2.0,
        "sum",
        1.0,
    )
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss.cpu().double(), ref_loss, rtol=1e-4, atol=1e-4)
    tolerance = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(
        grad.cpu().double(), ref_grad, rtol=tolerance, atol=tolerance * ref_grad.abs().max()
    )


@pytest.mark.cuda
def test_fused_on_cuda_across_a_gpu_chunk_boundary():
    """Rows on both sides of the first GPU chunk boundary (the last chunk partial) get the
    float64 reference's loss and gradient."""
    rows_per_chunk = focal_loss._GPU_CHUNK // SHAPE[1]
    logits, targets = _inputs(seed=5, shape=(rows_per_chunk + 123, SHAPE[1]))
    ref_loss, ref_grad = _loss_and_grad(
        reference_focal_loss, logits, targets, 0.25, 2.0, "none", 1.0
    )
    loss, grad = _loss_and_grad(
        sigmoid_focal_loss, logits.cuda().float(), targets.cuda().float(), 0.25, 2.0, "none", 1.0
    )
    around = slice(rows_per_chunk - 50, rows_per_chunk + 50)
    torch.testing.assert_close(loss[around].cpu().double(), ref_loss[around], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.cpu().double().sum(), ref_loss.sum(), rtol=1e-5, atol=0)
    torch.testing.assert_close(grad.cpu().double(), ref_grad, rtol=1e-4, atol=1e-7)


def test_any_shape_is_computed_over_the_last_dimension():
    """A (2, 3, 5) or 1-D input gives the reference's elementwise loss in its own shape."""
    for shape in [(2, 3, 5), (11,)]:
        logits, targets = _inputs(seed=4, shape=shape)
        out = sigmoid_focal_loss(logits.float(), targets.float())
        assert out.shape == shape
        torch.testing.assert_close(
            out.double(), reference_focal_loss(logits, targets), rtol=2e-5, atol=1e-7
        )
