"""Per-query retrieval ranks and what the demo derives from them: hits, a paired bootstrap, a check.

clip_benchmark reports only R@K averages; comparing two models on the same test set needs each
query's outcome, so that the difference can be resampled by test image (``bootstrap_interval``).
The ranks are recomputed from embeddings, so ``rank_check`` states how closely they reproduce
clip_benchmark's own R@K. Everything here is a pure function on tensors.
"""
from typing import Dict, List, Tuple

import torch

DIRECTIONS = ("image", "text")  # clip_benchmark's metric prefixes: T2I ("image" retrieval) and I2T
RECALL_K = (1, 5, 10)


def retrieval_ranks(scores: torch.Tensor, truth: torch.Tensor) -> Dict[str, torch.Tensor]:
    """From caption × image ``scores`` and each caption's image index: per T2I query (caption) the
    number of wrong images above its image, per I2T query (image) the number of wrong captions
    above its best caption."""
    rows = torch.arange(len(truth))
    positive = torch.zeros(scores.shape[1], len(truth), dtype=torch.bool)
    positive[truth, rows] = True
    # An exact tie (duplicate captions of different emoji) counts against the query here;
    # clip_benchmark's topk breaks ties either way, so its R@K can be a query or two higher.
    t2i = ((scores >= scores[rows, truth][:, None]) & ~positive.t()).sum(1)
    by_image = scores.t()
    best_positive = by_image.masked_fill(~positive, float("-inf")).max(1).values
    i2t = ((by_image >= best_positive[:, None]) & ~positive).sum(1)
    return {"image": t2i, "text": i2t}


def hits(runs: List[dict], direction: str, k: int) -> torch.Tensor:
    """Per test query, the fraction of seeds that put a correct answer in the top ``k``."""
    return torch.stack([(r[direction] < k).double() for r in runs]).mean(0)


def query_images(ranks: dict, direction: str) -> torch.Tensor:
    """The test image each query belongs to: a T2I query is a caption, an I2T query an image."""
    return ranks["caption_image"] if direction == "image" else torch.arange(len(ranks["text"]))


def recall(ranks: dict, direction: str, k: int) -> float:
    """One run's R@K in points from its per-query ranks, as clip_benchmark averages it over the queries."""
    return 100 * float((ranks[direction] < k).double().mean())


def bootstrap_interval(hits_a: torch.Tensor, hits_b: torch.Tensor, image: torch.Tensor,
                       reps: int = 2000) -> Tuple[float, float]:
    """95% paired-bootstrap interval of mean(hits_a) − mean(hits_b), in points.

    Whole test images are resampled, each with all its queries (``image``: the image of each
    query): an image's captions are not independent samples, and resampling them one by one
    would make the interval too narrow.
    """
    n = int(image.max()) + 1
    sum_a = torch.zeros(n, dtype=torch.float64).index_add_(0, image, hits_a)
    sum_b = torch.zeros(n, dtype=torch.float64).index_add_(0, image, hits_b)
    count = torch.bincount(image, minlength=n).double()
    index = torch.randint(n, (reps, n), generator=torch.Generator().manual_seed(0))
    diffs = 100 * (sum_a[index].sum(1) - sum_b[index].sum(1)) / count[index].sum(1)
    low, high = torch.quantile(diffs, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return low, high


def rank_check(results: Dict[str, Dict[str, List[dict]]], ranks: Dict[str, Dict[str, List[dict]]]) -> float:
    """Largest gap, in points, between R@K from the per-query ranks and clip_benchmark's R@K.

    ``results[split][label]`` holds clip_benchmark's metrics per seed, ``ranks[split][label]`` the
    ranks of the same runs.
    """
    gaps = [abs(recall(r, d, k) - 100 * m[f"{d}_retrieval_recall@{k}"])
            for split in results for label in results[split]
            for m, r in zip(results[split][label], ranks[split][label])
            for d in DIRECTIONS for k in RECALL_K]
    return max(gaps)
