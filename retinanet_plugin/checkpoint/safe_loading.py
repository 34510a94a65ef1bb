"""Reading weight files without running code from them.

A pickle can name any importable callable and call it while loading, so unpickling a downloaded
``.pkl`` or ``.pth`` file runs whatever its author chose. detectron2 unpickles ``.pkl`` weights
with :mod:`pickle`; here they go through :class:`RestrictedUnpickler`, which only rebuilds numpy
arrays, numbers, strings, bytes and containers, and ``.pth`` checkpoints go through
``torch.load(weights_only=True)``. Files the user trusts can still be read the usual way
(``--trust-weights``).
"""

import importlib
import pickle
import re
import zipfile
from collections import OrderedDict
from typing import Any, BinaryIO, Dict

import numpy as np
import torch

from ..errors import UserError

__all__ = [
    "ALLOWED_GLOBALS",
    "NotACheckpointError",
    "RestrictedUnpickler",
    "UnsafeCheckpointError",
    "WeightsReadError",
    "load_pickle",
    "load_torch",
]


def _numpy_module(name: str):
    # numpy 2 moved numpy.core to numpy._core; pickles written by either name them their way.
    try:
        return importlib.import_module(f"numpy._core.{name}")
    except ImportError:
        return importlib.import_module(f"numpy.core.{name}")


_multiarray = _numpy_module("multiarray")
_numeric = _numpy_module("numeric")
# What rebuilding numpy arrays, dtypes and scalars needs, under the names numpy 1 and 2 write,
# mapped to the objects themselves (importing numpy.core.* by name warns on numpy 2).
ALLOWED_GLOBALS: Dict[str, Any] = {
    f"numpy.{core}.{module}.{name}": obj
    for core in ("core", "_core")
    for module, name, obj in [
        ("multiarray", "_reconstruct", _multiarray._reconstruct),
        ("multiarray", "scalar", _multiarray.scalar),
        ("numeric", "_frombuffer", _numeric._frombuffer),  # pickle protocol 5 arrays
    ]
}
ALLOWED_GLOBALS.update(
    {
        "numpy.ndarray": np.ndarray,
        "numpy.dtype": np.dtype,
        "collections.OrderedDict": OrderedDict,
        # Pickle protocols 0-2 have no bytes opcode: they write bytes as _codecs.encode(str).
        "_codecs.encode": importlib.import_module("_codecs").encode,
    }
)


class UnsafeCheckpointError(UserError, pickle.UnpicklingError):
    """A weights file refers to a global outside the allow-list, so loading it could run code.

    Args:
        filename: the file.
        forbidden: the global(s) it refers to, as ``module.name``.
    """

    def __init__(self, filename: str, forbidden: str):
        super().__init__(
            f"Refusing to load {filename}: it refers to {forbidden}, which is not allowed in a "
            "weights file (loading it could run arbitrary code). If you trust the file, pass "
            "--trust-weights."
        )
        self.filename = filename
        self.forbidden = forbidden


class NotACheckpointError(UserError, ValueError):
    """A weights file is not a checkpoint of the expected kind (not a pickle, or not a dict)."""


class WeightsReadError(UserError, OSError):
    """A weights file that cannot be read at all (permissions, a folder, an I/O error)."""

    def __init__(self, filename: str, error: OSError):
        super().__init__(
            error.errno,
            f"cannot read {filename}: {error.strerror or error}; check the path and its "
            "permissions",
        )
        self.filename = filename

    def __str__(self) -> str:
        return self.args[1]


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only the globals of :data:`ALLOWED_GLOBALS`.

    Args:
        file: binary file to read.
        filename: named in the error when a forbidden global is found.
        kwargs: as ``pickle.Unpickler`` (e.g. ``encoding``).
    """

    def __init__(self, file: BinaryIO, filename: str, **kwargs):
        super().__init__(file, **kwargs)
        self.filename = filename

    def find_class(self, module: str, name: str):
        allowed = ALLOWED_GLOBALS.get(f"{module}.{name}")
        if allowed is None:
            raise UnsafeCheckpointError(self.filename, f"{module}.{name}")
        return allowed


def load_pickle(file: BinaryIO, *, filename: str, encoding: str = "latin1") -> dict:
    """Unpickles a ``.pkl`` weights file with :class:`RestrictedUnpickler`.

    Args:
        file: the open file.
        filename: named in errors.
        encoding: for ``str`` written by Python 2 (detectron2 reads its model zoo with latin1).

    Returns:
        the unpickled dict.

    Raises:
        UnsafeCheckpointError: the file refers to a global outside the allow-list.
        NotACheckpointError: the file is not a pickle of a dict.
    """
    expected = "a pickled dict of numpy arrays (detectron2 / Detectron model zoo format)"
    try:
        data = RestrictedUnpickler(file, filename, encoding=encoding).load()
    except UnsafeCheckpointError:
        raise
    except OSError as e:  # the file could not be read (a pickle error is about its content)
        raise WeightsReadError(filename, e) from e
    except Exception as e:  # what malformed input raises varies: UnpicklingError, EOFError, ...
        raise NotACheckpointError(
            f"{filename} is not a weights file: expected {expected} ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(data, dict):
        raise NotACheckpointError(
            f"{filename} is not a weights file: expected {expected}, got {type(data).__name__}"
        )
    return data


def load_torch(filename: str, *, trust: bool = False, mmap: bool = False) -> dict:
    """Loads a ``torch.save`` checkpoint on the CPU, with ``weights_only=True`` unless trusted.

    Passing ``weights_only`` explicitly also keeps the environment variable
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` from turning the check off.

    Args:
        filename: the file.
        trust: unpickle arbitrary objects (runs code from the file).
        mmap: map the tensors' data into memory instead of reading it (zip checkpoints, which
            ``torch.save`` writes; others are read), for looking at names and shapes.

    Returns:
        the loaded dict.

    Raises:
        UnsafeCheckpointError: the file refers to globals that weights-only loading refuses.
        NotACheckpointError: the file is not a ``torch.save`` file of a dict.
    """
    try:
        data = torch.load(
            filename,
            map_location=torch.device("cpu"),
            weights_only=not trust,
            mmap=mmap and zipfile.is_zipfile(filename),
        )
    except pickle.UnpicklingError as e:
        # torch raises UnpicklingError both for forbidden globals and for malformed files; only
        # the former have globals to name.
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(filename)
        except Exception:  # not a zip checkpoint (or not a checkpoint): torch cannot list them
            unsafe = re.findall(r"GLOBAL ([\w.]+)", str(e))[:1]
        if unsafe:
            raise UnsafeCheckpointError(filename, ", ".join(unsafe)) from None
        raise _not_a_torch_checkpoint(filename, e) from None
    except OSError as e:  # the file could not be read (a pickle error is about its content)
        raise WeightsReadError(filename, e) from e
    except Exception as e:  # what malformed input raises varies: EOFError, RuntimeError, ...
        raise _not_a_torch_checkpoint(filename, e) from None
    if not isinstance(data, dict):
        raise _not_a_torch_checkpoint(filename, f"it holds a {type(data).__name__}")
    return data


_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def _not_a_torch_checkpoint(filename: str, reason) -> NotACheckpointError:
    if isinstance(reason, Exception):
        # Drop the paragraphs torch wraps around weights_only failures: they do not apply here.
        lines = [
            line
            for line in str(reason).splitlines()
            if line.strip() and not line.startswith(_TORCH_BOILERPLATE)
        ]
        reason = f"{type(reason).__name__}: {' '.join(lines)}"
    return NotACheckpointError(
        f"{filename} is not a weights file: expected a torch.save checkpoint (a dict of tensors, "
        f"e.g. model_final.pth) or a .pkl detectron2 model zoo file ({reason})"
    )
