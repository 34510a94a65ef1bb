"""``python -m retinanet_plugin.predict``: annotated pictures and COCO results for images
(:mod:`retinanet_plugin.cli.predict`)."""

import sys

from retinanet_plugin.cli import run
from retinanet_plugin.cli.predict import main

if __name__ == "__main__":
    sys.exit(run(main))
