#!/usr/bin/env python
"""Trains or evaluates a LazyConfig (``.py``, e.g. ``configs/lazy/retinanet_R50_FPN_1x.py``) as
detectron2's ``tools/lazyconfig_train_net.py`` does, with the plugin's dataset registration and
checkpointer. The code and its options are :mod:`retinanet_plugin.cli.lazy_train` (``--help``)."""
import sys

from retinanet_plugin.cli import run
from retinanet_plugin.cli.lazy_train import main

if __name__ == "__main__":
    sys.exit(run(main))
