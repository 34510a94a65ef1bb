#!/usr/bin/env python
"""Dataset analysis: class counts, box sizes and anchor coverage per level (also the
``retinanet-analyze-dataset`` command).

The code and its options are :mod:`retinanet_plugin.cli.analyze_dataset` (``--help``)."""
import sys

from retinanet_plugin.cli import run
from retinanet_plugin.cli.analyze_dataset import main

if __name__ == "__main__":
    sys.exit(run(main))
