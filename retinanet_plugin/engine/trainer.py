"""The plugin's trainer: detectron2's ``DefaultTrainer`` with the plugin's optimizers, schedules,
data loading, evaluation and checkpoints, and an exact ``--resume``."""

import logging
import os
import weakref

from detectron2.engine import (
    AMPTrainer,
    DefaultTrainer,
    SimpleTrainer,
    TrainerBase,
    create_ddp_model,
    hooks,
)
from detectron2.utils import comm

from ..checkpoint.atomic_io import check_output_dir
from ..checkpoint.checkpointer import RetinaNetCheckpointer
from ..checkpoint.metadata import checkpoint_metadata
from ..compat.private_api import inner_trainer, restart_data_iterator, set_writer_period
from ..data import build_test_loader, build_train_loader
from ..data.resumable import ResumableTrainLoader
from ..errors import UserError
from ..evaluation.coco_evaluation import build_coco_evaluator
from .best_model import BestModelHook, EarlyStop
from .ema import EMA_PREFIX, EMAHook
from .preemption import StopOnSignal
from .resume import GatherTrainingState, checkpoint_training_state, load_training_state
from .run_checks import checkpoint_bytes
from .solver import build_lr_scheduler, build_optimizer

__all__ = ["Trainer", "TrainingDivergedError"]

logger = logging.getLogger(__name__)


class TrainingDivergedError(UserError, FloatingPointError):
    """The loss became NaN or infinite (the learning rate is too high for the model and data)."""


class Trainer(DefaultTrainer):
    """detectron2's DefaultTrainer with COCO evaluation, SOLVER.OPTIMIZER and the plugin's LR
    schedules, the INPUT.AUG augmentations, the plugin's checkpoint loading (safe by default,
    fine-tuning-aware) and an exact --resume (optimizer, data stream, RNGs, loss normalizer).

    Args:
        cfg: the config.
        trust_weights: see ``RetinaNetCheckpointer``.
    """

    def __init__(self, cfg, trust_weights=False):
        self.trust_weights = trust_weights  # set first: build_hooks below needs it
        self._gather_training_state = GatherTrainingState(cfg.SOLVER.CHECKPOINT_PERIOD)
        # DefaultTrainer's constructor, step for step, except that a CPU model is wrapped in
        # DistributedDataParallel without device_ids, which detectron2's create_ddp_model
        # always passes and DDP rejects for CPU modules (multi-process CPU training, gloo).
        TrainerBase.__init__(self)
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        on_cpu = not any(p.is_cuda for p in model.parameters())
        model = create_ddp_model(
            model, broadcast_buffers=False, **({"device_ids": None} if on_cpu else {})
        )
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(
            model, data_loader, optimizer
        )
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = RetinaNetCheckpointer(
            model,
            cfg.OUTPUT_DIR,
            allow_new_classes=True,  # fine-tuning from MODEL.WEIGHTS; never when resuming
            trust_weights=trust_weights,
            metadata=checkpoint_metadata(cfg),  # the weights alone are enough to use the model
            trainer=weakref.proxy(self),
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self._ema = self._best_model = None  # MODEL_EMA's and model_best's hooks, if built
        self.register_hooks(self.build_hooks())
        if comm.is_main_process():
            # Room for a checkpoint (weights plus optimizer state: ~2x the weights with SGD,
            # ~3x with AdamW), checked now rather than at the first checkpoint of the run.
            needed = checkpoint_bytes(self.model, self.optimizer)
            if self._ema is not None:  # every checkpoint holds the EMA's weights too
                weights = self._ema.ema.model.state_dict().values()
                needed += sum(t.numel() * t.element_size() for t in weights)
            check_output_dir(cfg.OUTPUT_DIR, min_free_bytes=needed)

    def state_dict(self):
        state = super().state_dict()
        # detectron2 0.6's DefaultTrainer leaves out its inner trainer's state, so the optimizer
        # (SGD momentum, AdamW moments) and AMP's grad scaler restarted on --resume; later
        # versions save it under the same key.
        state.setdefault("_trainer", inner_trainer(self).state_dict())
        state["resume"] = checkpoint_training_state(self, self._gather_training_state)
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if "_trainer" in state:  # idempotent where the base class loaded it already
            inner_trainer(self).load_state_dict(state["_trainer"])
        if "resume" in state:
            load_training_state(state["resume"], self.model, self.data_loader)

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume=resume)
        if isinstance(self.data_loader, ResumableTrainLoader) and self.start_iter:
            # Continue the data stream at the batch the checkpointed run would have read next.
            self.data_loader.start_iter = self.start_iter
            restart_data_iterator(inner_trainer(self))
        final = os.path.join(self.cfg.OUTPUT_DIR, "model_final.pth")
        if (
            self.start_iter >= self.max_iter
            and comm.is_main_process()
            and not os.path.exists(final)
        ):
            # Killed after the last iteration's checkpoint but before model_final was written:
            # no step is left to run, so the periodic checkpointer would never write it.
            logger.info("All %d iterations were done; writing the missing %s", self.max_iter, final)
            self.checkpointer.save("model_final", iteration=self.iter)

    def train(self):
        """detectron2's training, ended early by early stopping (TEST.EARLY_STOPPING_PATIENCE),
        then the weights-only files: ``model_final_weights.pth`` (and ``model_final_ema.pth``
        with MODEL_EMA), the run's metadata beside the weights, no optimizer state."""
        self._last_step = self.start_iter - 1
        results = None
        if self._best_model is not None and self._best_model.patience_exhausted:
            logger.info(
                "Early stopping ended this run at iteration %d; nothing to continue (raise "
                "TEST.EARLY_STOPPING_PATIENCE, or set it to 0, to train on)",
                self._last_step,
            )
        else:
            try:
                results = super().train()
            except EarlyStop:
                results = self._last_eval_results
        if comm.is_main_process():
            info = {"iteration": self._last_step}
            self.checkpointer.save_weights("model_final_weights", self.model, weights_info=info)
            if self._ema is not None:
                ema = {**info, "ema_decay": self._ema.ema.decay}
                self.checkpointer.save_weights(
                    "model_final_ema", self._ema.ema.model, weights_info=ema
                )
        return results

    def after_step(self):
        super().after_step()
        self._last_step = self.iter
        if self._best_model is not None and self._best_model.patience_exhausted:
            best = self._best_model
            logger.info(
                "Early stopping at iteration %d: %d evaluations without a new best %s (best %.4g "
                "at iteration %d, in model_best.pth)",
                self.iter,
                best.evaluations_since_best,
                best.metric,
                best.best_value,
                best.best_iteration,
            )
            if comm.is_main_process():
                self.checkpointer.save("model_final", iteration=self.iter)
            # One past the last iteration run, as detectron2's loop leaves the counter when it
            # completes: its metric printer's last write in after_train counts on it.
            self.iter += 1
            raise EarlyStop()

    def run_step(self):
        try:
            super().run_step()
        except FloatingPointError as e:
            # detectron2's message has the iteration and the loss terms; add where to resume
            # from: a checkpoint of this run (an earlier run's files may be in OUTPUT_DIR too).
            here = os.path.abspath(self.cfg.OUTPUT_DIR)
            ours = [
                path
                for path in self.checkpointer.run_checkpoints
                if os.path.dirname(os.path.abspath(path)) == here
            ]
            resume = (
                f"The last checkpoint of this run, safe to resume from with --resume, is "
                f"{ours[-1]}."
                if ours
                else "This run wrote no checkpoint before it."
            )
            raise TrainingDivergedError(
                f"{e} Training stopped. {resume} Lower SOLVER.BASE_LR or enable "
                "SOLVER.CLIP_GRADIENTS before resuming."
            ) from e

    @classmethod
    def build_model(cls, cfg):
        model = super().build_model(cfg)
        # This trainer honours the keys the model would warn about under detectron2's trainer.
        model.trainer_only_settings = []
        return model

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """detectron2's COCOEvaluator with the COCOeval of TEST.COCO_EVAL_BACKEND."""
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return build_coco_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg):
        """detectron2's loader with the augmentations of INPUT.AUG (none by default)."""
        return build_train_loader(cfg)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """detectron2's test loader, reading images as training and predict read them."""
        return build_test_loader(cfg, dataset_name)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        """detectron2's schedules plus "WarmupPolyLR" and "WarmupExponentialLR"."""
        return build_lr_scheduler(cfg, optimizer)

    def build_hooks(self):
        trainer_hooks = super().build_hooks()
        # detectron2 writes metrics every 20 iterations: a short run gets at least ~20 rows.
        period = max(1, min(20, self.max_iter // 20))
        for hook in trainer_hooks:
            if isinstance(hook, hooks.PeriodicWriter):
                set_writer_period(hook, period)
        # detectron2 evaluates after the checkpoint of the same iteration. Here the EMA update,
        # the evaluation, the best-weights choice and every rank's training state (RNGs the
        # evaluation drew from included) come before the main process's PeriodicCheckpointer
        # (the other ranks have none), so that a checkpoint holds all its iteration did and
        # --resume from it continues exactly.
        trainer_hooks = [h for h in trainer_hooks if not isinstance(h, hooks.EvalHook)]
        writers = (hooks.PeriodicCheckpointer, hooks.PeriodicWriter)
        at = next(
            (i for i, h in enumerate(trainer_hooks) if isinstance(h, writers)), len(trainer_hooks)
        )
        trainer_hooks[at:at] = [*self._evaluation_hooks(), self._gather_training_state]
        # A stop signal ends the run after this iteration's checkpoint (see preemption): after
        # the hooks that change the training state, before the metrics writer (which writes
        # this iteration's metrics when training ends; writing them twice fails in detectron2).
        stop = StopOnSignal(self._gather_training_state, self.cfg.SOLVER.CHECKPOINT_PERIOD)
        writer = [i for i, h in enumerate(trainer_hooks) if isinstance(h, hooks.PeriodicWriter)]
        trainer_hooks.insert(writer[0] if writer else len(trainer_hooks), stop)
        return trainer_hooks

    def _evaluation_hooks(self):
        """MODEL_EMA's hook, detectron2's EvalHook evaluating the model (and the EMA), and the
        hook of model_best.pth and early stopping."""
        cfg = self.cfg
        self._ema = EMAHook(self.model, cfg.MODEL_EMA.DECAY) if cfg.MODEL_EMA.ENABLED else None
        self._best_model = None
        evaluation = [hooks.EvalHook(cfg.TEST.EVAL_PERIOD, self._evaluate)]
        if cfg.TEST.EVAL_PERIOD > 0 and cfg.TEST.BEST_METRIC and cfg.DATASETS.TEST:
            ema = cfg.TEST.BEST_METRIC.startswith(EMA_PREFIX + "/")
            self._best_model = BestModelHook(
                cfg.TEST.EVAL_PERIOD,
                self.checkpointer,
                cfg.TEST.BEST_METRIC,
                self._ema.ema.model if ema else self.model,
                cfg.TEST.EARLY_STOPPING_PATIENCE,
            )
            evaluation.append(self._best_model)
        return ([self._ema] if self._ema is not None else []) + evaluation

    def _evaluate(self):
        """The results of the model and, with MODEL_EMA, of the EMA's weights under "ema"
        (metrics "ema/bbox/AP", ...; its evaluation files in inference/ema/<dataset>)."""
        results = self.test(self.cfg, self.model)
        if self._ema is not None:
            logger.info(
                "Evaluating the EMA of the weights (MODEL_EMA.DECAY %g, %d updates); its metrics "
                "are named %s/<metric>",
                self._ema.ema.decay,
                self._ema.ema.updates,
                EMA_PREFIX,
            )
            folder = os.path.join(self.cfg.OUTPUT_DIR, "inference", EMA_PREFIX)
            evaluators = [
                self.build_evaluator(self.cfg, name, os.path.join(folder, name))
                for name in self.cfg.DATASETS.TEST
            ]
            ema_results = self.test(self.cfg, self._ema.ema.model, evaluators)
            if ema_results:
                results = {**results, EMA_PREFIX: ema_results}
        self._last_eval_results = results
        return results
