"""Prints the environment the plugin runs in: ``python -m retinanet_plugin.env``.

detectron2's own ``collect_env_info`` table (Python, torch, CUDA, detectron2 and where it is
installed), preceded by what a bug report about this plugin needs on top of it: the plugin's
version, detectron2's version, whether detectron2's native ops are present, and, for a
detectron2 built by ``tools/install_detectron2.py``, the source fixes that build has.
"""

import argparse
import importlib.util
import json
import os
import sys
from typing import List, Tuple

from tabulate import tabulate

import retinanet_plugin

# What tools/install_detectron2.py writes into the detectron2 it builds.
BUILD_RECORD = "PURE_PYTHON_BUILD.json"


def plugin_env_rows() -> List[Tuple[str, str]]:
    """(name, value) rows describing the plugin and the detectron2 it runs on."""
    import detectron2

    package = os.path.dirname(detectron2.__file__)
    native = importlib.util.find_spec("detectron2._C") is not None
    rows = [
        ("retinanet_plugin", retinanet_plugin.__version__),
        ("detectron2", f"{detectron2.__version__} @{package}"),
        ("detectron2 native ops (_C)", "present" if native else "absent (pure Python build)"),
    ]
    record = os.path.join(package, BUILD_RECORD)
    if os.path.isfile(record):
        with open(record, encoding="utf-8") as f:
            build = json.load(f)
        rows.append(("detectron2 built from", f"{build['source']} (tools/install_detectron2.py)"))
        rows += [("detectron2 source fix", fix) for fix in build["fixes"]]
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
