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
        self.register_hooks(self.build_hooks())
        if comm.is_main_process():
            # Room for a checkpoint (weights plus optimizer state: ~2x the weights with SGD,
            # ~3x with AdamW), checked now rather than at the first checkpoint of the run.
            needed = checkpoint_bytes(self.model, self.optimizer)
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
        # Every rank gathers its training state before the main process's PeriodicCheckpointer
        # (which follows the LR scheduler's hook; the other ranks have none) writes it.
        after = next(i for i, h in enumerate(trainer_hooks) if isinstance(h, hooks.LRScheduler))
        trainer_hooks.insert(after + 1, self._gather_training_state)
        # A stop signal ends the run after this iteration's checkpoint (see preemption): after
        # the hooks that change the training state, before the metrics writer (which writes
        # this iteration's metrics when training ends; writing them twice fails in detectron2).
        stop = StopOnSignal(self._gather_training_state, self.cfg.SOLVER.CHECKPOINT_PERIOD)
        writer = [i for i, h in enumerate(trainer_hooks) if isinstance(h, hooks.PeriodicWriter)]
        trainer_hooks.insert(writer[0] if writer else len(trainer_hooks), stop)
        return trainer_hooks
