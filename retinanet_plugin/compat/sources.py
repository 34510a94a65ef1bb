"""The installed detectron2's source text, read without importing it.

The compat patches decide what to change by reading detectron2's code rather than its version
number (upstream main still calls itself 0.6), and must read it before importing, since
importing is what fails before some patches.
"""

import functools
import os
from typing import Tuple

__all__ = ["detectron2_module_sources", "detectron2_source"]

# Not detectron2's library code: LazyConfig files and the projects' redirect or copies.
_NOT_LIBRARY = ("model_zoo/configs/", "projects/")


def _package_dir() -> str:
    import detectron2

    return os.path.dirname(detectron2.__file__)


def detectron2_source(relative_path: str) -> str:
    """Text of detectron2's source file ``relative_path`` ("" if it does not exist)."""
    path = os.path.join(_package_dir(), relative_path)
    if not os.path.isfile(path):
        return ""
    with open(path, encoding="utf-8") as f:
        return f.read()


@functools.lru_cache(maxsize=None)
def detectron2_module_sources() -> Tuple[Tuple[str, str], ...]:
    """(module name, source text) of every module of detectron2's library code."""
    root = _package_dir()
    found = []
    for directory, subdirectories, files in os.walk(root):
        subdirectories.sort()
        relative_dir = os.path.relpath(directory, root).replace(os.sep, "/")
        if any((relative_dir + "/").startswith(prefix) for prefix in _NOT_LIBRARY):
            continue
        for file_name in sorted(files):
            if not file_name.endswith(".py"):
                continue
            relative_path = file_name if relative_dir == "." else f"{relative_dir}/{file_name}"
            module = "detectron2." + relative_path[: -len(".py")].replace("/", ".")
            if module.endswith(".__init__"):
                module = module[: -len(".__init__")]
            found.append((module, detectron2_source(relative_path)))
    return tuple(found)
