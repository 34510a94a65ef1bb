"""Training: the :class:`Trainer`, its optimizers and schedules, exact resume, launching
processes and machines, and the checks of a run before it starts; and prediction from Python
(:class:`Predictor`, as detectron2's ``DefaultPredictor`` is in ``detectron2.engine``)."""

from .predictor import Detections, Predictor
from .trainer import Trainer, TrainingDivergedError

__all__ = ["Detections", "Predictor", "Trainer", "TrainingDivergedError"]
