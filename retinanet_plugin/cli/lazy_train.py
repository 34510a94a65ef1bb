"""The training command for LazyConfig (``.py``) configs, ``tools/lazyconfig_train_net.py``:
detectron2's ``tools/lazyconfig_train_net.py`` (the same config sections: ``model``,
``dataloader``, ``optimizer``, ``lr_multiplier``, ``train``; the same ``key=value`` overrides)
with the plugin's dataset registration and checkpointer. For example::

    python tools/lazyconfig_train_net.py --config-file configs/lazy/retinanet_R18_GN_tiny.py \\
        --register-coco shapes_train train.json images/ \\
        dataloader.train.dataset.names=shapes_train train.max_iter=100

Differences from detectron2's script: ``--register-coco`` / ``--register-voc``, as
``train_net.py``; ``model.num_classes`` follows the training dataset unless set on the command
line; weights (``train.init_checkpoint``) load through ``RetinaNetCheckpointer`` (safe loading
unless ``--trust-weights``, fine-tuning to other classes); CPU processes (``train.device``
"cpu", ``--num-gpus N``) train in DistributedDataParallel. YAML configs train with
``train_net.py``.
"""

import logging

from detectron2.config import LazyConfig, instantiate
from detectron2.engine import (
    AMPTrainer,
    SimpleTrainer,
    default_argument_parser,
    default_setup,
    default_writers,
    hooks,
)
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..checkpoint.checkpointer import TRUST_WEIGHTS_HELP, RetinaNetCheckpointer
from ..data import add_dataset_arguments, dataset_class_names, register_datasets_from_args
from ..engine.launch import launch
from ..errors import UserError
from . import defaults as cli

__all__ = ["argument_parser", "main", "train_or_evaluate"]

logger = logging.getLogger(__name__)


def _evaluate(cfg, model):
    """detectron2's evaluation of a LazyConfig: ``dataloader.test`` with
    ``dataloader.evaluator`` (if the config has one)."""
    if "evaluator" not in cfg.dataloader:
        return {}
    results = inference_on_dataset(
        model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
    )
    print_csv_format(results)
    return results


def _ddp(cfg, model):
    """The model in DistributedDataParallel with ``train.ddp``'s options; a CPU model without
    ``device_ids`` (which detectron2 always passes and DDP rejects for CPU modules)."""
    options = dict(cfg.train.get("ddp", {}))
    if cfg.train.device == "cpu":
        options["device_ids"] = None
    return create_ddp_model(model, **options)


def _load_config(args):
    """The LazyConfig of ``--config-file`` with the ``key=value`` overrides."""
    if not args.config_file.endswith(".py"):
        raise UserError(
            f"--config-file {args.config_file}: a LazyConfig is a .py file (e.g. "
            "configs/lazy/retinanet_R50_FPN_1x.py); YAML configs train with train_net.py"
        )
    return LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)


def _follow_dataset_classes(cfg, args) -> None:
    """Sets ``model.num_classes`` to the number of classes of the (first) training dataset, of
    the test dataset with ``--eval-only``, unless an override sets it."""
    if any(o.split("=", 1)[0] == "model.num_classes" for o in args.opts):
        return
    names = (cfg.dataloader.test if args.eval_only else cfg.dataloader.train).dataset.names
    name = names if isinstance(names, str) else names[0]
    classes = dataset_class_names(name)
    if cfg.model.num_classes != len(classes):
        logger.info("model.num_classes set to %d, the classes of dataset %r", len(classes), name)
        cfg.model.num_classes = len(classes)


def train_or_evaluate(args):
    """What every process runs: trains as ``cfg.train`` says, or evaluates
    ``train.init_checkpoint`` with ``--eval-only``."""
    register_datasets_from_args(args)  # spawned processes start without the registrations
    cfg = _load_config(args)
    default_setup(cfg, args)
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="retinanet_plugin")
    _follow_dataset_classes(cfg, args)
    model = instantiate(cfg.model).to(cfg.train.device)
    if args.eval_only:
        RetinaNetCheckpointer(_ddp(cfg, model), trust_weights=args.trust_weights).load(
            cfg.train.init_checkpoint
        )
        return _evaluate(cfg, model)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    model = _ddp(cfg, model)
    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(
        model, instantiate(cfg.dataloader.train), optimizer
    )
    checkpointer = RetinaNetCheckpointer(
        model,
        cfg.train.output_dir,
        allow_new_classes=True,  # fine-tuning from train.init_checkpoint; never when resuming
        trust_weights=args.trust_weights,
        optimizer=optimizer,
        trainer=trainer,
    )
    main_process = comm.is_main_process()
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            (
                hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
                if main_process
                else None
            ),
            hooks.EvalHook(cfg.train.eval_period, lambda: _evaluate(cfg, model)),
            (
                hooks.PeriodicWriter(
                    default_writers(cfg.train.output_dir, cfg.train.max_iter),
                    period=cfg.train.log_period,
                )
                if main_process
                else None
            ),
        ]
    )
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    # A checkpoint stores the iteration that finished: resuming starts at the next.
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)


def argument_parser():
    parser = default_argument_parser(epilog=__doc__)
    add_dataset_arguments(parser)
    parser.add_argument("--trust-weights", action="store_true", help=TRUST_WEIGHTS_HELP)
    parser.add_argument(cli.DEBUG_FLAG, action="store_true", help=cli.DEBUG_HELP)
    return parser


def main(argv=None) -> int:
    """Trains or evaluates a LazyConfig in ``--num-gpus`` processes per machine."""
    args = cli.parse(argument_parser(), argv)
    register_datasets_from_args(args)
    device = _load_config(args).train.device  # bad input fails before any process starts
    launch(
        train_or_evaluate,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
        device=device,
    )
    return 0
