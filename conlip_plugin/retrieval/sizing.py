"""Which faiss index a gallery gets under a memory budget (``--max-index-memory``).

The same choice autofaiss makes with ``max_index_memory_usage``, written here because autofaiss
(2.18, the latest) pins numpy<2 and pandas<3, which this project's numpy 2 and pandas 3 exclude. The
index is an inverted file over about 4·√N lists; its codes are float16 (``SQfp16``, near exact)
while they fit, else product quantisation with the most bytes per vector that fit (``PQm``), after
an OPQ rotation where each code byte stands for several dimensions.
"""
import math
import re
from dataclasses import dataclass
from typing import List

ID_BYTES = 8  # faiss stores an int64 id next to each code in the inverted lists
PQ_BITS = 8
PQ_BYTES = (256, 192, 128, 96, 64, 48, 32, 24, 16, 12, 8, 4)
# OPQ's rotation spreads variance evenly over the sub-vectors; it pays where a code byte covers several
# dimensions, and below that PQ is close to lossless already while the rotation's training still costs.
OPQ_FROM_DIMS_PER_BYTE = 4
MAX_LISTS = 4096  # k-means costs lists x (40 · lists) training points: beyond this it dominates a CPU build
MIN_LISTS = 64
TRAIN_POINTS_PER_LIST = 40  # faiss asks for at least 39 per centroid
DEFAULT_MAX_INDEX_MEMORY = 8 * 2 ** 30
_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def list_count(n: int) -> int:
    """Inverted lists for ``n`` vectors: the power of two nearest 4·√n, within [64, MAX_LISTS], and no
    more than k-means has training points for (``TRAIN_POINTS_PER_LIST`` each)."""
    lists = int(min(MAX_LISTS, max(MIN_LISTS, 2 ** round(math.log2(4 * math.sqrt(max(n, 1)))))))
    return max(1, min(lists, n // TRAIN_POINTS_PER_LIST))


class BudgetTooSmall(ValueError):
    """No index of the gallery fits the memory budget (the message names the smallest's size)."""


@dataclass(frozen=True)
class IndexPlan:
    """A faiss factory string and what the index will take in memory."""

    factory: str
    lists: int
    code_bytes: int
    bytes: int

    @property
    def quantised(self) -> bool:
        return "PQ" in self.factory


def _plan(n: int, dim: int, lists: int, code_bytes: int, factory: str, extra: int) -> IndexPlan:
    centroids = lists * dim * 4
    return IndexPlan(factory, lists, code_bytes, n * (code_bytes + ID_BYTES) + centroids + extra)


def candidates(n: int, dim: int) -> List[IndexPlan]:
    """Every index this sizer would make for ``n`` vectors of ``dim``, largest (most accurate) first."""
    lists = list_count(n)
    plans = [_plan(n, dim, lists, 2 * dim, f"IVF{lists},SQfp16", 0)]
    for m in (m for m in PQ_BYTES if m < 2 * dim and dim % m == 0):
        codebooks = 2 ** PQ_BITS * dim * 4
        if dim // m >= OPQ_FROM_DIMS_PER_BYTE:
            plans.append(_plan(n, dim, lists, m, f"OPQ{m},IVF{lists},PQ{m}x{PQ_BITS}", codebooks + dim * dim * 4))
        else:
            plans.append(_plan(n, dim, lists, m, f"IVF{lists},PQ{m}x{PQ_BITS}", codebooks))
    return plans


def choose(n: int, dim: int, max_bytes: int) -> IndexPlan:
    """The most accurate index of ``n`` vectors that fits ``max_bytes``; a budget too small for any
    stops with the smallest's size."""
    plans = candidates(n, dim)
    fitting = [plan for plan in plans if plan.bytes <= max_bytes]
    if not fitting:
        smallest = plans[-1]
        raise BudgetTooSmall(f"{n:,} vectors of {dim} dimensions need at least {format_bytes(smallest.bytes)} "
                         f"({smallest.factory}), over --max-index-memory {format_bytes(max_bytes)}; pass "
                         f"--max-index-memory {format_bytes(smallest.bytes, up=True)} or more")
    return fitting[0]


def format_bytes(value: int, up: bool = False) -> str:
    """``value`` in the largest unit that keeps it at least 1, as --max-index-memory reads it (rounded up
    with ``up``, so that the size it names is enough)."""
    for unit in ("T", "G", "M", "K"):
        if value >= _UNITS[unit]:
            scaled = value / _UNITS[unit]
            return f"{math.ceil(scaled * 10) / 10 if up else round(scaled, 1):g}{unit}"
    return str(value)


def memory_size(text: str) -> int:
    """``--max-index-memory``: bytes, or a number with K, M, G or T (powers of 1024), e.g. ``8G``."""
    import argparse

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"must be a size such as 512M, 8G or 2.5G (more than 0), got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])
