"""Vectors and checks shared by the retrieval tests: clustered unit vectors, and recall@k recomputed
in float64 query by query, independently of ``nearest``."""
import numpy as np


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 50), dim))
    x = centres[rng.integers(0, len(centres), n)] + 1.5 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def float64_recall(gallery: np.ndarray, queries: np.ndarray, found: np.ndarray, own=None, k: int = 10) -> float:
    """recall@k in float64, query by query: a found row (own row and faiss's -1 left out) is a hit when
    its score reaches the query's true k-th score."""
    g, hits = gallery.astype(np.float64), 0
    for i, query in enumerate(queries.astype(np.float64)):
        scores = g @ query
        others = [j for j in range(len(g)) if own is None or j != own[i]]
        kth = np.sort(scores[others])[::-1][k - 1]
        row = [j for j in found[i] if j >= 0 and (own is None or j != own[i])][:k]
        hits += sum(1 for j in row if scores[j] >= kth - 1e-5)
    return hits / (k * len(queries))
