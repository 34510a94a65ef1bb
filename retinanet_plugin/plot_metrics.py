"""``python -m retinanet_plugin.plot_metrics``: plots of a run's metrics.json
(:mod:`retinanet_plugin.cli.plot_metrics`)."""

import sys

from retinanet_plugin.cli import run
from retinanet_plugin.cli.plot_metrics import main

if __name__ == "__main__":
    sys.exit(run(main))
