"""Checkpoints: loading that runs no code from the file and checks what it loads, fine-tuning
to other classes, and atomic writes."""

from .checkpointer import (
    TRUST_WEIGHTS_HELP,
    CheckpointNotFoundError,
    CheckpointWriteError,
    CorruptWeightsError,
    ResumeError,
    RetinaNetCheckpointer,
    WeightsDownloadError,
    WeightsMismatchError,
    check_resume,
)
from .safe_loading import NotACheckpointError, UnsafeCheckpointError, WeightsReadError

__all__ = [
    "CheckpointNotFoundError",
    "CheckpointWriteError",
    "CorruptWeightsError",
    "NotACheckpointError",
    "ResumeError",
    "RetinaNetCheckpointer",
    "TRUST_WEIGHTS_HELP",
    "UnsafeCheckpointError",
    "WeightsDownloadError",
    "WeightsMismatchError",
    "WeightsReadError",
    "check_resume",
]
