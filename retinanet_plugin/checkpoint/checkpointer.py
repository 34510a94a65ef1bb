"""Checkpoint loading that runs no code from the file and checks that the weights fit the model,
fine-tuning to other classes, and the checks of ``--resume`` / ``--resume-from``."""

import errno
import logging
import os
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from fvcore.common.checkpoint import Checkpointer
from torch.nn.parallel import DistributedDataParallel

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from ..data import resolve_num_classes
from ..errors import UserError
from .atomic_io import atomic_write
from .metadata import METADATA_KEY, sets_key
from .safe_loading import WeightsReadError, load_pickle, load_torch

__all__ = [
    "CheckpointNotFoundError",
    "CheckpointWriteError",
    "CorruptWeightsError",
    "ResumeError",
    "RetinaNetCheckpointer",
    "TRUST_WEIGHTS_HELP",
    "WeightsDownloadError",
    "WeightsFit",
    "WeightsMismatchError",
    "check_finite",
    "check_fit",
    "check_resume",
]

logger = logging.getLogger(__name__)

CLASSIFICATION_LAYER = "head.cls_score."
TRUST_WEIGHTS_HELP = (
    "load MODEL.WEIGHTS and checkpoints with full unpickling, which can run code from the file: "
    "only for files from a trusted source (default: only arrays, numbers, strings, containers)"
)
# What detectron2's loading leaves out of its missing and unexpected keys: buffers that old
# checkpoints lack or hold, which the config sets or the model recomputes.
_NOT_MISSING = ("pixel_mean", "pixel_std")
_NOT_UNUSED = "anchor_generator.cell_anchors"
# Where to look when tensors of a part of the model differ: (key prefix, config keys).
_CONFIG_OF = (
    ("backbone.bottom_up.", "MODEL.BACKBONE.NAME, MODEL.RESNETS (e.g. DEPTH)"),
    ("backbone.", "MODEL.BACKBONE.NAME, MODEL.FPN"),
    ("head.", "MODEL.RETINANET (NUM_CONVS, NORM), MODEL.ANCHOR_GENERATOR"),
)
_EXAMPLES = 3  # tensors named in a message


class CheckpointWriteError(UserError, OSError):
    """A checkpoint could not be written (e.g. disk full); the previous one is intact."""


class CheckpointNotFoundError(UserError, FileNotFoundError):
    """A weights file to load does not exist, or is a folder."""


class WeightsMismatchError(UserError, ValueError):
    """Weights that do not fit the model: another architecture, or another number of classes
    where the classification layer may not be re-initialized."""


class CorruptWeightsError(UserError, ValueError):
    """A weights file holding NaN or infinite values."""


class WeightsDownloadError(UserError, OSError):
    """A weights URL that could not be downloaded."""

    def __str__(self) -> str:
        return self.args[0]


class ResumeError(UserError, ValueError):
    """``--resume`` / ``--resume-from`` asked to continue something that cannot be continued
    exactly."""


class WeightsFit(NamedTuple):
    """How a file's weights fit a model whose tensors it may load (see :func:`check_fit`)."""

    unused: List[str]  # the file's tensors the model has no place for
    missing: List[str]  # the model's tensors the file lacks: they keep their initialization
    # (name, shape in the file, shape in the model) of the classification layer's tensors, for
    # a file of another number of classes.
    new_classes: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]]


def _examples(names: Sequence[str]) -> str:
    more = f", ... ({len(names) - _EXAMPLES} more)" if len(names) > _EXAMPLES else ""
    return ", ".join(names[:_EXAMPLES]) + more


def _config_keys(names: Sequence[str]) -> str:
    """The config keys that shape the model's tensors ``names``."""
    found = []
    for name in names:
        keys = next((keys for prefix, keys in _CONFIG_OF if name.startswith(prefix)), None)
        if keys and keys not in found:
            found.append(keys)
    return "; ".join(found) or "the config"


def _class_count(in_file, in_model, num_classes) -> Optional[int]:
    """The number of classes of a classification layer of ``in_file`` outputs, from the model's
    layer of ``in_model`` outputs for ``num_classes`` (the same anchors per location)."""
    if not num_classes or in_model % num_classes:
        return None
    anchors = in_model // num_classes
    return in_file // anchors if in_file % anchors == 0 else None


def check_fit(
    filename: str,
    weights: Dict[str, Tuple[int, ...]],
    model: Dict[str, Tuple[int, ...]],
    num_classes: Optional[int],
    *,
    new_classes: bool,
    resuming: bool,
) -> WeightsFit:
    """Whether the tensors of a weights file fit a model, before any is loaded.

    To start training (``new_classes``), a file may leave parts of the model at their
    initialization (an ImageNet backbone has no FPN or head) and hold tensors the model has no
    place for (the backbone's classifier), but a full detector (tensors in every top-level
    module of the model) must hold exactly the model's tensors, and every shape must agree,
    except the classification layer's number of outputs. Otherwise (evaluation, prediction,
    export) every tensor of the model must be in the file, with its shape. Resuming needs an
    exact match.

    Args:
        filename: the file, named in errors.
        weights: the file's tensor shapes by name (after detectron2's renaming).
        model: the model's ``state_dict`` shapes by name.
        num_classes: the model's number of classes (None if unknown).
        new_classes: the weights start a training (fine-tuning): the classification layer
            may be re-initialized for another number of classes, and a partial file is allowed.
        resuming: the file is a training checkpoint to continue.

    Raises:
        WeightsMismatchError: the file does not fit; the message names the tensors, their
            shapes and the config keys to compare.
    """
    unused = [k for k in weights if k not in model and _NOT_UNUSED not in k]
    missing = [k for k in model if k not in weights and k not in _NOT_MISSING]
    differ = [(k, tuple(weights[k]), tuple(model[k])) for k in model if k in weights]
    differ = [d for d in differ if d[1] != d[2]]
    if model and len(missing) + len(differ) == len(model):
        example = next(iter(weights), None)
        raise WeightsMismatchError(
            f"{filename}: none of its {len(weights)} tensors fits the model (e.g. {example!r}); "
            "it holds weights of another architecture. To start from random weights, set "
            "MODEL.WEIGHTS ''"
        )
    # Only the number of outputs (dimension 0) of the classification layer depends on the
    # number of classes; its input width is the FPN's.
    classes = [d for d in differ if d[0].startswith(CLASSIFICATION_LAYER) and d[1][1:] == d[2][1:]]
    shapes = [d for d in differ if d not in classes]
    if shapes:
        widths = [
            (a[1], b[1])
            for k, a, b in shapes
            if k == CLASSIFICATION_LAYER + "weight" and len(a) > 1 and len(b) > 1
        ]
        hint = (
            f"the FPN and head widths differ: MODEL.FPN.OUT_CHANNELS is {widths[0][1]} here, "
            f"{widths[0][0]} in the file"
            if widths
            else f"compare {_config_keys([k for k, _, _ in shapes])}"
        )
        raise WeightsMismatchError(
            f"{filename} holds a model of another architecture: {len(shapes)} of its tensors "
            "have other shapes than the model's ("
            + "; ".join(f"{k}: {a} in the file, {b} in the model" for k, a, b in shapes[:2])
            + (f"; ... ({len(shapes) - 2} more)" if len(shapes) > 2 else "")
            + f"); {hint}. Use weights of this architecture, or the config they were made with"
        )
    tops = {k.split(".", 1)[0] for k in model if "." in k}
    full = all(any(k.startswith(top + ".") for k in weights) for top in tops)
    if (unused or missing) and (full or resuming):
        parts = [
            (
                f"{len(unused)} of its tensors are not in the model (e.g. {_examples(unused)})"
                if unused
                else ""
            ),
            (
                f"{len(missing)} of the model's are not in it (e.g. {_examples(missing)})"
                if missing
                else ""
            ),
        ]
        raise WeightsMismatchError(
            f"{filename} holds a model of another architecture: "
            + " and ".join(p for p in parts if p)
            + f"; compare {_config_keys(missing + unused)}. Use weights of this architecture, or "
            "the config they were made with"
        )
    if missing and not new_classes:
        raise WeightsMismatchError(
            f"{filename} lacks {len(missing)} of the model's tensors (e.g. {_examples(missing)}): "
            "they would keep their random initialization, and the results would be random. Use "
            "the weights of a trained detector of this architecture (to train from these, give "
            "them as MODEL.WEIGHTS to train_net.py)"
        )
    if classes and (resuming or not new_classes):
        key, in_file, in_model = next((c for c in classes if c[0].endswith("weight")), classes[0])
        counts = _class_count(in_file[0], in_model[0], num_classes)
        raise WeightsMismatchError(
            f"{filename} has a classification layer for {counts or 'another number of'} classes "
            f"({key} of shape {in_file}), the model has {num_classes} classes (shape {in_model}; "
            "MODEL.RETINANET.NUM_CLASSES follows the dataset unless set): they were made "
            "for different numbers of classes. "
            + (
                "Resuming continues a run with its own classes and optimizer state; to train on "
                f"these classes from its weights, start a new run with MODEL.WEIGHTS {filename}, "
                "without --resume or --resume-from, in a new OUTPUT_DIR"
                if resuming
                else "A re-initialized classification layer would give random classes: use "
                f"weights trained for the model's {num_classes} classes, or fine-tune these to "
                f"them first (train_net.py with MODEL.WEIGHTS {filename})"
            )
        )
    return WeightsFit(unused, missing, classes)


def check_finite(filename: str, weights: Dict[str, torch.Tensor]) -> None:
    """Refuses weights holding NaN or infinite values, which no input turns into a result.

    Raises:
        CorruptWeightsError: names the file and the first such tensors, with counts.
    """
    bad = []
    for name, value in weights.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            count = value.numel() - int(torch.isfinite(value).sum())
            if count:
                bad.append(f"{name}: {count} of {value.numel()} values")
    if bad:
        raise CorruptWeightsError(
            f"{filename}: {len(bad)} of its {len(weights)} tensors hold NaN or infinite values "
            f"({_examples(bad)}); these weights cannot give results (a run that diverged saves "
            "such weights): use an earlier checkpoint or other weights"
        )


class _CheckedLoading(Checkpointer):
    """fvcore's steps of loading a file as RetinaNetCheckpointer does them: ``.pth`` files with
    ``weights_only=True`` unless ``self.trust_weights``, and the weights refused (NaN, another
    architecture, another class count where not allowed) before any is copied into the model.

    It sits between DetectionCheckpointer and fvcore's Checkpointer in RetinaNetCheckpointer's
    method order, so detectron2's handling of the loaded dict (renaming model-zoo weights)
    happens before the checks.
    """

    def _load_file(self, filename):
        return load_torch(filename, trust=self.trust_weights)

    def _load_model(self, checkpoint):
        weights = checkpoint["model"]
        self._convert_ndarray_to_tensor(weights)
        # fvcore strips the prefix DistributedDataParallel adds, after this step.
        strip = len("module.") if weights and all(k.startswith("module.") for k in weights) else 0
        check_finite(self._loading, weights)
        model = self.model
        self._fit = check_fit(
            self._loading,
            {k[strip:]: tuple(v.shape) for k, v in weights.items()},
            {k: tuple(v.shape) for k, v in model.state_dict().items()},
            getattr(model, "num_classes", None),
            new_classes=self.allow_new_classes and not self._restoring,
            resuming=self._restoring,
        )
        return super()._load_model(checkpoint)


def _model_zoo_checkpoint(data: dict) -> dict:
    """What detectron2's ``DetectionCheckpointer._load_file`` makes of an unpickled ``.pkl``
    file: a detectron2 model-zoo dict as it is, a Caffe2 / Detectron one as ``{"model": ...}``
    for detectron2's name-matching heuristics. Written here because detectron2 unpickles the
    file itself and takes no unpickler, and the plugin's is an allow-list."""
    if "model" in data and "__author__" in data:
        return data
    if "blobs" in data:  # detection models have "blobs", ImageNet models do not
        data = data["blobs"]
    data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
    return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}


class RetinaNetCheckpointer(DetectionCheckpointer, _CheckedLoading):
    """detectron2's DetectionCheckpointer, loading files safely and only when they fit the
    model, plus what fine-tuning to another class count and ``--resume-from`` need.

    Weight files are untrusted by default: ``.pkl`` files may only hold numpy arrays, numbers,
    strings, bytes and containers (:mod:`retinanet_plugin.checkpoint.safe_loading`), ``.pth`` files
    are read with ``torch.load(weights_only=True)``; anything else is refused with an error naming
    the file and the global it refers to. A missing file is a FileNotFoundError rather than fvcore's
    assertion, a URL that cannot be downloaded a :class:`WeightsDownloadError`.

    Checkpoints and the ``last_checkpoint`` pointer are written atomically (temporary file,
    fsync, rename): a kill or a full disk at any moment leaves the previous checkpoint loadable,
    and ``--resume`` never finds a truncated file.

    Before anything is loaded, the file's tensors are checked (:func:`check_finite`,
    :func:`check_fit`): NaN or infinite values and another architecture are refused. A
    classification layer of another number of classes is refused too, except when fine-tuning
    (``allow_new_classes`` and the training state is not restored): then the layer is
    re-initialized with the paper's prior probability bias and one line says so. Tensors of the
    model the file lacks and tensors of the file the model lacks (an ImageNet backbone) are
    counted in one warning line.

    Args:
        allow_new_classes: True only to fine-tune (train from other weights): a classification
            layer of another class count is then re-initialized. Otherwise (evaluation,
            prediction, export) a re-initialized layer would give random classes: an error.
        trust_weights: load files the way detectron2 does, unpickling arbitrary objects (which
            can run code from the file). Only for files from a trusted source.
        metadata: saved in every checkpoint as its ``"retinanet_plugin"`` entry (the run's
            :func:`~retinanet_plugin.checkpoint.metadata.checkpoint_metadata`); None for none.
        model, save_dir, save_to_disk, checkpointables: as ``DetectionCheckpointer``.
    """

    def __init__(
        self,
        model,
        save_dir="",
        *,
        allow_new_classes=False,
        trust_weights=False,
        metadata=None,
        **kwargs,
    ):
        super().__init__(model, save_dir, **kwargs)
        self.allow_new_classes = allow_new_classes
        self.trust_weights = trust_weights
        self.metadata = metadata
        # A checkpoint to continue (--resume-from) while save_dir has none of its own.
        self.resume_from = ""
        # The checkpoints this run loaded or wrote, latest last: the ones safe to resume from.
        self.run_checkpoints: List[str] = []
        self._loading = ""
        self._restoring = False  # whether this load restores the training state too
        self._fit = WeightsFit([], [], [])

    def has_checkpoint(self) -> bool:
        return super().has_checkpoint() or bool(self.resume_from)

    def get_checkpoint_file(self) -> str:
        if self.resume_from and not super().has_checkpoint():
            return self.resume_from
        return super().get_checkpoint_file()

    def load(self, path, checkpointables=None):
        if path and "://" in path:
            try:
                path = self.path_manager.get_local_path(path)  # downloads (cached)
            except Exception as e:  # what fails varies: URLError, HTTPError, a handler's own
                reason = getattr(e, "reason", None) or e
                raise WeightsDownloadError(
                    f"cannot download the weights {path}: {type(e).__name__}: {reason}; check "
                    "the URL and the network, or download the file and set MODEL.WEIGHTS to it"
                ) from e
        # With DistributedDataParallel detectron2 checks the file itself: a worker without it
        # skips loading and gets the weights from the main worker.
        if path and not isinstance(self.model, DistributedDataParallel):
            if os.path.isdir(path):
                raise CheckpointNotFoundError(
                    errno.EISDIR, f"{path} is a folder, not a weights file: name the file", path
                )
            if not os.path.isfile(path):
                raise CheckpointNotFoundError(errno.ENOENT, "Checkpoint file not found", path)
        self._loading = path
        restored = self.checkpointables if checkpointables is None else checkpointables
        self._restoring = bool(restored)
        try:
            loaded = super().load(path, checkpointables)
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
        if filename.endswith(".pkl"):
            with self.path_manager.open(filename, "rb") as f:
                return _model_zoo_checkpoint(load_pickle(f, filename=filename))
        return super()._load_file(filename)  # .pth files: _CheckedLoading, weights-only

    def save(self, name: str, **kwargs) -> None:
        """fvcore's ``Checkpointer.save`` (model, checkpointables and ``kwargs`` in
        ``<save_dir>/<name>.pth``, then the pointer), with both files written atomically, plus
        ``self.metadata`` as the ``"retinanet_plugin"`` entry.

        A failed write (e.g. a full disk) or Ctrl-C during it removes the partial file and
        leaves the previous checkpoint and the pointer to it as they were.

        Raises:
            CheckpointWriteError: the file could not be written; names the previous checkpoint,
                which stays intact.
            KeyboardInterrupt: Ctrl-C during the write (after logging what is left).
        """
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        if self.metadata is not None:
            data[METADATA_KEY] = self.metadata
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        self._write(save_file, data, pointer=basename)
        self.run_checkpoints.append(save_file)

    def save_weights(self, name: str, model: torch.nn.Module, **kwargs) -> None:
        """Writes ``<save_dir>/<name>.pth`` with only ``model``'s weights (its ``state_dict`` as
        ``"model"``), ``self.metadata`` and ``kwargs``: a file to share, predict, evaluate or
        export with, or start another training from (MODEL.WEIGHTS), not to resume (no optimizer
        or training state; ``last_checkpoint`` is left as it is). Written atomically as
        :meth:`save` writes.

        Args:
            name: the file's name without ``.pth``.
            model: the module whose weights to write (e.g. the EMA of the trained model's).
            kwargs: more entries (numbers, strings, lists, dicts: the file stays loadable with
                ``torch.load(weights_only=True)``).
        """
        if not self.save_dir or not self.save_to_disk:
            return
        if isinstance(model, DistributedDataParallel):
            model = model.module
        data = {"model": model.state_dict(), **kwargs}
        if self.metadata is not None:
            data[METADATA_KEY] = self.metadata
        save_file = os.path.join(self.save_dir, f"{name}.pth")
        self.logger.info(f"Saving weights to {save_file}")
        self._write(save_file, data)

    def _write(self, save_file: str, data: dict, pointer: str = "") -> None:
        """``torch.save(data)`` to ``save_file`` atomically, then ``last_checkpoint`` set to
        ``pointer`` if given; errors as :meth:`save` says."""
        previous = self.get_checkpoint_file() if self.has_checkpoint() else ""
        kept = (
            f"The previous checkpoint {previous} is intact; --resume starts from it."
            if previous
            else "There is no earlier checkpoint in this directory."
        )
        try:
            with atomic_write(save_file) as f:
                torch.save(data, f)
            if pointer:
                self.tag_last_checkpoint(pointer)
        except KeyboardInterrupt:
            self.logger.warning(f"Interrupted while writing {save_file}, which was removed. {kept}")
            raise
        except (OSError, RuntimeError) as e:
            # torch.save reports a failed write of the file as "RuntimeError: [enforce fail at
            # inline_container.cc...]", the file's OSError (e.g. ENOSPC) as its context.
            cause = e if isinstance(e, OSError) else e.__context__
            if not isinstance(cause, OSError) and "inline_container" not in str(e):
                raise
            if isinstance(cause, OSError):
                reason = cause.strerror or str(cause)
            else:
                reason = str(e).strip().splitlines()[0]
            raise CheckpointWriteError(
                f"Could not write checkpoint {save_file} ({reason}). {kept}"
            ) from e

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        with atomic_write(os.path.join(self.save_dir, "last_checkpoint"), "w") as f:
            f.write(last_filename_basename)

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)  # checked by _CheckedLoading first
        new_classes = self._fit.new_classes
        head = getattr(self.model, "head", None)
        if new_classes and hasattr(head, "reset_classification_layer"):
            head.reset_classification_layer()
            weight = next(s for s in new_classes if s[0].endswith("weight"))
            logger.info(
                "Fine-tuning: skipped %s (checkpoint %s, model %s: a different number of "
                "classes); re-initialized the classification layer with prior probability %g",
                ", ".join(s[0] for s in new_classes),
                tuple(weight[1]),
                tuple(weight[2]),
                head.prior_prob,
            )
        return incompatible

    def _log_incompatible_keys(self, incompatible) -> None:
        """One warning line counting what was not loaded, instead of fvcore's line per tensor
        (the classification layer of fine-tuning has its own line)."""
        skipped = {k for k, _, _ in incompatible.incorrect_shapes}  # also in missing_keys
        missing = [k for k in incompatible.missing_keys if k not in skipped | set(_NOT_MISSING)]
        unused = incompatible.unexpected_keys
        if not missing and not unused:
            return
        total = len(self.model.state_dict())
        loaded = total - len(missing) - len(incompatible.incorrect_shapes)
        parts = [
            (
                f"{len(missing)} of the model's tensors keep their initialization (e.g. "
                f"{_examples(missing)})"
                if missing
                else ""
            ),
            (
                f"{len(unused)} of the file's tensors were not used (e.g. {_examples(unused)})"
                if unused
                else ""
            ),
        ]
        logger.warning(
            "Loaded %d of the model's %d tensors from %s; %s",
            loaded,
            total,
            self._loading,
            " and ".join(p for p in parts if p),
        )


def _training_checkpoint(path: str, trust: bool) -> Optional[dict]:
    """The contents of ``path`` (tensors memory-mapped, not read) if it is a local ``.pth`` file
    holding a training state (an iteration), else None."""
    if not path or "://" in path or path.endswith(".pkl") or not os.path.isfile(path):
        return None
    data = load_torch(path, trust=trust, mmap=True)
    return data if "iteration" in data else None


def _model_for(cfg, config_file: str, opts: Sequence[str], eval_only: bool) -> torch.nn.Module:
    """The model the run would build, on the meta device (shapes only: no memory, no init)."""
    cfg = cfg.clone()
    cfg.defrost()
    # As train_net's setup: NUM_CLASSES follows the dataset trained on (or evaluated).
    datasets = cfg.DATASETS.TEST if eval_only else cfg.DATASETS.TRAIN
    if datasets:
        key = "MODEL.RETINANET.NUM_CLASSES"
        resolve_num_classes(cfg, datasets[0], sets_key(config_file, opts, key))
    cfg.MODEL.DEVICE = "meta"
    with torch.device("meta"):
        return build_model(cfg)


def check_resume(cfg, args) -> None:
    """Checks, before any process starts or anything is written, that ``--resume`` or
    ``--resume-from`` can continue exactly what they name.

    * ``--resume-from PATH`` goes without ``--resume`` and ``--eval-only``; PATH is a training
      checkpoint (it has an iteration) outside OUTPUT_DIR (which the run writes).
    * ``--resume`` into an OUTPUT_DIR without ``last_checkpoint``, with MODEL.WEIGHTS a training
      checkpoint, is refused: it would restart that checkpoint at iteration 0 (use
      ``--resume-from``). With weights that hold no training state it starts a new run, as in
      detectron2.
    * The checkpoint to continue holds finite values and fits the model of this config exactly
      (:func:`check_fit`): restoring an optimizer state onto other shapes crashes the process.

    Args:
        cfg: the config from the file and overrides (NUM_CLASSES not yet resolved).
        args: train_net's options (``resume``, ``resume_from``, ``eval_only``,
            ``trust_weights``, ``config_file``, ``opts``).

    Raises:
        ResumeError, WeightsMismatchError, CorruptWeightsError: what cannot be continued.
    """
    path, checkpoint = args.resume_from, None
    if path:
        if args.resume or args.eval_only:
            option = "--resume" if args.resume else "--eval-only"
            raise ResumeError(
                f"--resume-from {path} with {option}: --resume-from continues training from "
                "that checkpoint, --resume from OUTPUT_DIR's last checkpoint, --eval-only "
                "evaluates MODEL.WEIGHTS; give one of them"
            )
        if not os.path.isfile(path):
            what = (
                "is a folder: name a checkpoint file in it"
                if os.path.isdir(path)
                else "does not exist"
            )
            raise ResumeError(f"--resume-from {path} {what}")
        if os.path.dirname(os.path.realpath(path)) == os.path.realpath(cfg.OUTPUT_DIR):
            raise ResumeError(
                f"--resume-from {path} is in OUTPUT_DIR {cfg.OUTPUT_DIR}, whose checkpoints the "
                "run writes: set OUTPUT_DIR to a new folder to continue from it there, or use "
                "--resume to continue the run in OUTPUT_DIR from its last checkpoint"
            )
        checkpoint = _training_checkpoint(path, args.trust_weights)
        if checkpoint is None:
            raise ResumeError(
                f"--resume-from {path}: it holds no training state (iteration, optimizer, "
                f"schedule) to continue; to train from its weights, set MODEL.WEIGHTS {path} "
                "instead"
            )
    elif args.resume:
        pointer = os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")
        if os.path.isfile(pointer):
            with open(pointer, encoding="utf-8", errors="replace") as f:
                path = os.path.join(cfg.OUTPUT_DIR, f.read().strip())
            if os.path.isfile(path):  # else run_checks reports the pointer
                checkpoint = load_torch(path, trust=args.trust_weights, mmap=True)
        else:
            weights = cfg.MODEL.WEIGHTS
            state = _training_checkpoint(weights, args.trust_weights)
            if state is not None:
                raise ResumeError(
                    f"--resume: OUTPUT_DIR {cfg.OUTPUT_DIR} has no last_checkpoint, so training "
                    f"would start at iteration 0 from MODEL.WEIGHTS {weights}, a training "
                    f"checkpoint (iteration {state['iteration']}) whose optimizer, schedule and "
                    f"data stream would be dropped. To continue it, use --resume-from {weights} "
                    "(without --resume); to fine-tune from its weights, leave out --resume"
                )
    if checkpoint is None:
        return
    tensors = checkpoint.get("model", {})
    check_finite(path, tensors)
    model = _model_for(cfg, args.config_file, args.opts, args.eval_only)
    check_fit(
        path,
        {k: tuple(v.shape) for k, v in tensors.items()},
        {k: tuple(v.shape) for k, v in model.state_dict().items()},
        getattr(model, "num_classes", None),
        new_classes=False,
        resuming=not args.eval_only,
    )
