"""3x3 convolutions on CPU by NNPACK's Winograd algorithm, for backbone and head.

RetinaNet's compute is nearly all 3x3, stride-1 convolutions (the head's eight 256-channel
convolutions and its classifier on five levels, the FPN's outputs, the ResNet's bottlenecks).
On a CPU, oneDNN computes them directly; NNPACK, which ships inside torch, computes them with the
Winograd transform F(6x6, 3x3), several times fewer multiplications, and is faster on large
feature maps (below some size its transforms cost more than they save). torch never picks it
on x86 (oneDNN comes first), so :class:`WinogradConvolutions` routes the eligible calls of
``torch.nn.functional.conv2d`` to it while it is active: float32 CPU tensors in the contiguous
(N, C, H, W) layout, 3x3 kernel, stride 1, padding 1, no dilation or groups, with at least
:data:`MIN_CHANNELS` input channels and :data:`MIN_POSITIONS` positions per map (from about
there it measured faster than oneDNN, in training too: docs/performance.md). Everything else,
bfloat16 autocast and the GPU included, runs as before.

Results equal the direct convolution's up to float rounding, which the F(6x6, 3x3) transforms
make larger than oneDNN's (tests/test_winograd.py states the tolerances). NNPACK's batch
algorithm is slower than its single-image one, so a batch is computed image by image. The
gradient: the input's gradient is again a 3x3 convolution (of the output's gradient with the
transposed, flipped kernel) and goes through NNPACK too; the kernel's gradient uses the Winograd
transform F(2x2, 3x3) with one matrix product per transformed position (written here: torch has
no Winograd kernel gradient).
"""

import functools
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

__all__ = [
    "MIN_CHANNELS",
    "MIN_POSITIONS",
    "WinogradConvolutions",
    "winograd_applies",
    "winograd_available",
    "winograd_conv3x3",
]

MIN_POSITIONS = 56 * 56  # H * W of the input
MIN_CHANNELS = 128

_CONV2D_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV2D_DEFAULTS = (None, None, None, 1, 0, 1, 1)


@functools.lru_cache(maxsize=None)
def winograd_available() -> bool:
    """Whether this torch has NNPACK and NNPACK runs on this CPU (elsewhere the convolutions
    stay torch's). The first call also initializes NNPACK, without which its convolutions fail."""
    if not hasattr(torch, "_nnpack_spatial_convolution"):  # a torch built without it
        return False
    return torch.backends.nnpack.is_available()


def winograd_applies(device) -> bool:
    """Whether the Winograd convolutions can run now for tensors on ``device``: a CPU, outside
    CPU autocast, with NNPACK."""
    cpu = torch.device(device).type == "cpu"
    return cpu and not torch.is_autocast_enabled("cpu") and winograd_available()


def _pair(value) -> Tuple:
    return (value, value) if isinstance(value, int) else tuple(value)


def _eligible(x, weight, stride, padding, dilation, groups) -> bool:
    if not (isinstance(x, Tensor) and isinstance(weight, Tensor)):
        return False
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if x.dim() != 4 or tuple(weight.shape[2:]) != (3, 3) or groups != 1:
        return False
    if padding == "same":  # for a 3x3 kernel with stride 1 and no dilation, padding 1
        padding = 1
    if isinstance(padding, str) or (_pair(stride), _pair(padding), _pair(dilation)) != (
        (1, 1),
        (1, 1),
        (1, 1),
    ):
        return False
    if x.shape[1] < MIN_CHANNELS or x.shape[2] * x.shape[3] < MIN_POSITIONS:
        return False
    # A channels-last input stays with oneDNN, which keeps its layout; under autocast the
    # convolution belongs to the autocast dtype.
    return x.is_contiguous() and not torch.is_autocast_enabled("cpu")


def _nnpack_conv3x3(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """(N, C, H, W) -> (N, C_out, H, W), padding 1, one image at a time."""
    weight = weight.contiguous()
    if x.shape[0] == 1:
        return torch._nnpack_spatial_convolution(x, weight, bias, [1, 1])
    return torch.cat(
        [
            torch._nnpack_spatial_convolution(x[i : i + 1], weight, bias, [1, 1])
            for i in range(len(x))
        ]
    )


# F(2x2, 3x3) (Lavin and Gray, 2016) for the kernel's gradient, which NNPACK has but torch does
# not expose: the input transform B^T d B and the kernel transform G; A's last row is negated
# in the gradient's transform below and, to make up for it, G's last row here.
_KERNEL_TRANSFORM = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, -1]])


def _winograd_kernel_gradient(x: Tensor, grad: Tensor) -> Tensor:
    """The gradient of a 3x3 convolution's kernel (padding 1, stride 1) by F(2x2, 3x3).

    Per 2x2 output tile and 4x4 input tile, with V = B^T d B of the input tile and M = A g A^T
    of the output's gradient: dL/dw = G^T (sum over tiles and images of M V^T, one matrix
    product per each of the 16 transformed positions) G, 2.25 times fewer multiplications than
    the direct sum, with sums of 4 instead of 9 terms per product.

    Args:
        x: (N, C, H, W) input of the convolution.
        grad: (N, C_out, H, W) gradient of its output.

    Returns:
        (C_out, C, 3, 3).
    """
    n, c, h, w = x.shape
    c_out = grad.shape[1]
    th, tw = (h + 1) // 2, (w + 1) // 2  # tiles; odd sizes get a zero row / column of gradient
    x = F.pad(x, (1, 1 + 2 * tw - w, 1, 1 + 2 * th - h))
    grad = F.pad(grad, (0, 2 * tw - w, 0, 2 * th - h))
    # (4, 4, C, N, th, tw) so that each transformed position is one (C, N * th * tw) matrix;
    # the B^T rows (1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1) as sums of slices.
    v = x.new_empty(4, 4, c, n, th, tw)
    r = [x[:, :, k : k + 2 * th : 2, :] for k in range(4)]
    for a, row in enumerate((r[0] - r[2], r[1] + r[2], r[2] - r[1], r[1] - r[3])):
        q = [row[..., k : k + 2 * tw : 2] for k in range(4)]
        torch.sub(q[0], q[2], out=v[a, 0].transpose(0, 1))
        torch.add(q[1], q[2], out=v[a, 1].transpose(0, 1))
        torch.sub(q[2], q[1], out=v[a, 2].transpose(0, 1))
        torch.sub(q[1], q[3], out=v[a, 3].transpose(0, 1))
    # A's rows (1, 0), (1, 1), (1, -1), (0, -1), the last one's sign moved into G.
    m = grad.new_empty(4, 4, c_out, n, th, tw)
    g0, g1 = grad[:, :, 0::2, :], grad[:, :, 1::2, :]
    for a, row in enumerate((g0, g0 + g1, g0 - g1, g1)):
        q0, q1 = row[..., 0::2], row[..., 1::2]
        m[a, 0].transpose(0, 1).copy_(q0)
        torch.add(q0, q1, out=m[a, 1].transpose(0, 1))
        torch.sub(q0, q1, out=m[a, 2].transpose(0, 1))
        m[a, 3].transpose(0, 1).copy_(q1)
    u = torch.bmm(m.view(16, c_out, -1), v.view(16, c, -1).transpose(1, 2)).view(4, 4, c_out, c)
    g = _KERNEL_TRANSFORM.to(u.dtype)
    return torch.einsum("ap,aboi,bq->oipq", g, u, g)


class _WinogradConv3x3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        ctx.save_for_backward(x, weight)
        return _nnpack_conv3x3(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            # The input's gradient: the output's gradient convolved with the kernel transposed
            # (C_out <-> C_in) and flipped, padding 1.
            grad_x = _nnpack_conv3x3(grad, weight.transpose(0, 1).flip(2, 3), None)
        if ctx.needs_input_grad[1]:
            grad_weight = _winograd_kernel_gradient(x, grad)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.sum(dim=(0, 2, 3))
        return grad_x, grad_weight, grad_bias


def winograd_conv3x3(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` by NNPACK's Winograd algorithm, with gradients.

    Args:
        x: (N, C, H, W) float32 CPU tensor.
        weight: (C_out, C, 3, 3).
        bias: (C_out,) or None.

    Returns:
        (N, C_out, H, W).
    """
    if not winograd_available():
        raise RuntimeError("NNPACK is not available in this torch build or on this CPU")
    return _WinogradConv3x3.apply(x, weight, bias)


class WinogradConvolutions(TorchFunctionMode):
    """While active (``with WinogradConvolutions(): ...``), the eligible calls of
    ``torch.nn.functional.conv2d`` (see the module's docstring) run :func:`winograd_conv3x3`;
    all others run as they are. Enter it only where :func:`winograd_available`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.conv2d:
            values = list(args) + [
                kwargs.get(name, default)
                for name, default in zip(_CONV2D_ARGS[len(args) :], _CONV2D_DEFAULTS[len(args) :])
            ]
            if _eligible(values[0], values[1], *values[3:]):
                return _WinogradConv3x3.apply(values[0], values[1], values[2])
        return func(*args, **kwargs)
