"""``conlip-retrieval index`` and ``serve`` at scale, for ``conlip-retrieval-bench --store-sizes``: each
size is indexed and then served in child processes of their own, so that each one's wall time and
peak resident memory (the kernel's VmHWM for that process) are its own; search latency p50/p99 and
recall@10 against exact search come from the serving process; the figures for a larger gallery are
calculated from the measured ones (``extrapolate``).

``index`` is ``IndexWriter``'s real path (chunks, metadata, assembly, faiss) with ``SyntheticEmbedder``
in place of the model. ``serve`` is ``Index`` loaded as ``conlip-retrieval serve`` loads it, searched
one query at a time through ``Index.search`` (faiss or exact search, then the rows' metadata): the
web layer and the query model are left out, their cost does not grow with the gallery.
"""
import multiprocessing
import shutil
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

from conlip_plugin.retrieval.nearest import RECALL_K, exact_search, recall_at_k
from conlip_plugin.retrieval.sizing import BudgetTooSmall, choose, format_bytes
from conlip_plugin.benchmarks.process_memory import status_bytes
from conlip_plugin.benchmarks.synthetic_vectors import SyntheticEmbedder, synthetic_items

MB = 1e6


def _imported() -> int:
    """The process's RSS once what ``index`` and ``serve`` import is loaded (torch, faiss, pyarrow)."""
    import faiss  # noqa: F401  (imported where used; here, so that the baseline holds it)
    import pyarrow  # noqa: F401

    from conlip_plugin.retrieval import store  # noqa: F401

    return status_bytes("VmRSS")


def _index_child(out: str, n: int, dim: int, centres: int, noise: float, seed: int, chunk_size: int,
                 max_index_memory: int) -> dict:
    from conlip_plugin.retrieval.store import IndexWriter

    base, start = _imported(), time.perf_counter()
    writer = IndexWriter(Path(out), SyntheticEmbedder(dim, centres, noise, seed), f"synthetic:{n}",
                         chunk_size=chunk_size, max_index_memory=max_index_memory, progress=False)
    manifest = writer.run(synthetic_items(n))
    return {"wall_s": time.perf_counter() - start, "base_rss_bytes": base, "peak_rss_bytes": status_bytes("VmHWM"),
            "manifest": manifest}


def _serve_child(out: str, queries: np.ndarray, k: int) -> dict:
    from conlip_plugin.retrieval.store import Index

    base, start = _imported(), time.perf_counter()
    index = Index(Path(out))
    loaded_s, loaded_rss = time.perf_counter() - start, status_bytes("VmRSS")
    index.search(queries[0], "images", k)
    times, rows = [], []
    for query in queries:
        began = time.perf_counter()
        results = index.search(query, "images", k)
        times.append((time.perf_counter() - began) * 1e3)
        rows.append([r["row"] for r in results])
    p50, p99 = np.percentile(times, [50, 99])
    return {"load_s": loaded_s, "base_rss_bytes": base, "loaded_rss_bytes": loaded_rss, "peak_rss_bytes": status_bytes("VmHWM"),
            "p50_ms": float(p50), "p99_ms": float(p99), "rows": rows}


def _run(target: Callable[..., dict], conn, kwargs: dict) -> None:
    conn.send(target(**kwargs))
    conn.close()


def in_child(target: Callable[..., dict], **kwargs) -> dict:
    """``target(**kwargs)`` in a fresh (spawned) process, whose peak memory is then its own."""
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_run, args=(target, send, kwargs))
    child.start()
    send.close()
    result = receive.recv()
    child.join()
    if child.exitcode:
        raise RuntimeError(f"{target.__name__} exited with status {child.exitcode}")
    return result


def bench_store(n: int, work: Path, queries: np.ndarray, dim: int, centres: int, noise: float, seed: int,
                chunk_size: int, max_index_memory: int) -> dict:
    """Index ``n`` synthetic items into ``work``, serve them, measure both, then delete the index."""
    out = work / f"index-{n}"
    shutil.rmtree(out, ignore_errors=True)
    print(f"[store {n:,}] indexing", flush=True)
    index = in_child(_index_child, out=str(out), n=n, dim=dim, centres=centres, noise=noise, seed=seed,
                     chunk_size=chunk_size, max_index_memory=max_index_memory)
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    print(f"[store {n:,}] indexed in {index['wall_s']:.0f} s, peak RSS {index['peak_rss_bytes'] / MB:.0f} MB; "
          f"serving {len(queries)} queries", flush=True)
    serve = in_child(_serve_child, out=str(out), queries=queries, k=RECALL_K)
    gallery = np.load(out / "images.npy", mmap_mode="r")
    truth_scores = exact_search(gallery, queries, RECALL_K)[0]
    recall = recall_at_k(gallery, queries, np.asarray(serve.pop("rows")), truth_scores, RECALL_K)
    del gallery
    shutil.rmtree(out)
    search = index["manifest"]["search"]["images"]
    print(f"[store {n:,}] serve peak RSS {serve['peak_rss_bytes'] / MB:.0f} MB, p99 {serve['p99_ms']:.1f} ms, "
          f"recall@10 {recall:.3f} ({search['kind']})", flush=True)
    return {"n": n, "index": {"wall_s": index["wall_s"], "base_rss_bytes": index["base_rss_bytes"],
                              "peak_rss_bytes": index["peak_rss_bytes"],
                              "search": search, "files": files, "disk_bytes": sum(files.values())},
            "serve": {**serve, "recall_at_10": recall}}


def extrapolate(sizes: List[dict], n: int, dim: int, max_index_memory: int) -> Optional[dict]:
    """Figures for ``n`` items from the two largest measured sizes with an approximate index. Wall time,
    disk (less the faiss file) and what loading adds to the serving process's memory (over its RSS
    after the imports) scale with the items, at the largest size's cost per item. ``index``'s peak over
    its imports is fitted through both sizes as a fixed part plus a multiple of the faiss index's size
    (the sizer's, for the plan it makes under the same budget): the chunk bounds the rest. What
    searching adds to the served RSS is the inverted lists' pages it reads: it scales with the bytes of
    one list (items x code bytes / lists)."""
    measured = sorted((s for s in sizes if s["index"]["search"]["kind"] != "exact"), key=lambda s: s["n"])
    if len(measured) < 2:
        return None
    small, large = measured[-2], measured[-1]
    scale, serve = n / large["n"], large["serve"]
    try:
        plan = choose(n, dim, max_index_memory)
    except BudgetTooSmall as err:
        return {"n": n, "from": [small["n"], large["n"]], "unbuildable": str(err)}
    plans = [choose(s["n"], dim, max_index_memory) for s in (small, large)]
    rises = [s["index"]["peak_rss_bytes"] - s["index"]["base_rss_bytes"] for s in (small, large)]
    per_index_byte = (rises[1] - rises[0]) / (plans[1].bytes - plans[0].bytes)
    fixed = rises[1] - per_index_byte * plans[1].bytes
    faiss_file = large["index"]["files"].get("images.faiss", 0)
    loaded = serve["base_rss_bytes"] + (serve["loaded_rss_bytes"] - serve["base_rss_bytes"]) * scale
    list_bytes = scale * plan.code_bytes / plans[1].code_bytes * plans[1].lists / plan.lists
    return {"n": n, "from": [small["n"], large["n"]], "kind": plan.factory, "index_bytes": plan.bytes,
            "index_wall_s": large["index"]["wall_s"] * scale, "index_fixed_bytes": fixed,
            "index_peak_per_index_byte": per_index_byte,
            "index_peak_rss_bytes": large["index"]["base_rss_bytes"] + fixed + per_index_byte * plan.bytes,
            "serve_loaded_rss_bytes": loaded,
            "serve_peak_rss_bytes": loaded + (serve["peak_rss_bytes"] - serve["loaded_rss_bytes"]) * list_bytes,
            "disk_bytes": (large["index"]["disk_bytes"] - faiss_file) * scale + plan.bytes}


def markdown(store: Dict[str, object]) -> List[str]:
    """The report's section on ``index`` and ``serve`` at each size, and the calculated one."""
    lines = [f"## index and serve at scale ({store['dim']}-d synthetic vectors, --max-index-memory "
             f"{format_bytes(store['max_index_memory'])}, chunk size {store['chunk_size']})", "",
             "Each size indexed (`IndexWriter` with synthetic vectors in place of the model) and then served "
             "(`Index` loaded, one query at a time through `Index.search`) in a child process of its own; peak "
             "RSS is that process's VmHWM. Recall@10: against exact search of the held-out queries. "
             "MB = 10^6 bytes.", "",
             "| N | index s | index peak RSS MB (after imports) | index kind, nprobe | disk MB | serve load s | "
             "serve RSS loaded MB (after imports) | serve peak RSS MB | p50 ms | p99 ms | recall@10 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in store["sizes"]:
        i, v, search = s["index"], s["serve"], s["index"]["search"]
        kind = search["kind"] if search["kind"] == "exact" else f"{search['kind']}, {search['nprobe']}"
        lines.append(f"| {s['n']:,} | {i['wall_s']:.0f} | {i['peak_rss_bytes'] / MB:.0f} "
                     f"({i['base_rss_bytes'] / MB:.0f}) | {kind} | {i['disk_bytes'] / MB:.0f} | {v['load_s']:.2f} | "
                     f"{v['loaded_rss_bytes'] / MB:.0f} ({v['base_rss_bytes'] / MB:.0f}) | "
                     f"{v['peak_rss_bytes'] / MB:.0f} | {v['p50_ms']:.2f} | {v['p99_ms']:.2f} | "
                     f"{v['recall_at_10']:.3f} |")
    calc = store.get("calculated")
    if calc and calc.get("unbuildable"):
        lines += ["", f"Not calculated for {calc['n']:,} items: {calc['unbuildable']}."]
    elif calc:
        lines += ["", f"Calculated for {calc['n']:,} items from the costs measured at {calc['from'][0]:,} and "
                      f"{calc['from'][1]:,} (see `retrieval_scale.extrapolate`; index's peak over its imports: "
                      f"{calc['index_fixed_bytes'] / MB:,.0f} MB + {calc['index_peak_per_index_byte']:.2f} x the "
                      f"faiss index): index {calc['kind']} of "
                      f"{calc['index_bytes'] / MB:,.0f} MB, index wall {calc['index_wall_s'] / 3600:.1f} h, index "
                      f"peak RSS {calc['index_peak_rss_bytes'] / MB:,.0f} MB, serve RSS loaded "
                      f"{calc['serve_loaded_rss_bytes'] / MB:,.0f} MB, serve peak RSS "
                      f"{calc['serve_peak_rss_bytes'] / MB:,.0f} MB, disk {calc['disk_bytes'] / MB:,.0f} MB."]
    return lines + [""]
