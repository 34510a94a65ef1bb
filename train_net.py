#!/usr/bin/env python
"""Train and evaluate the plugin's RetinaNet with detectron2's trainer, loaders and evaluator:
detectron2's tools/train_net.py command line plus dataset registration (``--help`` lists the
options; the code is :mod:`retinanet_plugin.cli.train`), for example::

    python train_net.py --config-file configs/retinanet_R50_FPN_1x.yaml --num-gpus 8
    python train_net.py --config-file configs/retinanet_R50_FPN_1x.yaml \\
        --eval-only MODEL.WEIGHTS output/model_final.pth
"""
import sys

from retinanet_plugin.cli import run
from retinanet_plugin.cli.train import main

if __name__ == "__main__":
    sys.exit(run(main))
