"""Inference and training speed-ups (MODEL.INFERENCE_OPTIMIZATION, MODEL.TRAINING_OPTIMIZATION):
the same detections, losses and gradients as detectron2's RetinaNet with the same weights, and
an unchanged state_dict."""

import copy
import io

import pytest
import torch
from detectron2_pairs import PAIRS, assert_detections_match, build_pair, make_batch

from detectron2.layers import Conv2d, FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from retinanet_plugin.modeling.inference_optimization import (
    fold_frozen_batchnorm,
    native_bfloat16,
    resolve_inference_dtype,
)

# Tolerances of the optimized float32 path against detectron2's plain one: folding the norm into
# the weights and the channels-last convolutions change the rounding of every layer only. Folding
# adds -mean * gamma / sigma to the bias, which cancels against the convolution's output: on the
# benchmark's calibrated R50-FPN (activations normalized as in a trained network) scores moved by
# up to 2.5e-5 and boxes by 4e-4 px (benchmarks, --quick size).
SCORE_ATOL = 1e-4
BOX_ATOL = 5e-3  # pixels, on boxes of up to 400 px
# ResNet-18 with FrozenBN (detectron2's R50 config at depth 18): the folding at a third of the cost.
R18_FROZEN_BN = ("MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64")
OFF = (
    "MODEL.INFERENCE_OPTIMIZATION.FOLD_FROZEN_BN",
    "False",
    "MODEL.INFERENCE_OPTIMIZATION.CHANNELS_LAST",
    "False",
    "MODEL.INFERENCE_OPTIMIZATION.WINOGRAD",
    "False",
)


def _pair(name, *plugin_opts, common=()):
    """(plugin model with ``plugin_opts``, detectron2's RetinaNet) with the same weights, both
    with the options ``common``."""
    _, reference = build_pair(name, *common)
    plugin = build_model(PAIRS[name][0](*common, *plugin_opts))
    plugin.load_state_dict(reference.state_dict(), strict=True)
    return plugin, reference


def _scored_pair(name, *opts, common=()):
    plugin, reference = _pair(name, *opts, common=common)
    with torch.no_grad():
        # Zero classification bias: with the prior bias, random weights score below 0.05.
        for model in (plugin, reference):
            model.head.cls_score.bias.zero_()
    return plugin.eval(), reference.eval()


def _assert_detections_close(ours, theirs):
    assert_detections_match(ours, theirs, SCORE_ATOL, BOX_ATOL)


def _frozen_bn_convs(module):
    return [
        m
        for m in module.modules()
        if isinstance(m, Conv2d) and isinstance(m.norm, FrozenBatchNorm2d)
    ]


def test_folded_conv_equals_conv_then_frozen_bn_float64():
    """One folded conv against conv then FrozenBN, in float64 with random statistics."""
    torch.manual_seed(0)
    conv = Conv2d(4, 6, 3, padding=1, bias=True, norm=FrozenBatchNorm2d(6)).double()
    conv.norm.weight.uniform_(0.5, 2.0)
    conv.norm.bias.normal_()
    conv.norm.running_mean.normal_()
    conv.norm.running_var.uniform_(0.1, 3.0)
    x = torch.randn(2, 4, 9, 7, dtype=torch.float64)
    folded = fold_frozen_batchnorm(conv)
    assert folded.norm is None and isinstance(conv.norm, FrozenBatchNorm2d)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), conv(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("grad_enabled", [False, True], ids=["no_grad", "grad"])
def test_optimized_inference_equals_detectron2(grad_enabled):
    """Folded FrozenBN and channels-last (the defaults): detectron2's detections within
    SCORE_ATOL / BOX_ATOL; the model's own modules keep their norms."""
    plugin, reference = _scored_pair("R50_FPN_1x")
    assert plugin.inference_runner.fold_frozen_bn and plugin.inference_runner.channels_last
    batch = make_batch(plugin.num_classes)
    for item, (h, w) in zip(batch, [(300, 400), (448, 320)]):
        item["height"], item["width"] = h, w
    with torch.set_grad_enabled(grad_enabled):
        ours = plugin(batch)
        theirs = reference(batch)
    _assert_detections_close(ours, theirs)
    # The optimized path ran: its backbone copy has no FrozenBN left, the model's all of them.
    copied_backbone = plugin.inference_runner._runner.backbone
    assert _frozen_bn_convs(copied_backbone) == []
    assert len(_frozen_bn_convs(plugin.backbone)) == len(_frozen_bn_convs(reference.backbone)) > 50


def _state(model):
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


def test_state_dict_and_training_unchanged_by_inference():
    """state_dict (and its saved bytes) after eval, inference, train is the same as before, and
    the next training step's losses and gradients equal those of a model never evaluated."""
    plugin, _ = build_pair("R50_FPN_1x", *R18_FROZEN_BN)
    untouched = copy.deepcopy(plugin)
    before = _state(plugin)
    plugin.eval()
    with torch.no_grad():
        plugin([{"image": x["image"]} for x in make_batch(plugin.num_classes)])
    assert plugin.inference_runner._runner is not None
    assert _state(plugin) == before  # a checkpoint written in eval mode (mid-training evaluation)
    plugin.train()
    assert plugin.inference_runner._runner is None
    assert _state(plugin) == before
    # A copy of the evaluated model (as an EMA or a checkpoint hook makes) builds nothing.
    assert copy.deepcopy(plugin.eval()).inference_runner._runner is None
    plugin.train()
    batch = make_batch(plugin.num_classes)
    with EventStorage():
        ours = plugin(copy.deepcopy(batch))
        theirs = untouched(copy.deepcopy(batch))
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    sum(ours.values()).backward()
    sum(theirs.values()).backward()
    for (name, a), b in zip(plugin.named_parameters(), untouched.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        assert a.grad is None or torch.equal(a.grad, b.grad), name


@pytest.mark.parametrize("how", ["load_state_dict", "in_place"])
def test_weights_changed_after_inference_are_used(how):
    """New weights after an inference call (a checkpoint loaded into an evaluated model, or an
    in-place update) give the new weights' detections, not those of the folded copy."""
    plugin, reference = _scored_pair("R50_FPN_1x", common=R18_FROZEN_BN)
    batch = [{"image": x["image"]} for x in make_batch(plugin.num_classes)]
    with torch.no_grad():
        before = plugin(batch)
        new_weights = {k: v.clone() for k, v in reference.state_dict().items()}
        for key in new_weights:
            if key.endswith("norm.weight"):
                new_weights[key].mul_(0.9)
        reference.load_state_dict(new_weights)
        after = reference(batch)
        assert not torch.equal(
            before[0]["instances"].pred_boxes.tensor, after[0]["instances"].pred_boxes.tensor
        )
        if how == "load_state_dict":
            plugin.load_state_dict(new_weights)
        else:
            for key, value in plugin.state_dict().items():
                value.copy_(new_weights[key])
        _assert_detections_close(plugin(batch), after)


@pytest.mark.parametrize("name", ["R50_FPN_1x", "R18_GN_tiny"])
def test_training_channels_last_losses_and_gradients_equal_detectron2(name):
    """MODEL.TRAINING_OPTIMIZATION.CHANNELS_LAST: backbone and head run channels-last, and the
    losses and gradients equal those of detectron2's RetinaNet fed the same channels-last images
    (rtol 1e-5 for the losses, 1e-4 of each gradient's largest entry: the plain equality test's
    tolerances). Against detectron2 in the plain layout the gradients of a random ResNet differ
    by up to about 1e-2 of their largest entry (other summation order, through every layer)."""
    plugin, reference = _pair(name, "MODEL.TRAINING_OPTIMIZATION.CHANNELS_LAST", "True")
    assert plugin.training_channels_last
    plugin.train()
    reference.train()
    features = {}
    plugin.backbone.register_forward_hook(lambda m, i, o: features.update(o))
    reference.backbone.register_forward_pre_hook(
        lambda m, i: (i[0].contiguous(memory_format=torch.channels_last),)
    )
    batch = make_batch(plugin.num_classes)
    with EventStorage():
        ours = plugin(copy.deepcopy(batch))
        theirs = reference(copy.deepcopy(batch))
    assert all(x.is_contiguous(memory_format=torch.channels_last) for x in features.values())
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=0)
    sum(ours.values()).backward()
    sum(theirs.values()).backward()
    for (k, a), b in zip(plugin.named_parameters(), reference.parameters()):
        assert (a.grad is None) == (b.grad is None), k
        if a.grad is not None:
            scale = b.grad.abs().max().item()
            assert (a.grad - b.grad).abs().max().item() <= 1e-4 * scale + 1e-12, k


def test_plain_path_when_off_and_while_tracing():
    """With the speed-ups off, or while the model is traced (export), the model's own modules
    run and nothing is built."""
    plugin, _ = _scored_pair("R18_GN_tiny", *OFF)
    assert not plugin.inference_runner.enabled
    with torch.no_grad():
        plugin([{"image": make_batch(plugin.num_classes)[0]["image"]}])
    assert plugin.inference_runner._runner is None
    assert plugin.inference_runner.applies()
    traced = []

    def record(x):
        traced.append(plugin.inference_runner.applies())
        return x * 2

    torch.jit.trace(record, (torch.ones(1),), check_trace=False)
    assert traced == [False]


def test_auto_dtype_follows_native_bfloat16_support():
    """MODEL.INFERENCE_DTYPE "auto": bfloat16 only where the CPU has avx512_bf16 or AMX (as
    torch's own CPU capability checks say), float32 elsewhere."""
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert native_bfloat16("cpu") == native
    assert resolve_inference_dtype("auto", "cpu") == ("bfloat16" if native else "float32")
    assert resolve_inference_dtype("float32", "cpu") == "float32"
    assert resolve_inference_dtype("bfloat16", "cpu") == "bfloat16"


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_compiled_inference_equals_eager_without_recompiling_per_size():
    """MODEL.INFERENCE_OPTIMIZATION.COMPILE on the tiny model: the eager model's detections on
    images of three sizes, from at most two compiled graphs (dynamic shapes; the convolution's
    kernel choice puts one guard on the feature map's size, here between the first image and
    the other two). Slow: inductor compiles for minutes on 2 cores (`make test-slow`)."""
    torch._dynamo.reset()
    plugin, reference = _scored_pair("R18_GN_tiny", "MODEL.INFERENCE_OPTIMIZATION.COMPILE", "True")
    sizes = make_batch(plugin.num_classes, with_empty_image=True)  # 192x256, 224x160, 160x192
    graphs = torch._dynamo.utils.counters["stats"]
    counts = []
    with torch.no_grad():
        for item in sizes:
            _assert_detections_close(plugin([item]), reference([item]))
            counts.append(graphs["unique_graphs"])
    assert hasattr(plugin.inference_runner._runner, "_orig_mod")
    # The third size ran a graph compiled for an earlier one.
    assert counts[2] == counts[1] <= 2
