"""Tests for retinanet_plugin.FocalLossHead (the classification and box subnets)."""

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import retinanet_plugin  # noqa: F401  (registers the plugin's components)
from conftest import plugin_cfg
from detectron2.config import get_cfg
from detectron2.layers import CycleBatchNormList, ShapeSpec
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from retinanet_plugin import RETINANET_HEAD_REGISTRY, FocalLossHead, build_retinanet_head

STRIDES = (8, 16, 32, 64, 128)
C = 64  # divisible by 32 so that GroupNorm(32, C) is valid
K = 3
A = 9


pytestmark = pytest.mark.usefixtures("single_thread")


def _shapes(channels=C, strides=STRIDES):
    return [ShapeSpec(channels=channels, stride=s) for s in strides]


def _kwargs(**overrides):
    kwargs = dict(
        input_shape=_shapes(),
        num_classes=K,
        num_anchors=A,
        conv_dims=[C, C],
        norm="",
        prior_prob=0.01,
    )
    kwargs.update(overrides)
    return kwargs


def _features(batch=2, channels=C, base=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = [(base, base + 3), (base // 2, base // 2 + 2), (4, 3), (2, 2), (1, 1)]
    return [torch.randn(batch, channels, h, w, generator=g) for h, w in sizes]


def _convs(module):
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)]


def _randomise(module, seed=1):
    """Non-trivial weights (the 0.01-std init makes every output nearly the bias)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


# ---------------------------------------------------------------------------------------------
# Shapes and construction
# ---------------------------------------------------------------------------------------------


def test_registered_and_built_from_plugin_config():
    """The plugin config builds FocalLossHead through the registry with the paper's settings."""
    cfg = plugin_cfg("retinanet_R50_FPN_1x.yaml")
    shapes = _shapes(channels=256)
    head = build_retinanet_head(cfg, shapes)
    assert RETINANET_HEAD_REGISTRY.get("FocalLossHead") is FocalLossHead
    assert type(head) is FocalLossHead
    assert head.num_classes == 80 and head.num_anchors == 9
    convs = [m for m in head.cls_subnet if isinstance(m, nn.Conv2d)]
    assert [(m.in_channels, m.out_channels) for m in convs] == [(256, 256)] * 4
    assert head.cls_score.out_channels == 9 * 80
    assert head.bbox_pred.out_channels == 9 * 4
    torch.testing.assert_close(
        head.cls_score.bias, torch.full((720,), -math.log(99.0)), rtol=0, atol=0
    )


def test_built_from_tiny_config_uses_group_norm():
    """The tiny config (2 convs, GN) builds a GN head for 128-channel features."""
    cfg = plugin_cfg("retinanet_R18_GN_tiny.yaml", "MODEL.RETINANET.NUM_CLASSES", "4")
    head = FocalLossHead(cfg, _shapes(channels=128))
    assert head.num_classes == 4
    kinds = [type(m) for m in head.cls_subnet]
    assert kinds == [nn.Conv2d, nn.GroupNorm, nn.ReLU] * 2
    logits, deltas = head(_features(channels=128))
    assert logits[0].shape[1] == 9 * 4 and deltas[0].shape[1] == 9 * 4


def test_no_subnet_convs_is_a_clear_error():
    """detectron2's head needs at least one subnet conv (it sizes the predictors from the last
    one): the option's rule says so instead of an IndexError."""
    with pytest.raises(ValueError, match=r"MODEL.RETINANET.NUM_CONVS\) = 0: must be >= 1"):
        FocalLossHead(**_kwargs(conv_dims=[]))


# ---------------------------------------------------------------------------------------------
# Initialization
# ---------------------------------------------------------------------------------------------


def test_reset_classification_layer():
    """reset_classification_layer re-draws the predictor weight N(0, 0.01), sets its bias from
    the prior probability and leaves every other tensor alone."""
    head = FocalLossHead(**_kwargs(prior_prob=0.2))
    _randomise(head)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    torch.manual_seed(0)
    head.reset_classification_layer()
    assert torch.equal(head.cls_score.bias.detach(), torch.full((A * K,), -math.log(4.0)))
    weight = head.cls_score.weight.detach()
    assert abs(weight.std().item() - 0.01) < 0.001 and abs(weight.mean().item()) < 0.001
    for key, value in head.state_dict().items():
        if not key.startswith("cls_score."):
            assert torch.equal(value, before[key])


# ---------------------------------------------------------------------------------------------
# Normalization
# ---------------------------------------------------------------------------------------------


def test_group_norm_builds_and_runs():
    """norm="GN" inserts GroupNorm(32, channels) after each subnet conv, and the head runs."""
    head = FocalLossHead(**_kwargs(norm="GN", conv_dims=[C, 96]))
    for subnet in (head.cls_subnet, head.bbox_subnet):
        assert [type(m) for m in subnet] == [nn.Conv2d, nn.GroupNorm, nn.ReLU] * 2
        norms = [m for m in subnet if isinstance(m, nn.GroupNorm)]
        assert [(m.num_groups, m.num_channels) for m in norms] == [(32, C), (32, 96)]
    features = _features()
    logits, deltas = head(features)
    assert all(torch.isfinite(t).all() for t in logits + deltas)

    # Reference: conv -> group_norm -> relu by hand.
    def subnet(x, modules):
        for m in modules:
            if isinstance(m, nn.Conv2d):
                x = F.conv2d(x, m.weight, m.bias, padding=1)
            elif isinstance(m, nn.GroupNorm):
                x = F.group_norm(x, 32, m.weight, m.bias, m.eps)
            else:
                x = F.relu(x)
        return x

    ref = F.conv2d(
        subnet(features[0], head.cls_subnet), head.cls_score.weight, head.cls_score.bias, padding=1
    )
    torch.testing.assert_close(logits[0], ref)


def test_group_norm_head_matches_detectron2_where_detectron2_can_build_it():
    """detectron2 0.6's own RetinaNetHead(norm="GN") cannot be built (it probes get_norm(norm, 1),
    i.e. GroupNorm(32, 1)), which FocalLossHead avoids; where the installed detectron2 builds it
    (upstream main), FocalLossHead(norm="GN") has its parameters and gives its outputs."""
    try:
        theirs = RetinaNetHead(**_kwargs(norm="GN"))
    except ValueError as e:  # detectron2 0.6
        assert "divisible" in str(e)
        return
    ours = FocalLossHead(**_kwargs(norm="GN"))
    _randomise(theirs, seed=5)
    ours.load_state_dict(theirs.state_dict())
    features = _features()
    out_ours, out_theirs = ours(features), theirs(features)
    for a, b in zip(out_ours[0] + out_ours[1], out_theirs[0] + out_theirs[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_batch_norm_is_per_level_and_matches_detectron2():
    """norm="BN" keeps per-level statistics (CycleBatchNormList) like detectron2's head, with the
    same parameters and the same outputs."""
    torch.manual_seed(0)
    theirs = RetinaNetHead(**_kwargs(norm="BN"))
    ours = FocalLossHead(**_kwargs(norm="BN"))
    assert isinstance(ours.cls_subnet[1], CycleBatchNormList)
    assert len(ours.cls_subnet[1]) == 5
    _randomise(theirs)
    ours.load_state_dict(theirs.state_dict())
    features = _features()
    out_ours = ours(features)
    out_theirs = theirs(features)
    for a, b in zip(out_ours[0] + out_ours[1], out_theirs[0] + out_theirs[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # Both updated the running statistics of each level's own BatchNorm identically.
    for key, value in ours.state_dict().items():
        assert torch.equal(value, theirs.state_dict()[key]), key


# ---------------------------------------------------------------------------------------------
# Compatibility with detectron2's RetinaNetHead
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("conv_dims", [[C, C], [C] * 4, [32, 48]])
def test_state_dict_matches_detectron2(conv_dims):
    """Parameter names and shapes are those of detectron2's RetinaNetHead (norm="")."""
    ours = FocalLossHead(**_kwargs(conv_dims=conv_dims))
    theirs = RetinaNetHead(**_kwargs(conv_dims=conv_dims))
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert list(sd_ours) == list(sd_theirs)
    for key in sd_theirs:
        assert sd_ours[key].shape == sd_theirs[key].shape, key


def test_outputs_match_detectron2_after_loading_its_weights():
    """After load_state_dict from detectron2's head, both give identical outputs; and the loaded
    weights round-trip back into detectron2's head."""
    theirs = RetinaNetHead(**_kwargs())
    _randomise(theirs, seed=3)
    ours = FocalLossHead(**_kwargs())
    result = ours.load_state_dict(theirs.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    features = _features()
    with torch.no_grad():
        lg_ours, dl_ours = ours(features)
        lg_theirs, dl_theirs = theirs(features)
    for a, b in zip(lg_ours + dl_ours, lg_theirs + dl_theirs):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    back = RetinaNetHead(**_kwargs())
    back.load_state_dict(ours.state_dict())
    for key, value in back.state_dict().items():
        assert torch.equal(value, theirs.state_dict()[key])


def test_built_from_config_matches_detectron2_from_its_config():
    """From the plugin config and from detectron2's model-zoo config, the two heads have the same
    parameter names and shapes."""
    from detectron2 import model_zoo

    zoo = get_cfg()
    zoo.merge_from_file(model_zoo.get_config_file("COCO-Detection/retinanet_R_50_FPN_1x.yaml"))
    shapes = _shapes(channels=256)
    ours = build_retinanet_head(plugin_cfg("retinanet_R50_FPN_1x.yaml"), shapes)
    theirs = RetinaNetHead(zoo, shapes)
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert list(sd_ours) == list(sd_theirs)
    assert all(sd_ours[k].shape == sd_theirs[k].shape for k in sd_theirs)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prior_prob", [0.0, 1.0, -0.1, 1.5])
def test_prior_prob_outside_unit_interval_raises(prior_prob):
    """prior_prob must be strictly inside (0, 1)."""
    with pytest.raises(ValueError, match="PRIOR_PROB"):
        FocalLossHead(**_kwargs(prior_prob=prior_prob))


def test_different_channels_per_level_raises():
    """The convs are shared across levels, so every level must have the same channels."""
    shapes = _shapes()
    shapes[2] = ShapeSpec(channels=C * 2, stride=32)
    with pytest.raises(ValueError, match="same channels"):
        FocalLossHead(**_kwargs(input_shape=shapes))


def test_different_anchor_counts_per_level_in_config_raises():
    """A config giving different numbers of anchors per level is rejected when building."""
    cfg = plugin_cfg("retinanet_R50_FPN_1x.yaml")
    cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [[1.0], [0.5, 1.0], [1.0], [1.0], [1.0]]
    with pytest.raises(ValueError, match="number of anchors"):
        build_retinanet_head(cfg, _shapes(channels=256))
