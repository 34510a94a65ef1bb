"""Checkpoint loading that runs no code from the file, and fine-tuning on other classes."""

import contextlib
import errno
import functools
import logging
import os
from typing import List

import torch
from fvcore.common.checkpoint import Checkpointer
from torch.nn.parallel import DistributedDataParallel

from detectron2.checkpoint import DetectionCheckpointer

from .atomic_io import atomic_write
from .compat.private_api import pkl_unpickler
from .errors import UserError
from .safe_loading import WeightsReadError, load_pickle, load_torch

__all__ = [
    "CheckpointNotFoundError",
    "CheckpointWriteError",
    "RetinaNetCheckpointer",
    "TRUST_WEIGHTS_HELP",
    "WeightsMismatchError",
]

logger = logging.getLogger(__name__)

CLASSIFICATION_LAYER = "head.cls_score."
TRUST_WEIGHTS_HELP = (
    "load MODEL.WEIGHTS and checkpoints with full unpickling, which can run code from the file: "
    "only for files from a trusted source (default: only arrays, numbers, strings, containers)"
)


class CheckpointWriteError(UserError, OSError):
    """A checkpoint could not be written (e.g. disk full); the previous one is intact."""


class CheckpointNotFoundError(UserError, FileNotFoundError):
    """A weights file to load does not exist, or is a folder."""


class WeightsMismatchError(UserError, ValueError):
    """A weights file none of whose tensors fits the model (another architecture)."""


class _TorchLoading(Checkpointer):
    """fvcore's ``.pth`` loading step with ``weights_only=True`` unless ``self.trust_weights``.

    It sits between DetectionCheckpointer and fvcore's Checkpointer in RetinaNetCheckpointer's
    method order, so detectron2's handling of the loaded dict still applies.
    """

    def _load_file(self, filename):
        return load_torch(filename, trust=self.trust_weights)


class RetinaNetCheckpointer(DetectionCheckpointer, _TorchLoading):
    """detectron2's DetectionCheckpointer, loading files safely, plus what fine-tuning to another
    class count needs.

    Weight files are untrusted by default: ``.pkl`` files may only hold numpy arrays, numbers,
    strings, bytes and containers (:mod:`retinanet_plugin.safe_loading`), ``.pth`` files are read
    with ``torch.load(weights_only=True)``; anything else is refused with an error naming the file
    and the global it refers to. A missing file is a FileNotFoundError rather than fvcore's
    assertion.

    Checkpoints and the ``last_checkpoint`` pointer are written atomically (temporary file,
    fsync, rename): a kill or a full disk at any moment leaves the previous checkpoint loadable,
    and ``--resume`` never finds a truncated file.

    Every tensor whose shape matches is loaded. detectron2 skips (and logs) tensors whose shape
    differs; when the skipped ones are the classification output layer (a checkpoint trained
    with another number of classes), that layer is re-initialized with the paper's prior
    probability bias and one summary line says so. Skipped tensors outside that layer get a
    warning naming them, since they mean the architectures differ.

    Args:
        allow_new_classes: False for inference, where a re-initialized classification layer
            would give random classes: a class-count mismatch is then an error.
        trust_weights: load files the way detectron2 does, unpickling arbitrary objects (which
            can run code from the file). Only for files from a trusted source.
        model, save_dir, save_to_disk, checkpointables: as ``DetectionCheckpointer``.
    """

    def __init__(
        self, model, save_dir="", *, allow_new_classes=True, trust_weights=False, **kwargs
    ):
        super().__init__(model, save_dir, **kwargs)
        self.allow_new_classes = allow_new_classes
        self.trust_weights = trust_weights
        # The checkpoints this run loaded or wrote, latest last: the ones safe to resume from.
        self.run_checkpoints: List[str] = []
        self._loading = ""

    def load(self, path, *args, **kwargs):
        # With DistributedDataParallel detectron2 checks the file itself: a worker without it
        # skips loading and gets the weights from the main worker.
        if path and not isinstance(self.model, DistributedDataParallel):
            path = self.path_manager.get_local_path(path)  # downloads URLs, keeps local paths
            if os.path.isdir(path):
                raise CheckpointNotFoundError(
                    errno.EISDIR, f"{path} is a folder, not a weights file: name the file", path
                )
            if not os.path.isfile(path):
                raise CheckpointNotFoundError(errno.ENOENT, "Checkpoint file not found", path)
        self._loading = path
        try:
            loaded = super().load(path, *args, **kwargs)
        except UserError:
            raise
        except OSError as e:  # detectron2 opens .pkl files itself
            raise WeightsReadError(path, e) from e
        if path:
            self.run_checkpoints.append(path)
        return loaded

    def _load_file(self, filename):
        if self.trust_weights:
            logger.warning(
                "Loading %s with --trust-weights: unpickling arbitrary objects can run code from "
                "the file",
                filename,
            )
            return super()._load_file(filename)
        # .pth files need nothing here: _TorchLoading already loads them weights-only.
        # detectron2 reads .pkl files with pickle.load inside DetectionCheckpointer._load_file;
        # replacing only that call keeps its model-zoo handling (``__author__``, Caffe2
        # ``blobs``, ``matching_heuristics``) instead of copying it.
        restricted = (
            pkl_unpickler(functools.partial(load_pickle, filename=filename))
            if filename.endswith(".pkl")
            else None
        )
        with restricted or contextlib.nullcontext():
            return super()._load_file(filename)

    def save(self, name: str, **kwargs) -> None:
        """fvcore's ``Checkpointer.save`` (model, checkpointables and ``kwargs`` in
        ``<save_dir>/<name>.pth``, then the pointer), with both files written atomically.

        Raises:
            CheckpointWriteError: the file could not be written; names the previous checkpoint,
                which stays intact.
        """
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        try:
            with atomic_write(save_file) as f:
                torch.save(data, f)
        except OSError as e:
            previous = self.get_checkpoint_file() if self.has_checkpoint() else ""
            raise CheckpointWriteError(
                f"Could not write checkpoint {save_file} ({e.strerror or e}). "
                + (
                    f"The previous checkpoint {previous} is intact; --resume starts from it."
                    if previous
                    else "There is no earlier checkpoint in this directory."
                )
            ) from e
        self.tag_last_checkpoint(basename)
        self.run_checkpoints.append(save_file)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        with atomic_write(os.path.join(self.save_dir, "last_checkpoint"), "w") as f:
            f.write(last_filename_basename)

    def _load_model(self, checkpoint):
        in_file = list(checkpoint.get("model", {}))  # fvcore's loading pops "model"
        incompatible = super()._load_model(checkpoint)
        model_keys = set(self.model.state_dict())
        wrong_shape = {key for key, _, _ in incompatible.incorrect_shapes}
        not_loaded = set(incompatible.missing_keys) | wrong_shape
        if model_keys and model_keys <= not_loaded:
            example = in_file[0] if in_file else None
            raise WeightsMismatchError(
                f"{self._loading}: none of its {len(in_file)} tensors fits the model "
                f"(e.g. {example!r}); it holds weights of another architecture. To start from "
                "random weights, set MODEL.WEIGHTS ''"
            )
        skipped = incompatible.incorrect_shapes
        classification = [s for s in skipped if s[0].startswith(CLASSIFICATION_LAYER)]
        others = [s for s in skipped if not s[0].startswith(CLASSIFICATION_LAYER)]
        head = getattr(self.model, "head", None)
        if classification and not self.allow_new_classes:
            key, in_checkpoint, in_model = classification[0]
            raise WeightsMismatchError(
                f"The checkpoint's {key} has shape {tuple(in_checkpoint)}, the model's "
                f"{tuple(in_model)}: they were made for different numbers of classes. Set "
                "MODEL.RETINANET.NUM_CLASSES (or name the training dataset) to match the checkpoint"
            )
        if classification and hasattr(head, "reset_classification_layer"):
            head.reset_classification_layer()
            weight = next(s for s in classification if s[0].endswith("weight"))
            logger.info(
                "Fine-tuning: skipped %s (checkpoint %s, model %s: a different number of "
                "classes); re-initialized the classification layer with prior probability %g",
                ", ".join(s[0] for s in classification),
                tuple(weight[1]),
                tuple(weight[2]),
                head.prior_prob,
            )
        if others:
            logger.warning(
                "Checkpoint tensors not loaded because their shapes differ from the model's "
                "(the architecture differs from the checkpoint's): %s",
                "; ".join(f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in others),
            )
        return incompatible
