"""Backbones by config: detectron2's ResNet-18..152 with FPN, the timm adapter and the PANet neck.
Every config builds and trains at tiny sizes; structures and outputs are checked against
torchvision's ResNets, timm's own models and the PANet formula."""

import importlib.util
import sys

import pytest
import torch
import torchvision
from torch.nn import functional as F

from conftest import plugin_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone, build_model
from detectron2.modeling.backbone.fpn import build_retinanet_resnet_fpn_backbone
from detectron2.modeling.backbone.resnet import BasicBlock, BottleneckBlock
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from retinanet_plugin import get_config_file
from retinanet_plugin.config.loading import ConfigError, load_config
from retinanet_plugin.engine.solver import build_optimizer
from retinanet_plugin.modeling.backbone import PANet, TimmBackbone, build_timm_backbone

requires_timm = pytest.mark.skipif(
    importlib.util.find_spec("timm") is None, reason="timm is not installed (requirements-dev.txt)"
)

# Tiny heads and unit-variance inputs (random weights with the MSRA std of 1 give huge features).
TINY = (
    "MODEL.FPN.OUT_CHANNELS",
    "32",
    "MODEL.RETINANET.NUM_CONVS",
    "1",
    "MODEL.RETINANET.NUM_CLASSES",
    "3",
    "MODEL.PIXEL_STD",
    "[57.375, 57.120, 58.395]",
)
TIMM_B0 = "backbones/retinanet_timm_efficientnet_b0_FPN.yaml"
# The ResNet paper's Table 1: residual blocks per stage (conv2_x .. conv5_x).
BLOCKS_PER_STAGE = {
    18: [2, 2, 2, 2],
    34: [3, 4, 6, 3],
    50: [3, 4, 6, 3],
    101: [3, 4, 23, 3],
    152: [3, 8, 36, 3],
}

pytestmark = pytest.mark.usefixtures("single_thread")


def make_batch(size=64):
    generator = torch.Generator().manual_seed(0)
    batch = []
    for _ in range(2):
        instances = Instances((size, size))
        instances.gt_boxes = Boxes(torch.tensor([[5.0, 5.0, 40.0, 50.0], [20.0, 10.0, 60.0, 30.0]]))
        instances.gt_classes = torch.tensor([0, 2])
        image = torch.randint(0, 256, (3, size, size), generator=generator).float()
        batch.append({"image": image, "instances": instances})
    return batch


def train_two_iterations(cfg):
    """Two SGD steps of the configured model; returns the losses of each."""
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    optimizer = build_optimizer(cfg, model)
    history = []
    with EventStorage():
        for step in range(2):
            losses = model(make_batch())
            total = sum(losses.values())
            assert torch.isfinite(total), losses
            optimizer.zero_grad()
            total.backward()
            if step == 0:  # every trainable parameter is part of the computation
                trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
                assert not [n for n, p in trainable if p.grad is None]
            optimizer.step()
            history.append({k: v.item() for k, v in losses.items()})
    return model, history


# --------------------------------------------------------------------------------------------
# ResNets


def conv_shapes(module):
    return sorted(tuple(m.weight.shape) for m in module.modules() if isinstance(m, torch.nn.Conv2d))


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
def test_resnet_structure_equals_torchvision(depth):
    cfg = plugin_cfg(f"backbones/retinanet_R{depth}_FPN_1x.yaml", *TINY)
    assert cfg.MODEL.RESNETS.DEPTH == depth
    backbone = build_backbone(cfg)
    resnet = backbone.bottom_up
    stages = [getattr(resnet, f"res{i}") for i in range(2, 6)]
    assert [len(stage) for stage in stages] == BLOCKS_PER_STAGE[depth]
    block_type = BasicBlock if depth < 50 else BottleneckBlock
    assert all(type(block) is block_type for stage in stages for block in stage)
    # Every convolution of torchvision's ResNet (without its classifier), in the same shapes.
    with torch.device("meta"):
        reference = getattr(torchvision.models, f"resnet{depth}")()
    assert conv_shapes(resnet) == conv_shapes(reference)
    # One forward at 64 px: P3..P7 at strides 8..128 (P6 and P7 at least 1x1).
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 64, 64))
    assert {k: tuple(v.shape) for k, v in features.items()} == {
        "p3": (1, 32, 8, 8),
        "p4": (1, 32, 4, 4),
        "p5": (1, 32, 2, 2),
        "p6": (1, 32, 1, 1),
        "p7": (1, 32, 1, 1),
    }


@pytest.mark.parametrize(
    "config",
    [
        "backbones/retinanet_R18_FPN_1x.yaml",
        "backbones/retinanet_R34_FPN_1x.yaml",
        "backbones/retinanet_R50_FPN_1x.yaml",
        "backbones/retinanet_R50_PANet_1x.yaml",
        pytest.param(TIMM_B0, marks=requires_timm),
    ],
)
def test_config_builds_and_trains(config):
    load_config(get_config_file(config))  # loads safely and validates, as train_net.py does
    train_two_iterations(plugin_cfg(config, *TINY))


@requires_timm
def test_timm_panet_with_group_norm_trains():
    model, _ = train_two_iterations(
        plugin_cfg(
            TIMM_B0,
            *TINY,
            "MODEL.BACKBONE.NAME",
            "build_retinanet_timm_panet_backbone",
            "MODEL.PANET.NORM",
            "GN",
            "MODEL.TIMM.NORM",
            "BN",
        )
    )
    assert isinstance(model.backbone, PANet)
    assert isinstance(model.backbone.bottom_up, TimmBackbone)
    assert isinstance(model.backbone.pan_output4.norm, torch.nn.GroupNorm)
    assert model.backbone.pan_output4.bias is None


# --------------------------------------------------------------------------------------------
# timm adapter


def timm_backbone(*opts):
    cfg = plugin_cfg(TIMM_B0, *opts)
    return build_timm_backbone(cfg, ShapeSpec(channels=3))


@requires_timm
def test_timm_levels_are_named_by_stride_with_timm_channels():
    backbone = timm_backbone()
    # EfficientNet-B0's stages 2, 4 and 6 (Tan & Le 2019, Table 1): 40, 112, 320 channels.
    assert {k: (s.channels, s.stride) for k, s in backbone.output_shape().items()} == {
        "res3": (40, 8),
        "res4": (112, 16),
        "res5": (320, 32),
    }
    with torch.no_grad():
        features = backbone(torch.randn(2, 3, 64, 96))
    for name, shape in backbone.output_shape().items():
        assert features[name].shape == (2, shape.channels, 64 // shape.stride, 96 // shape.stride)


@requires_timm
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_weights_load_from_a_local_file(suffix, tmp_path):
    """MODEL.TIMM.WEIGHTS: a whole timm model's checkpoint, loaded into the feature levels."""
    import timm

    torch.manual_seed(1)
    source = timm.create_model("efficientnet_b0", pretrained=False)
    path = str(tmp_path / f"b0{suffix}")
    if suffix == ".pth":
        torch.save(source.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file(source.state_dict(), path)
    torch.manual_seed(2)
    backbone = timm_backbone("MODEL.TIMM.WEIGHTS", path, "MODEL.TIMM.NORM", "BN")
    expected = source.state_dict()
    loaded = backbone.model.state_dict()
    assert loaded and set(loaded) <= set(expected)
    for name, value in loaded.items():
        assert torch.equal(value, expected[name]), name
    torch.manual_seed(2)
    assert not torch.equal(timm_backbone().model.conv_stem.weight, source.conv_stem.weight)


@requires_timm
def test_timm_frozen_bn_computes_what_bn_does_in_eval_mode():
    """FrozenBN keeps each BatchNorm's statistics, affine and activation (timm's BatchNormAct2d),
    and trains none of them."""
    trained = timm_backbone("MODEL.TIMM.NORM", "BN").eval()
    with torch.no_grad():  # statistics other than the initial 0 / 1
        for module in trained.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
    frozen = timm_backbone("MODEL.TIMM.NORM", "FrozenBN")
    result = frozen.load_state_dict(trained.state_dict(), strict=False)
    assert not result.missing_keys
    assert all(k.endswith("num_batches_tracked") for k in result.unexpected_keys)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in frozen.modules())
    norm_parameters = [
        p for m in frozen.modules() if "Frozen" in type(m).__name__ for p in m.parameters()
    ]
    assert not norm_parameters
    frozen.train()  # frozen statistics are used in training mode too
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours, reference = frozen(x), trained(x)
    for name in reference:
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-5, atol=1e-5)


@requires_timm
def test_timm_sync_bn_converts_every_batch_norm():
    backbone = timm_backbone("MODEL.TIMM.NORM", "SyncBN")
    norms = [m for m in backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    # timm's BatchNormAct2d becomes SyncBatchNormAct, a torch SyncBatchNorm.
    assert norms and all(isinstance(m, torch.nn.SyncBatchNorm) for m in norms)


def test_missing_timm_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'retinanet_plugin\[timm\]'"):
        timm_backbone()


@requires_timm
def test_fpn_inputs_missing_from_the_timm_levels_are_a_clear_error():
    cfg = plugin_cfg(TIMM_B0, *TINY, "MODEL.TIMM.OUT_INDICES", "(1, 2, 3)")  # res2..res4
    with pytest.raises(ValueError, match=r"MODEL.FPN.IN_FEATURES names \['res5'\]"):
        build_model(cfg)


@requires_timm
def test_unknown_timm_model_is_a_clear_error():
    with pytest.raises(ValueError, match="MODEL.TIMM.NAME = 'efficientnet_b99' is not a timm"):
        timm_backbone("MODEL.TIMM.NAME", "efficientnet_b99")


@requires_timm
def test_timm_model_args_reach_the_model_and_survive_a_config_dump(tmp_path):
    """MODEL.TIMM.MODEL_ARGS from a config file: the backbone is timm's model built with them
    (its levels' channels as timm reports them), and a dumped config loads them back."""
    import timm

    config = tmp_path / "narrow.yaml"
    config.write_text(
        f"_BASE_: {get_config_file('retinanet_resnet10t_demo.yaml')}\n"
        "MODEL:\n  TIMM:\n    MODEL_ARGS:\n      channels: [64, 96, 160, 256]\n"
    )
    cfg = load_config(str(config))
    reference = timm.create_model(
        "resnet10t", features_only=True, out_indices=(2, 3, 4), channels=[64, 96, 160, 256]
    )
    backbone = build_timm_backbone(cfg, ShapeSpec(channels=3))
    assert [s.channels for s in backbone.output_shape().values()] == [96, 160, 256]
    assert reference.feature_info.channels() == [96, 160, 256]
    assert sum(p.numel() for p in backbone.parameters()) == sum(
        p.numel() for p in reference.parameters()
    )
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(cfg.dump())
    assert load_config(str(dumped)).MODEL.TIMM.MODEL_ARGS == {"channels": [64, 96, 160, 256]}
    # On the command line too: a new key of the open section, and one the file set.
    opts = ["MODEL.TIMM.MODEL_ARGS.drop_path_rate", "0.1"]
    opts += ["MODEL.TIMM.MODEL_ARGS.channels", "[64, 128, 256, 512]"]
    args = load_config(str(config), opts).MODEL.TIMM.MODEL_ARGS
    assert args == {"channels": [64, 128, 256, 512], "drop_path_rate": 0.1}
    with pytest.raises(ConfigError, match="unknown config key MODEL.TIMM.MODEL_ARG.channels"):
        load_config(str(config), ["MODEL.TIMM.MODEL_ARG.channels", "[64]"])


@requires_timm
def test_unknown_timm_model_arg_is_a_clear_error(tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text(
        f"_BASE_: {get_config_file(TIMM_B0)}\nMODEL:\n  TIMM:\n    MODEL_ARGS:\n"
        "      drop_pth_rate: 0.1\n"
    )
    with pytest.raises(ValueError, match=r"MODEL.TIMM.MODEL_ARGS = \{'drop_pth_rate': 0.1\}"):
        build_timm_backbone(load_config(str(config)), ShapeSpec(channels=3))


@pytest.mark.parametrize(
    "key, value, rule",
    [
        ("MODEL.TIMM.NORM", "GN", "must be one of"),
        ("MODEL.TIMM.OUT_INDICES", "(4, 3)", "increasing order"),
        ("MODEL.TIMM.OUT_INDICES", "()", "increasing order"),
        ("MODEL.TIMM.WEIGHTS", "/nonexistent/b0.pth", "existing local file"),
    ],
)
def test_invalid_timm_values_are_config_errors(key, value, rule):
    with pytest.raises(ConfigError, match=f"{key} = .*{rule}"):
        load_config(get_config_file(TIMM_B0), [key, value])


# --------------------------------------------------------------------------------------------
# PANet


def test_panet_equals_its_formula_on_the_fpn_outputs():
    """N3 = P3, N_{l+1} = ReLU(conv3x3(ReLU(conv3x3_s2(N_l)) + P_{l+1})), with P from
    detectron2's own RetinaNet FPN loaded with the same weights."""
    cfg = plugin_cfg(
        "backbones/retinanet_R18_FPN_1x.yaml",
        *TINY,
        "MODEL.BACKBONE.NAME",
        "build_retinanet_resnet_panet_backbone",
    )
    torch.manual_seed(0)
    panet = build_backbone(cfg).double()
    fpn = build_retinanet_resnet_fpn_backbone(cfg, ShapeSpec(channels=3)).double()
    result = fpn.load_state_dict(panet.state_dict(), strict=False)
    # The FPN's parameter names are unchanged: all of them load; only the new path is extra.
    assert not result.missing_keys
    assert result.unexpected_keys and all(k.startswith("pan_") for k in result.unexpected_keys)

    x = torch.randn(1, 3, 96, 64, dtype=torch.float64)
    with torch.no_grad():
        ours, p = panet(x), fpn(x)
    names = ["p3", "p4", "p5", "p6", "p7"]
    assert list(ours) == list(p) == names
    expected = [p["p3"]]
    for lower, upper in zip(names, names[1:]):
        down = getattr(panet, f"pan_downsample{lower[1:]}")
        out = getattr(panet, f"pan_output{upper[1:]}")
        n = F.relu(F.conv2d(expected[-1], down.weight, down.bias, stride=2, padding=1))
        expected.append(F.relu(F.conv2d(n + p[upper], out.weight, out.bias, padding=1)))
    for name, value in zip(names, expected):
        assert ours[name].shape == p[name].shape
        torch.testing.assert_close(ours[name], value, rtol=1e-10, atol=1e-10)
    assert panet.output_shape() == fpn.output_shape()
