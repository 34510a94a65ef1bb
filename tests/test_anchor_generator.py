"""Tests for retinanet_plugin.RetinaNetAnchorGenerator, octave_scaled_sizes and the YAML configs."""

import math
from pathlib import Path

import pytest
import torch
import yaml

import retinanet_plugin  # noqa: F401  (registers the plugin's components)
from conftest import detectron2_cfg, plugin_cfg
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.anchor_generator import (
    ANCHOR_GENERATOR_REGISTRY,
    DefaultAnchorGenerator,
    build_anchor_generator,
)
from retinanet_plugin import (
    RetinaNetAnchorGenerator,
    add_retinanet_config,
    get_config_file,
    octave_scaled_sizes,
)

pytestmark = pytest.mark.usefixtures("single_thread")

STRIDES = (8, 16, 32, 64, 128)
SHAPES = [ShapeSpec(channels=256, stride=s) for s in STRIDES]
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
# (plugin config, detectron2 model-zoo config it reproduces)
ZOO_COUNTERPARTS = [
    ("retinanet_R50_FPN_1x.yaml", "COCO-Detection/retinanet_R_50_FPN_1x.yaml"),
    ("retinanet_R50_FPN_3x.yaml", "COCO-Detection/retinanet_R_50_FPN_3x.yaml"),
    ("retinanet_R101_FPN_3x.yaml", "COCO-Detection/retinanet_R_101_FPN_3x.yaml"),
]


def _features(height, width, batch=1):
    return [torch.zeros(batch, 256, math.ceil(height / s), math.ceil(width / s)) for s in STRIDES]


@pytest.fixture(scope="module")
def generators():
    """(plugin's generator from the plugin config, detectron2's from its model-zoo config)."""
    return (
        build_anchor_generator(plugin_cfg("retinanet_R50_FPN_1x.yaml"), SHAPES),
        build_anchor_generator(detectron2_cfg("COCO-Detection/retinanet_R_50_FPN_1x.yaml"), SHAPES),
    )


# ---------------------------------------------------------------------------------------------
# octave_scaled_sizes
# ---------------------------------------------------------------------------------------------


def test_octave_scaled_sizes_hand_computed():
    """Each base size s becomes [s, s 2^(1/3), s 2^(2/3)]."""
    out = octave_scaled_sizes([[32], [64]], 3)
    expected = [
        [32.0, 32 * 2 ** (1 / 3), 32 * 2 ** (2 / 3)],
        [64.0, 64 * 2 ** (1 / 3), 64 * 2 ** (2 / 3)],
    ]
    assert len(out) == 2
    for level, ref in zip(out, expected):
        assert level == pytest.approx(ref, rel=1e-12)
    assert out[0][1] == pytest.approx(40.317473596635935, rel=1e-12)
    assert out[0][2] == pytest.approx(50.79683366298238, rel=1e-12)


def test_octave_scaled_sizes_one_scale_is_identity_and_groups_by_base_size():
    """One scale per octave keeps the sizes; several base sizes are each expanded in order."""
    assert octave_scaled_sizes([[32], [64, 128]], 1) == [[32], [64, 128]]
    out = octave_scaled_sizes([[10, 100]], 2)
    assert len(out) == 1
    assert out[0] == pytest.approx([10, 10 * math.sqrt(2), 100, 100 * math.sqrt(2)], rel=1e-12)


def test_octave_scaled_sizes_equal_model_zoo_sizes_exactly():
    """The plugin config's plain SIZES + SCALES_PER_OCTAVE give exactly the floats of the model
    zoo's eval'd Python expression."""
    ours = octave_scaled_sizes(
        plugin_cfg("retinanet_R50_FPN_1x.yaml").MODEL.ANCHOR_GENERATOR.SIZES,
        plugin_cfg("retinanet_R50_FPN_1x.yaml").MODEL.ANCHOR_GENERATOR.SCALES_PER_OCTAVE,
    )
    zoo = detectron2_cfg("COCO-Detection/retinanet_R_50_FPN_1x.yaml")
    assert ours == [list(level) for level in zoo.MODEL.ANCHOR_GENERATOR.SIZES]


@pytest.mark.parametrize("scales_per_octave", [0, -1, -3])
def test_octave_scaled_sizes_rejects_less_than_one_scale(scales_per_octave):
    """scales_per_octave < 1 raises ValueError."""
    with pytest.raises(ValueError, match="SCALES_PER_OCTAVE"):
        octave_scaled_sizes([[32]], scales_per_octave)


# ---------------------------------------------------------------------------------------------
# RetinaNetAnchorGenerator vs detectron2's DefaultAnchorGenerator
# ---------------------------------------------------------------------------------------------


def test_built_from_config_types(generators):
    """The plugin config builds the registered RetinaNetAnchorGenerator; the zoo config detectron2's
    DefaultAnchorGenerator."""
    ours, theirs = generators
    assert ANCHOR_GENERATOR_REGISTRY.get("RetinaNetAnchorGenerator") is RetinaNetAnchorGenerator
    assert type(ours) is RetinaNetAnchorGenerator
    assert type(theirs) is DefaultAnchorGenerator
    assert ours.scales_per_octave == 3
    assert ours.strides == theirs.strides == list(STRIDES)
    assert ours.offset == theirs.offset == 0.0


def test_cell_anchors_equal_detectron2(generators):
    """Per-level cell anchors are element-for-element those of detectron2's generator."""
    ours, theirs = generators
    assert len(ours.cell_anchors) == len(theirs.cell_anchors) == 5
    for a, b in zip(ours.cell_anchors, theirs.cell_anchors):
        assert a.dtype == b.dtype
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "height,width", [(512, 640), (800, 1333), (333, 517), (100, 90)], ids=lambda v: str(v)
)
def test_anchors_equal_detectron2(generators, height, width):
    """Anchors on every level equal detectron2's exactly, incl. sizes not multiples of 128."""
    ours, theirs = generators
    features = _features(height, width)
    boxes_ours = ours(features)
    boxes_theirs = theirs(features)
    assert len(boxes_ours) == len(boxes_theirs) == 5
    for f, a, b in zip(features, boxes_ours, boxes_theirs):
        assert a.tensor.shape == (f.shape[2] * f.shape[3] * 9, 4)
        assert torch.equal(a.tensor, b.tensor)


def test_anchors_location_major_layout(generators):
    """Anchors are location-major: the A anchors of a location are consecutive, shifted by the
    stride between neighbouring locations."""
    ours, _ = generators
    boxes = ours(_features(64, 96))
    level0 = boxes[0].tensor.view(8, 12, 9, 4)
    cell = list(ours.cell_anchors)[0]
    for y, x in [(0, 0), (0, 1), (3, 5), (7, 11)]:
        shift = torch.tensor([x * 8.0, y * 8.0, x * 8.0, y * 8.0])
        torch.testing.assert_close(level0[y, x], cell + shift, rtol=0, atol=1e-4)


def test_nine_anchors_per_location(generators):
    """3 octave scales x 3 aspect ratios = 9 cell anchors on each of the 5 levels."""
    ours, _ = generators
    assert ours.num_cell_anchors == [9] * 5
    assert ours.num_anchors == [9] * 5
    assert all(c.shape == (9, 4) for c in ours.cell_anchors)


def test_level0_cell_anchor_areas_and_ratios(generators):
    """Level-0 cell anchors have areas (32 2^(i/3))^2 and height/width ratios {0.5, 1, 2}, and are
    centered on the origin."""
    ours, _ = generators
    cell = list(ours.cell_anchors)[0].double()
    widths = cell[:, 2] - cell[:, 0]
    heights = cell[:, 3] - cell[:, 1]
    expected_areas = [(32 * 2 ** (i / 3)) ** 2 for i in range(3) for _ in range(3)]
    torch.testing.assert_close(
        widths * heights, torch.tensor(expected_areas, dtype=torch.float64), rtol=0, atol=1e-3
    )
    ratios = (heights / widths).view(3, 3)  # (scale, aspect ratio)
    for row in ratios:
        torch.testing.assert_close(
            row, torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64), rtol=1e-5, atol=0
        )
    torch.testing.assert_close(cell[:, 0] + cell[:, 2], torch.zeros(9, dtype=torch.float64))
    torch.testing.assert_close(cell[:, 1] + cell[:, 3], torch.zeros(9, dtype=torch.float64))


def test_level_sizes_double_per_level(generators):
    """Base sizes are 32..512 on P3..P7: every level's cell anchors are twice the previous ones."""
    ours, _ = generators
    cells = list(ours.cell_anchors)
    for prev, cur in zip(cells[:-1], cells[1:]):
        torch.testing.assert_close(cur, 2 * prev, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("scales_per_octave", [1, 2, 4])
def test_keyword_construction_matches_default_generator(scales_per_octave):
    """Built from keywords, it equals DefaultAnchorGenerator given the expanded sizes (also with
    one size list broadcast to all levels and a non-zero offset)."""
    ours = RetinaNetAnchorGenerator(
        sizes=[[24]],
        scales_per_octave=scales_per_octave,
        aspect_ratios=[[0.25, 1.0]],
        strides=[4, 8],
        offset=0.5,
    )
    sizes = [[24 * 2 ** (i / scales_per_octave) for i in range(scales_per_octave)]]
    theirs = DefaultAnchorGenerator(
        sizes=sizes, aspect_ratios=[[0.25, 1.0]], strides=[4, 8], offset=0.5
    )
    features = [torch.zeros(2, 8, 7, 5), torch.zeros(2, 8, 4, 3)]
    assert ours.num_cell_anchors == [2 * scales_per_octave] * 2
    for a, b in zip(ours(features), theirs(features)):
        assert torch.equal(a.tensor, b.tensor)


def test_config_scales_per_octave_is_used():
    """MODEL.ANCHOR_GENERATOR.SCALES_PER_OCTAVE from the config changes the number of anchors."""
    cfg = plugin_cfg("retinanet_R50_FPN_1x.yaml")
    cfg.MODEL.ANCHOR_GENERATOR.SCALES_PER_OCTAVE = 2
    gen = build_anchor_generator(cfg, SHAPES)
    assert gen.num_cell_anchors == [6] * 5
    cell = list(gen.cell_anchors)[0]
    widths = cell[:, 2] - cell[:, 0]
    heights = cell[:, 3] - cell[:, 1]
    expected = torch.tensor([32.0**2] * 3 + [2 * 32.0**2] * 3)
    torch.testing.assert_close(widths * heights, expected, rtol=1e-5, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# YAML configs
# ---------------------------------------------------------------------------------------------

CONFIG_FILES = sorted(CONFIG_DIR.rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_config_is_safe_yaml_and_merges(path):
    """Every config is plain YAML (no Python tags) and merges into the plugin's config."""
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    assert isinstance(data, dict)
    cfg = get_cfg()
    add_retinanet_config(cfg)
    cfg.merge_from_file(str(path))
    assert cfg.MODEL.META_ARCHITECTURE == "FocalLossRetinaNet"
    assert cfg.MODEL.ANCHOR_GENERATOR.NAME == "RetinaNetAnchorGenerator"
    assert cfg.MODEL.RETINANET.HEAD_NAME == "FocalLossHead"


def test_get_config_file_finds_the_configs_directory():
    """get_config_file resolves names to the files in configs/ and rejects unknown names."""
    for path in CONFIG_FILES:
        name = str(path.relative_to(CONFIG_DIR))  # e.g. "backbones/retinanet_R18_FPN_1x.yaml"
        assert Path(get_config_file(name)).resolve() == path.resolve()
    with pytest.raises(FileNotFoundError):
        get_config_file("no_such_config.yaml")


def _flatten(node, prefix=""):
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(_flatten(value, prefix + key + "."))
        else:
            out[prefix + key] = value
    return out


@pytest.mark.parametrize("ours,zoo", ZOO_COUNTERPARTS, ids=[o for o, _ in ZOO_COUNTERPARTS])
def test_config_reproduces_model_zoo_config(ours, zoo):
    """Apart from naming the plugin's components and its added keys, each full-size config equals
    detectron2's model-zoo config it is named after."""
    plugin = _flatten(plugin_cfg(ours))
    detectron = _flatten(detectron2_cfg(zoo))
    expected_differences = {
        "MODEL.META_ARCHITECTURE",
        "MODEL.ANCHOR_GENERATOR.NAME",
        "MODEL.ANCHOR_GENERATOR.SIZES",
    }
    added = set(plugin) - set(detectron)
    assert not set(detectron) - set(plugin)
    with_plugin_keys = get_cfg()
    add_retinanet_config(with_plugin_keys)
    assert added == set(_flatten(with_plugin_keys)) - set(_flatten(get_cfg()))
    differing = {k for k in detectron if plugin[k] != detectron[k]}
    assert differing == expected_differences, {k: (plugin[k], detectron[k]) for k in differing}


def test_flat_size_list_is_used_on_every_level():
    """Like detectron2's DefaultAnchorGenerator, a flat SIZES list applies to every level."""
    flat = RetinaNetAnchorGenerator(
        sizes=[32], scales_per_octave=2, aspect_ratios=[0.5, 1.0], strides=[8, 16]
    )
    nested = RetinaNetAnchorGenerator(
        sizes=[[32], [32]], scales_per_octave=2, aspect_ratios=[0.5, 1.0], strides=[8, 16]
    )
    assert flat.num_cell_anchors == [4, 4]
    for a, b in zip(flat.cell_anchors, nested.cell_anchors):
        assert torch.equal(a, b)
