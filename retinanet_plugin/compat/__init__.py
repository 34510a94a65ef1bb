"""The plugin's adapters for detectron2 versions (0.6 and upstream main).

:mod:`.private_api` holds one adapter per private detectron2 name the plugin uses, each with a
clear :class:`Detectron2APIError` if the installed detectron2 lacks it. Nothing here changes
detectron2: the fixes detectron2 0.6 needs on current Python, numpy and Pillow are made where
that detectron2 is built (``tools/install_detectron2.py``), and what the plugin itself needs on
any version lives in its own trainer, launcher and dataset registration.
"""

from .private_api import Detectron2APIError

__all__ = ["Detectron2APIError"]
