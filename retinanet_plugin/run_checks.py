"""Checks of a training or evaluation command before any work starts.

``train_net.py`` runs these in the launching process, before it starts worker processes, builds
the model or reads a dataset, so that a mistake costs seconds rather than a training run: the
processes and devices asked for, the datasets named in the config, the weights to start from and
the output folder. Each failure is a :class:`RunCheckError` naming the option or config key, the
value, what is wrong and how to fix it.
"""

import difflib
import glob
import logging
import os
from typing import List, Optional

import torch

from detectron2.data import DatasetCatalog, MetadataCatalog

from .errors import UserError

__all__ = [
    "RUN_OUTPUTS",
    "RunCheckError",
    "check_dataset",
    "check_datasets",
    "check_device",
    "check_device_and_processes",
    "check_weights",
    "prepare_output_dir",
]

logger = logging.getLogger(__name__)

# What a run leaves in OUTPUT_DIR that a new run would overwrite or append to.
RUN_OUTPUTS = ("model_final.pth", "last_checkpoint", "metrics.json", "config.yaml")
# Where detectron2 reads weights from other than the local disk.
_REMOTE_PREFIXES = ("detectron2://", "http://", "https://", "catalog://", "manifold://")


class RunCheckError(UserError, ValueError):
    """A training or evaluation command that cannot work as given."""


def check_device(cfg) -> int:
    """MODEL.DEVICE is cpu, or cuda with a GPU visible here.

    Returns:
        The number of CUDA GPUs visible (0 for cpu).
    """
    try:
        device = torch.device(cfg.MODEL.DEVICE)
    except (RuntimeError, TypeError) as e:
        raise RunCheckError(
            f"MODEL.DEVICE = {cfg.MODEL.DEVICE!r} is not a device torch knows ({e}); use cpu or "
            "cuda"
        ) from e
    if device.type == "cpu":
        return 0
    if device.type != "cuda":
        raise RunCheckError(f"MODEL.DEVICE = {cfg.MODEL.DEVICE!r}: the plugin runs on cpu or cuda")
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if available == 0:
        raise RunCheckError(
            f"MODEL.DEVICE = {cfg.MODEL.DEVICE!r}, but no CUDA GPU is visible here; set "
            "MODEL.DEVICE cpu"
        )
    return available


def check_device_and_processes(cfg, num_gpus: int, num_machines: int = 1) -> None:
    """MODEL.DEVICE (:func:`check_device`), and ``--num-gpus``/``--num-machines`` against the
    GPUs here and SOLVER.IMS_PER_BATCH."""
    if num_gpus < 1:
        raise RunCheckError(
            f"--num-gpus {num_gpus}: must be >= 1 (processes per machine; with MODEL.DEVICE cpu "
            "each process uses the CPU)"
        )
    if num_machines < 1:
        raise RunCheckError(f"--num-machines {num_machines}: must be >= 1")
    available = check_device(cfg)
    if available and num_gpus > available:
        raise RunCheckError(
            f"--num-gpus {num_gpus} with MODEL.DEVICE {cfg.MODEL.DEVICE!r}, but this machine has "
            f"{available} CUDA GPU(s); use --num-gpus {available} or less"
        )
    world_size = num_gpus * num_machines
    if cfg.SOLVER.IMS_PER_BATCH % world_size:
        raise RunCheckError(
            f"SOLVER.IMS_PER_BATCH = {cfg.SOLVER.IMS_PER_BATCH} is not divisible by the "
            f"{world_size} processes (--num-gpus {num_gpus} x --num-machines {num_machines}); "
            "every process takes the same number of images per batch"
        )


def _user_registered() -> List[str]:
    """Registered names other than detectron2's built-in ones (those have no file on disk here
    unless a user put them there), for suggestions."""
    builtin_prefixes = ("coco_", "keypoints_coco", "lvis_", "cityscapes_", "voc_", "ade20k_")
    return [n for n in DatasetCatalog.list() if not n.startswith(builtin_prefixes)]


def check_dataset(key: str, name: str) -> None:
    """Dataset ``name`` (given by option or config key ``key``) is registered and, where its
    metadata names files, they exist."""
    if name not in DatasetCatalog.list():
        close = difflib.get_close_matches(name, DatasetCatalog.list(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        names = _user_registered()
        others = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
        raise RunCheckError(
            f"{key}: dataset {name!r} is not registered{hint}; register it with --register-coco "
            f"NAME JSON IMAGE_ROOT or --register-voc NAME VOC_DIR SPLIT (registered: "
            f"{others or 'none besides detectron2 built-in ones'})"
        )
    metadata = MetadataCatalog.get(name)
    for attribute in ("json_file", "image_root"):
        path = getattr(metadata, attribute, None)
        if path and not os.path.exists(path):
            raise RunCheckError(
                f"{key}: dataset {name!r} reads its {attribute.replace('_', ' ')} from {path}, "
                "which does not exist (detectron2's built-in datasets live under "
                "$DETECTRON2_DATASETS, default ./datasets)"
            )


def check_datasets(cfg, eval_only: bool) -> None:
    """Every dataset in DATASETS.TRAIN (unless evaluating only) and DATASETS.TEST is registered
    and, where its metadata names files, they exist."""
    if not eval_only:
        if not cfg.DATASETS.TRAIN:
            raise RunCheckError(
                "DATASETS.TRAIN is empty: name the registered dataset(s) to train on"
            )
        for name in cfg.DATASETS.TRAIN:
            check_dataset("DATASETS.TRAIN", name)
    elif not cfg.DATASETS.TEST:
        raise RunCheckError("--eval-only with DATASETS.TEST empty: name the dataset(s) to evaluate")
    for name in cfg.DATASETS.TEST:
        check_dataset("DATASETS.TEST", name)


def _last_checkpoint(output_dir: str) -> Optional[str]:
    """The checkpoint OUTPUT_DIR/last_checkpoint points to, or None if there is no pointer."""
    pointer = os.path.join(output_dir, "last_checkpoint")
    if not os.path.isfile(pointer):
        return None
    with open(pointer, encoding="utf-8", errors="replace") as f:
        name = f.read().strip()
    path = os.path.join(output_dir, name)
    if not name or "/" in name or not os.path.isfile(path):
        raise RunCheckError(
            f"{pointer} names {name[:80]!r}, which is not a checkpoint file in {output_dir}; "
            "write the name of one of its model_*.pth files into it, or delete it to start from "
            "MODEL.WEIGHTS"
        )
    return path


def check_weights(cfg, resume: bool, eval_only: bool) -> None:
    """MODEL.WEIGHTS, or with ``--resume`` the checkpoint OUTPUT_DIR/last_checkpoint names, is
    a file that exists; ``--eval-only`` has weights to evaluate."""
    last = _last_checkpoint(cfg.OUTPUT_DIR) if resume else None
    weights = cfg.MODEL.WEIGHTS
    if last is None and weights and not weights.startswith(_REMOTE_PREFIXES):
        if os.path.isdir(weights):
            raise RunCheckError(
                f"MODEL.WEIGHTS = {weights!r} is a folder; name the weights file in it (e.g. "
                f"{os.path.join(weights, 'model_final.pth')})"
            )
        if not os.path.isfile(weights):
            raise RunCheckError(f"MODEL.WEIGHTS = {weights!r} does not exist")
    if eval_only and last is None and not weights:
        raise RunCheckError(
            "--eval-only without weights would evaluate a randomly initialized model: set "
            "MODEL.WEIGHTS to a trained model (e.g. OUTPUT_DIR/model_final.pth), or add --resume "
            "to evaluate OUTPUT_DIR's last checkpoint"
        )


def earlier_run_outputs(output_dir: str) -> List[str]:
    """The files of an earlier run in ``output_dir`` (see :data:`RUN_OUTPUTS`)."""
    return [name for name in RUN_OUTPUTS if os.path.exists(os.path.join(output_dir, name))]


def prepare_output_dir(output_dir: str, resume: bool, overwrite: bool) -> None:
    """Refuses to start a new training run over an earlier run's files unless ``--resume``
    (continue it) or ``--overwrite`` (replace it: its checkpoints, metrics and events are
    deleted first, so the new run's metrics.json holds only its own rows).

    Raises:
        RunCheckError: ``output_dir`` is a file, or holds an earlier run and neither option was
            given.
    """
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise RunCheckError(f"OUTPUT_DIR = {output_dir!r} is a file; set OUTPUT_DIR to a folder")
    found = earlier_run_outputs(output_dir)
    if not found or resume:
        return
    if not overwrite:
        raise RunCheckError(
            f"OUTPUT_DIR = {output_dir!r} holds an earlier run ({', '.join(found)}); pass "
            "--resume to continue it, --overwrite to replace it, or set OUTPUT_DIR to a new folder"
        )
    patterns = ("model_*.pth", "last_checkpoint", "metrics.json", "events.out.tfevents.*")
    removed = sorted(
        {path for pattern in patterns for path in glob.glob(os.path.join(output_dir, pattern))}
    )
    for path in removed:
        os.remove(path)
    logger.warning(
        "--overwrite: removed %d file(s) of the earlier run in %s: %s",
        len(removed),
        output_dir,
        ", ".join(os.path.basename(p) for p in removed),
    )
