#!/usr/bin/env python
"""Exports a trained RetinaNet to TorchScript or ONNX (also the ``retinanet-export`` command).

The code and its options are :mod:`retinanet_plugin.cli.export` (``--help``)."""
import sys

from retinanet_plugin.cli import run
from retinanet_plugin.cli.export import main

if __name__ == "__main__":
    sys.exit(run(main))
