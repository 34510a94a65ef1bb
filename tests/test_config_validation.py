"""retinanet_plugin.config.loading and config_validation: safe YAML, clear errors for bad files,
keys and values."""

import ast
import glob
import inspect
import logging
import os
import re

import pytest
import torch

import retinanet_plugin  # noqa: F401  (registers the plugin's components)
from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.engine import AMPTrainer
from detectron2.layers import get_norm
from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, build_backbone, build_model
from detectron2.modeling.anchor_generator import ANCHOR_GENERATOR_REGISTRY
from detectron2.solver import build_lr_scheduler as detectron2_lr_scheduler
from retinanet_plugin import add_retinanet_config
from retinanet_plugin.config.loading import (
    ConfigArgumentError,
    ConfigError,
    config_sets_key,
    evaluate_arithmetic,
    load_config,
)
from retinanet_plugin.config.validation import validate_config
from retinanet_plugin.errors import UserError
from retinanet_plugin.modeling.head import RETINANET_HEAD_REGISTRY

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


# ---------------------------------------------------------------------------------------------
# Files YAML reads wrongly or not at all


def test_duplicate_section_names_file_key_and_both_lines(tmp_path):
    config_file = write_config(tmp_path, "SOLVER:\n  BASE_LR: 0.01\nSOLVER:\n  MAX_ITER: 5\n")
    before = open(config_file).read()
    raises_config_error(config_file, (), config_file, "SOLVER is set twice", "lines 2 and 4")
    assert open(config_file).read() == before


def test_duplicate_key_in_a_nested_section(tmp_path):
    body = "MODEL:\n  RETINANET:\n    NUM_CLASSES: 3\n    NUM_CONVS: 2\n    NUM_CLASSES: 4\n"
    raises_config_error(write_config(tmp_path, body), (), "NUM_CLASSES", "lines 4 and 6")


def test_duplicate_key_in_a_base_names_the_base(tmp_path):
    base = write_config(tmp_path, "SOLVER:\n  BASE_LR: 0.01\n  BASE_LR: 0.02\n", name="b.yaml")
    config_file = write_config(tmp_path, "", base=base)
    raises_config_error(config_file, (), base, f"the _BASE_ of {config_file}", "lines 3 and 4")


def test_same_key_in_a_base_and_its_child_is_an_override(tmp_path):
    base = write_config(tmp_path, "SOLVER:\n  BASE_LR: 0.01\n", name="b.yaml")
    assert (
        load_config(write_config(tmp_path, "SOLVER:\n  BASE_LR: 0.02\n", base=base)).SOLVER.BASE_LR
        == 0.02
    )


def test_yaml_merge_keys_may_override(tmp_path):
    # "<<" copies a mapping in; keys beside it replace the copied ones, as YAML defines.
    body = "INPUT:\n  <<: {MIN_SIZE_TEST: 160, MAX_SIZE_TEST: 320}\n  MIN_SIZE_TEST: 128\n"
    cfg = load_config(write_config(tmp_path, body))
    assert (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) == (128, 320)


@pytest.mark.parametrize(
    "body, key, nested",
    [
        ("SOLVER.BASE_LR: 0.1\n", "'SOLVER.BASE_LR'", "`SOLVER: {BASE_LR: 0.1}`"),
        ("MODEL:\n  RETINANET.IN_FEATURES: [p3]\n", "MODEL.RETINANET.IN_FEATURES", '["p3"]'),
    ],
)
def test_dotted_key_in_a_file_says_to_nest_it(tmp_path, body, key, nested):
    raises_config_error(write_config(tmp_path, body), (), key, "nest it", nested)


@pytest.mark.parametrize(
    "content",
    [b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", bytes(range(256)), b"SOLVER:\n  BASE_LR: \x00\n"],
    ids=["png", "bytes", "nul"],
)
def test_binary_config_file_is_one_clear_error(tmp_path, content):
    config_file = tmp_path / "binary.yaml"
    config_file.write_bytes(content)
    message = raises_config_error(str(config_file), (), str(config_file), "is not a text file")
    assert "\n" not in message
    assert config_file.read_bytes() == content


@pytest.mark.parametrize(
    "opts, fragment",
    [
        ("SOLVER.BASE_LR 0.01", "not str 'SOLVER.BASE_LR 0.01'"),
        (b"A B", "not bytes"),
        ({"SOLVER.BASE_LR": "0.01"}, "not dict"),
        ([1, "2"], "opts[0] = 1"),
    ],
)
def test_load_config_arguments_of_the_wrong_type(opts, fragment):
    with pytest.raises(ConfigArgumentError) as info:
        load_config(TINY, opts)
    assert isinstance(info.value, TypeError) and "opts" in str(info.value)
    assert fragment in str(info.value)


def test_load_config_takes_a_path_object_and_a_tuple(tmp_path):
    import pathlib

    cfg = load_config(pathlib.Path(TINY), ("SOLVER.BASE_LR", "0.01"))
    assert cfg.SOLVER.BASE_LR == 0.01


# ---------------------------------------------------------------------------------------------
# Values


@pytest.mark.parametrize(
    "key, value, rule",
    [
        ("SOLVER.GAMMA", "-1.0", "(0, 1]"),
        ("SOLVER.WARMUP_FACTOR", "-1.0", "[0, 1]"),
        ("SOLVER.MOMENTUM", "1.0", "[0, 1)"),
        ("SOLVER.WEIGHT_DECAY", "-0.1", ">= 0"),
        ("SOLVER.CHECKPOINT_PERIOD", "0", ">= 1"),
        ("SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "l2", "'value', 'norm'"),
        ("SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "-5.0", "> 0"),
        ("SOLVER.ADAMW_BETAS", "(0.9, 1.0)", "each in [0, 1)"),
        ("TEST.EVAL_PERIOD", "-1", ">= 0"),
        ("TEST.DETECTIONS_PER_IMAGE", "0", ">= 1"),
        ("DATALOADER.REPEAT_THRESHOLD", "-1.0", ">= 0"),
        ("INPUT.MAX_SIZE_TRAIN", "223", "largest INPUT.MIN_SIZE_TRAIN (224)"),
        ("INPUT.MAX_SIZE_TEST", "191", "largest INPUT.MIN_SIZE_TEST (192)"),
        ("MODEL.FPN.OUT_CHANNELS", "0", ">= 1"),
        ("MODEL.RESNETS.DEPTH", "19", "18, 34, 50, 101, 152"),
        ("MODEL.RESNETS.NORM", "gn", "did you mean 'GN'?"),
        ("MODEL.PANET.NORM", "GroupNorm", "'GN'"),
    ],
)
def test_invalid_value_in_overrides_names_key_value_and_rule(key, value, rule):
    raises_config_error(TINY, [key, value], f"{key} = ", rule)


def test_none_is_refused_where_the_default_is_a_value(tmp_path):
    config_file = write_config(tmp_path, "SOLVER:\n  BASE_LR: null\n")
    raises_config_error(config_file, (), "SOLVER.BASE_LR = None", "expected float")
    # ... and taken where detectron2's default is None.
    assert load_config(TINY, ["SOLVER.WEIGHT_DECAY_BIAS", "0.0"]).SOLVER.WEIGHT_DECAY_BIAS == 0.0


def test_number_rules_on_a_config_built_in_python_name_the_value():
    cfg = get_cfg()
    add_retinanet_config(cfg)
    cfg.SOLVER.BASE_LR = None
    cfg.SOLVER.GAMMA = "0.1"
    with pytest.raises(ConfigError) as info:
        validate_config(cfg, "python")
    assert "SOLVER.BASE_LR = None: must be a number > 0" in str(info.value)
    assert "SOLVER.GAMMA = '0.1': must be a number in (0, 1]" in str(info.value)


def test_the_norms_listed_are_those_detectron2_builds():
    message = raises_config_error(TINY, ["MODEL.FPN.NORM", "GroupNorm"])
    listed = re.search(r"must be one of (.*?) \(", message).group(1)
    names = [ast.literal_eval(n) for n in listed.split(", ")]
    for name in names:
        get_norm(name, 32)  # every listed name builds
    assert {"", "BN", "SyncBN", "FrozenBN", "GN"} <= set(names)
    with pytest.raises(KeyError):
        get_norm("GroupNorm", 32)


@pytest.mark.parametrize(
    "key, registry",
    [
        ("MODEL.BACKBONE.NAME", BACKBONE_REGISTRY),
        ("MODEL.META_ARCHITECTURE", META_ARCH_REGISTRY),
        ("MODEL.ANCHOR_GENERATOR.NAME", ANCHOR_GENERATOR_REGISTRY),
        ("MODEL.RETINANET.HEAD_NAME", RETINANET_HEAD_REGISTRY),
    ],
)
def test_unknown_registry_name_lists_the_registry(key, registry):
    message = raises_config_error(TINY, [key, "Nope"], f"{key} = 'Nope'")
    listed = re.search(r"\(registered: (.*)\)", message).group(1).split(", ")
    assert listed == sorted(name for name, _ in registry)


def test_every_registered_backbone_and_sampler_is_accepted():
    for name, _ in BACKBONE_REGISTRY:
        if name.startswith("build_retinanet_"):  # the RetinaNet levels p3..p7
            load_config(TINY, ["MODEL.BACKBONE.NAME", name])
    for sampler in ("TrainingSampler", "RepeatFactorTrainingSampler"):
        load_config(TINY, ["DATALOADER.SAMPLER_TRAIN", sampler])


def test_in_features_of_another_backbone_are_refused():
    # detectron2's Faster R-CNN FPN ends at p6: RetinaNet's p7 is missing.
    opts = ["MODEL.BACKBONE.NAME", "build_resnet_fpn_backbone"]
    raises_config_error(TINY, opts, "names ['p7']", "build_resnet_fpn_backbone")


def test_in_features_checked_against_the_built_backbone():
    opts = ["MODEL.RETINANET.IN_FEATURES", "['p2', 'p3', 'p4', 'p5', 'p6']"]
    message = raises_config_error(TINY, opts, "MODEL.RETINANET.IN_FEATURES", "names ['p2']")
    # The levels offered are those of the backbone the model builds.
    backbone = build_backbone(load_config(TINY))
    assert f"name some of {sorted(backbone.output_shape())}" in message
    # A subset of the levels (with one anchor size per level) is valid.
    load_config(
        TINY,
        [
            "MODEL.RETINANET.IN_FEATURES",
            "['p4', 'p5']",
            "MODEL.ANCHOR_GENERATOR.SIZES",
            "[[64], [128]]",
        ],
    )


@pytest.mark.parametrize(
    "opts",
    [
        ["SOLVER.WARMUP_FACTOR", "0.0"],
        ["SOLVER.WARMUP_FACTOR", "1.0"],
        ["SOLVER.GAMMA", "1.0"],
        ["SOLVER.MOMENTUM", "0.0"],
        ["TEST.EVAL_PERIOD", "0"],
        ["INPUT.MAX_SIZE_TRAIN", "224"],
        ["INPUT.MIN_SIZE_TEST", "0", "INPUT.MAX_SIZE_TEST", "100"],  # 0: no resizing
        ["MODEL.RESNETS.DEPTH", "34"],
        ["MODEL.RESNETS.DEPTH", "50", "MODEL.RESNETS.RES2_OUT_CHANNELS", "256"],
        ["SOLVER.AMP.ENABLED", "True"],  # refused only for training (below)
    ],
)
def test_more_edge_values_are_valid(opts):
    load_config(TINY, opts)


# ---------------------------------------------------------------------------------------------
# What only training checks


def test_warmup_longer_than_the_run_is_refused_for_training():
    opts = ["SOLVER.WARMUP_ITERS", "1000", "SOLVER.MAX_ITER", "2"]
    with pytest.raises(ConfigError, match="WARMUP_ITERS = 1000 .*MAX_ITER = 2.*set SOLVER.WARMU"):
        load_config(TINY, opts, training=True)
    load_config(TINY, opts)  # evaluation and export do not warm up
    load_config(TINY, ["SOLVER.WARMUP_ITERS", "2", "SOLVER.MAX_ITER", "2"], training=True)


def test_warmup_longer_than_the_run_in_a_file_is_refused(tmp_path):
    config_file = write_config(tmp_path, "SOLVER:\n  MAX_ITER: 50\n  STEPS: [40]\n")
    with pytest.raises(ConfigError, match="WARMUP_ITERS = 100 is longer than the run"):
        load_config(config_file, training=True)
    # The same file (e.g. a short run's saved config.yaml) evaluates and exports.
    assert load_config(config_file).SOLVER.MAX_ITER == 50


def test_a_shortened_run_of_a_config_warns_about_its_warmup(caplog):
    # `SOLVER.MAX_ITER 2` on a config with a 100-iteration warm-up: a trial run, warned.
    with caplog.at_level(logging.WARNING, logger="retinanet_plugin.config.validation"):
        cfg = load_config(TINY, ["SOLVER.MAX_ITER", "2"], training=True)
    assert cfg.SOLVER.WARMUP_ITERS == 100 and cfg.SOLVER.MAX_ITER == 2
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("SOLVER.WARMUP_ITERS = 100 is longer than the run" in m for m in warned), warned


def test_amp_is_refused_for_training_on_a_device_without_cuda():
    opts = ["SOLVER.AMP.ENABLED", "True", "MODEL.DEVICE", "cpu"]
    with pytest.raises(ConfigError, match="SOLVER.AMP.ENABLED = True: .*needs CUDA"):
        load_config(TINY, opts, training=True)


def test_amp_on_cpu_fails_in_detectron2s_trainer():
    """The reference for the rule above: detectron2's AMPTrainer needs CUDA."""
    source = inspect.getsource(AMPTrainer)
    assert "torch.cuda.is_available()" in source and "CUDA is required" in source


def test_steps_beyond_max_iter_are_dropped_by_detectron2_with_a_warning(caplog):
    cfg = load_config(TINY, ["SOLVER.MAX_ITER", "600", "SOLVER.WARMUP_ITERS", "10"], training=True)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.SOLVER.BASE_LR)
    cfg.SOLVER.LR_SCHEDULER_NAME = "WarmupMultiStepLR"
    with caplog.at_level(logging.WARNING):
        detectron2_lr_scheduler(cfg, optimizer)
    assert any("SOLVER.STEPS contains values larger" in r.getMessage() for r in caplog.records)


def test_number_rules_take_numpy_numbers_and_refuse_other_types():
    import numpy as np

    from retinanet_plugin.config.rules import at_least, in_interval

    assert at_least(1)(np.int64(2)) is None and in_interval(0, 1)(np.float32(0.5)) is None
    assert at_least(1)(np.int64(0)) == "must be >= 1"
    for value in (None, "1", float("nan"), True):
        assert at_least(0)(value) == "must be a number >= 0", value


def test_dotted_key_with_a_typo_suggests_the_known_key(tmp_path):
    raises_config_error(
        write_config(tmp_path, "SOLVER.BASE_LRR: 0.1\n"),
        (),
        "did you mean SOLVER.BASE_LR?",
        "`SOLVER: {BASE_LR: 0.1}`",
    )


def test_in_features_the_backbone_lacks_is_a_user_error_in_python_too():
    """The model's own check, for configs built in Python without validation."""
    cfg = get_cfg()
    add_retinanet_config(cfg)
    cfg.merge_from_file(TINY)
    cfg.MODEL.RETINANET.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    with pytest.raises(UserError, match=r"IN_FEATURES names \['p2'\]") as info:
        build_model(cfg)
    assert "\n" not in str(info.value)
