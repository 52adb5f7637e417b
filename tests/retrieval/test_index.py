"""conlip-retrieval's gallery sources, index files, resumption and search, against independent
computations (float64 loops over the stored vectors, the encoder run one image at a time)."""
import dataclasses
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import retrieval_models
import shapes_data
from vector_checks import clustered, float64_recall
from conlip_plugin.retrieval.encoder import MAX_ASPECT_RATIO, Encoder, UnreadableImage, decode_image
from conlip_plugin.retrieval import embedding
from conlip_plugin.retrieval.metadata import ItemsReader
from conlip_plugin.retrieval.nearest import build_approximate, exact_search, recall_at_k
from conlip_plugin.retrieval.sizing import list_count
from conlip_plugin.retrieval.sources import Item, gallery_items
from conlip_plugin.retrieval.store import Index, IndexWriter


def float64_top_k(gallery: np.ndarray, query: np.ndarray, k: int) -> list:
    """Explicit loop: every row's score in float64, sorted best first, lower row first on ties."""
    scores = [(-sum(float(a) * float(b) for a, b in zip(row, query)), i) for i, row in enumerate(gallery)]
    return [i for _, i in sorted(scores)[:k]]


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """The 30 shapes images, plus an unreadable file and a missing one in a CSV, and a tiny ConLIP model."""
    root = tmp_path_factory.mktemp("gallery")
    data = shapes_data.write(root / "data")
    (root / "data" / "images" / "broken.png").write_bytes(b"\x89PNG not really")
    with open(data["csv"], "a") as f:
        f.write(f"{root / 'data' / 'images' / 'broken.png'},a broken file\n{root / 'gone.png'},a missing file\n")
    ckpt = retrieval_models.conlip_checkpoint(root / "tiny.pt")
    return {"root": root, "csv": data["csv"], "shard": data["shard"], "ckpt": ckpt,
            "encoder": Encoder("conlip-tiny", str(ckpt), "cpu")}


def build(gallery, out: Path, chunk_size: int = 4096, **kw) -> dict:
    items = gallery_items(str(gallery["csv"]), "filepath", "title", ",")
    return IndexWriter(out, gallery["encoder"], str(gallery["csv"]), chunk_size=chunk_size, progress=False,
                       **kw).run(items)


def stops_after(gallery, n: int):
    """The gallery's items, interrupted (as by Ctrl-C) when item ``n`` is asked for."""
    for i, item in enumerate(gallery_items(str(gallery["csv"]), "filepath", "title", ",")):
        if i == n:
            raise KeyboardInterrupt
        yield item


def test_exact_search_matches_a_float64_loop():
    rng = np.random.default_rng(1)
    g = rng.standard_normal((300, 8)).astype(np.float16)
    g[17] = g[3]  # an exact tie: the lower row comes first
    queries = rng.standard_normal((4, 8)).astype(np.float32)
    queries[0] = g[3].astype(np.float32)
    scores, ids = exact_search(g, queries, 6)
    for q, row_ids, row_scores in zip(queries, ids, scores):
        expected = float64_top_k(g.astype(np.float64), q.astype(np.float64), 6)
        assert row_ids.tolist() == expected
        np.testing.assert_allclose(row_scores, [float(g[i].astype(np.float64) @ q) for i in expected], rtol=1e-5)
    assert ids[0][:2].tolist() == [3, 17]


def test_list_count_grows_with_the_square_root_and_respects_training_points():
    assert list_count(1_000_000) == 4096 and list_count(100_000) == 1024
    assert list_count(300) == 300 // 40 and list_count(10) == 1


def test_approximate_index_reports_the_recall_an_independent_computation_finds():
    g = clustered(4000, 16, seed=2)
    built = build_approximate(g, target_recall=0.9, sample=50, seed=0)
    assert built.kind == f"IVF{list_count(4000)},SQfp16"
    own = built.query_rows
    assert len(own) == built.queries == 50
    built.index.nprobe = built.nprobe
    found = built.index.search(g[own].astype(np.float32), 11)[1]
    assert built.recall == pytest.approx(float64_recall(g, g[own], found, own), abs=1e-9)
    assert built.recall >= 0.9 or built.nprobe == list_count(4000)


def test_approximate_index_is_tuned_on_the_other_modality_too():
    """Queries of the other modality sit away from the gallery (a shift, as CLIP's modality gap): the
    tuning uses them too, and the reported recall is the lower of the two sets', each recomputed."""
    g = clustered(4000, 16, seed=2)
    shift = np.random.default_rng(5).standard_normal(16)
    other = g[::20].astype(np.float64) + 0.8 * shift / np.linalg.norm(shift)
    other = (other / np.linalg.norm(other, axis=1, keepdims=True)).astype(np.float16)
    built = build_approximate(g, target_recall=0.97, sample=200, seed=0, other_queries=other)
    assert built.queries == 400  # 200 gallery rows and all 200 other-modality vectors
    built.index.nprobe = built.nprobe
    own = built.query_rows
    mine = float64_recall(g, g[own], built.index.search(g[own].astype(np.float32), 11)[1], own)
    theirs = float64_recall(g, other, built.index.search(other.astype(np.float32), 10)[1])
    assert built.recall == pytest.approx(min(mine, theirs), abs=1e-9)
    assert built.recall >= 0.97 or built.nprobe == list_count(4000)
    alone = build_approximate(g, target_recall=0.97, sample=200, seed=0)
    assert alone.nprobe <= built.nprobe


def test_exact_duplicates_count_as_found():
    """A tenth of the gallery is one repeated vector: exact search and faiss break the tie differently,
    which an id overlap counted as misses all the way to nprobe = lists (recall 0.92 there)."""
    g = clustered(4000, 16, seed=2).copy()
    g[::10] = g[0]
    built = build_approximate(g, target_recall=0.95, sample=200, seed=0)
    assert built.recall >= 0.95 and built.nprobe < list_count(4000)
    built.index.nprobe = built.nprobe
    own = built.query_rows
    found = built.index.search(g[own].astype(np.float32), 11)[1]
    assert built.recall == pytest.approx(float64_recall(g, g[own], found, own), abs=1e-9)


def test_recall_at_k_counts_by_score():
    gallery = np.array([[1, 0], [1, 0], [0.6, 0.8], [0, 1]], dtype=np.float32)  # rows 0 and 1 tie
    queries = np.array([[1, 0], [0, 1]], dtype=np.float32)
    truth_scores = np.array([[1, 1], [1, 0.8]], dtype=np.float32)
    found = np.array([[1, 2], [3, -1]])  # the tie's other row counts; faiss's -1 padding does not
    assert recall_at_k(gallery, queries, found, truth_scores, 2) == pytest.approx(2 / 4)
    assert recall_at_k(gallery, queries, found, truth_scores, 2) == pytest.approx(
        float64_recall(gallery, queries, found, k=2))


def test_folder_items_take_sidecar_captions_and_skip_other_files(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    shapes_data.draw("red", "square").save(tmp_path / "sub" / "b.png")
    shapes_data.draw("blue", "circle").save(tmp_path / "a.jpg")
    (tmp_path / "a.txt").write_text("  a blue\n circle ")
    (tmp_path / "notes.md").write_text("not an image")
    monkeypatch.chdir(tmp_path.parent)  # a relative --images: the index must still find the files elsewhere
    items = list(gallery_items(tmp_path.name))
    assert [(i.key, i.caption) for i in items] == [("a.jpg", "a blue circle"), ("sub/b.png", None)]
    assert [i.path for i in items] == [str(tmp_path.resolve() / "a.jpg"), str(tmp_path.resolve() / "sub" / "b.png")]


def test_a_strip_image_and_one_that_exhausts_memory_are_skipped_not_fatal(gallery, tmp_path, monkeypatch):
    """A 1 x 20,000 strip resized to the model's input side would take gigabytes: it is skipped from
    its header; an image whose decoding runs out of memory is skipped too, and the index finishes."""
    shapes_data.draw("red", "square").save(tmp_path / "a.png")
    shapes_data.draw("blue", "bar").save(tmp_path / "b.png")
    Image.new("RGB", (20_000, 1)).save(tmp_path / "strip.png")
    with pytest.raises(UnreadableImage, match=f"20000x1 pixels, an aspect ratio over {MAX_ASPECT_RATIO}:1"):
        decode_image((tmp_path / "strip.png").read_bytes(), gallery["encoder"].preprocess)
    real_decode = embedding.decode_image

    def exhausted_for_b(data, preprocess):
        if data == (tmp_path / "b.png").read_bytes():
            raise MemoryError
        return real_decode(data, preprocess)

    monkeypatch.setattr(embedding, "decode_image", exhausted_for_b)
    manifest = IndexWriter(tmp_path / "idx", gallery["encoder"], str(tmp_path), progress=False).run(
        gallery_items(str(tmp_path)))
    assert manifest["counts"] == {"items": 1, "captions": 0, "skipped": 2}
    skipped = {s["key"]: s["reason"] for s in map(json.loads, (tmp_path / "idx" / "skipped.jsonl").open())}
    assert set(skipped) == {"b.png", "strip.png"} and skipped["b.png"] == "out of memory while decoding it"
    assert "aspect ratio over" in skipped["strip.png"]


def test_shard_items_point_at_the_image_bytes(tmp_path):
    data = shapes_data.write(tmp_path)
    items = list(gallery_items(str(data["shard"])))
    with tarfile.open(data["shard"]) as tar:
        for n in (0, 29):
            assert items[n].read_bytes() == tar.extractfile(f"{n:06d}.png").read()
            assert items[n].caption == tar.extractfile(f"{n:06d}.txt").read().decode()
    assert Item.from_record(items[5].record()) == items[5]


def test_missing_and_cut_shards_and_imageless_samples_are_skipped_with_reasons(gallery, tmp_path):
    data = shapes_data.write(tmp_path)
    whole = data["shard"].read_bytes()
    with tarfile.open(data["shard"]) as tar:
        png_20, txt_10, png_15 = (tar.getmember(n) for n in ("000020.png", "000010.txt", "000015.png"))
    (tmp_path / "inside.tar").write_bytes(whole[:png_20.offset_data + 40])  # inside sample 20's image
    (tmp_path / "between.tar").write_bytes(whole[:txt_10.offset_data + 512])  # after sample 10, whole
    damaged = bytearray(whole)  # tarfile ends quietly at a member header whose checksum fails
    damaged[png_15.offset + 3] ^= 0xFF
    (tmp_path / "damaged.tar").write_bytes(bytes(damaged))
    with tarfile.open(tmp_path / "textonly.tar", "w") as tar:
        info = tarfile.TarInfo("lonely.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"words"))
    pattern = str(tmp_path / "{shard-000000,inside,between,missing,textonly,damaged}.tar")
    manifest = IndexWriter(tmp_path / "idx", gallery["encoder"], pattern, progress=False).run(gallery_items(pattern))
    lines = (tmp_path / "idx" / "skipped.jsonl").read_text().splitlines()
    skipped = {entry["key"]: entry["reason"] for entry in map(json.loads, lines)}
    assert set(skipped) == {"inside.tar (from the break on)", "between.tar (from the break on)", "missing.tar",
                            "textonly.tar/lonely", "damaged.tar (from the break on)"}
    assert skipped["damaged.tar (from the break on)"].startswith(f"damaged member header at byte {png_15.offset:,}")
    assert "cut short or damaged (unexpected end of data)" in skipped["inside.tar (from the break on)"]
    assert "cut short" in skipped["between.tar (from the break on)"]
    assert skipped["missing.tar"] == "shard not found"
    assert skipped["textonly.tar/lonely"] == "the sample has no image member (it has: txt)"
    assert manifest["counts"] == {"items": 30 + 20 + 11 + 15, "captions": 30 + 20 + 11 + 15, "skipped": 5}


def test_a_gallery_that_is_not_there_or_of_no_known_kind_is_named(tmp_path):
    with pytest.raises(SystemExit, match="--images .*photos not found"):
        gallery_items(str(tmp_path / "photos"))
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(SystemExit, match="neither a folder, a .csv/.tsv file nor a .tar shard pattern"):
        gallery_items(str(tmp_path / "list.json"))


def test_csv_without_the_image_column_names_the_flag(tmp_path):
    (tmp_path / "x.csv").write_text("file,title\na.png,x\n")
    with pytest.raises(SystemExit, match="--csv-img-key"):
        list(gallery_items(str(tmp_path / "x.csv"), "filepath", "title", ","))


def test_index_stores_each_image_and_caption_embedding_and_names_what_it_skipped(gallery, tmp_path):
    manifest = build(gallery, tmp_path / "idx", batch_size=7)
    assert manifest["counts"] == {"items": 30, "captions": 30, "skipped": 2}
    skipped = [json.loads(line) for line in (tmp_path / "idx" / "skipped.jsonl").read_text().splitlines()]
    assert skipped[0]["key"].endswith("broken.png") and "cannot identify image" in skipped[0]["reason"]
    assert skipped[1]["key"].endswith("gone.png") and "No such file" in skipped[1]["reason"]
    images = np.load(tmp_path / "idx" / "images.npy")
    captions = np.load(tmp_path / "idx" / "captions.npy")
    assert images.dtype == np.float16 and captions.dtype == np.float16
    items = ItemsReader(tmp_path / "idx" / "items.arrow").rows(range(30))
    encoder = gallery["encoder"]
    for n in (0, 13, 29):
        alone = encoder.images(decode_image(Path(items[n]["path"]).read_bytes(), encoder.preprocess)[None])[0]
        np.testing.assert_allclose(images[n].astype(np.float32), alone.numpy(), atol=2e-3)
        np.testing.assert_allclose(captions[n].astype(np.float32), encoder.texts([items[n]["caption"]])[0].numpy(),
                                   atol=2e-3)
    assert manifest["model"]["fingerprint"] == encoder.identity.fingerprint
    assert not (tmp_path / "idx" / "parts").exists()


def test_index_search_ranks_as_a_float64_loop_over_the_stored_vectors(gallery, tmp_path):
    build(gallery, tmp_path / "idx")
    index = Index(tmp_path / "idx")
    query = gallery["encoder"].texts(["a green circle"])[0].numpy()
    results = index.search(query, "images", 5)
    stored = np.load(tmp_path / "idx" / "images.npy").astype(np.float64)
    assert [r["row"] for r in results] == float64_top_k(stored, query.astype(np.float64), 5)
    assert [r["rank"] for r in results] == [1, 2, 3, 4, 5]
    assert results[0]["caption"] and results[0]["path"].endswith(".png")
    by_caption = index.search(query, "captions", 3)
    stored_captions = np.load(tmp_path / "idx" / "captions.npy").astype(np.float64)
    assert [r["row"] for r in by_caption] == float64_top_k(stored_captions, query.astype(np.float64), 3)


def test_a_stopped_run_resumes_to_the_same_files(gallery, tmp_path):
    whole = build(gallery, tmp_path / "whole", chunk_size=8)
    writer = IndexWriter(tmp_path / "cut", gallery["encoder"], str(gallery["csv"]), chunk_size=8, progress=False)
    with pytest.raises(KeyboardInterrupt):
        writer.run(stops_after(gallery, 20))
    assert sorted(p.name for p in (tmp_path / "cut" / "parts").iterdir()) == ["000000.npz", "000001.npz"]
    with pytest.raises(SystemExit, match="unfinished"):
        Index(tmp_path / "cut")
    resumed = build(gallery, tmp_path / "cut", chunk_size=8)
    assert resumed == whole
    for name in ("images.npy", "captions.npy", "captions.rows.npy", "items.arrow", "skipped.jsonl"):
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_resuming_with_other_settings_or_a_changed_source_is_refused(gallery, tmp_path):
    writer = IndexWriter(tmp_path / "cut", gallery["encoder"], str(gallery["csv"]), chunk_size=8, progress=False)
    with pytest.raises(KeyboardInterrupt):
        writer.run(stops_after(gallery, 9))
    items = list(gallery_items(str(gallery["csv"]), "filepath", "title", ","))
    with pytest.raises(SystemExit, match="chunk size 8; this run asks for .* chunk size 16"):
        build(gallery, tmp_path / "cut", chunk_size=16)
    renamed = [dataclasses.replace(items[0], key="renamed.png"), *items[1:]]
    recaptioned = [items[0], dataclasses.replace(items[1], caption="an edited caption"), *items[2:]]
    for changed in (items[1:], renamed, recaptioned, items[:5]):  # inside the finished chunk, or cut short
        with pytest.raises(SystemExit, match="chunk 0 .* differs; the source changed"):
            IndexWriter(tmp_path / "cut", gallery["encoder"], str(gallery["csv"]), chunk_size=8,
                        progress=False).run(changed)
    assert build(gallery, tmp_path / "cut", chunk_size=8)["counts"]["items"] == 30


def test_approximate_search_when_the_gallery_is_large(gallery, tmp_path):
    manifest = build(gallery, tmp_path / "idx", exact_below=0)
    assert manifest["search"]["images"]["kind"] == "IVF1,SQfp16"
    assert manifest["search"]["images"]["recall_at_10"] == pytest.approx(1.0)
    index = Index(tmp_path / "idx")
    query = gallery["encoder"].texts(["a red bar"])[0].numpy()
    stored = np.load(tmp_path / "idx" / "images.npy").astype(np.float64)
    assert [r["row"] for r in index.search(query, "images", 4)] == float64_top_k(stored, query.astype(np.float64), 4)


def test_approximate_caption_search_maps_faiss_positions_to_item_rows(gallery, tmp_path):
    """Only some items have captions, so caption vector j belongs to item captions.rows[j]: each result's
    row, caption and score must be that item's, over an index of several inverted lists."""
    colours, shapes = list(shapes_data.COLOURS), shapes_data.SHAPES
    for n in range(120):
        colour, shape = colours[n % len(colours)], shapes[(n // len(colours)) % len(shapes)]
        shapes_data.draw(colour, shape).rotate(n * 3).save(tmp_path / f"{n:03d}.png")
        if n % 4:  # every fourth item has no caption
            (tmp_path / f"{n:03d}.txt").write_text(f"a {colour} {shape}, picture {n}")
    manifest = IndexWriter(tmp_path / "idx", gallery["encoder"], str(tmp_path), progress=False,
                           exact_below=0).run(gallery_items(str(tmp_path)))
    assert manifest["counts"] == {"items": 120, "captions": 90, "skipped": 0}
    assert manifest["search"]["captions"]["kind"] == f"IVF{list_count(90)},SQfp16" and list_count(90) >= 2
    index = Index(tmp_path / "idx")
    stored = np.load(tmp_path / "idx" / "captions.npy").astype(np.float64)
    rows = np.load(tmp_path / "idx" / "captions.rows.npy")
    assert rows.tolist() == [n for n in range(120) if n % 4]
    query = gallery["encoder"].texts(["a purple cross"])[0].numpy()
    results = index.search(query, "captions", 10)
    assert len(results) == 10
    for r in results:
        (position,) = np.flatnonzero(rows == r["row"])
        assert r["caption"] == (tmp_path / f"{r['row']:03d}.txt").read_text()
        assert r["score"] == pytest.approx(float(stored[position] @ query.astype(np.float64)), abs=2e-3)
