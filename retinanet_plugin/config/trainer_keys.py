"""The config keys that only the plugin's ``Trainer`` (``train_net.py``) honours.

detectron2's ``DefaultTrainer`` and ``tools/plain_train_net.py`` build the optimizer, the LR
schedule and the training loader from detectron2's keys only, so these keys of the plugin are
ignored there without a word: :func:`trainer_only_settings` names the ones a config sets, and the
model warns about them when detectron2's trainer trains it (see ``FocalLossRetinaNet``).
"""

from typing import List

from detectron2.config import CfgNode

__all__ = ["TRAINER_ONLY_KEYS", "trainer_only_settings"]

# Key -> the default that changes nothing when detectron2's trainer ignores the key.
TRAINER_ONLY_KEYS = {
    "SOLVER.OPTIMIZER": "SGD",  # detectron2's build_optimizer is SGD only
    "SOLVER.LR_SCHEDULER_NAME": "WarmupMultiStepLR",  # "WarmupPolyLR", "WarmupExponentialLR"
    "INPUT.AUG.ROTATION.ENABLED": False,
    "INPUT.AUG.SCALE_CROP.ENABLED": False,
    "INPUT.AUG.COLOR_JITTER.ENABLED": False,
    "INPUT.AUG.MOSAIC.ENABLED": False,
    "INPUT.AUG.MIXUP.ENABLED": False,
    "INPUT.AUG.CUTMIX.ENABLED": False,
}

# Schedules detectron2's own build_lr_scheduler has (it rejects the plugin's others by name).
_DETECTRON2_SCHEDULES = ("WarmupMultiStepLR", "WarmupCosineLR")


def _value(cfg: CfgNode, key: str):
    node = cfg
    for part in key.split("."):
        node = node.get(part) if isinstance(node, CfgNode) else None
    return node


def trainer_only_settings(cfg: CfgNode) -> List[str]:
    """``"KEY = value"`` for every key of :data:`TRAINER_ONLY_KEYS` that ``cfg`` sets to a value
    detectron2's trainer would not honour (an empty list for a config without the plugin's
    keys)."""
    settings = []
    for key, default in TRAINER_ONLY_KEYS.items():
        value = _value(cfg, key)
        if key == "SOLVER.LR_SCHEDULER_NAME" and value in _DETECTRON2_SCHEDULES:
            continue
        if value is not None and value != default:
            settings.append(f"{key} = {value!r}")
    return settings
