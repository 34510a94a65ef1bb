#!/usr/bin/env python
"""Train and evaluate the plugin's RetinaNet with detectron2's trainer, loaders and evaluator.

detectron2's tools/train_net.py command line, for example::

    python train_net.py --config-file configs/retinanet_R50_FPN_1x.yaml --num-gpus 8
    python train_net.py --config-file configs/retinanet_R50_FPN_1x.yaml \\
        --eval-only MODEL.WEIGHTS output/model_final.pth

plus dataset registration (repeatable), after which the names go in DATASETS.TRAIN/TEST::

    --register-coco NAME ANNOTATIONS.json IMAGE_ROOT
    --register-voc NAME VOC_DIR SPLIT        [--voc-classes a,b,c]

MODEL.RETINANET.NUM_CLASSES follows the training dataset unless set. With MODEL.DEVICE cpu,
--num-gpus N starts N CPU processes (gloo). Weight files (MODEL.WEIGHTS, checkpoints to resume
from) may only hold arrays, numbers, strings and containers unless --trust-weights is given.
With --num-machines N the machines wait for each other at --dist-url for up to
$RETINANET_PLUGIN_RENDEZVOUS_TIMEOUT seconds (default 600). One run at a time writes into an
OUTPUT_DIR (a second is refused while the first runs); --eval-only records its config and log
in OUTPUT_DIR/inference, beside its results.
"""
import contextlib
import logging
import os
import sys
import weakref

from torch.multiprocessing import ProcessExitedException

import retinanet_plugin  # noqa: F401  (registers the plugin's components)
from detectron2.engine import (
    AMPTrainer,
    DefaultTrainer,
    SimpleTrainer,
    TrainerBase,
    create_ddp_model,
    default_argument_parser,
    default_setup,
    hooks,
)
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from retinanet_plugin import cli
from retinanet_plugin.atomic_io import check_output_dir
from retinanet_plugin.checkpoint import TRUST_WEIGHTS_HELP, RetinaNetCheckpointer, check_resume
from retinanet_plugin.compat.private_api import (
    inner_trainer,
    restart_data_iterator,
    set_writer_period,
)
from retinanet_plugin.config_io import config_sets_key, load_config
from retinanet_plugin.cpu_memory import keep_freed_memory
from retinanet_plugin.data import (
    add_dataset_arguments,
    build_test_loader,
    build_train_loader,
    register_datasets_from_args,
    resolve_num_classes,
)
from retinanet_plugin.data.resumable import ResumableTrainLoader
from retinanet_plugin.errors import UserError
from retinanet_plugin.evaluation import build_coco_evaluator
from retinanet_plugin.launch import launch
from retinanet_plugin.resume import (
    GatherTrainingState,
    checkpoint_training_state,
    load_training_state,
)
from retinanet_plugin.run_checks import (
    check_datasets,
    check_device_and_processes,
    check_weights,
    checkpoint_bytes,
    evaluation_dir,
    lock_output_dir,
    prepare_output_dir,
)
from retinanet_plugin.solver import build_lr_scheduler, build_optimizer

logger = logging.getLogger("retinanet_plugin.train_net")


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
        return trainer_hooks


def build_config(args):
    """The config from the file and trailing KEY VALUE overrides (not frozen, no side effects),
    with the checks that only training needs unless ``--eval-only``."""
    return load_config(args.config_file, args.opts, training=not args.eval_only)


class _UserErrorsInOneLine(logging.Filter):
    """Drops the traceback that detectron2's training loop logs ("Exception during training:")
    for bad input (a :class:`UserError`, e.g. a full disk at a checkpoint), which the command
    line reports in one line (``--debug`` shows the traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], UserError))


def setup(args):
    """The frozen config, with the loggers set up and the config recorded by detectron2's
    ``default_setup``: in OUTPUT_DIR for training, in OUTPUT_DIR/inference for ``--eval-only``
    (beside its results, not over the config.yaml of a training run in OUTPUT_DIR; the recorded
    copy's OUTPUT_DIR is that folder)."""
    cfg = build_config(args)
    if comm.is_main_process():
        check_output_dir(cfg.OUTPUT_DIR)  # fail now, not at the first checkpoint
    record_dir = evaluation_dir(cfg.OUTPUT_DIR) if args.eval_only else cfg.OUTPUT_DIR
    setup_logger(record_dir, distributed_rank=comm.get_rank(), name="retinanet_plugin")
    datasets = cfg.DATASETS.TEST if args.eval_only else cfg.DATASETS.TRAIN
    if datasets:
        key = "MODEL.RETINANET.NUM_CLASSES"
        resolve_num_classes(cfg, datasets[0], config_sets_key(args.config_file, args.opts, key))
    cfg.freeze()
    record = cfg
    if args.eval_only:
        record = cfg.clone()
        record.defrost()
        record.OUTPUT_DIR = record_dir
    default_setup(record, args)
    train_loop = logging.getLogger("detectron2.engine.train_loop")
    if not any(isinstance(f, _UserErrorsInOneLine) for f in train_loop.filters):
        train_loop.addFilter(_UserErrorsInOneLine())
    return cfg


def run(args):
    """What every process runs: train (or evaluate) as the options say. With several processes,
    bad input found in them (e.g. in a dataset's records) is printed once, as ``error: ...`` by
    the first process, and every process exits with status 2."""
    try:
        return _run(args)
    except UserError as e:
        if comm.get_world_size() == 1:
            raise  # cli.run reports it
        if comm.get_rank() == 0:
            print(f"error: {cli.one_line(e)}", file=sys.stderr, flush=True)
        sys.exit(2)


def _run(args):
    register_datasets_from_args(args)  # spawned processes start without the registrations
    cfg = setup(args)
    if cfg.MODEL.DEVICE == "cpu":
        logger.info("CPU: %s", keep_freed_memory())
    if args.eval_only:
        model = Trainer.build_model(cfg)
        checkpointer = RetinaNetCheckpointer(
            model, save_dir=cfg.OUTPUT_DIR, trust_weights=args.trust_weights
        )
        checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        results = Trainer.test(cfg, model)
        verify_results(cfg, results)
        return results
    trainer = Trainer(cfg, trust_weights=args.trust_weights)
    # --resume-from: continued as --resume continues OUTPUT_DIR's last checkpoint.
    trainer.checkpointer.resume_from = args.resume_from
    trainer.resume_or_load(resume=args.resume or bool(args.resume_from))
    return trainer.train()


def argument_parser():
    parser = default_argument_parser(epilog=__doc__)
    add_dataset_arguments(parser)
    parser.add_argument("--trust-weights", action="store_true", help=TRUST_WEIGHTS_HELP)
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run in an OUTPUT_DIR that holds an earlier one, deleting its "
        "checkpoints, metrics and events (default: refuse; --resume continues it instead)",
    )
    parser.add_argument(
        "--resume-from",
        metavar="PATH",
        default="",
        help="continue training from the checkpoint PATH exactly (its iteration, optimizer, LR "
        "schedule, data stream, RNGs), writing into a new OUTPUT_DIR (--resume continues "
        "OUTPUT_DIR's own last checkpoint)",
    )
    parser.add_argument(cli.DEBUG_FLAG, action="store_true", help=cli.DEBUG_HELP)
    return parser


def main(argv=None) -> int:
    """Checks the command (config, datasets, devices, weights, output folder), then trains or
    evaluates in ``--num-gpus`` processes per machine."""
    args = cli.parse(argument_parser(), argv)
    register_datasets_from_args(args)
    cfg = build_config(args)
    check_device_and_processes(cfg, args.num_gpus, args.num_machines, args.machine_rank)
    check_datasets(cfg, args.eval_only)
    check_weights(cfg, args.resume, args.eval_only)
    # Every machine refuses an earlier run's folder; machine rank 0 (the one writing the
    # checkpoints and metrics) holds the folder for the whole run and clears it on --overwrite.
    first = args.machine_rank == 0
    with lock_output_dir(cfg.OUTPUT_DIR) if first else contextlib.nullcontext():
        check_resume(cfg, args)  # before prepare_output_dir may delete files
        if not args.eval_only:
            prepare_output_dir(
                cfg.OUTPUT_DIR, args.resume, args.overwrite, cfg.MODEL.WEIGHTS, remove=first
            )
        print("Command Line Args:", args)
        try:
            launch(
                run,
                args.num_gpus,
                num_machines=args.num_machines,
                machine_rank=args.machine_rank,
                dist_url=args.dist_url,
                args=(args,),
                device=cfg.MODEL.DEVICE,
            )
        except ProcessExitedException as e:
            if e.exit_code == 2:  # a process reported bad input (see run)
                return 2
            raise
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
