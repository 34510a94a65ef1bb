"""The best weights by validation metric (``model_best.pth``) and early stopping.

After every evaluation of the training (``TEST.EVAL_PERIOD`` and the one at the end),
:class:`BestModelHook` reads ``TEST.BEST_METRIC`` from the evaluation's results (as
``metrics.json`` records them) and, when it is higher than every earlier evaluation's, writes
the weights evaluated to ``model_best.pth`` (weights only, with the run's metadata and the
metric). It counts the evaluations since the best one: with ``TEST.EARLY_STOPPING_PATIENCE`` N
> 0, training ends after N evaluations in a row without a new best. Its state (the best value
and iteration, the count) is part of the trainer's, so ``--resume`` continues it exactly.
Unlike detectron2's ``BestCheckpointer``, which saves a full checkpoint (optimizer included)
and points ``last_checkpoint`` at it, the best file is weights only and ``--resume`` still
continues from the last checkpoint.
"""

import logging
import math
from typing import Any, Dict, Optional

from torch import nn

from detectron2.engine import HookBase
from detectron2.utils import comm

from ..errors import UserError

__all__ = ["BEST_FILE", "BestModelHook", "EarlyStop", "MetricNotFoundError"]

logger = logging.getLogger(__name__)

BEST_FILE = "model_best"  # <OUTPUT_DIR>/model_best.pth


class MetricNotFoundError(UserError, KeyError):
    """TEST.BEST_METRIC is not among an evaluation's results."""

    def __str__(self) -> str:
        return self.args[0]


class EarlyStop(BaseException):
    """Ends the training loop after the step whose evaluation used up the patience.

    A BaseException, as ``StopIteration`` or ``KeyboardInterrupt`` are: detectron2's loop logs
    every ``Exception`` as a failed training; this one passes it, through its ``after_train``
    hooks, to the trainer, which ends the run normally.
    """


class BestModelHook(HookBase):
    """Writes the best weights by an evaluation metric and decides early stopping.

    Runs after detectron2's ``EvalHook`` of the same period, at the same iterations (every
    ``eval_period`` iterations and after the last one).

    Args:
        eval_period: ``TEST.EVAL_PERIOD`` (> 0).
        checkpointer: writes ``model_best.pth`` (its ``save_weights``).
        metric: ``TEST.BEST_METRIC``, a key of the evaluation's flattened results
            ("bbox/AP"); higher is better.
        model: the module whose weights the metric measures (the model, or the EMA's copy).
        patience: ``TEST.EARLY_STOPPING_PATIENCE``; 0: never stop.
    """

    def __init__(self, eval_period: int, checkpointer, metric: str, model: nn.Module, patience):
        self.period = eval_period
        self.checkpointer = checkpointer
        self.metric = metric
        self.model = model
        self.patience = patience
        self.best_value: Optional[float] = None
        self.best_iteration = -1
        self.evaluations_since_best = 0

    @property
    def patience_exhausted(self) -> bool:
        """Whether early stopping ends the run: ``patience`` evaluations without a new best."""
        return bool(self.patience) and self.evaluations_since_best >= self.patience

    def after_step(self):
        # The conditions of detectron2's EvalHook.
        next_iter = self.trainer.iter + 1
        if next_iter % self.period == 0 and next_iter != self.trainer.max_iter:
            self._record()

    def after_train(self):
        if self.trainer.iter + 1 >= self.trainer.max_iter:
            self._record()

    def _latest(self):
        """(value, iteration) of the metric in this iteration's evaluation (main process),
        or the error message."""
        storage = self.trainer.storage
        found = storage.latest().get(self.metric)
        if found is not None and found[1] == storage.iter:
            # The iteration of the weights, as checkpoints count it (metrics.json records the
            # evaluation after the last iteration at MAX_ITER, one more).
            return float(found[0]), min(found[1], self.trainer.max_iter - 1)
        reported = sorted(
            k for k, (_, it) in storage.latest().items() if it == storage.iter and "AP" in k
        )
        return (
            f"TEST.BEST_METRIC = {self.metric!r} is not among the evaluation's metrics "
            f"({', '.join(reported[:12]) or 'none'}{', ...' if len(reported) > 12 else ''}); "
            "set it to one of them (see metrics.json), or '' for no model_best.pth"
        )

    def _record(self) -> None:
        # Only the main process has the results; every process takes its decision.
        latest = comm.all_gather(self._latest() if comm.is_main_process() else None)[0]
        if isinstance(latest, str):
            raise MetricNotFoundError(latest)
        value, iteration = latest
        if math.isfinite(value) and (self.best_value is None or value > self.best_value):
            previous = (
                f"the previous best {self.best_value:.4g} at iteration {self.best_iteration}"
                if self.best_value is not None
                else "the first evaluation"
            )
            self.best_value, self.best_iteration = value, iteration
            self.evaluations_since_best = 0
            if comm.is_main_process():
                logger.info(
                    "%s %.4g at iteration %d: the best so far (%s); writing %s.pth",
                    self.metric,
                    value,
                    iteration,
                    previous,
                    BEST_FILE,
                )
                self.checkpointer.save_weights(
                    BEST_FILE,
                    self.model,
                    weights_info={"iteration": iteration, "metric": self.metric, "value": value},
                )
            return
        self.evaluations_since_best += 1
        patience = (
            f"; {self.evaluations_since_best} of TEST.EARLY_STOPPING_PATIENCE {self.patience} "
            "evaluations without a new best"
            if self.patience
            else ""
        )
        logger.info(
            "%s %.4g at iteration %d: not above the best %.4g at iteration %d%s",
            self.metric,
            value,
            iteration,
            self.best_value if self.best_value is not None else math.nan,
            self.best_iteration,
            patience,
        )

    def state_dict(self) -> Dict[str, Any]:
        return {
            "metric": self.metric,
            "best_value": self.best_value,
            "best_iteration": self.best_iteration,
            "evaluations_since_best": self.evaluations_since_best,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state["metric"] != self.metric:
            logger.warning(
                "The checkpoint tracked the best %s, this run TEST.BEST_METRIC %s: the best "
                "value and the early-stopping count start again",
                state["metric"],
                self.metric,
            )
            return
        self.best_value = state["best_value"]
        self.best_iteration = state["best_iteration"]
        self.evaluations_since_best = state["evaluations_since_best"]
        if self.best_value is not None:
            logger.info(
                "Resumed: the best %s so far is %.4g at iteration %d (model_best.pth of the run "
                "that wrote the checkpoint), %d evaluation(s) since",
                self.metric,
                self.best_value,
                self.best_iteration,
                self.evaluations_since_best,
            )
