"""Nearest neighbours by inner product of unit vectors: exact (a matrix product) or faiss IVF.

The approximate index follows autofaiss's sizing idea: exact search below ``exact_below`` vectors,
otherwise an inverted file with about 4·√N lists (a power of two) over float16 codes, whose ``nprobe``
is raised until recall@10 against exact search reaches the target on a sample of the gallery and,
when given, a sample of the other modality's vectors (text queries against an image gallery sit
elsewhere in the space than the images themselves: CLIP's modality gap).
"""
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

EXACT_BELOW = 100_000
TARGET_RECALL = 0.95
RECALL_QUERIES = 1000
RECALL_K = 10  # the approximate index is tuned to, and reports, recall@10
TRAIN_POINTS_PER_LIST = 40  # faiss asks for at least 39 per centroid
KMEANS_ITERATIONS = 20
# Scores within this of the true k-th score count as found: float32 products of the same vectors
# differ by about 1e-7, and exact duplicates in a gallery tie exactly.
TIE_TOLERANCE = 1e-5
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


def recall_at_k(gallery: np.ndarray, queries: np.ndarray, found: np.ndarray, truth_scores: np.ndarray,
                k: int) -> float:
    """Mean fraction of each query's true top-k that ``found`` (row ids, -1 for none) recovers, counted
    by score: a found row whose exact score reaches the true k-th score is a hit. Counting row ids
    instead would miss rows tied with a true neighbour (duplicate images, repeated captions), which
    exact search and faiss break differently."""
    found = np.asarray(found)[:, :k]
    valid = found >= 0
    vectors = np.asarray(gallery[np.where(valid, found, 0)], dtype=np.float32)
    scores = np.einsum("qkd,qd->qk", vectors, np.asarray(queries, dtype=np.float32))
    hits = valid & (scores >= truth_scores[:, k - 1:k] - TIE_TOLERANCE)
    return float(hits.sum(axis=1).mean()) / k


def _without_self(scores: np.ndarray, ids: np.ndarray, own: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Each row's scores and ids with the query's own row removed, cut to k."""
    keep = [row != me for row, me in zip(ids, own)]
    return (np.stack([row[m][:k] for row, m in zip(scores, keep)]),
            np.stack([row[m][:k] for row, m in zip(ids, keep)]))


@dataclass
class _Probe:
    """Tuning queries with their exact top-k scores; ``own``: the gallery rows they are, to leave out."""

    queries: np.ndarray
    truth_scores: np.ndarray
    own: Optional[np.ndarray]


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


def build_approximate(gallery: np.ndarray, target_recall: float = TARGET_RECALL, k: int = RECALL_K,
                      sample: int = RECALL_QUERIES, seed: int = 0, lists: Optional[int] = None,
                      other_queries: Optional[np.ndarray] = None) -> ApproximateIndex:
    """Train and fill ``IVF{lists},SQfp16`` on the gallery, then the smallest power-of-two nprobe whose
    recall@k against exact search reaches ``target_recall`` on ``sample`` gallery rows used as queries
    (each query's own row left out of both result lists) and on ``sample`` rows of ``other_queries``
    (the other modality's vectors, e.g. captions for an image gallery); the recall reported is the
    lower of the two."""
    import faiss

    n, dim = gallery.shape
    if n <= k:
        raise ValueError(f"{n} vectors: tuning recall@{k} needs more than {k} (search them exactly)")
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
    probes = [_Probe(queries, _without_self(*exact_search(gallery, queries, k + 1), own, k)[0], own)]
    if other_queries is not None and len(other_queries):
        picked = np.sort(rng.choice(len(other_queries), size=min(len(other_queries), sample), replace=False))
        others = np.asarray(other_queries[picked], dtype=np.float32)
        probes.append(_Probe(others, exact_search(gallery, others, k)[0], None))

    def recall_at(nprobe: int) -> float:
        index.nprobe = nprobe
        recalls = []
        for probe in probes:
            extra = 0 if probe.own is None else 1
            scores, ids = index.search(probe.queries, k + extra)
            if probe.own is not None:
                ids = _without_self(scores, ids, probe.own, k)[1]
            recalls.append(recall_at_k(gallery, probe.queries, ids, probe.truth_scores, k))
        return min(recalls)

    nprobe = 1
    while (recall := recall_at(nprobe)) < target_recall and nprobe < lists:
        nprobe = min(lists, nprobe * 2)
    return ApproximateIndex(index, kind, nprobe, recall, sum(len(p.queries) for p in probes), own)
