#!/usr/bin/env python
"""Train and evaluate the plugin's RetinaNet with detectron2's trainer, loaders and evaluator.

The same command line as detectron2's tools/train_net.py, for example::

    python train_net.py --config-file configs/retinanet_R50_FPN_1x.yaml --num-gpus 8
    python train_net.py --config-file configs/retinanet_R50_FPN_1x.yaml \\
        --eval-only MODEL.WEIGHTS output/model_final.pth
    python train_net.py --config-file configs/retinanet_R18_GN_tiny.yaml \\
        --register-coco shapes_train data/train.json data/train \\
        DATASETS.TRAIN "('shapes_train',)" MODEL.DEVICE cpu

plus ``--register-coco NAME JSON IMAGE_ROOT`` (repeatable) to register COCO-format datasets.
"""
import logging
import os

import retinanet_plugin  # noqa: F401  (applies detectron2 compat patches, registers components)
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.evaluation import COCOEvaluator, verify_results
from retinanet_plugin import add_retinanet_config
from retinanet_plugin.data import register_coco_dataset

logger = logging.getLogger("retinanet_plugin.train_net")


class Trainer(DefaultTrainer):
    """detectron2's DefaultTrainer with COCO evaluation of every test dataset."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return COCOEvaluator(dataset_name, output_dir=output_folder)


def setup(args):
    """Builds the config from the file and the trailing KEY VALUE overrides."""
    cfg = get_cfg()
    add_retinanet_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if cfg.TEST.AUG.ENABLED:
        raise ValueError("TEST.AUG.ENABLED: test-time augmentation is not implemented for RetinaNet")
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def register_datasets(args):
    for name, json_file, image_root in args.register_coco or ():
        register_coco_dataset(name, json_file, image_root)


def main(args):
    # Every process (one per GPU) needs the datasets registered.
    register_datasets(args)
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        results = Trainer.test(cfg, model)
        verify_results(cfg, results)
        return results
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def argument_parser():
    parser = default_argument_parser(epilog=__doc__)
    parser.add_argument(
        "--register-coco",
        nargs=3,
        action="append",
        metavar=("NAME", "JSON", "IMAGE_ROOT"),
        help="register a COCO-format dataset under NAME (repeatable)",
    )
    return parser


if __name__ == "__main__":
    args = argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
