"""``python -m retinanet_plugin.env``: the environment the plugin runs in
(:mod:`retinanet_plugin.cli.env`)."""

import sys

from retinanet_plugin.cli.env import main

if __name__ == "__main__":
    sys.exit(main())
