"""Prints the environment the plugin runs in: ``python -m retinanet_plugin.env``.

detectron2's own ``collect_env_info`` table (Python, torch, CUDA, detectron2 and where it is
installed), preceded by what a bug report about this plugin needs on top of it: the plugin's
version, detectron2's version, whether detectron2's native ops are present, and which
compatibility patches were applied.
"""

import argparse
import os
import sys
from typing import List, Tuple

from tabulate import tabulate

import retinanet_plugin
from retinanet_plugin import compat


def plugin_env_rows() -> List[Tuple[str, str]]:
    """(name, value) rows describing the plugin and the detectron2 it runs on."""
    import detectron2

    state = compat.apply()
    error = state["native_ops_error"]
    rows = [
        ("retinanet_plugin", retinanet_plugin.__version__),
        ("detectron2", f"{detectron2.__version__} @{os.path.dirname(detectron2.__file__)}"),
        ("detectron2 native ops (_C)", "present" if error is None else f"absent: {error}"),
    ]
    rows += [("compat patch", patch) for patch in state["patches"]] or [("compat patch", "none")]
    return rows


def collect_env() -> str:
    """The full environment report as text."""
    from detectron2.utils.collect_env import collect_env_info

    return tabulate(plugin_env_rows()) + "\n" + collect_env_info()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Print the environment retinanet_plugin runs in.")
    parser.add_argument(
        "--plugin-only", action="store_true", help="only the plugin and detectron2 rows"
    )
    args = parser.parse_args(argv)
    print(tabulate(plugin_env_rows()) if args.plugin_only else collect_env())
    return 0


if __name__ == "__main__":
    sys.exit(main())
