"""The ``conlip-retrieval-bench`` report: the machine it ran on, then each part's figures as Markdown."""
import datetime
import os
import platform
from typing import Optional

import numpy as np

from conlip_plugin.benchmarks.retrieval_scale import markdown as store_markdown
from conlip_plugin.benchmarks.retrieval_search import K, MB, TARGET_SIZE


def machine_info() -> dict:
    """What the figures depend on: the date, cores, library versions, thread settings and the load."""
    import open_clip
    import torch

    try:
        import faiss
    except ImportError:  # an embedding-only run (--sizes with no value) needs no faiss
        faiss = None

    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
            "faiss": faiss.__version__ if faiss else "not installed", "open_clip": open_clip.__version__,
            "faiss_threads": faiss.omp_get_max_threads() if faiss else 0,
            "thread_settings": {k: v for k, v in os.environ.items() if k.endswith("_NUM_THREADS")},
            "load_average_at_start": list(os.getloadavg())}


def _mb(value: Optional[int]) -> str:
    return "n/a" if value is None else f"{value / MB:.1f}"


def _curve(size: dict) -> str:
    points = size["approximate"]["recall_at_10_by_nprobe"].items()
    return f"{size['n']:,}: " + ", ".join(f"{nprobe} → {recall:.3f}" for nprobe, recall in points)


def markdown(report: dict) -> str:
    """The report as Markdown, one section per part that ran."""
    machine = report["machine"]
    lines = [f"# conlip-retrieval benchmark, {machine['date']}", "",
             f"{machine['cpu_count']} CPU cores ({machine['processor']}), torch {machine['torch']}, faiss "
             f"{machine['faiss']} ({machine['faiss_threads']} threads), numpy {machine['numpy']}, open_clip "
             f"{machine['open_clip']}. Load average (1, 5, 15 min) at start "
             f"{', '.join(f'{v:.2f}' for v in machine['load_average_at_start'])}, at end "
             f"{', '.join(f'{v:.2f}' for v in report['load_average_at_end'])} (this run's own threads count "
             f"too). Wall time {report['wall_s']:.0f} s.", ""]
    emb = report.get("embedding")
    if emb:
        lines += [f"## Embedding throughput ({emb['device']}, batch {emb['batch']}, median of {emb['rounds']} "
                  f"round(s), {emb['torch_threads']} torch threads)", "", emb["image_source"] + ". Load average "
                  f"(1 min) when timed: {emb['load_average'][0]:.2f}.", "",
                  "| model | image tower params (M) | images/s end to end | images/s forward "
                  "| decode+preprocess ms/img | end to end / CLIP | forward / CLIP |", "|---|---|---|---|---|---|---|"]
        for role in ("model", "baseline"):
            r = emb[role]
            lines.append(f"| {r['used']} | {r['image_tower_params_m']:.1f} | {r['images_per_s']:.2f} | "
                         f"{r['forward_images_per_s']:.2f} | {r['decode_preprocess_ms_per_image']:.1f} | "
                         f"{r['ratio_to_baseline']:.3f} | {r['forward_ratio_to_baseline']:.3f} |")
        lines.append("")
    if report["sizes"]:
        index = report["index"]
        lines += [f"## Search ({index['dim']}-d, {index['queries']} held-out queries one at a time, k={K}, CPU)", "",
                  f"Vectors: {index['vectors']}.", "",
                  "Exact: `exact_search` on the gallery as a float32 array in memory (its build: the float16 → "
                  "float32 copy; stored: the float16 .npy). Approximate: `build_approximate` (train, fill, tune "
                  "nprobe on gallery rows to the target recall); stored: the index file faiss writes. Peak RSS +: "
                  "how far the build raised the process's peak resident memory. Recall@10: against exact search "
                  "on the held-out queries. MB = 10^6 bytes.", "",
                  "| N | search | build s | stored MB | stored MB per 1M | peak RSS + MB | p50 ms | p99 ms "
                  "| recall@10 | nprobe (lists) | recall@10 at nprobe 1 | own-centre share of exact top-10 |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for s in report["sizes"]:
            e, a = s["exact"], s["approximate"]
            lines.append(f"| {s['n']:,} | exact | {e['build_s']:.2f} | {_mb(e['stored_bytes'])} | "
                         f"{e['stored_mb_per_million']:.0f} | {_mb(e['peak_rss_increase_bytes'])} | "
                         f"{e['p50_ms']:.2f} | {e['p99_ms']:.2f} | 1 | – | – | "
                         f"{s['own_centre_share_of_exact_top10']:.3f} |")
            lines.append(f"| {s['n']:,} | {a['kind']} | {a['build_s']:.1f} | {_mb(a['serialized_bytes'])} | "
                         f"{a['serialized_mb_per_million']:.0f} | {_mb(a['peak_rss_increase_bytes'])} | "
                         f"{a['p50_ms']:.2f} | {a['p99_ms']:.2f} | {a['recall_at_10']:.3f} | {a['nprobe']} "
                         f"({a['lists']}) | {a['recall_at_10_nprobe_1']:.3f} | |")
        lines += ["", "Held-out recall@10 by nprobe: " + "; ".join(map(_curve, report["sizes"])) + ".", "",
                  "Load average (1 min) when each size was done: " + "; ".join(
                      f"{s['n']:,}: {s['load_average'][0]:.2f}" for s in report["sizes"]) + ".", ""]
    if report["targets"]:
        lines += ["## Targets (issue)", "", "| target | measured | met |", "|---|---|---|"]
        for t in report["targets"]:
            if t["met"] is None:
                lines.append(f"| {t['target']} | not measured ({TARGET_SIZE:,} not in --sizes) | – |")
                continue
            shown = f"{t['measured']:.3f}" if not t["unit"] else f"{t['measured']:.1f} {t['unit']}"
            verdict = "yes" if t["met"] else f"**no**, by {abs(t['margin']):.3g} {t['unit']}".rstrip()
            lines.append(f"| {t['target']} | {shown} | {verdict} |")
        lines.append("")
    if report.get("store"):
        lines += store_markdown(report["store"])
    return "\n".join(lines)
