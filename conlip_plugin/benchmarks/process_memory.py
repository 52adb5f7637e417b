"""A step's wall time and how far it raised this process's peak and resident memory (Linux's
``/proc/self/status``), for the benchmarks' figures: the peak mark is reset before the step and freed
heap pages handed back, so the figure is the step's own and not an earlier step's reuse.
"""
import ctypes
import dataclasses
import gc
import time
from typing import Callable, Optional, Tuple, TypeVar

T = TypeVar("T")


def status_bytes(field: str) -> Optional[int]:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in bytes; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Set the kernel's peak-RSS mark (VmHWM) to the current RSS, so a step's own peak can be read."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclasses.dataclass
class Measured:
    """A step's wall time and how far it raised the peak and the resident memory of this process."""

    seconds: float
    peak_increase: Optional[int]
    resident_increase: Optional[int]


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc only), so that a step's allocations raise the RSS
    instead of silently reusing pages an earlier step freed but the process kept."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measured(step: Callable[[], T]) -> Tuple[T, Measured]:
    """``step()`` with its wall time and memory; the peak is None where it cannot be reset."""
    gc.collect()
    _trim_heap()
    reset = _reset_peak()
    before = status_bytes("VmRSS")
    start = time.perf_counter()
    result = step()
    seconds = time.perf_counter() - start
    after, peak = status_bytes("VmRSS"), status_bytes("VmHWM")
    if before is None or after is None:
        return result, Measured(seconds, None, None)
    return result, Measured(seconds, peak - before if reset and peak is not None else None, after - before)
