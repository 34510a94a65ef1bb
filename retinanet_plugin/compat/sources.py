"""The installed detectron2's source text, read without importing it.

The adapters decide what the installed detectron2 does by reading its code rather than its
version number (upstream main still calls itself 0.6).
"""

import os

__all__ = ["detectron2_source"]


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
