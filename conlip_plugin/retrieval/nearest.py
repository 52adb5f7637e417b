"""Nearest neighbours by inner product of unit vectors: exact (a matrix product) or faiss IVF.

The approximate index follows autofaiss's sizing idea: exact search below ``exact_below`` vectors,
otherwise an inverted file with about 4·√N lists (a power of two) over float16 codes, whose ``nprobe``
is raised until recall@10 against exact search reaches the target on a sample of the gallery.
"""
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

EXACT_BELOW = 100_000
TARGET_RECALL = 0.95
RECALL_QUERIES = 1000
TRAIN_POINTS_PER_LIST = 40  # faiss asks for at least 39 per centroid
KMEANS_ITERATIONS = 20
EXACT_BLOCK = 1 << 16


def exact_search(gallery: np.ndarray, queries: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Top-k rows of ``gallery`` by inner product with each query, best first (equal scores: lower row
    first; of rows tied exactly at the k-th place, which ones are kept is not specified).

    The gallery is read in blocks, so a float16 memory map is converted a block at a time; pass a
    float32 array to search it repeatedly without converting."""
    k = min(k, len(gallery))
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best_scores = np.zeros((len(queries), 0), dtype=np.float32)
    best_ids = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(0, len(gallery), EXACT_BLOCK):
        block_scores = queries @ np.asarray(gallery[start:start + EXACT_BLOCK], dtype=np.float32).T
        if block_scores.shape[1] > k:
            keep = np.argpartition(-block_scores, k - 1, axis=1)[:, :k]
            block_scores = np.take_along_axis(block_scores, keep, axis=1)
        else:
            keep = np.broadcast_to(np.arange(block_scores.shape[1]), block_scores.shape)
        scores = np.concatenate([best_scores, block_scores], axis=1)
        ids = np.concatenate([best_ids, keep + start], axis=1)
        order = np.lexsort((ids, -scores), axis=1)[:, :k]
        best_scores = np.take_along_axis(scores, order, axis=1)
        best_ids = np.take_along_axis(ids, order, axis=1)
    return best_scores, best_ids


def list_count(n: int) -> int:
    """Inverted lists for ``n`` vectors: the power of two nearest 4·√n, within [64, 65536], and no more
    than k-means has training points for (``TRAIN_POINTS_PER_LIST`` each)."""
    lists = int(min(65536, max(64, 2 ** round(math.log2(4 * math.sqrt(max(n, 1)))))))
    return max(1, min(lists, n // TRAIN_POINTS_PER_LIST))


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean fraction of each query's true top-k that ``found``'s top-k contains."""
    hits = [len(set(f[:k].tolist()) & set(t[:k].tolist())) for f, t in zip(found, truth)]
    return float(np.mean(hits)) / k


def _without_self(ids: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """Each row's ids with the query's own row removed, cut to k."""
    return np.stack([row[row != me][:k] for row, me in zip(ids, own)])


@dataclass
class ApproximateIndex:
    """A trained faiss index with the nprobe it needs and the recall it reached."""

    index: object
    kind: str
    nprobe: int
    recall: float
    queries: int
    query_rows: Optional[np.ndarray] = None  # the gallery rows the recall was measured with, when built here

    def search(self, queries: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        self.index.nprobe = self.nprobe
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def build_approximate(gallery: np.ndarray, target_recall: float = TARGET_RECALL, k: int = 10,
                      sample: int = RECALL_QUERIES, seed: int = 0, lists: Optional[int] = None) -> ApproximateIndex:
    """Train and fill ``IVF{lists},SQfp16`` on the gallery, then the smallest power-of-two nprobe whose
    recall@k against exact search reaches ``target_recall`` on ``sample`` gallery rows used as
    queries (each query's own row left out of both result lists)."""
    import faiss

    n, dim = gallery.shape
    lists = lists or list_count(n)
    kind = f"IVF{lists},SQfp16"
    index = faiss.index_factory(dim, kind, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    train_rows = np.sort(rng.choice(n, size=min(n, TRAIN_POINTS_PER_LIST * lists), replace=False))
    index.cp.niter = KMEANS_ITERATIONS
    index.cp.seed = seed
    index.train(np.asarray(gallery[train_rows], dtype=np.float32))
    for start in range(0, n, EXACT_BLOCK * 4):
        index.add(np.asarray(gallery[start:start + EXACT_BLOCK * 4], dtype=np.float32))
    own = np.sort(rng.choice(n, size=min(n, sample), replace=False))
    queries = np.asarray(gallery[own], dtype=np.float32)
    truth = _without_self(exact_search(gallery, queries, k + 1)[1], own, k)
    nprobe, recall = 1, 0.0
    while True:
        index.nprobe = nprobe
        found = _without_self(index.search(queries, k + 1)[1], own, k)
        recall = recall_at_k(found, truth, k)
        if recall >= target_recall or nprobe >= lists:
            break
        nprobe = min(lists, nprobe * 2)
    return ApproximateIndex(index, kind, nprobe, recall, len(own), own)
