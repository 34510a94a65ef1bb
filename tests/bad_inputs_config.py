"""Bad-input cases: config files and config values (see bad_input_env.py; run by
test_bad_inputs.py). Every case is refused by train_net.py's config check, before any dataset is
read; the user's config files are left as they were."""

import ast
import os
import struct
import zlib
from typing import Callable, Dict, List

from bad_input_env import TINY, Case, Env

CASES: Dict[str, Case] = {}
LAZY_TINY = os.path.join(os.path.dirname(TINY), "lazy", "retinanet_R18_GN_tiny.py")


def _with_config(name: str, body: str, base: str = TINY) -> Callable[[Env], List[str]]:
    """The correct tiny command line with ``--config-file`` a file ``name`` that inherits
    ``base`` and adds ``body``."""

    def argv(env: Env) -> List[str]:
        args = env.train()
        args[args.index("--config-file") + 1] = env.path(name, f'_BASE_: "{base}"\n{body}')
        return args

    return argv


def _shown(value: str):
    """How the message shows an override's value (as yacs decodes it)."""
    try:
        return repr(ast.literal_eval(value))
    except (ValueError, SyntaxError):
        return repr(value)


def _full_run(env: Env, config_file: str) -> List[str]:
    """The correct tiny command line with ``config_file`` and without a shortening
    SOLVER.MAX_ITER override (the config's own run length counts)."""
    args = env.train()
    args[args.index("--config-file") + 1] = config_file
    at = args.index("SOLVER.MAX_ITER")
    return args[:at] + args[at + 2 :]


def _lazy_config(env: Env) -> List[str]:
    """The correct tiny command line with the tiny LazyConfig as ``--config-file``."""
    args = env.train()
    args[args.index("--config-file") + 1] = LAZY_TINY
    return args


def _config_file(name: str) -> Callable[[Env], List[str]]:
    return lambda env: [str(env.tmp / name)]


def _png() -> bytes:
    """A valid 1x1 PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00\xff\x00\x00")
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def _binary_config(name: str, content: bytes) -> Callable[[Env], List[str]]:
    def argv(env: Env) -> List[str]:
        args = env.train()
        args[args.index("--config-file") + 1] = env.path(name, content)
        return args

    return argv


def _duplicate_in_base(env: Env) -> List[str]:
    env.path(
        "base_twice.yaml", f'_BASE_: "{TINY}"\nSOLVER:\n  BASE_LR: 0.01\nSOLVER:\n  MAX_ITER: 5\n'
    )
    return _with_config("child.yaml", "MODEL:\n  DEVICE: cpu\n", base="base_twice.yaml")(env)


# -- The YAML file itself -------------------------------------------------------------------
CASES.update(
    {
        "config-duplicate-section": Case(
            "train_net.py",
            "YAML file with the same section twice (the first was dropped)",
            _with_config("twice.yaml", "SOLVER:\n  BASE_LR: 0.01\nSOLVER:\n  MAX_ITER: 5\n"),
            ["twice.yaml", "SOLVER is set twice", "lines 2 and 4"],
            keep=_config_file("twice.yaml"),
        ),
        "config-duplicate-key": Case(
            "train_net.py",
            "YAML file with the same key twice in a section",
            _with_config("twice.yaml", "SOLVER:\n  BASE_LR: 0.01\n  STEPS: [5]\n  BASE_LR: 0.1\n"),
            ["twice.yaml", "BASE_LR is set twice", "lines 3 and 5"],
            keep=_config_file("twice.yaml"),
        ),
        "config-duplicate-in-base": Case(
            "train_net.py",
            "`_BASE_` file with the same section twice",
            _duplicate_in_base,
            [
                "base_twice.yaml",
                "the _BASE_ of",
                "child.yaml",
                "SOLVER is set twice",
                "lines 2 and 4",
            ],
            keep=lambda env: [str(env.tmp / "base_twice.yaml"), str(env.tmp / "child.yaml")],
        ),
        "config-dotted-key": Case(
            "train_net.py",
            "dotted key written as one YAML key (`SOLVER.BASE_LR: 0.1`)",
            _with_config("dotted.yaml", "SOLVER.BASE_LR: 0.1\n"),
            ["dotted.yaml", "'SOLVER.BASE_LR'", "nest it", "SOLVER: {BASE_LR: 0.1}"],
            keep=_config_file("dotted.yaml"),
        ),
        "config-dotted-key-nested": Case(
            "train_net.py",
            "dotted key inside a section (`MODEL: {RETINANET.NUM_CLASSES: 3}`)",
            _with_config("dotted.yaml", "MODEL:\n  RETINANET.NUM_CLASSES: 3\n"),
            ["dotted.yaml", "MODEL.RETINANET.NUM_CLASSES", "RETINANET: {NUM_CLASSES: 3}"],
            keep=_config_file("dotted.yaml"),
        ),
        "config-png": Case(
            "train_net.py",
            "a PNG image given as `--config-file`",
            _binary_config("photo.png", _png()),
            ["photo.png", "is not a text file"],
            keep=_config_file("photo.png"),
        ),
        "config-binary": Case(
            "train_net.py",
            "binary bytes given as `--config-file`",
            _binary_config("random.yaml", bytes(range(256)) * 4),
            ["random.yaml", "is not a text file"],
            keep=_config_file("random.yaml"),
        ),
        "config-control-characters": Case(
            "train_net.py",
            "config file with control characters",
            _binary_config("control.yaml", b"SOLVER:\n  BASE_LR: \x01\x02\n"),
            ["control.yaml", "is not a text file", "U+0001"],
            keep=_config_file("control.yaml"),
        ),
    }
)

# -- Values accepted though wrong, or failing late: (key, value, fragments of the rule) ------
_VALUES = [
    ("SOLVER.GAMMA", "-1.0", "(0, 1]"),
    ("SOLVER.WARMUP_FACTOR", "-1.0", "[0, 1]"),
    ("SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "-5.0", "> 0"),
    ("SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "l2", "'value', 'norm'"),
    ("SOLVER.CHECKPOINT_PERIOD", "-10", ">= 1"),
    ("SOLVER.CHECKPOINT_PERIOD", "0", ">= 1"),
    ("SOLVER.MOMENTUM", "-0.9", "[0, 1)"),
    ("SOLVER.WEIGHT_DECAY", "-0.0001", ">= 0"),
    ("SOLVER.BASE_LR", "None", "None is no float"),
    ("SOLVER.MAX_ITER", "0", ">= 1"),
    ("TEST.EVAL_PERIOD", "-1", ">= 0"),
    ("TEST.DETECTIONS_PER_IMAGE", "0", ">= 1"),
    ("TEST.EARLY_STOPPING_PATIENCE", "-1", ">= 0"),
    ("MODEL_EMA.DECAY", "1.0", "[0, 1)"),
    ("INPUT.MAX_SIZE_TRAIN", "200", "largest INPUT.MIN_SIZE_TRAIN (224)"),
    ("INPUT.MAX_SIZE_TEST", "100", "largest INPUT.MIN_SIZE_TEST (192)"),
    ("DATALOADER.REPEAT_THRESHOLD", "-1.0", ">= 0"),
    ("MODEL.FPN.OUT_CHANNELS", "0", ">= 1"),
    ("MODEL.FPN.OUT_CHANNELS", "100", "multiple of 32 with MODEL.FPN.NORM, MODEL.RETINANET.NORM"),
    ("MODEL.RESNETS.NORM", "GroupNorm", "'FrozenBN', 'GN'"),
    ("MODEL.RESNETS.DEPTH", "19", "18, 34, 50, 101, 152"),
    ("MODEL.RESNETS.RES2_OUT_CHANNELS", "128", "must be 64 with MODEL.RESNETS.DEPTH 18"),
    ("MODEL.RETINANET.NUM_CONVS", "-1", ">= 1"),
    ("MODEL.RETINANET.TOPK_CANDIDATES_TEST", "0", ">= 1"),
    ("MODEL.RETINANET.NMS_THRESH_TEST", "1.5", "[0, 1]"),
    ("INPUT.RANDOM_FLIP", "both", "'none', 'horizontal', 'vertical'"),
]
for _key, _value, _rule in _VALUES:
    CASES[f"config-value-{_key.lower()}={_value}"] = Case(
        "train_net.py",
        f"`{_key} {_value}`",
        lambda e, k=_key, v=_value: e.train(k, v),
        [f"{_key} = {_shown(_value)}", _rule],
    )

# -- Names that no registry holds: (key, value, the closest registered name, another one) ----
_NAMES = [
    ("MODEL.BACKBONE.NAME", "build_resnet_fpn_backbon", "build_resnet_fpn_backbone", "timm"),
    ("MODEL.META_ARCHITECTURE", "RetinaNett", "RetinaNet", "GeneralizedRCNN"),
    ("MODEL.RETINANET.HEAD_NAME", "FocalHead", "FocalLossHead", "(registered: FocalLossHead)"),
    ("MODEL.ANCHOR_GENERATOR.NAME", "Default", "DefaultAnchorGenerator", "RetinaNetAnchor"),
    ("DATALOADER.SAMPLER_TRAIN", "RepeatFactorSampler", "RepeatFactorTrainingSampler", "'Train"),
]
for _key, _value, _closest, _listed in _NAMES:
    CASES[f"config-name-{_key.lower()}"] = Case(
        "train_net.py",
        f"`{_key} {_value}` (no such registered name)",
        lambda e, k=_key, v=_value: e.train(k, v),
        [f"{_key} = {_value!r}", f"did you mean {_closest!r}?", _listed],
    )

# -- Keys that contradict each other or the machine ------------------------------------------
CASES.update(
    {
        "config-in-features": Case(
            "train_net.py",
            "`MODEL.RETINANET.IN_FEATURES` naming a level the backbone lacks",
            lambda e: e.train("MODEL.RETINANET.IN_FEATURES", "['p2', 'p3', 'p4', 'p5', 'p6']"),
            ["MODEL.RETINANET.IN_FEATURES", "['p2']", "'p3', 'p4', 'p5', 'p6', 'p7'"],
        ),
        "config-warmup-longer-than-run": Case(
            "train_net.py",
            "`SOLVER.WARMUP_ITERS 1000` with `SOLVER.MAX_ITER 2`",
            lambda e: e.train("SOLVER.WARMUP_ITERS", "1000", "SOLVER.MAX_ITER", "2"),
            ["SOLVER.WARMUP_ITERS = 1000", "SOLVER.MAX_ITER = 2", "set SOLVER.WARMUP_ITERS <= 2"],
        ),
        "config-warmup-in-file": Case(
            "train_net.py",
            "config file whose warm-up is longer than its run",
            lambda e: _full_run(
                e,
                e.path("short.yaml", f'_BASE_: "{TINY}"\nSOLVER:\n  MAX_ITER: 50\n  STEPS: [40]\n'),
            ),
            ["short.yaml", "SOLVER.WARMUP_ITERS = 100", "SOLVER.MAX_ITER = 50"],
            keep=_config_file("short.yaml"),
        ),
        "config-best-metric-unknown": Case(
            "train_net.py",
            "`TEST.BEST_METRIC bbox/mAP` (no such metric)",
            lambda e: e.train("TEST.BEST_METRIC", "bbox/mAP"),
            ["TEST.BEST_METRIC = 'bbox/mAP'", "'bbox/<metric>'", "AP50", "AP-<class name>"],
        ),
        "config-best-metric-ema-off": Case(
            "train_net.py",
            "`TEST.BEST_METRIC ema/bbox/AP` without `MODEL_EMA.ENABLED`",
            lambda e: e.train("TEST.BEST_METRIC", "ema/bbox/AP"),
            ["TEST.BEST_METRIC = 'ema/bbox/AP'", "MODEL_EMA.ENABLED True"],
        ),
        "config-early-stopping-without-evaluations": Case(
            "train_net.py",
            "`TEST.EARLY_STOPPING_PATIENCE 3` with `TEST.EVAL_PERIOD 0`",
            lambda e: e.train("TEST.EARLY_STOPPING_PATIENCE", "3"),
            ["TEST.EARLY_STOPPING_PATIENCE = 3", "TEST.EVAL_PERIOD > 0"],
        ),
        "config-amp-on-cpu": Case(
            "train_net.py",
            "`SOLVER.AMP.ENABLED True` with `MODEL.DEVICE cpu`",
            lambda e: e.train("SOLVER.AMP.ENABLED", "True"),
            ["SOLVER.AMP.ENABLED = True", "needs CUDA", "MODEL.DEVICE = 'cpu'"],
        ),
        "config-lazyconfig": Case(
            "train_net.py",
            "a LazyConfig (`.py`) as `--config-file`",
            _lazy_config,
            ["retinanet_R18_GN_tiny.py", "LazyConfig", "tools/lazyconfig_train_net.py"],
        ),
    }
)
