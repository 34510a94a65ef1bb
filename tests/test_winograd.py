"""Winograd convolutions (MODEL.INFERENCE_OPTIMIZATION.WINOGRAD, MODEL.TRAINING_OPTIMIZATION
.WINOGRAD): values and gradients against a float64 convolution, which calls they take, and the
model's detections, losses and gradients against detectron2's RetinaNet with the same weights."""

import copy

import pytest
import torch
from detectron2_pairs import assert_detections_match, build_pair
from torch.nn import functional as F

from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from retinanet_plugin.modeling.winograd import (
    MIN_CHANNELS,
    MIN_POSITIONS,
    WinogradConvolutions,
    winograd_available,
    winograd_conv3x3,
)

pytestmark = pytest.mark.skipif(not winograd_available(), reason="torch without NNPACK")

# The Winograd transforms round more than a direct convolution: measured about 1e-5 of the
# outputs' largest value per layer (F(6x6, 3x3) in float32), against 2e-6 for oneDNN's.
RELATIVE_ATOL = 1e-4
R18_FROZEN_BN = ("MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64")


def _relative_error(ours, reference):
    return ((ours.double() - reference).abs().max() / reference.abs().max()).item()


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_values_and_gradients_equal_float64_convolution(bias):
    """A batch of two (computed image by image): output, and gradients of input, kernel and
    bias, against float64 ``F.conv2d`` with padding 1."""
    torch.manual_seed(0)
    x = torch.randn(2, 40, 52, 61, requires_grad=True)
    weight = (torch.randn(72, 40, 3, 3) * 0.05).requires_grad_()
    b = torch.randn(72, requires_grad=True) if bias else None
    inputs = [t for t in (x, weight, b) if t is not None]
    y = winograd_conv3x3(x, weight, b)
    grad = torch.randn_like(y)
    grads = torch.autograd.grad(y, inputs, grad)

    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    y64 = F.conv2d(inputs64[0], inputs64[1], inputs64[2] if bias else None, padding=1)
    grads64 = torch.autograd.grad(y64, inputs64, grad.double())
    assert _relative_error(y, y64) < RELATIVE_ATOL
    for ours, reference in zip(grads, grads64):
        assert _relative_error(ours, reference) < RELATIVE_ATOL


def test_only_eligible_calls_are_routed():
    """Inside the mode, a 3x3 stride-1 float32 convolution on a large enough (N, C, H, W) map
    gives exactly :func:`winograd_conv3x3`'s result (not oneDNN's); a channels-last input, a
    small map, few channels, stride 2, padding 0 and bfloat16 autocast give exactly what they
    give outside."""
    torch.manual_seed(1)
    x = torch.randn(1, 128, 56, 58)
    weight = torch.randn(32, 128, 3, 3) * 0.05
    direct = F.conv2d(x, weight, padding=1)
    with torch.no_grad(), WinogradConvolutions():
        routed = F.conv2d(x, weight, padding=1)
        assert torch.equal(routed, winograd_conv3x3(x, weight))
        assert not torch.equal(routed, direct)
        not_routed = {
            "channels-last": (x.contiguous(memory_format=torch.channels_last), {"padding": 1}),
            "small map": (x[:, :, :48, :48], {"padding": 1}),
            "few channels": (x[:, :64], {"padding": 1}),
            "stride 2": (x, {"padding": 1, "stride": 2}),
            "padding 0": (x, {"padding": 0}),
        }
        inside = {
            k: F.conv2d(v, weight[:, : v.shape[1]], **kw) for k, (v, kw) in not_routed.items()
        }
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside["bfloat16"] = F.conv2d(x, weight, padding=1)
    outside = {k: F.conv2d(v, weight[:, : v.shape[1]], **kw) for k, (v, kw) in not_routed.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outside["bfloat16"] = F.conv2d(x, weight, padding=1)
    for name in outside:
        assert torch.equal(inside[name], outside[name]), name
    assert 48 * 48 < MIN_POSITIONS <= 56 * 58 and 64 < MIN_CHANNELS <= 128


def _large_batch(num_classes):
    """Two 448x480 images: the head's stride-8 level has 56x60 positions, where the Winograd
    convolutions apply, as they do to the ResNet's res3."""
    generator = torch.Generator().manual_seed(2)
    batch = []
    for boxes in ([[20.0, 30, 200, 250], [150, 100, 300, 180]], [[40.0, 60, 120, 300]]):
        instances = Instances((448, 480))
        instances.gt_boxes = Boxes(torch.tensor(boxes))
        instances.gt_classes = torch.arange(len(boxes)) % num_classes
        image = torch.randint(0, 256, (3, 448, 480), generator=generator, dtype=torch.uint8)
        batch.append({"image": image, "instances": instances})
    return batch


def test_inference_equals_detectron2():
    """Inference with the defaults (folding and Winograd on CPU): detectron2's detections within
    1e-4 in score and 5e-3 px, on a ResNet-18 FrozenBN model whose head's stride-8 level runs
    through NNPACK; with WINOGRAD off the scores are not bitwise the same (the route was taken)."""
    plugin, reference = build_pair("R50_FPN_1x", *R18_FROZEN_BN)
    plain = copy.deepcopy(plugin)
    plain.inference_runner.winograd = False
    for model in (plugin, reference, plain):
        with torch.no_grad():
            model.head.cls_score.bias.zero_()  # random weights score below 0.05 with the prior
        model.eval()
    assert plugin.inference_runner.winograd
    batch = [{"image": x["image"]} for x in _large_batch(plugin.num_classes)]
    with torch.no_grad():
        ours, theirs, without = plugin(batch), reference(batch), plain(batch)
    assert_detections_match(ours, theirs, 1e-4, 5e-3)
    assert not torch.equal(ours[0]["instances"].scores, without[0]["instances"].scores)


# Gradients of a whole random model against detectron2's in float64, per parameter: the norm of
# the error over the norm of the gradient. Measured: Winograd at most 1.6e-3 (FrozenBN model) and
# 2.0e-3 (GroupNorm model), detectron2's own float32 gradients 1.4e-3 and 2.0e-3.
GRADIENT_RTOL = 1e-2


@pytest.mark.parametrize("name", ["R50_FPN_1x", "R18_GN_tiny"])
def test_training_losses_and_gradients_equal_detectron2_float64(name):
    """Training with MODEL.TRAINING_OPTIMIZATION.WINOGRAD (the default), on images where the
    head's stride-8 level runs through NNPACK, against detectron2's RetinaNet in float64 with
    the same weights: losses within rtol 1e-5, gradients within GRADIENT_RTOL (see there); with
    WINOGRAD off the gradients are not bitwise the same (the route was taken)."""
    plugin, reference = build_pair(name, *(R18_FROZEN_BN if name == "R50_FPN_1x" else ()))
    reference.double()
    plain = copy.deepcopy(plugin)
    plain.training_winograd = False
    assert plugin.training_winograd
    batch = _large_batch(plugin.num_classes)
    with EventStorage():
        ours = plugin.train()(copy.deepcopy(batch))
        theirs = reference.train()(copy.deepcopy(batch))
        without = plain.train()(copy.deepcopy(batch))
    for key in ours:
        torch.testing.assert_close(ours[key].double(), theirs[key].double(), rtol=1e-5, atol=0)
    for losses in (ours, theirs, without):
        sum(losses.values()).backward()
    assert not torch.equal(plugin.head.cls_score.weight.grad, plain.head.cls_score.weight.grad)
    compared = 0
    for (k, a), b in zip(plugin.named_parameters(), reference.parameters()):
        assert (a.grad is None) == (b.grad is None), k
        if a.grad is not None:
            error = (a.grad.double() - b.grad).norm() / b.grad.norm()
            assert error <= GRADIENT_RTOL, k
            compared += 1
    assert compared > 20
