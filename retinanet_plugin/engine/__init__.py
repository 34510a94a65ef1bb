"""Training: the :class:`Trainer`, its optimizers and schedules, exact resume, launching
processes and machines, and the checks of a run before it starts."""

from .trainer import Trainer, TrainingDivergedError

__all__ = ["Trainer", "TrainingDivergedError"]
