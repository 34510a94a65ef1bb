"""Clear errors for detectron2's native (C++/CUDA) ops when the installed build lacks them.

RetinaNet needs none of detectron2's native ops (rotated boxes, deformable convolution, the fast
COCO evaluation); a pure-Python detectron2 (``tools/install_detectron2.py``) runs the plugin
fully. Code that does call such an op gets :class:`MissingNativeOpError` naming the op, never a
fake result. detectron2 reaches its ops in two ways, and each is covered only where needed:

* ``from detectron2 import _C`` at module level (detectron2 0.6's ``detectron2.layers``), which
  fails at import: a stand-in ``detectron2._C`` module is installed. Upstream fixed this after
  0.6 (commit 710e7795, 2022-01-25, "Make detectron2 usable without building C extensions"), so
  a newer detectron2 gets no stand-in.
* ``torch.ops.detectron2.<op>`` (rotated NMS in 0.6; on upstream main also rotated IoU and
  ROIAlign), which raises a bare AttributeError when the op was never registered: the modules
  doing this get a ``torch`` whose ``ops.detectron2`` raises :class:`MissingNativeOpError` for
  each unregistered op (registered ones are torch's own).
"""

import importlib
import importlib.machinery
import importlib.util
import re
import sys
import types
from typing import Dict, List, Optional

import torch

from .sources import detectron2_module_sources

__all__ = ["MissingNativeOpError", "native_ops_error"]

_HOW_TO_GET_NATIVE_OPS = (
    "This detectron2 was installed without its C++/CUDA extension (detectron2._C), e.g. by "
    "tools/install_detectron2.py. RetinaNet does not need it; to use this op, build detectron2 "
    "from source with its native ops: "
    "https://detectron2.readthedocs.io/en/latest/tutorials/install.html"
)


class MissingNativeOpError(RuntimeError):
    """Raised when code calls a detectron2 native op that the installed build lacks."""


class _MissingNativeOps(types.ModuleType):
    """Stand-in for a namespace of detectron2 native ops: every op raises a clear error.

    Args:
        name: the namespace it stands in for (``detectron2._C`` or ``torch.ops.detectron2``).
        reason: why the native ops are missing, for the error message.
        registered: the real namespace, whose ops (if any are registered) are returned as is.
    """

    # Build-information queries made by detectron2.utils.collect_env; answered truthfully.
    _BUILD_INFO = {
        "get_compiler_version": lambda: "not built (detectron2 without native ops)",
        "get_cuda_version": lambda: "not built (detectron2 without native ops)",
        "has_cuda": lambda: False,
    }

    def __init__(self, name: str, reason: str, registered: Optional[object] = None):
        super().__init__(name, "Stand-in for detectron2's missing native ops.")
        # A spec without origin, so importlib.util.find_spec("detectron2._C") answers.
        self.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
        self._reason = reason
        self._registered = registered

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        if self._registered is not None and hasattr(self._registered, name):
            return getattr(self._registered, name)
        if self._registered is None and name in self._BUILD_INFO:
            return self._BUILD_INFO[name]

        def missing_op(*args, **kwargs):
            raise MissingNativeOpError(
                f"detectron2 native op '{name}' is not available ({self._reason}). "
                + _HOW_TO_GET_NATIVE_OPS
            )

        return missing_op


class _TorchOps:
    """``torch.ops`` with the ``detectron2`` namespace replaced by a stand-in."""

    def __init__(self, detectron2_ops: _MissingNativeOps):
        self.detectron2 = detectron2_ops

    def __getattr__(self, name: str):
        return getattr(torch.ops, name)


class _TorchWithNativeOpsStandIn(types.ModuleType):
    """The ``torch`` of one detectron2 module: torch itself but for ``torch.ops.detectron2``;
    torch is left alone for everyone else."""

    def __init__(self, reason: str):
        super().__init__("torch", "torch with a stand-in for torch.ops.detectron2")
        self.ops = _TorchOps(
            _MissingNativeOps("torch.ops.detectron2", reason, registered=torch.ops.detectron2)
        )

    def __getattr__(self, name: str):
        return getattr(torch, name)


def native_ops_error() -> Optional[str]:
    """Returns why ``detectron2._C`` cannot be used, or None if it loads (loading it also
    registers its ``torch.ops.detectron2`` ops)."""
    if importlib.util.find_spec("detectron2._C") is None:
        return "detectron2._C is not installed"
    try:
        importlib.import_module("detectron2._C")
    except ImportError as e:
        return f"detectron2._C failed to load: {e}"
    return None


# `from detectron2 import _C` at the start of a line, i.e. at module level outside any try block.
_UNGUARDED_C_IMPORT = re.compile(r"^(from detectron2 import _C\b|import detectron2\._C\b)", re.M)
_TORCH_OPS_USE = re.compile(r"\btorch\.ops\.detectron2\.(\w+)")


def _imported_unguarded(module: str, sources: Dict[str, str]) -> bool:
    """Whether some detectron2 module imports ``module`` at module level outside a try block,
    so that a failure to import it fails that module too."""
    package, short = module.rsplit(".", 1)
    absolute = [
        rf"^from {re.escape(module)} import ",
        rf"^import {re.escape(module)}\b",
        rf"^from {re.escape(package)} import [^\n]*\b{short}\b",
    ]
    relative = [rf"^from \.{short} import ", rf"^from \. import [^\n]*\b{short}\b"]
    for importer, source in sources.items():
        # `importer` is a package (its __init__) or a module of one; either way relative imports
        # in it resolve against `package` if one of these holds.
        same_package = package in (importer, importer.rsplit(".", 1)[0])
        patterns = absolute + relative if same_package else absolute
        if any(re.search(pattern, source, re.M) for pattern in patterns):
            return True
    return False


def install_c_stand_in(reason: str) -> Optional[str]:
    """Installs the ``detectron2._C`` stand-in if importing detectron2 would fail without it: a
    module imports ``_C`` unguarded and is itself imported unguarded by another (detectron2
    0.6's ``detectron2.layers``). Returns what was done, or None."""
    sources = dict(detectron2_module_sources())
    importers = [name for name, source in sources.items() if _UNGUARDED_C_IMPORT.search(source)]
    failing = [name for name in importers if _imported_unguarded(name, sources)]
    if not failing:
        return None
    import detectron2

    stand_in = _MissingNativeOps("detectron2._C", reason)
    sys.modules["detectron2._C"] = stand_in
    detectron2._C = stand_in
    return (
        f"detectron2._C stand-in (native ops raise MissingNativeOpError; imported by "
        f"{', '.join(failing)})"
    )


def install_torch_ops_stand_in(reason: str) -> List[str]:
    """Gives each detectron2 module that calls an unregistered ``torch.ops.detectron2`` op a
    ``torch`` whose ``ops.detectron2`` raises :class:`MissingNativeOpError` for it. Returns what
    was done."""
    done = []
    for module_name, source in detectron2_module_sources():
        ops = sorted(set(_TORCH_OPS_USE.findall(source)))
        missing = [op for op in ops if not hasattr(torch.ops.detectron2, op)]
        if not missing:
            continue
        module = importlib.import_module(module_name)
        module.torch = _TorchWithNativeOpsStandIn(reason)
        done.append(f"{module_name}: torch.ops.detectron2.{{{', '.join(missing)}}} stand-in")
    return done


def stand_in_namespaces() -> Dict[str, object]:
    """The stand-ins in use, by what they replace (for tests and the environment report)."""
    found = {}
    c_module = sys.modules.get("detectron2._C")
    if isinstance(c_module, _MissingNativeOps):
        found["detectron2._C"] = c_module
    for module_name, _ in detectron2_module_sources():
        module = sys.modules.get(module_name)
        if isinstance(getattr(module, "torch", None), _TorchWithNativeOpsStandIn):
            found[f"{module_name}.torch.ops.detectron2"] = module.torch.ops.detectron2
    return found
