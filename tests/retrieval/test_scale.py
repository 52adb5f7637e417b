"""conlip-retrieval at scale: index memory bounded by the chunk, not the gallery; the memory-budget
sizer; k honoured; metadata read by rows; chunks shared among ranks (in process and under torchrun)."""
import io
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import retrieval_models
import shapes_data
from vector_checks import clustered, float64_recall
from conlip_plugin.retrieval import cli, distributed, sources
from conlip_plugin.retrieval.arrays import NpyWriter
from conlip_plugin.retrieval.distributed import Ranks
from conlip_plugin.retrieval.metadata import ItemsReader, ItemsWriter
from conlip_plugin.retrieval.nearest import SCORE_BYTES, build_approximate, exact_search
from conlip_plugin.retrieval.sizing import BudgetTooSmall, candidates, choose, list_count, memory_size
from conlip_plugin.retrieval.sources import gallery_items
from conlip_plugin.retrieval.store import Index, IndexWriter
from conlip_plugin.benchmarks.synthetic_vectors import SyntheticEmbedder, synthetic_items, synthetic_queries

DIM = 16


def synthetic_index(out: Path, n: int, **kw) -> dict:
    return IndexWriter(out, SyntheticEmbedder(DIM, 50, 2.0, 0), f"synthetic:{n}", progress=False, **kw).run(
        synthetic_items(n))


def test_index_memory_is_bounded_by_the_chunk_not_the_gallery(tmp_path):
    """50k items in chunks of 1000: what Python allocates (tracemalloc counts numpy's buffers too) stays
    under a bound that holding the gallery's records (about 0.3 KB each as dicts) or a second copy of its
    vectors would exceed."""
    tracemalloc.start()
    try:
        manifest = synthetic_index(tmp_path / "idx", 50_000, chunk_size=1000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert manifest["counts"]["items"] == 50_000
    assert peak < 6e6, f"index allocated {peak / 1e6:.1f} MB at its peak"
    assert ItemsReader(tmp_path / "idx" / "items.arrow").rows([49_999]) == [
        {"key": "000049999.jpg", "path": "/gallery/00004/000049999.jpg"}]


def test_exact_search_of_many_queries_allocates_a_bounded_block(tmp_path):
    """1000 tuning queries against 70k vectors: the scores are made a block at a time whose size falls
    with the number of queries (all at once, or blocks of 65536 rows, would take hundreds of MB)."""
    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((70_000, DIM)).astype(np.float16)
    queries = rng.standard_normal((1000, DIM)).astype(np.float32)
    tracemalloc.start()
    try:
        scores, ids = exact_search(gallery, queries, 11)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * SCORE_BYTES
    truth = np.argsort(-(queries[:3].astype(np.float64) @ gallery.astype(np.float64).T), axis=1)[:, :11]
    assert [set(row) for row in ids[:3]] == [set(row) for row in truth]


def test_npy_writer_writes_np_save_byte_for_byte(tmp_path):
    array = np.arange(7 * 3, dtype=np.float16).reshape(7, 3)
    writer = NpyWriter(tmp_path / "a.npy", array.shape, np.float16)
    writer.write(array[:4])
    assert not (tmp_path / "a.npy").exists()
    writer.write(array[4:])
    writer.close()
    expected = io.BytesIO()
    np.save(expected, array)
    assert (tmp_path / "a.npy").read_bytes() == expected.getvalue()
    short = NpyWriter(tmp_path / "b.npy", (3,), np.int64)
    short.write(np.arange(2))
    with pytest.raises(ValueError, match="2 rows written of 3"):
        short.close()


def test_items_reader_returns_the_rows_asked_in_their_order(tmp_path):
    writer = ItemsWriter(tmp_path / "items.arrow")
    writer.write([{"key": "a", "path": "/a.png", "caption": "an a"}, {"key": "b", "path": "/b.png"}])
    writer.write([])
    writer.write([{"key": "c", "shard": "/s.tar", "offset": 512, "size": 9}])
    writer.close()
    reader = ItemsReader(tmp_path / "items.arrow")
    assert reader.count == 3
    assert reader.rows([2, 0, 1]) == [{"key": "c", "shard": "/s.tar", "offset": 512, "size": 9},
                                      {"key": "a", "caption": "an a", "path": "/a.png"},
                                      {"key": "b", "path": "/b.png"}]
    with pytest.raises(IndexError, match="no item 3; this index holds items 0 to 2"):
        reader.rows([3])


def test_sizer_keeps_float16_while_it_fits_then_the_largest_product_quantiser():
    n, dim = 10_000_000, 256
    fp16 = choose(n, dim, 8 * 2 ** 30)
    assert fp16.factory == "IVF4096,SQfp16" and fp16.bytes == n * (512 + 8) + 4096 * 256 * 4
    pq = choose(n, dim, 1 * 2 ** 30)  # 1 GiB / 10M = 107 bytes a vector: PQ64 (72 with its id)
    assert pq.factory == "OPQ64,IVF4096,PQ64x8" and pq.bytes <= 2 ** 30
    assert choose(n, dim, 2 * 2 ** 30).factory == "IVF4096,PQ128x8"  # 2 dimensions a byte: no OPQ
    sizes = [plan.bytes for plan in candidates(n, dim)]
    assert sizes == sorted(sizes, reverse=True)
    with pytest.raises(BudgetTooSmall, match=r"need at least 118\.9M \(OPQ4,IVF4096,PQ4x8\), over "
                                             r"--max-index-memory 100M; pass --max-index-memory 119M or more"):
        choose(n, dim, 100 * 2 ** 20)
    assert list_count(10_000_000) == 4096 and list_count(1_000_000) == 4096


def test_max_index_memory_reads_sizes_and_names_bad_ones():
    assert memory_size("8G") == 8 * 2 ** 30 and memory_size("512m") == 512 * 2 ** 20
    assert memory_size("1.5GiB") == int(1.5 * 2 ** 30) and memory_size("1000") == 1000
    for bad in ("", "8X", "-1G", "0"):
        with pytest.raises(Exception, match="must be a size such as 512M, 8G"):
            memory_size(bad)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["index", "--model", "m", "--images", "x", "--out", "o",
                                       "--max-index-memory", "lots"])


@pytest.mark.parametrize("budget, kind", [(10 ** 9, "IVF100,SQfp16"), (100_000, "IVF100,PQ8x8")])
def test_the_budget_chooses_the_index_and_its_recall_is_reported(budget, kind):
    """4000 vectors of 16 dimensions (100 lists): float16 codes (40 bytes a vector with its id) under a
    large budget; under 100 kB, 8-byte PQ codes, whose recall, measured as for float16, is lower and
    reported as found."""
    g = clustered(4000, DIM, seed=2)
    other = clustered(200, DIM, seed=3)  # all 200 are tuning queries, as are 200 gallery rows
    built = build_approximate(g, target_recall=0.95, sample=200, seed=0, other_queries=other, max_bytes=budget)
    assert built.kind == kind
    import faiss

    ivf = faiss.extract_index_ivf(built.index)
    assert (ivf.code_size == 8) == ("PQ" in kind)
    ivf.nprobe = built.nprobe
    own = built.query_rows
    mine = float64_recall(g, g[own], built.index.search(g[own].astype(np.float32), 11)[1], own)
    theirs = float64_recall(g, other, built.index.search(other.astype(np.float32), 10)[1])
    assert built.recall == pytest.approx(min(mine, theirs), abs=1e-9)
    assert built.recall >= 0.95 if "SQfp16" in kind else 0.3 < built.recall < 0.95


def test_an_index_under_a_small_budget_is_pq_and_a_budget_too_small_is_named(tmp_path):
    manifest = synthetic_index(tmp_path / "pq", 3000, exact_below=0, max_index_memory=60_000)
    assert "PQ" in manifest["search"]["images"]["kind"] and 0 < manifest["search"]["images"]["recall_at_10"] < 1
    with pytest.raises(SystemExit, match=r"the approximate images index: 3,000 vectors of 16 dimensions need at "
                                         r"least .* pass --max-index-memory .*; then run the same command again"):
        synthetic_index(tmp_path / "tiny", 3000, exact_below=0, max_index_memory=1000)


def test_k_is_honoured_when_the_tuned_nprobe_reaches_too_few_vectors(tmp_path):
    """An approximate index probed at nprobe 1 holds about 60 vectors in the list it probes: asked for
    300, faiss alone pads with -1; search raises nprobe until 300 come back, the exact top 300 where
    every list is probed. More than the gallery holds: all, and the reason."""
    synthetic_index(tmp_path / "idx", 3000, exact_below=0)
    index = Index(tmp_path / "idx")
    ann = index.approximate["images"]
    ann.nprobe = 1
    query = synthetic_queries(1, DIM, 50, 2.0, 0)[0][0]
    import faiss

    faiss.extract_index_ivf(ann.index).nprobe = 1
    assert (ann.index.search(query[None], 300)[1] < 0).any()  # the shortfall this test is about
    results = index.search(query, "images", 300)
    assert len(results) == 300 and results.short_reason is None
    assert len({r["row"] for r in results}) == 300 and [r["rank"] for r in results] == list(range(1, 301))
    assert all(a["score"] >= b["score"] for a, b in zip(results, results[1:]))
    everything = index.search(query, "images", 5000)
    assert len(everything) == 3000 and everything.short_reason == ("the index holds 3000 image vector(s), "
                                                                   "fewer than k=5000")
    stored = np.load(tmp_path / "idx" / "images.npy").astype(np.float64)
    assert {r["row"] for r in everything[:10]} == set(np.argsort(-(stored @ query))[:10].tolist())


def test_rows_returns_the_records_search_results_carry(tmp_path):
    synthetic_index(tmp_path / "idx", 500)
    index = Index(tmp_path / "idx")
    results = index.search(synthetic_queries(1, DIM, 50, 2.0, 0)[0][0], "images", 3)
    assert index.rows([r["row"] for r in results]) == [{"key": r["key"], "path": r["path"]} for r in results]
    assert not hasattr(index, "items")


def test_a_csv_is_read_in_blocks_to_the_same_items(tmp_path, monkeypatch):
    (tmp_path / "g.csv").write_text("filepath,title\n" + "".join(f"{n}.png,caption {n}\n" for n in range(11)))
    whole = list(gallery_items(str(tmp_path / "g.csv"), "filepath", "title", ","))
    monkeypatch.setattr(sources, "CSV_BLOCK_ROWS", 3)
    assert list(gallery_items(str(tmp_path / "g.csv"), "filepath", "title", ",")) == whole
    assert [item.caption for item in whole] == [f"caption {n}" for n in range(11)]


class CountingEmbedder(SyntheticEmbedder):
    """Synthetic vectors, counting the chunks it embeds."""

    def __init__(self):
        super().__init__(DIM, 50, 2.0, 0)
        self.chunks = []

    def embed_chunk(self, items, progress):
        self.chunks.append(int(items[0].key.split(".")[0]))
        return super().embed_chunk(items, progress)


def test_ranks_share_the_chunks_and_a_rank_resumes_the_others_work(tmp_path, monkeypatch):
    """Rank 0 of 2 is stopped at once; rank 1 embeds the odd chunks and leaves the assembly to rank 0;
    a one-process run then embeds only the even ones, and its files are byte for byte a one-process
    build's."""
    monkeypatch.setattr(distributed.Ranks, "barrier", lambda self: None)
    whole = synthetic_index(tmp_path / "whole", 1000, chunk_size=100, exact_below=0)

    def killed_at_once():
        raise KeyboardInterrupt
        yield

    with pytest.raises(KeyboardInterrupt):  # rank 0 sets the run up, then is stopped
        IndexWriter(tmp_path / "shared", CountingEmbedder(), "synthetic:1000", chunk_size=100, exact_below=0,
                    progress=False, ranks=Ranks(0, 2)).run(killed_at_once())
    second = CountingEmbedder()
    assert IndexWriter(tmp_path / "shared", second, "synthetic:1000", chunk_size=100, exact_below=0,
                       progress=False, ranks=Ranks(1, 2)).run(synthetic_items(1000)) is None
    assert second.chunks == [100, 300, 500, 700, 900]
    first = CountingEmbedder()
    manifest = IndexWriter(tmp_path / "shared", first, "synthetic:1000", chunk_size=100, exact_below=0,
                           progress=False).run(synthetic_items(1000))
    assert first.chunks == [0, 200, 400, 600, 800] and manifest == whole
    for name in ("images.npy", "items.arrow", "images.faiss", "captions.npy", "skipped.jsonl", "manifest.json"):
        assert (tmp_path / "shared" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


@pytest.mark.slow
def test_two_gloo_ranks_under_torchrun_write_the_one_process_index(tmp_path):
    """torchrun --nproc-per-node 2 (gloo, CPU) and a single process index the shapes CSV in chunks of 4
    with a faiss index: every file is byte for byte the same."""
    data = shapes_data.write(tmp_path / "data")
    ckpt = retrieval_models.conlip_checkpoint(tmp_path / "tiny.pt")
    common = ["-m", "conlip_plugin.retrieval.cli", "index", "--model", "conlip-tiny", "--pretrained", str(ckpt),
              "--images", str(data["csv"]), "--csv-separator", ",", "--chunk-size", "4", "--workers", "0",
              "--exact-below", "0", "--device", "cpu", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single = subprocess.run([sys.executable, *common, "--out", str(tmp_path / "one")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    ranks = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                            "--standalone", *common, "--out", str(tmp_path / "two")], env=env,
                           capture_output=True, text=True, timeout=300)
    assert ranks.returncode == 0, ranks.stderr
    assert "rank 1 of 2: its chunks" in ranks.stdout and "indexed 30 images" in ranks.stdout
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir()) and "images.faiss" in names
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_the_calculated_figures_follow_the_measured_costs():
    """From 1M and 10M measured items to 100M: time, disk and loaded memory scale with the items;
    index's peak is the fitted fixed part plus the fitted multiple of the PQ index the sizer makes
    under the same 8 GiB budget."""
    from conlip_plugin.benchmarks.retrieval_scale import extrapolate

    budget = 8 * 2 ** 30
    fp16_1m, fp16_10m, pq = (choose(n, 256, budget) for n in (1_000_000, 10_000_000, 100_000_000))

    def size(n: int, plan) -> dict:  # a peak of 0.3 GB + 1.5 x the index over imports of 0.8 GB
        return {"n": n, "index": {"wall_s": n / 1e4, "base_rss_bytes": 8e8, "peak_rss_bytes": 8e8 + 3e8 +
                                  1.5 * plan.bytes, "disk_bytes": n * 1100.0, "files": {"images.faiss": n * 520.0},
                                  "search": {"kind": plan.factory}},
                "serve": {"base_rss_bytes": 8e8, "loaded_rss_bytes": 8e8 + n * 10.0, "peak_rss_bytes": 8e8 + n * 110.0}}

    exact = {**size(10_000, fp16_1m), "index": {**size(10_000, fp16_1m)["index"], "search": {"kind": "exact"}}}
    calc = extrapolate([exact, size(1_000_000, fp16_1m), size(10_000_000, fp16_10m)], 100_000_000, 256, budget)
    assert calc["kind"] == pq.factory == "OPQ64,IVF4096,PQ64x8" and calc["from"] == [1_000_000, 10_000_000]
    assert calc["index_wall_s"] == pytest.approx(10_000.0)
    assert calc["index_fixed_bytes"] == pytest.approx(3e8) and calc["index_peak_per_index_byte"] == pytest.approx(1.5)
    assert calc["index_peak_rss_bytes"] == pytest.approx(8e8 + 3e8 + 1.5 * pq.bytes)
    assert calc["disk_bytes"] == pytest.approx(580.0 * 1e8 + pq.bytes)
    assert calc["serve_loaded_rss_bytes"] == pytest.approx(8e8 + 1e9)
    # searching reads lists 10x as long, of 64-byte codes where float16 ones are 512 (4096 lists both)
    assert calc["serve_peak_rss_bytes"] == pytest.approx(8e8 + 1e9 + 1e9 * 10 * 64 / 512)
    assert extrapolate([exact, size(10_000_000, fp16_10m)], 100_000_000, 256, budget) is None
    too_small = extrapolate([size(1_000_000, fp16_1m), size(10_000_000, fp16_10m)], 100_000_000, 256, 2 ** 20)
    assert too_small["unbuildable"].startswith("100,000,000 vectors of 256 dimensions need at least")
