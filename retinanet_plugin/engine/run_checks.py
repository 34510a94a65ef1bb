"""Checks of a training or evaluation command before any work starts.

``train_net.py`` runs these in the launching process, before it starts worker processes, builds
the model or reads a dataset, so that a mistake costs seconds rather than a training run: the
processes and devices asked for, the datasets named in the config, the weights to start from and
the output folder. Each failure is a :class:`RunCheckError` naming the option or config key, the
value, what is wrong and how to fix it. :func:`lock_output_dir` keeps a second run out of an
output folder in use.
"""

import contextlib
import difflib
import fcntl
import glob
import logging
import os
import shutil
from typing import Iterator, List, Optional

import torch

from detectron2.data import DatasetCatalog, MetadataCatalog

from ..checkpoint.atomic_io import check_output_dir, is_local_path, remove_leftover_temp_files
from ..data.datasets import check_datasets_before_training
from ..errors import UserError

__all__ = [
    "LOCK_FILE",
    "RUN_OUTPUTS",
    "RunCheckError",
    "check_dataset",
    "check_datasets",
    "check_device",
    "check_device_and_processes",
    "check_weights",
    "checkpoint_bytes",
    "evaluation_dir",
    "lock_output_dir",
    "prepare_output_dir",
]

logger = logging.getLogger(__name__)

# What a run leaves in OUTPUT_DIR that a new run would overwrite or append to (inference/: the
# evaluation results, and an --eval-only run's config and log, see evaluation_dir).
RUN_OUTPUTS = ("model_final.pth", "last_checkpoint", "metrics.json", "config.yaml", "inference")
# Everything of an earlier run that --overwrite removes: RUN_OUTPUTS, the other checkpoints,
# detectron2's tensorboard events and logs (log.txt, log.txt.rank<N> of the other processes).
_OVERWRITTEN = RUN_OUTPUTS + ("model_*.pth", "events.out.tfevents.*", "log.txt", "log.txt.rank*")
# Held (flock) by the launching process of machine rank 0 for the whole run.
LOCK_FILE = ".train_net.lock"
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


def check_device_and_processes(
    cfg, num_gpus: int, num_machines: int = 1, machine_rank: int = 0
) -> None:
    """MODEL.DEVICE (:func:`check_device`), ``--num-gpus``/``--num-machines``/``--machine-rank``
    against each other, the GPUs here and SOLVER.IMS_PER_BATCH."""
    if num_gpus < 1:
        raise RunCheckError(
            f"--num-gpus {num_gpus}: must be >= 1 (processes per machine; with MODEL.DEVICE cpu "
            "each process uses the CPU)"
        )
    if num_machines < 1:
        raise RunCheckError(f"--num-machines {num_machines}: must be >= 1")
    if not 0 <= machine_rank < num_machines:
        ranks = "0" if num_machines == 1 else f"from 0 to {num_machines - 1}"
        raise RunCheckError(
            f"--machine-rank {machine_rank} with --num-machines {num_machines}: the machine rank "
            f"must be {ranks} (0 on the machine that hosts --dist-url)"
        )
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
    # Loaded and checked now (files, boxes, images, the same classes), not after training.
    check_datasets_before_training([] if eval_only else cfg.DATASETS.TRAIN, cfg.DATASETS.TEST)


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


def _overwritten(output_dir: str) -> List[str]:
    """The paths --overwrite removes (files, and the inference folder), sorted."""
    return sorted(
        {path for pattern in _OVERWRITTEN for path in glob.glob(os.path.join(output_dir, pattern))}
    )


def _inside(path: str, removed: List[str]) -> bool:
    """Whether ``path`` is one of ``removed`` or in one of its folders."""
    path = os.path.realpath(path)
    for other in map(os.path.realpath, removed):
        if path == other or path.startswith(other.rstrip(os.sep) + os.sep):
            return True
    return False


def _check_not_a_file(output_dir: str) -> None:
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise RunCheckError(f"OUTPUT_DIR = {output_dir!r} is a file; set OUTPUT_DIR to a folder")


def prepare_output_dir(
    output_dir: str,
    resume: bool,
    overwrite: bool,
    weights: str = "",
    remove: bool = True,
) -> None:
    """Refuses to start a new training run over an earlier run's files unless ``--resume``
    (continue it) or ``--overwrite`` (replace it: everything the earlier run wrote, see
    :data:`_OVERWRITTEN`, is deleted first, so that the folder holds only the new run's files).

    Args:
        output_dir: OUTPUT_DIR.
        resume, overwrite: the options.
        weights: MODEL.WEIGHTS, the file the run starts from, which --overwrite must not delete.
        remove: whether to delete (False on machines other than rank 0: a shared folder is
            cleared once, by rank 0 while it holds the folder's lock).

    Raises:
        RunCheckError: ``output_dir`` is a file, or holds an earlier run and neither option was
            given, or --overwrite would delete MODEL.WEIGHTS.
    """
    _check_not_a_file(output_dir)
    found = earlier_run_outputs(output_dir)
    if not found or resume:
        return
    if not overwrite:
        raise RunCheckError(
            f"OUTPUT_DIR = {output_dir!r} holds an earlier run ({', '.join(found)}); pass "
            "--resume to continue it, --overwrite to replace it, or set OUTPUT_DIR to a new folder"
        )
    removed = _overwritten(output_dir)
    if weights and is_local_path(weights) and _inside(weights, removed):
        raise RunCheckError(
            f"MODEL.WEIGHTS = {weights!r} is a file of the earlier run in OUTPUT_DIR = "
            f"{output_dir!r}, which --overwrite would delete before the run starts from it; copy "
            f"it out of OUTPUT_DIR (e.g. cp {weights} {os.path.basename(weights)}) and set "
            "MODEL.WEIGHTS to the copy"
        )
    if not remove:
        return
    names, files = [], 0
    for path in removed:
        if os.path.isdir(path) and not os.path.islink(path):
            names.append(os.path.basename(path) + "/")
            files += sum(len(f) for _, _, f in os.walk(path))
            shutil.rmtree(path)
        else:
            names.append(os.path.basename(path))
            files += 1
            os.remove(path)
    logger.warning(
        "--overwrite: removed %d file(s) of the earlier run in %s: %s",
        files,
        output_dir,
        ", ".join(names),
    )


def evaluation_dir(output_dir: str) -> str:
    """Where ``--eval-only`` writes its config.yaml and log.txt: beside its results in
    OUTPUT_DIR/inference, not over the config of the training run in OUTPUT_DIR."""
    return os.path.join(output_dir, "inference")


@contextlib.contextmanager
def lock_output_dir(output_dir: str) -> Iterator[None]:
    """Holds OUTPUT_DIR for one run during the ``with`` block: a second run into the same folder
    (started at the same time, or a --resume while the first still runs) is refused instead of
    both writing the same checkpoints and metrics.

    The lock is an ``flock`` on OUTPUT_DIR/:data:`LOCK_FILE`, which the operating system releases
    when the process ends, even when it is killed; the file holds the holder's PID. Leftover
    temporary files of checkpoint writes killed in an earlier run
    (:func:`~retinanet_plugin.checkpoint.atomic_io.remove_leftover_temp_files`) are removed once the
    lock is held, with a count in the log.

    Raises:
        RunCheckError: OUTPUT_DIR is a file, or another process holds its lock.
        OutputDirError: OUTPUT_DIR cannot be created or written.
    """
    if not is_local_path(output_dir):  # other storage has no locks: nothing to hold
        yield
        return
    _check_not_a_file(output_dir)
    path = os.path.join(output_dir, LOCK_FILE)
    try:
        os.makedirs(output_dir, exist_ok=True)
        lock_file = open(path, "a+", encoding="utf-8")
    except OSError:
        check_output_dir(output_dir)  # says why the folder cannot be written
        raise
    with lock_file as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            f.seek(0)
            holder = f.read().strip()
            raise RunCheckError(
                f"OUTPUT_DIR = {output_dir!r} is in use by another run"
                + (f" (process {holder})" if holder.isdigit() else "")
                + f", which holds {path}; wait until it ends, or set OUTPUT_DIR to another folder"
            ) from e
        except OSError as e:  # a file system without locks (some network file systems)
            unlockable = e
        else:
            unlockable = None
        if unlockable:
            logger.warning(
                "Cannot lock %s (%s): a second run started into %s while this one runs would not "
                "be refused",
                path,
                unlockable.strerror or unlockable,
                output_dir,
            )
        try:
            f.truncate(0)
            f.write(f"{os.getpid()}\n")
            f.flush()
            # Only while no other run can be writing into the folder.
            removed = [] if unlockable else remove_leftover_temp_files(output_dir)
            if removed:
                logger.warning(
                    "Removed %d temporary file(s) of writes that an earlier run in %s did not "
                    "finish (it was killed): %s",
                    len(removed),
                    output_dir,
                    ", ".join(os.path.basename(p) for p in removed),
                )
            yield
        finally:
            f.truncate(0)  # no stale PID once released


# Optimizer state per parameter element, in parameter-sized buffers: SGD's momentum buffer,
# Adam's and AdamW's two moments (three with amsgrad). Other optimizers: assume Adam's.
def _optimizer_buffers(optimizer: torch.optim.Optimizer, group: dict) -> int:
    if isinstance(optimizer, torch.optim.SGD):
        return 1 if group.get("momentum", 0) else 0
    return 3 if group.get("amsgrad", False) else 2


def checkpoint_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """An upper estimate of the size of a training checkpoint of ``model`` and ``optimizer``:
    the model's state (parameters and buffers), the optimizer's state (one buffer per trainable
    parameter element for SGD with momentum, two for Adam/AdamW), and the file format's and the
    small training state's (RNGs, data stream, scheduler) overhead."""
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    optimizer_bytes = sum(
        p.numel() * p.element_size() * _optimizer_buffers(optimizer, group)
        for group in optimizer.param_groups
        for p in group["params"]
        if p.requires_grad
    )
    tensors = len(model.state_dict()) + 3 * sum(len(g["params"]) for g in optimizer.param_groups)
    # Per tensor: a zip record with 64-byte alignment and its pickled reference; per run: RNG
    # states of every process, the data stream's state and the pickled structure.
    return model_bytes + optimizer_bytes + 1024 * tensors + 2**20
