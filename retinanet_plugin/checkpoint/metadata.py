"""What a checkpoint written by the plugin says about itself, and the config of a command that
uses it.

Every checkpoint the plugin's trainer writes holds, beside detectron2's entries, one entry
``"retinanet_plugin"`` (:func:`checkpoint_metadata`): the run's full config as YAML text, the
class names of its training dataset, its datasets, the input format and pixel statistics, and
the plugin / detectron2 / torch versions. It holds only strings, numbers, lists and dicts, so
``torch.load(weights_only=True)`` reads it, and detectron2's ``DetectionCheckpointer`` ignores
it (it loads only ``"model"`` and the checkpointables it is given).

:func:`config_for_weights` gives ``predict``, ``train_net.py --eval-only`` and
``tools/export.py`` their config: the checkpoint's when no config file is given, else the
given one, refused where it builds another network than the checkpoint's
(:data:`NETWORK_KEYS`) unless the user overrides the check.
"""

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog

from ..config.loading import config_sets_key, load_config, load_config_text
from ..errors import UserError
from .safe_loading import load_torch

__all__ = [
    "IGNORE_CONFIG_FLAG",
    "IGNORE_CONFIG_HELP",
    "METADATA_KEY",
    "NETWORK_KEYS",
    "CheckpointConfigError",
    "checkpoint_metadata",
    "config_conflicts",
    "config_for_weights",
    "read_metadata",
    "sets_key",
]

METADATA_KEY = "retinanet_plugin"
IGNORE_CONFIG_FLAG = "--ignore-checkpoint-config"
IGNORE_CONFIG_HELP = (
    "use --config-file even where it builds another network than the config stored in the "
    "weights file (default: refuse; without --config-file the stored config is used)"
)
# The keys that define the network and what it is given: a checkpoint's weights and detections
# are only right with its own values. A section stands for all its keys.
NETWORK_KEYS = (
    "MODEL.META_ARCHITECTURE",
    "MODEL.BACKBONE.NAME",
    "MODEL.RESNETS.DEPTH",
    "MODEL.RESNETS.NORM",
    "MODEL.RESNETS.OUT_FEATURES",
    "MODEL.RESNETS.NUM_GROUPS",
    "MODEL.RESNETS.WIDTH_PER_GROUP",
    "MODEL.RESNETS.STRIDE_IN_1X1",
    "MODEL.RESNETS.RES2_OUT_CHANNELS",
    "MODEL.FPN.IN_FEATURES",
    "MODEL.FPN.OUT_CHANNELS",
    "MODEL.FPN.NORM",
    "MODEL.FPN.FUSE_TYPE",
    "MODEL.TIMM.NAME",
    "MODEL.TIMM.OUT_INDICES",
    "MODEL.TIMM.NORM",
    "MODEL.PANET.NORM",
    "MODEL.ANCHOR_GENERATOR",
    "MODEL.RETINANET.NUM_CLASSES",
    "MODEL.RETINANET.IN_FEATURES",
    "MODEL.RETINANET.HEAD_NAME",
    "MODEL.RETINANET.NUM_CONVS",
    "MODEL.RETINANET.NORM",
    "MODEL.RETINANET.BBOX_REG_WEIGHTS",
    "MODEL.PIXEL_MEAN",
    "MODEL.PIXEL_STD",
    "INPUT.FORMAT",
    "INPUT.MIN_SIZE_TEST",
    "INPUT.MAX_SIZE_TEST",
)
_NUM_CLASSES = "MODEL.RETINANET.NUM_CLASSES"


class CheckpointConfigError(UserError, ValueError):
    """A config that does not fit the checkpoint, or no config for a file that holds none."""


def _plain(value: Any) -> Any:
    """``value`` with tuples as lists (a config's values as YAML gives them back)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def checkpoint_metadata(cfg: CfgNode) -> Dict[str, Any]:
    """The ``"retinanet_plugin"`` entry of the checkpoints of a run of config ``cfg``.

    Returns:
        ``{"config": cfg.dump(), "class_names": [...] (those of DATASETS.TRAIN[0] if it is
        registered with class names, else []), "datasets": {"train": [...], "test": [...]},
        "input_format", "pixel_mean", "pixel_std", "versions": {"retinanet_plugin",
        "detectron2", "torch"}}``: strings, numbers, lists and dicts only.
    """
    import torch

    import detectron2
    import retinanet_plugin

    train = list(cfg.DATASETS.TRAIN)
    classes: List[str] = []
    if train and train[0] in DatasetCatalog.list():
        classes = [str(c) for c in MetadataCatalog.get(train[0]).get("thing_classes", [])]
    return {
        "config": cfg.dump(),
        "class_names": classes,
        "datasets": {"train": train, "test": list(cfg.DATASETS.TEST)},
        "input_format": cfg.INPUT.FORMAT,
        "pixel_mean": [float(v) for v in cfg.MODEL.PIXEL_MEAN],
        "pixel_std": [float(v) for v in cfg.MODEL.PIXEL_STD],
        "versions": {
            "retinanet_plugin": str(retinanet_plugin.__version__),
            "detectron2": str(detectron2.__version__),
            "torch": str(torch.__version__),
        },
    }


def read_metadata(path: str, trust: bool = False) -> Optional[Dict[str, Any]]:
    """The ``"retinanet_plugin"`` entry of a local ``.pth`` file, None for any other weights
    (a ``.pkl`` or a URL, a checkpoint without it). Tensors are memory-mapped, not read."""
    if not path or "://" in path or path.endswith(".pkl") or not os.path.isfile(path):
        return None
    data = load_torch(path, trust=trust, mmap=True)
    entry = data.get(METADATA_KEY) if isinstance(data, dict) else None
    return entry if isinstance(entry, dict) and isinstance(entry.get("config"), str) else None


def _value(cfg: CfgNode, key: str) -> Any:
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def _flat(cfg: CfgNode, key: str) -> List[Tuple[str, Any]]:
    """(key, value) of ``key`` in ``cfg``, each key of a section for a section."""
    value = _value(cfg, key)
    if isinstance(value, CfgNode):
        return [item for sub in sorted(value) for item in _flat(cfg, f"{key}.{sub}")]
    return [(key, _plain(value))]


def config_conflicts(given: CfgNode, stored: CfgNode) -> List[Tuple[str, Any, Any]]:
    """The :data:`NETWORK_KEYS` whose values differ, as (key, value in ``given``, value in
    ``stored``)."""
    conflicts = []
    for key in NETWORK_KEYS:
        theirs = dict(_flat(stored, key))
        conflicts += [(k, v, theirs.get(k)) for k, v in _flat(given, key) if v != theirs.get(k)]
    return conflicts


def _weights_in(opts: Sequence[str]) -> str:
    """The last ``MODEL.WEIGHTS`` value of ``KEY VALUE`` overrides, "" if none."""
    values = [v for k, v in zip(opts[0::2], opts[1::2]) if k == "MODEL.WEIGHTS"]
    return values[-1] if values else ""


def config_for_weights(
    config_file: str,
    opts: Sequence[str],
    *,
    ignore_checkpoint_config: bool = False,
    trust_weights: bool = False,
    training: bool = False,
) -> CfgNode:
    """The config of a command that uses the weights MODEL.WEIGHTS (predict, evaluation, export).

    Without ``config_file`` it is the config stored in MODEL.WEIGHTS (from ``opts``), a file
    written by the plugin, with ``opts`` on top and MODEL.WEIGHTS that file. With
    ``config_file``, it is that config, with the checkpoint's NUM_CLASSES where it leaves it
    unset; if MODEL.WEIGHTS holds a config, the given one must build the same network
    (:func:`config_conflicts`), unless ``ignore_checkpoint_config``.

    Args:
        config_file: a YAML config, or "" for the checkpoint's.
        opts: ``KEY VALUE`` overrides.
        ignore_checkpoint_config: use the given config whatever the checkpoint's.
        trust_weights: read MODEL.WEIGHTS with full unpickling.
        training: as :func:`load_config`.

    Raises:
        CheckpointConfigError: no config file and MODEL.WEIGHTS is no file written by the
            plugin; or a given config that differs from the checkpoint's in the network keys
            (the message names each key and both values).
        ConfigError: as :func:`load_config`.
    """
    if not config_file:
        weights = _weights_in(opts)
        metadata = read_metadata(weights, trust_weights)
        if metadata is None:
            what = f"MODEL.WEIGHTS {weights}" if weights else "no MODEL.WEIGHTS"
            raise CheckpointConfigError(
                f"no --config-file, and {what}: only a checkpoint written by this plugin's "
                "training holds its config; pass --config-file with the config the weights "
                "were trained with (model-zoo .pkl files and other checkpoints need one)"
            )
        return load_config_text(metadata["config"], weights, opts, training=training)
    cfg = load_config(config_file, opts, training=training)
    metadata = read_metadata(cfg.MODEL.WEIGHTS, trust_weights)
    if metadata is None:
        return cfg
    stored = load_config_text(metadata["config"], cfg.MODEL.WEIGHTS)
    if not config_sets_key(config_file, opts, _NUM_CLASSES):
        cfg.MODEL.RETINANET.NUM_CLASSES = stored.MODEL.RETINANET.NUM_CLASSES
    if ignore_checkpoint_config:
        return cfg
    conflicts = config_conflicts(cfg, stored)
    if conflicts:
        raise CheckpointConfigError(
            f"--config-file {config_file} builds another network than the one MODEL.WEIGHTS "
            f"{cfg.MODEL.WEIGHTS} was trained as: "
            + "; ".join(f"{k} is {a} here, {b} in the checkpoint" for k, a, b in conflicts)
            + f". Leave out --config-file to use the checkpoint's config, or pass "
            f"{IGNORE_CONFIG_FLAG} to use this one anyway"
        )
    return cfg


def sets_key(config_file: str, opts: Sequence[str], key: str) -> bool:
    """Whether the command sets ``key`` (e.g. to resolve NUM_CLASSES from a dataset only when
    it does not): a config from a checkpoint (no ``config_file``) sets every key."""
    return not config_file or config_sets_key(config_file, opts, key)
