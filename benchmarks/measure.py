"""Timing and peak-memory measurement shared by the benchmark cases."""

import os
import platform
import re
import statistics
import time
from typing import Callable, Dict, List

import torch

_MiB = 1024.0 * 1024.0


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(
    fns: Dict[str, Callable[[], object]], device: torch.device, warmup: int, reps: int
) -> Dict[str, List[float]]:
    """Seconds per call of every function, the functions taking turns in each repetition.

    Taking turns spreads slow drifts of a shared machine (other jobs, clock changes) evenly over
    the implementations, so their ratios stay meaningful even when absolute times move.

    Args:
        fns: name -> zero-argument function.
        device: the device the functions run on (CUDA work is synchronised around each call).
        warmup: untimed calls of each function first.
        reps: timed calls of each function.

    Returns:
        name -> list of ``reps`` durations in seconds.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def stage_medians(
    stagers: Dict[str, Callable[[], Dict[str, float]]], reps: int
) -> Dict[str, Dict[str, float]]:
    """Median of every value ``stager()`` returns (per-stage seconds, candidate counts) over
    ``reps`` calls of each, the stagers taking turns as in :func:`interleaved_times`."""
    values: Dict[str, Dict[str, List[float]]] = {name: {} for name in stagers}
    for _ in range(reps):
        for name, stager in stagers.items():
            for key, value in stager().items():
                values[name].setdefault(key, []).append(value)
    return {
        name: {key: median(v) for key, v in per_key.items()} for name, per_key in values.items()
    }


def median(values: List[float]) -> float:
    return statistics.median(values)


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def peak_memory_mib(fn: Callable[[], object], device: torch.device, calls: int = 2) -> float:
    """Peak memory (MiB) that ``calls`` calls of ``fn`` need above what the process held before.

    CPU: the resident set's high-water mark (Linux ``VmHWM``, reset through
    ``/proc/self/clear_refs``) minus the resident set at the start. CUDA: torch's peak allocated
    memory minus the memory allocated at the start. Run one case per process so that earlier
    cases' freed memory (kept by the allocator) does not hide this one's.
    """
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        for _ in range(calls):
            fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - start) / _MiB
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    start = _status_kib("VmRSS")
    for _ in range(calls):
        fn()
    return (_status_kib("VmHWM") - start) / 1024.0


def device_label(device: torch.device) -> str:
    """A file-name-safe name of the machine, e.g. "cpu-intel-xeon-processor-2cores"."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or "cpu"
        try:
            with open("/proc/cpuinfo") as f:
                match = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE)
            if match:
                name = match.group(1)
        except OSError:
            pass
        name = f"cpu {name} {os.cpu_count()}cores"
    name = re.sub(r"\((r|tm)\)", "", name, flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
