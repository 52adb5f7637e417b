"""The demo's noise statement: per-query retrieval ranks and the paired bootstrap over queries."""
import math

import torch

from conlip_plugin.evaluation import demo, demo_report, ranks


def _reference_ranks(scores, truth):
    """Explicit loops: wrong candidates scoring at least as high as the (best) right one."""
    n_text, n_image = scores.shape
    t2i = [sum(1 for j in range(n_image) if j != truth[t] and scores[t, j] >= scores[t, truth[t]])
           for t in range(n_text)]
    i2t = []
    for i in range(n_image):
        best = max(float(scores[t, i]) for t in range(n_text) if truth[t] == i)
        i2t.append(sum(1 for t in range(n_text) if truth[t] != i and float(scores[t, i]) >= best))
    return t2i, i2t


def test_retrieval_ranks_match_loops_with_ties():
    torch.manual_seed(0)
    truth = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4, 5])
    scores = torch.randn(10, 6, dtype=torch.float64).round(decimals=1)  # rounding makes exact ties
    scores[3] = scores[6]  # two captions of different images with identical scores (duplicate text)
    got = ranks.retrieval_ranks(scores, truth)
    t2i, i2t = _reference_ranks(scores, truth.tolist())
    assert got["image"].tolist() == t2i
    assert got["text"].tolist() == i2t


def test_bootstrap_interval_is_degenerate_for_identical_or_opposite_models():
    ones, zeros = torch.ones(200, dtype=torch.float64), torch.zeros(200, dtype=torch.float64)
    images = torch.arange(200) // 3
    assert ranks.bootstrap_interval(ones, ones, images) == (0.0, 0.0)
    assert ranks.bootstrap_interval(ones, zeros, images) == (100.0, 100.0)


def test_bootstrap_interval_matches_the_normal_approximation():
    g = torch.Generator().manual_seed(1)
    a = (torch.rand(2000, generator=g) < 0.40).double()
    b = (torch.rand(2000, generator=g) < 0.35).double()
    d = (a - b).tolist()
    mean_d = sum(d) / len(d)
    sd = math.sqrt(sum((x - mean_d) ** 2 for x in d) / (len(d) - 1))
    half = 100 * 1.96 * sd / math.sqrt(len(d))
    low, high = ranks.bootstrap_interval(a, b, torch.arange(2000))
    assert abs((low + high) / 2 - 100 * mean_d) < 0.2 * half
    assert abs((high - low) / 2 - half) < 0.1 * half


def test_bootstrap_resamples_images_with_all_their_captions():
    """Three identical captions per image carry one image's worth of evidence, not three."""
    g = torch.Generator().manual_seed(2)
    a = (torch.rand(600, generator=g) < 0.40).double()
    b = (torch.rand(600, generator=g) < 0.35).double()
    low, high = ranks.bootstrap_interval(a, b, torch.arange(600))
    tripled = ranks.bootstrap_interval(a.repeat_interleave(3), b.repeat_interleave(3), torch.arange(1800) // 3)
    assert abs((tripled[1] - tripled[0]) - (high - low)) < 0.1 * (high - low)


def _fake_runs(t2i_rank_of_query, seeds=1):
    query_ranks = {"image": torch.tensor(t2i_rank_of_query), "text": torch.tensor(t2i_rank_of_query),
                   "caption_image": torch.arange(len(t2i_rank_of_query))}
    metrics = {f"{d}_retrieval_recall@{k}": float((query_ranks[d] < k).double().mean())
               for d in ("image", "text") for k in (1, 5, 10)}
    return [metrics] * seeds, [query_ranks] * seeds


def test_summary_calls_a_clear_win_outside_and_a_tie_inside_the_noise():
    results, per_query = {}, {}
    for split, _ in demo.SPLITS:
        clear = {"ConLIP": _fake_runs([0] * 300), "Vanilla": _fake_runs([20] * 300), "CL": _fake_runs([0] * 300),
                 "CLIP": _fake_runs([0] * 150 + [20] * 150), "CLIP+ConMLM+ConMIM": _fake_runs([0] * 300)}
        results[split] = {label: runs[0] for label, runs in clear.items()}
        per_query[split] = {label: runs[1] for label, runs in clear.items()}
    text = demo_report.summarise(results, per_query, seeds=1)
    assert "ConLIP − Vanilla = +100.0 points, outside the noise" in text
    assert "ConLIP − CL = +0.0 points, inside the noise" in text
    assert "ConLIP − CLIP = +50.0 points, outside the noise" in text
    assert "CLIP+ConMLM+ConMIM − CLIP = +50.0 points, outside the noise" in text
    assert "| unseen | CLIP+ConMLM+ConMIM | 100.0 |" in text
    assert "one seed only" in text


def test_hits_and_rank_check_match_loops():
    """hits: per query, the share of seeds with a right answer in the top k; rank_check: the largest R@K gap."""
    runs = [{"image": torch.tensor([0, 3, 12]), "text": torch.tensor([1, 0])},
            {"image": torch.tensor([2, 0, 4]), "text": torch.tensor([9, 5])}]
    expected = [sum(r["image"][q].item() < 3 for r in runs) / len(runs) for q in range(3)]
    assert ranks.hits(runs, "image", 3).tolist() == expected
    owners = {"caption_image": torch.tensor([0, 0, 1]), "text": torch.tensor([4, 7])}
    assert ranks.query_images(owners, "image").tolist() == [0, 0, 1]
    assert ranks.query_images(owners, "text").tolist() == [0, 1]
    metrics = {f"{d}_retrieval_recall@{k}": sum(x < k for x in runs[0][d].tolist()) / len(runs[0][d])
               for d in ("image", "text") for k in (1, 5, 10)}
    assert ranks.rank_check({"s": {"m": [metrics]}}, {"s": {"m": runs[:1]}}) == 0.0
    metrics["text_retrieval_recall@1"] += 0.25
    assert math.isclose(ranks.rank_check({"s": {"m": [metrics]}}, {"s": {"m": runs[:1]}}), 25.0)
