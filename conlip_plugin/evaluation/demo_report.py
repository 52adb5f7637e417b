"""The demo's report: the results table with its noise statement, the loss curves, the retrieval gallery
and the README that ties them together.

Rendering only: ``conlip_plugin.evaluation.demo`` trains, evaluates and embeds, and hands this module
plain numbers (metrics, per-query ranks, scores), so the report can be redrawn or tested without a model.
"""
import base64
import html
import math
import textwrap
from pathlib import Path
from statistics import mean, stdev
from typing import Dict, List, Sequence, Tuple

import torch

from conlip_plugin.evaluation.ranks import DIRECTIONS, RECALL_K, bootstrap_interval, hits, query_images, recall

# (arm, baseline) pairs whose differences the report tests against the noise.
COMPARISONS = (("ConLIP", "Vanilla"), ("ConLIP", "CL"), ("ConLIP", "CLIP"), ("CLIP+ConMLM+ConMIM", "CLIP"))
METRICS = [(f"{d}_retrieval_recall@{k}", f"{'T2I' if d == 'image' else 'I2T'} R@{k}")
           for d in DIRECTIONS for k in RECALL_K]


def summarise(results: Dict[str, Dict[str, List[dict]]], ranks: Dict[str, Dict[str, List[dict]]], seeds: int) -> str:
    """The results table (mean ± spread over seeds) and a plain statement about the noise.

    ``results[split][label]`` holds clip_benchmark's metrics per seed, ``ranks[split][label]`` the
    per-query ranks of the same runs; rows follow their order. Two sources of noise are checked: the
    test set (a paired bootstrap over its images, each with all its captions, which one seed already
    allows) and, with two or more seeds, training (the spread over seeds; with few seeds a rough
    bound). A difference is called outside the noise only when it is outside both. Differences and
    intervals come from the per-query ranks.
    """
    lines = ["| split | model | " + " | ".join(name for _, name in METRICS) + " |",
             "|---|---|" + "---|" * len(METRICS)]
    for split, by_label in results.items():
        for label, runs in by_label.items():
            cells = []
            for key, _ in METRICS:
                vals = [100 * r[key] for r in runs]
                cells.append(f"{mean(vals):.1f}" + (f" ± {stdev(vals):.1f}" if len(vals) > 1 else ""))
            lines.append(f"| {split} | {label} | " + " | ".join(cells) + " |")
    notes = []
    for split in results:
        for arm, other in COMPARISONS:
            for direction, k, name in (("image", 1, "T2I R@1"), ("text", 1, "I2T R@1"),
                                       ("image", 10, "T2I R@10"), ("text", 10, "I2T R@10")):
                mine, theirs = ranks[split][arm], ranks[split][other]
                hits_a, hits_b = hits(mine, direction, k), hits(theirs, direction, k)
                diff = 100 * float(hits_a.mean() - hits_b.mean())
                low, high = bootstrap_interval(hits_a, hits_b, query_images(mine[0], direction))
                outside = low > 0 or high < 0
                detail = f"95% bootstrap interval over the test images [{low:+.1f}, {high:+.1f}]"
                if seeds < 2:
                    detail += "; one seed only, so the spread over training seeds (usually the larger noise) is not measured"
                else:
                    a = [recall(r, direction, k) for r in mine]
                    b = [recall(r, direction, k) for r in theirs]
                    noise = 2 * math.sqrt((stdev(a) ** 2 + stdev(b) ** 2) / seeds)
                    outside = outside and abs(diff) > noise
                    detail += f"; 2 standard errors over seeds = {noise:.1f}"
                verdict = "outside the noise" if outside else "inside the noise"
                notes.append(f"- {split}, {name}: {arm} − {other} = {diff:+.1f} points, {verdict} ({detail}).")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def chance_and_rank_notes(chance: Dict[str, float], gap: float) -> str:
    """What the table is read against: chance level per split, and how closely the recomputed
    per-query ranks reproduce clip_benchmark's own R@K (``gap``, in points)."""
    levels = ", ".join(f"{split} {level:.2f}" for split, level in chance.items())
    return (f"\nChance level of T2I R@1 (one right image among N), in %: {levels}.\n"
            f"\nThe per-query ranks behind the bootstrap intervals are recomputed here from the same "
            f"checkpoints; they reproduce clip_benchmark's R@1/5/10 to within {gap:.2f} points (exact ties, "
            f"from duplicate captions of different emoji, count against the query here).\n")


def readme(title: str, table: str, table2: str) -> str:
    """The report's README.md: the retrieval table and its notes, then the attention table (Table 2)."""
    return (f"# ConLIP demo on emoji ({title})\n\n"
            f"Zero-shot retrieval, Recall@K in % (T2I: text→image, I2T: image→text):\n\n{table}\n"
            f"Cross-attention weight on the other modality's CLS slot (paper Table 2):\n\n{table2}\n"
            "Files: losses.png, table2.png, gallery.png, gallery.html, results.json\n")


def plot_losses(curves: Dict[str, Dict[str, List[float]]], path: Path) -> None:
    """One panel per loss term, the variants overlaid: their terms differ, their shared ones compare."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    terms = sorted({t for c in curves.values() for t in c})
    fig, axes = plt.subplots(1, len(terms), figsize=(4 * len(terms), 3.2), squeeze=False)
    for ax, term in zip(axes[0], terms):
        for label, c in curves.items():
            if term in c:
                ax.plot(c[term], label=label)
        ax.set_title(term)
        ax.set_xlabel("logged step (every 10 steps)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def gallery(chosen: Sequence[Tuple[str, str]], files: Sequence[str], scores: torch.Tensor, top: torch.Tensor,
            root: Path, report: Path) -> None:
    """Paper Figure 5 as gallery.png and gallery.html: each (image file, caption) query of ``chosen``
    with its top images (``top``: indices into ``files``, under ``root``) and their ``scores``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    shown = top.shape[1]
    fig, axes = plt.subplots(len(chosen), shown + 1, figsize=(11, 1.6 * len(chosen)),
                             gridspec_kw={"width_ratios": [2.6] + [1] * shown})
    rows_html = []
    for r, (truth, caption) in enumerate(chosen):
        axes[r, 0].text(0, 0.5, textwrap.fill(caption, 34), fontsize=7, va="center")
        axes[r, 0].axis("off")
        cells = [f"<td>{html.escape(caption)}</td>"]
        for c in range(shown):
            f = files[top[r, c]]
            axes[r, c + 1].imshow(Image.open(root / f))
            axes[r, c + 1].set_title(f"{scores[r, c]:.2f}" + (" ✓" if f == truth else ""), fontsize=7)
            axes[r, c + 1].axis("off")
            data = base64.b64encode((root / f).read_bytes()).decode()
            mark = " style='outline:3px solid green'" if f == truth else ""
            cells.append(f"<td><img src='data:image/jpeg;base64,{data}' width=64{mark}><br>{scores[r, c]:.3f}</td>")
        rows_html.append("<tr>" + "".join(cells) + "</tr>")
    fig.savefig(report / "gallery.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    (report / "gallery.html").write_text(
        f"<html><body><h2>Text query → top-{shown} images (ConLIP, cross-style split; green: the query's own image)</h2>"
        "<table border=1 cellpadding=4>" + "".join(rows_html) + "</table></body></html>\n")
