"""retinanet_plugin.config_io and config_validation: safe YAML, clear errors for bad files, keys
and values."""

import glob
import os

import pytest

import retinanet_plugin  # noqa: F401  (compat patches before any detectron2 submodule)
from detectron2 import model_zoo
from detectron2.config import get_cfg
from retinanet_plugin import add_retinanet_config
from retinanet_plugin.config_io import (
    ConfigError,
    config_sets_key,
    evaluate_arithmetic,
    load_config,
)
from retinanet_plugin.config_validation import validate_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "retinanet_R18_GN_tiny.yaml")
PLUGIN_CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))


def write_config(tmp_path, body: str, base: str = TINY, name: str = "config.yaml") -> str:
    """A config file in tmp_path that inherits ``base`` and adds ``body``."""
    path = tmp_path / name
    path.write_text(f'_BASE_: "{base}"\n{body}')
    return str(path)


def raises_config_error(config_file: str, opts=(), *fragments: str) -> str:
    """Asserts load_config fails with a ConfigError containing every fragment; the message."""
    with pytest.raises(ConfigError) as info:
        load_config(config_file, opts)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.mark.parametrize("config_file", PLUGIN_CONFIGS, ids=os.path.basename)
def test_plugin_configs_load_as_detectron2_loads_them(config_file):
    cfg = load_config(config_file)
    reference = get_cfg()
    add_retinanet_config(reference)
    reference.merge_from_file(config_file)
    assert cfg == reference


def test_model_zoo_config_with_eval_tag_loads_as_detectron2_loads_it():
    # Its _BASE_ spells the anchor sizes with !!python/object/apply:eval.
    config_file = model_zoo.get_config_file("COCO-Detection/retinanet_R_50_FPN_1x.yaml")
    cfg = load_config(config_file)
    reference = get_cfg()
    add_retinanet_config(reference)
    reference.merge_from_file(config_file)
    assert cfg == reference
    octave = [32, 32 * 2 ** (1 / 3), 32 * 2 ** (2 / 3)]
    assert cfg.MODEL.ANCHOR_GENERATOR.SIZES[0] == pytest.approx(octave)


def test_overrides_apply():
    cfg = load_config(TINY, ["SOLVER.BASE_LR", "0.005", "INPUT.MIN_SIZE_TRAIN", "(128,)"])
    assert cfg.SOLVER.BASE_LR == 0.005
    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == (128,)


def test_missing_config_file(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    raises_config_error(missing, (), missing, "does not exist")


def test_missing_base_file_names_the_referencing_file(tmp_path):
    config_file = write_config(tmp_path, "", base="missing_base.yaml")
    raises_config_error(
        config_file, (), str(tmp_path / "missing_base.yaml"), f"the _BASE_ of {config_file}"
    )


def test_yaml_syntax_error_gives_file_and_line(tmp_path):
    config_file = write_config(tmp_path, "SOLVER:\n  BASE_LR: [0.01\n  MAX_ITER: 10\n")
    raises_config_error(config_file, (), config_file, "line 4", "invalid YAML")


def test_unsafe_yaml_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "marker"
    config_file = write_config(
        tmp_path, f'OUTPUT_DIR: !!python/object/apply:os.system ["touch {marker}"]\n'
    )
    raises_config_error(config_file, (), config_file, "unsafe YAML", "line 2")
    assert not marker.exists()


def test_unsafe_yaml_in_a_base_file_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "marker"
    base = write_config(
        tmp_path, f'OUTPUT_DIR: !!python/object/apply:os.system ["touch {marker}"]\n', name="b.yaml"
    )
    config_file = write_config(tmp_path, "", base=base)
    raises_config_error(config_file, (), base, "unsafe YAML")
    assert not marker.exists()


def test_eval_tag_with_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "marker"
    expression = f"__import__('os').system('touch {marker}')"
    config_file = write_config(
        tmp_path, f'OUTPUT_DIR: !!python/object/apply:eval ["{expression}"]\n'
    )
    raises_config_error(config_file, (), config_file, "not a plain arithmetic expression")
    assert not marker.exists()


@pytest.mark.parametrize(
    "expression",
    ["(1).__class__", "len([1])", "10 ** 10 ** 10", "[0] * 10 ** 9", "x", "(-8) ** 0.5", "[1"],
)
def test_arithmetic_evaluator_refuses_anything_else(expression):
    with pytest.raises(ValueError):
        evaluate_arithmetic(expression)


def test_config_sets_key_loads_safely(tmp_path):
    marker = tmp_path / "marker"
    config_file = write_config(
        tmp_path, f'OUTPUT_DIR: !!python/object/apply:os.system ["touch {marker}"]\n'
    )
    with pytest.raises(ConfigError, match="unsafe YAML"):
        config_sets_key(config_file, [], "MODEL.RETINANET.NUM_CLASSES")
    assert not marker.exists()


def test_config_sets_key_follows_base_chain(tmp_path):
    key = "MODEL.RETINANET.NUM_CLASSES"
    assert not config_sets_key(TINY, [], key)
    assert config_sets_key(TINY, [key, "3"], key)
    config_file = write_config(tmp_path, "MODEL:\n  RETINANET:\n    NUM_CLASSES: 3\n")
    assert config_sets_key(config_file, [], key)


def test_unknown_key_in_file_suggests_closest(tmp_path):
    config_file = write_config(tmp_path, "SOLVER:\n  BASE_LRR: 0.01\n")
    raises_config_error(
        config_file, (), config_file, "SOLVER.BASE_LRR", "did you mean SOLVER.BASE_LR?"
    )


def test_unknown_key_in_overrides_suggests_closest():
    raises_config_error(
        TINY,
        ["MODEL.RETINANET.FOCAL_LOSS_GAMA", "2.0"],
        TINY,
        "MODEL.RETINANET.FOCAL_LOSS_GAMA",
        "did you mean MODEL.RETINANET.FOCAL_LOSS_GAMMA?",
    )


def test_odd_number_of_overrides():
    raises_config_error(TINY, ["SOLVER.BASE_LR"], "KEY VALUE", "SOLVER.BASE_LR")


def test_wrong_type_in_file(tmp_path):
    config_file = write_config(tmp_path, "SOLVER:\n  MAX_ITER: many\n")
    raises_config_error(config_file, (), config_file, "SOLVER.MAX_ITER", "'many'", "expected int")


def test_wrong_type_in_overrides():
    raises_config_error(TINY, ["SOLVER.BASE_LR", "fast"], TINY, "SOLVER.BASE_LR", "'fast'", "float")


def test_value_for_a_section(tmp_path):
    config_file = write_config(tmp_path, "SOLVER: 3\n")
    raises_config_error(config_file, (), config_file, "SOLVER", "section")


@pytest.mark.parametrize(
    "key, value, rule",
    [
        ("SOLVER.BASE_LR", "0.0", "> 0"),
        ("SOLVER.BASE_LR", "-0.01", "> 0"),
        ("SOLVER.MAX_ITER", "0", ">= 1"),
        ("SOLVER.IMS_PER_BATCH", "0", ">= 1"),
        ("SOLVER.STEPS", "(680, 560)", "strictly increasing"),
        ("SOLVER.OPTIMIZER", "Adam", "'SGD', 'AdamW'"),
        ("MODEL.RETINANET.NUM_CLASSES", "0", ">= 1"),
        ("MODEL.RETINANET.FOCAL_LOSS_GAMMA", "-1.0", ">= 0"),
        ("MODEL.RETINANET.FOCAL_LOSS_ALPHA", "1.5", "[0, 1]"),
        ("MODEL.RETINANET.IOU_THRESHOLDS", "[0.5, 0.4]", "strictly increasing"),
        ("MODEL.RETINANET.IOU_THRESHOLDS", "[0.4, 1.5]", "[0, 1]"),
        ("MODEL.RETINANET.IOU_LABELS", "[0, 1]", "3 values"),
        ("MODEL.RETINANET.SCORE_THRESH_TEST", "1.5", "[0, 1]"),
        ("MODEL.RETINANET.NMS_THRESH_TEST", "-0.5", "[0, 1]"),
        ("MODEL.RETINANET.TOPK_CANDIDATES_TEST", "0", ">= 1"),
        ("MODEL.RETINANET.PRIOR_PROB", "1.0", "(0, 1)"),
        ("MODEL.RETINANET.CLS_LOSS_TYPE", "softmax", "'focal', 'focal_star'"),
        ("MODEL.RETINANET.LOSS_NORMALIZER", "none", "'ema', 'batch'"),
        ("MODEL.INFERENCE_DTYPE", "float16", "'float32', 'bfloat16'"),
        ("TEST.COCO_EVAL_BACKEND", "lvis", "'faster_coco_eval', 'pycocotools'"),
        ("MODEL.ANCHOR_GENERATOR.SIZES", "[[32], [64], [128]]", "5: the levels"),
        ("MODEL.ANCHOR_GENERATOR.SIZES", "[[32, -64]]", "positive"),
    ],
)
def test_invalid_value_in_file(tmp_path, key, value, rule):
    *sections, leaf = key.split(".")
    body = "".join(f"{'  ' * i}{s}:\n" for i, s in enumerate(sections))
    config_file = write_config(tmp_path, body + f"{'  ' * len(sections)}{leaf}: {value}\n")
    message = raises_config_error(config_file, (), config_file, key, rule)
    assert "invalid config value" in message


def test_invalid_value_in_overrides():
    raises_config_error(
        TINY, ["SOLVER.BASE_LR", "-0.5"], TINY, "overrides", "SOLVER.BASE_LR = -0.5", "> 0"
    )


def test_every_invalid_value_is_listed():
    message = raises_config_error(TINY, ["SOLVER.BASE_LR", "0.0", "SOLVER.MAX_ITER", "0"])
    assert "SOLVER.BASE_LR = 0.0" in message and "SOLVER.MAX_ITER = 0" in message


@pytest.mark.parametrize(
    "opts",
    [
        # A negative alpha means no alpha weighting (focal_loss.py's `alpha >= 0`).
        ["MODEL.RETINANET.FOCAL_LOSS_ALPHA", "-1.0"],
        ["MODEL.RETINANET.FOCAL_LOSS_ALPHA", "0.0"],
        ["MODEL.RETINANET.FOCAL_LOSS_GAMMA", "0.0"],
        # Steps past MAX_ITER are ignored by detectron2: short runs of full configs rely on it.
        ["SOLVER.MAX_ITER", "3"],
        ["MODEL.RETINANET.SCORE_THRESH_TEST", "0.0"],
        ["MODEL.ANCHOR_GENERATOR.SIZES", "[[32, 64, 128, 256, 512]]"],
        ["MODEL.ANCHOR_GENERATOR.SIZES", "[32, 64]"],
    ],
)
def test_edge_values_are_valid(opts):
    load_config(TINY, opts)


def test_validate_config_on_a_config_built_in_python():
    cfg = get_cfg()
    add_retinanet_config(cfg)
    validate_config(cfg, "defaults")
    cfg.MODEL.RETINANET.FOCAL_LOSS_GAMMA = -2.0
    with pytest.raises(ConfigError, match=r"built in a test: .*FOCAL_LOSS_GAMMA = -2.0"):
        validate_config(cfg, "built in a test")


def test_old_version_config_is_upgraded(tmp_path):
    # VERSION 1 named the RPN's head "RPN.HEAD_NAME"; detectron2 upgrades it on merge.
    config_file = tmp_path / "v1.yaml"
    config_file.write_text('VERSION: 1\nMODEL:\n  RPN:\n    HEAD_NAME: "X"\n')
    cfg = load_config(str(config_file))
    assert cfg.MODEL.RPN.HEAD_NAME == "X"
    assert cfg.VERSION == 2
