"""Crash-safe file writes: a kill or a full disk at any moment leaves the previous file intact.

A file is written to a temporary file in the same directory, flushed and fsync-ed, then renamed
over the target (``os.replace`` is atomic on POSIX and Windows within one file system), and the
directory entry is fsync-ed. Readers therefore see either the old file or the complete new one,
never a truncated one.

Paths of other storage that detectron2's ``PathManager`` handles (``s3://``, ``manifold://``, ...)
have no rename; they are written through ``PathManager`` directly, as detectron2 writes them.
"""

import contextlib
import os
import re
import shutil
import tempfile
from typing import IO, Iterator, List

from detectron2.utils.file_io import PathManager

from ..errors import UserError

__all__ = [
    "OutputDirError",
    "atomic_write",
    "check_output_dir",
    "is_local_path",
    "remove_leftover_temp_files",
]

# "scheme://" of a path that PathManager opens with another handler than the local disk's.
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_local_path(path: str) -> bool:
    """Whether ``path`` is on the local file system (not ``s3://``, ``manifold://``, ...)."""
    return not _URI.match(path) or path.startswith("file://")


TEMP_SUFFIX = ".tmp"
# The name of atomic_write's temporary file: "." + the target's name + "." + mkstemp's 8 random
# characters + TEMP_SUFFIX.
_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}" + re.escape(TEMP_SUFFIX) + "$")


class OutputDirError(UserError, OSError):
    """The output directory cannot take the run's files (not writable, or too little space)."""


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb") -> Iterator[IO]:
    """Opens a temporary file that replaces ``path`` when the ``with`` block completes.

    If the block raises (including ``OSError`` for a full disk), the temporary file is removed
    and ``path`` is untouched. A process killed mid-write leaves at most a hidden
    ``.<name>.<random>.tmp`` file next to ``path``.

    Args:
        path: the file to write; a non-local path (see :func:`is_local_path`) is written with
            ``PathManager`` instead, without the guarantee.
        mode: "wb" or "w".

    Yields:
        the open temporary file.
    """
    if not is_local_path(path):
        with PathManager.open(path, mode) as f:
            yield f
        return
    directory = os.path.dirname(os.path.abspath(path))
    fd, temp_path = tempfile.mkstemp(
        prefix=f".{os.path.basename(path)}.", suffix=TEMP_SUFFIX, dir=directory
    )
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes the file private (0600); give it the mode open() gives other outputs.
        os.chmod(temp_path, 0o666 & ~_current_umask())
        os.replace(temp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temp_path)
        raise
    _fsync_directory(directory)


def remove_leftover_temp_files(directory: str) -> List[str]:
    """Removes the temporary files that processes killed inside :func:`atomic_write` left in
    ``directory`` (not in its sub-folders); no other file is touched.

    Only call this while no other process writes into ``directory`` (e.g. holding its run lock):
    a running write's temporary file looks the same.

    Returns:
        The paths removed.
    """
    if not is_local_path(directory) or not os.path.isdir(directory):
        return []
    removed = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if _TEMP_NAME.match(name) and os.path.isfile(path) and not os.path.islink(path):
            os.remove(path)
            removed.append(path)
    return removed


def _current_umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def _fsync_directory(directory: str) -> None:
    # Makes the rename itself durable; not possible (nor needed) on every platform.
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_output_dir(directory: str, min_free_bytes: int = 0) -> None:
    """Fails now, with the directory named, if the run could not write its files there later.

    Args:
        directory: the output directory (created if missing).
        min_free_bytes: free space required, e.g. the size of one checkpoint.

    Raises:
        OutputDirError: the directory cannot be created or written, or has too little space.
    """
    if not is_local_path(directory):
        PathManager.mkdirs(directory)  # other storage: its handler reports its own errors
        return
    try:
        os.makedirs(directory, exist_ok=True)
        with atomic_write(os.path.join(directory, ".write_test"), "wb") as f:
            f.write(b"ok")
        with contextlib.suppress(FileNotFoundError):  # another run starting there removed it
            os.remove(os.path.join(directory, ".write_test"))
    except OSError as e:
        raise OutputDirError(
            f"Output directory {directory} is not writable ({e.strerror or e}); set OUTPUT_DIR to "
            "a writable directory"
        ) from e
    free = shutil.disk_usage(directory).free
    if free < min_free_bytes:
        raise OutputDirError(
            f"Output directory {directory} has {free / 2**20:.0f} MiB free, less than the "
            f"{min_free_bytes / 2**20:.0f} MiB one checkpoint needs; free space or set OUTPUT_DIR"
        )
