"""Keeping freed memory in the process during CPU training (glibc's allocator).

A training step frees its activations and gradients and allocates the same sizes again in the
next step. glibc's ``malloc`` hands large blocks back to the kernel when they are freed (blocks
above its mmap threshold, and free memory above its trim threshold at the top of the heap), so
every step touches fresh pages, each one a page fault the kernel zeroes. Raising the thresholds
keeps that memory in the process for reuse: fewer page faults and faster steps for somewhat more
peak resident memory (measured in docs/training.md). GPU training is
unaffected (its tensors live in the CUDA caching allocator already).
"""

import ctypes
import ctypes.util
import os

__all__ = ["MALLOC_SETTINGS", "keep_freed_memory"]

# name: (mallopt parameter number in glibc's malloc.h, value set): the largest mmap threshold
# glibc accepts on 64-bit systems (32 MiB; larger blocks are always mmapped), up to 1 GiB of free
# heap kept, and the heap grown 64 MiB at a time.
MALLOC_SETTINGS = {
    "M_MMAP_THRESHOLD": (-3, 32 << 20),
    "M_TRIM_THRESHOLD": (-1, 1 << 30),
    "M_TOP_PAD": (-2, 64 << 20),
}
# Environment variables by which a user already tuned glibc's malloc: left as they are.
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_memory() -> str:
    """Sets :data:`MALLOC_SETTINGS` with glibc's ``mallopt`` for this process.

    Returns:
        what was done, for the log: a description of the settings, or why nothing was set
        (not glibc, or the user's own ``MALLOC_*`` / ``GLIBC_TUNABLES`` malloc settings).
    """
    user = [name for name in _USER_SETTINGS if name in os.environ]
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        user.append("GLIBC_TUNABLES")
    if user:
        return f"malloc settings left to the environment ({', '.join(user)})"
    libc_name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(libc_name) if libc_name else None
    if libc is None or not hasattr(libc, "gnu_get_libc_version"):
        return "malloc settings unchanged (the C library is not glibc)"
    refused = [
        name for name, (param, value) in MALLOC_SETTINGS.items() if libc.mallopt(param, value) != 1
    ]
    if refused:
        return f"glibc's mallopt refused {', '.join(refused)}"
    settings = ", ".join(
        f"{name} {value >> 20} MiB" for name, (_, value) in MALLOC_SETTINGS.items()
    )
    return f"freed memory kept for reuse: glibc malloc {settings}"
