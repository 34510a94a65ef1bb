"""The training command of ``train_net.py``: detectron2's ``tools/train_net.py`` command line
with dataset registration, checks of the whole command before any work starts, and training or
evaluation in ``--num-gpus`` processes per machine. For example::

    python train_net.py --config-file configs/retinanet_R50_FPN_1x.yaml --num-gpus 8
    python train_net.py --eval-only MODEL.WEIGHTS output/model_final.pth

(``--eval-only`` takes the config stored in a checkpoint the plugin wrote; a ``--config-file``
that builds another network is refused unless ``--ignore-checkpoint-config``)

plus dataset registration (repeatable), after which the names go in DATASETS.TRAIN/TEST::

    --register-coco NAME ANNOTATIONS.json IMAGE_ROOT
    --register-voc NAME VOC_DIR SPLIT        [--voc-classes a,b,c]

MODEL.RETINANET.NUM_CLASSES follows the training dataset unless set. With MODEL.DEVICE cpu,
--num-gpus N starts N CPU processes (gloo). Weight files (MODEL.WEIGHTS, checkpoints to resume
from) may only hold arrays, numbers, strings and containers unless --trust-weights is given.
With --num-machines N the machines wait for each other at --dist-url for up to
$RETINANET_PLUGIN_RENDEZVOUS_TIMEOUT seconds (default 600). Started by torchrun or by srun (one
task per GPU), each process joins the others as the launcher's environment says, without
--num-gpus/--num-machines/--dist-url. SIGTERM, SIGUSR1 or Ctrl-C stop training on every process
after the current iteration, with a checkpoint of it, and exit with status 75; --resume
continues it exactly (automatically when SLURM requeued the job or torchrun restarted it). One
run at a time writes into an OUTPUT_DIR (a second is refused while the first runs); --eval-only
records its config and log in OUTPUT_DIR/inference, beside its results.
"""

import contextlib
import logging
import os
import sys

from torch.multiprocessing import ProcessExitedException

from detectron2.engine import default_argument_parser, default_setup
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..checkpoint.atomic_io import check_output_dir
from ..checkpoint.checkpointer import TRUST_WEIGHTS_HELP, RetinaNetCheckpointer, check_resume
from ..checkpoint.metadata import (
    IGNORE_CONFIG_FLAG,
    IGNORE_CONFIG_HELP,
    config_for_weights,
    sets_key,
)
from ..config.loading import load_config
from ..data import add_dataset_arguments, register_datasets_from_args, resolve_num_classes
from ..engine.cluster import check_cluster_run, cluster_process, restart_count
from ..engine.cpu_memory import keep_freed_memory
from ..engine.launch import launch
from ..engine.preemption import PREEMPTED_EXIT_STATUS, TrainingPreempted, stop_on_signals
from ..engine.run_checks import (
    check_datasets,
    check_device,
    check_device_and_processes,
    check_weights,
    evaluation_dir,
    lock_output_dir,
    prepare_output_dir,
)
from ..engine.trainer import Trainer
from ..errors import UserError
from . import defaults as cli

__all__ = ["argument_parser", "main", "setup", "train_or_evaluate"]

logger = logging.getLogger(__name__)


def build_config(args):
    """The config from the file and trailing KEY VALUE overrides (not frozen, no side effects),
    with the checks that only training needs unless ``--eval-only``. ``--eval-only`` without
    ``--config-file`` takes the config stored in MODEL.WEIGHTS, and refuses a config file that
    builds another network than the one stored there (see ``checkpoint.metadata``)."""
    if args.eval_only:
        return config_for_weights(
            args.config_file,
            args.opts,
            ignore_checkpoint_config=args.ignore_checkpoint_config,
            trust_weights=args.trust_weights,
        )
    if not args.config_file:
        raise UserError(
            "training needs --config-file (e.g. configs/retinanet_R50_FPN_1x.yaml); only "
            "--eval-only can take the config stored in a checkpoint"
        )
    return load_config(args.config_file, args.opts, training=True)


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
        resolve_num_classes(cfg, datasets[0], sets_key(args.config_file, args.opts, key))
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


def train_or_evaluate(args):
    """What every process runs: train (or evaluate) as the options say. With several processes,
    bad input found in them (e.g. in a dataset's records) is printed once, as ``error: ...`` by
    the first process, and every process exits with status 2; training stopped by a signal
    exits every process with :data:`PREEMPTED_EXIT_STATUS`."""
    try:
        return _train_or_evaluate(args)
    except UserError as e:
        if comm.get_world_size() == 1:
            raise  # cli.run reports it
        if comm.get_rank() == 0:
            print(f"error: {cli.one_line(e)}", file=sys.stderr, flush=True)
        sys.exit(2)
    except TrainingPreempted as e:
        if comm.is_main_process():
            logger.warning(
                "Training stopped by a signal after iteration %d, checkpoint %s; --resume "
                "continues it (exit status %d)",
                e.iteration,
                e.checkpoint,
                PREEMPTED_EXIT_STATUS,
            )
        if comm.get_world_size() == 1:
            raise  # main returns the status
        sys.exit(PREEMPTED_EXIT_STATUS)


def _train_or_evaluate(args):
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
    with stop_on_signals():
        trainer.resume_or_load(resume=args.resume or bool(args.resume_from))
        return trainer.train()


def argument_parser():
    parser = default_argument_parser(epilog=__doc__)
    add_dataset_arguments(parser)
    parser.add_argument("--trust-weights", action="store_true", help=TRUST_WEIGHTS_HELP)
    parser.add_argument(IGNORE_CONFIG_FLAG, action="store_true", help=IGNORE_CONFIG_HELP)
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


def _resume_a_restart(args, output_dir: str) -> None:
    """A run that the launcher started again (SLURM requeued the job, torchrun restarted its
    workers) continues OUTPUT_DIR's last checkpoint, as --resume does (or starts from
    MODEL.WEIGHTS, or --resume-from, if it wrote none)."""
    variable, count = restart_count(os.environ)
    if not count or args.eval_only or args.resume:
        return
    if args.resume_from and not os.path.isfile(os.path.join(output_dir, "last_checkpoint")):
        return  # the first start wrote no checkpoint: --resume-from again
    logger.warning(
        "%s=%d: the launcher started this run again; continuing OUTPUT_DIR's last checkpoint, "
        "as --resume does",
        variable,
        count,
    )
    args.resume, args.resume_from = True, ""


def _check_processes(cfg, args, cluster) -> None:
    if cluster is None:
        check_device_and_processes(cfg, args.num_gpus, args.num_machines, args.machine_rank)
        return
    parser = argument_parser()
    options = {
        f"--{name.replace('_', '-')}": (getattr(args, name), parser.get_default(name))
        for name in ("num_gpus", "num_machines", "machine_rank", "dist_url")
    }
    check_cluster_run(cluster, options, cfg.SOLVER.IMS_PER_BATCH, check_device(cfg))


def main(argv=None) -> int:
    """Checks the command (config, datasets, devices, weights, output folder), then trains or
    evaluates in ``--num-gpus`` processes per machine, or in this process when torchrun or srun
    started it. Returns the exit status (:data:`PREEMPTED_EXIT_STATUS` when stopped by a
    signal)."""
    args = cli.parse(argument_parser(), argv)
    cluster = cluster_process(os.environ)
    register_datasets_from_args(args)
    cfg = build_config(args)
    _check_processes(cfg, args, cluster)
    _resume_a_restart(args, cfg.OUTPUT_DIR)
    check_datasets(cfg, args.eval_only)
    check_weights(cfg, args.resume, args.eval_only)
    # Every machine refuses an earlier run's folder; rank 0 (the process, or the launching
    # process of the machine, writing the checkpoints and metrics) holds the folder for the
    # whole run and clears it on --overwrite.
    first = cluster.rank == 0 if cluster else args.machine_rank == 0
    with lock_output_dir(cfg.OUTPUT_DIR) if first else contextlib.nullcontext():
        check_resume(cfg, args)  # before prepare_output_dir may delete files
        if not args.eval_only:
            prepare_output_dir(
                cfg.OUTPUT_DIR, args.resume, args.overwrite, cfg.MODEL.WEIGHTS, remove=first
            )
        print("Command Line Args:", args)
        if cluster:
            print(f"Started by {cluster.launcher}: {cluster.describe()}")
        try:
            launch(
                train_or_evaluate,
                args.num_gpus,
                num_machines=args.num_machines,
                machine_rank=args.machine_rank,
                dist_url=args.dist_url,
                args=(args,),
                device=cfg.MODEL.DEVICE,
                cluster=cluster,
            )
        except TrainingPreempted:
            return PREEMPTED_EXIT_STATUS
        except ProcessExitedException as e:
            # A process reported bad input (see train_or_evaluate), or all stopped at a signal.
            if e.exit_code in (2, PREEMPTED_EXIT_STATUS):
                return e.exit_code
            raise
    return 0
