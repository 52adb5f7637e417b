"""Nearest neighbours by inner product of unit vectors: exact (a matrix product) or faiss IVF.

The approximate index follows autofaiss's sizing idea (``sizing``): exact search below
``exact_below`` vectors, otherwise an inverted file with about 4·√N lists whose codes fit the memory
budget, and whose ``nprobe`` is raised until recall@10 against exact search reaches the target on a
sample of the gallery and, when given, a sample of the other modality's vectors (text queries
against an image gallery sit elsewhere in the space than the images themselves: CLIP's modality gap).
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from conlip_plugin.retrieval.sizing import DEFAULT_MAX_INDEX_MEMORY, TRAIN_POINTS_PER_LIST, IndexPlan, choose

EXACT_BELOW = 100_000
TARGET_RECALL = 0.95
RECALL_QUERIES = 1000
RECALL_K = 10  # the approximate index is tuned to, and reports, recall@10
KMEANS_ITERATIONS = 20
PQ_TRAIN_POINTS = 256 * TRAIN_POINTS_PER_LIST  # each 8-bit sub-quantizer is a k-means of 256 centroids
# A quantised index can stop short of the target recall at any nprobe (its codes lose the rest): once
# doubling nprobe gains less than this, probing more lists only costs time.
PLATEAU_GAIN = 0.002
# Scores within this of the true k-th score count as found: float32 products of the same vectors
# differ by about 1e-7, and exact duplicates in a gallery tie exactly.
TIE_TOLERANCE = 1e-5
EXACT_BLOCK = 1 << 16
SCORE_BYTES = 1 << 24  # the float32 scores of one block of exact search, whatever the number of queries
ADD_BLOCK = 1 << 16


def exact_search(gallery: np.ndarray, queries: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Top-k rows of ``gallery`` by inner product with each query, best first (equal scores: lower row
    first; of rows tied exactly at the k-th place, which ones are kept is not specified).

    The gallery is read in blocks, so a float16 memory map is converted a block at a time; blocks are
    fewer rows the more queries there are, so that their scores take ``SCORE_BYTES`` at most."""
    k = min(k, len(gallery))
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    block = max(k, min(EXACT_BLOCK, SCORE_BYTES // (4 * max(1, len(queries)))))
    best_scores = np.zeros((len(queries), 0), dtype=np.float32)
    best_ids = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(0, len(gallery), block):
        block_scores = queries @ np.asarray(gallery[start:start + block], dtype=np.float32).T
        if block_scores.shape[1] > k:
            keep = np.argpartition(block_scores, block_scores.shape[1] - k, axis=1)[:, -k:]
            block_scores = np.take_along_axis(block_scores, keep, axis=1)
        else:
            keep = np.broadcast_to(np.arange(block_scores.shape[1]), block_scores.shape)
        scores = np.concatenate([best_scores, block_scores], axis=1)
        ids = np.concatenate([best_ids, keep + start], axis=1)
        order = np.lexsort((ids, -scores), axis=1)[:, :k]
        best_scores = np.take_along_axis(scores, order, axis=1)
        best_ids = np.take_along_axis(ids, order, axis=1)
    return best_scores, best_ids


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

    @property
    def lists(self) -> int:
        import faiss

        return int(faiss.extract_index_ivf(self.index).nlist)

    def search(self, queries: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """Top-k at the tuned nprobe; a query whose probed lists hold fewer than k vectors (faiss pads
        its ids with -1) is searched again with nprobe doubled, up to every list, so that k results
        come back whenever the index holds k vectors."""
        import faiss

        ivf = faiss.extract_index_ivf(self.index)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        nprobe = ivf.nprobe = self.nprobe
        scores, ids = self.index.search(queries, k)
        short = (ids < 0).any(axis=1)
        while short.any() and nprobe < ivf.nlist:
            nprobe = ivf.nprobe = min(int(ivf.nlist), nprobe * 2)
            scores[short], ids[short] = self.index.search(queries[short], k)
            short = (ids < 0).any(axis=1)
        return scores, ids


def build_approximate(gallery: np.ndarray, target_recall: float = TARGET_RECALL, k: int = RECALL_K,
                      sample: int = RECALL_QUERIES, seed: int = 0, other_queries: Optional[np.ndarray] = None,
                      max_bytes: int = DEFAULT_MAX_INDEX_MEMORY, plan: Optional[IndexPlan] = None) -> ApproximateIndex:
    """Train and fill the index ``sizing.choose`` picks for ``max_bytes`` (or ``plan``) on the gallery,
    then the smallest power-of-two nprobe whose recall@k against exact search reaches ``target_recall``
    on ``sample`` gallery rows used as queries (each query's own row left out of both result lists) and
    on ``sample`` rows of ``other_queries`` (the other modality's vectors, e.g. captions for an image
    gallery); the recall reported is the lower of the two.

    The gallery may be a float16 memory map: it is read in blocks, and only the training sample and
    the tuning queries are held as float32."""
    import faiss

    n, dim = gallery.shape
    if n <= k:
        raise ValueError(f"{n} vectors: tuning recall@{k} needs more than {k} (search them exactly)")
    plan = plan or choose(n, dim, max_bytes)
    index = faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.niter, ivf.cp.seed = KMEANS_ITERATIONS, seed
    rng = np.random.default_rng(seed)
    wanted = TRAIN_POINTS_PER_LIST * plan.lists
    if plan.quantised:
        wanted = max(wanted, PQ_TRAIN_POINTS)
    train_rows = np.sort(rng.choice(n, size=min(n, wanted), replace=False))
    index.train(np.asarray(gallery[train_rows], dtype=np.float32))
    del train_rows
    for start in range(0, n, ADD_BLOCK):
        index.add(np.asarray(gallery[start:start + ADD_BLOCK], dtype=np.float32))
    own = np.sort(rng.choice(n, size=min(n, sample), replace=False))
    queries = [np.asarray(gallery[own], dtype=np.float32)]
    if other_queries is not None and len(other_queries):
        picked = np.sort(rng.choice(len(other_queries), size=min(len(other_queries), sample), replace=False))
        queries.append(np.asarray(other_queries[picked], dtype=np.float32))
    truth_scores, truth_ids = exact_search(gallery, np.concatenate(queries), k + 1)  # one pass for both sets
    mine = slice(0, len(own))
    probes = [_Probe(queries[0], _without_self(truth_scores[mine], truth_ids[mine], own, k)[0], own)]
    if len(queries) > 1:
        probes.append(_Probe(queries[1], truth_scores[len(own):, :k], None))

    def recall_at(nprobe: int) -> float:
        ivf.nprobe = nprobe
        recalls = []
        for probe in probes:
            extra = 0 if probe.own is None else 1
            scores, ids = index.search(probe.queries, k + extra)
            if probe.own is not None:
                ids = _without_self(scores, ids, probe.own, k)[1]
            recalls.append(recall_at_k(gallery, probe.queries, ids, probe.truth_scores, k))
        return min(recalls)

    nprobe, recall = 1, recall_at(1)
    while recall < target_recall and nprobe < plan.lists:
        nprobe, before = min(plan.lists, nprobe * 2), recall
        recall = recall_at(nprobe)
        if plan.quantised and recall - before < PLATEAU_GAIN:
            break
    return ApproximateIndex(index, plan.factory, nprobe, recall, sum(len(p.queries) for p in probes), own)
