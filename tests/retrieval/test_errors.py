"""conlip-retrieval on damaged indexes, missing optional packages and malformed input: each stops with
a message that names the file or flag and the fix, before the model loads where it can."""
import io
import json
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

import retrieval_models
import shapes_data
from conlip_plugin.arguments import positive_float
from conlip_plugin.retrieval import cli
from conlip_plugin.retrieval.encoder import Encoder
from conlip_plugin.retrieval.metadata import ItemsReader, ItemsWriter
from conlip_plugin.retrieval.nearest import build_approximate
from conlip_plugin.retrieval.sources import gallery_items, shard_items
from conlip_plugin.retrieval.store import Index, IndexWriter, NoCaptions


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The 30 shapes (CSV) indexed twice with a tiny ConLIP model: exact search, and faiss for both kinds."""
    root = tmp_path_factory.mktemp("errors")
    data = shapes_data.write(root / "data")
    ckpt = retrieval_models.conlip_checkpoint(root / "tiny.pt")
    encoder = Encoder("conlip-tiny", str(ckpt), "cpu")
    for kind, exact_below in (("exact", 100), ("approximate", 0)):
        IndexWriter(root / kind, encoder, str(data["csv"]), exact_below=exact_below, progress=False).run(
            csv_items(data))
    return {"root": root, "data": data, "encoder": encoder, "ckpt": ckpt}


def csv_items(data: dict) -> list:
    return list(gallery_items(str(data["csv"]), "filepath", "title", ","))


def no_model(*args, **kwargs):
    raise AssertionError("the model was loaded before the input was checked")


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


def keep_20_rows(path: Path) -> None:
    writer = ItemsWriter(path)
    writer.write(ItemsReader(path).rows(range(20)))
    writer.close()


def drop_nprobe(path: Path) -> None:
    manifest = json.loads(path.read_text())
    del manifest["search"]["images"]["nprobe"]
    path.write_text(json.dumps(manifest))


def rows_past_the_end(path: Path) -> None:
    np.save(path, np.load(path) + 1000)


@pytest.mark.parametrize("kind, name, damage, says", [
    ("exact", "manifest.json", truncate, "manifest.json cannot be read (JSONDecodeError"),
    ("exact", "items.arrow", Path.unlink, "items.arrow cannot be read (FileNotFoundError"),
    ("exact", "items.arrow", truncate, "items.arrow cannot be read (ArrowInvalid"),
    ("exact", "captions.rows.npy", Path.unlink, "captions.rows.npy cannot be read (FileNotFoundError"),
    ("exact", "images.npy", truncate, "images.npy cannot be read (ValueError"),
    ("exact", "items.arrow", keep_20_rows, "images.npy holds 30 vectors of {dim} dimensions, where items.arrow "
                                           "and the manifest call for 20 of {dim}"),
    ("exact", "captions.rows.npy", rows_past_the_end, "captions.rows.npy names rows outside the 30 items"),
    ("approximate", "images.faiss", Path.unlink, "images.faiss cannot be read (RuntimeError"),
    ("approximate", "captions.faiss", truncate, "captions.faiss cannot be read (RuntimeError"),
    ("approximate", "manifest.json", drop_nprobe, "manifest.json has a missing or malformed field (KeyError('nprobe')"),
])
def test_a_damaged_index_names_the_file_and_the_fix(built, tmp_path, kind, name, damage, says):
    copy = tmp_path / kind
    shutil.copytree(built["root"] / kind, copy)
    Index(copy)  # whole, it loads
    damage(copy / name)
    with pytest.raises(SystemExit) as stop:
        Index(copy)
    message, says = str(stop.value), says.format(dim=built["encoder"].embed_dim)
    assert f"the index {copy} is damaged: {says}" in message and "Rebuild it with conlip-retrieval index" in message


def test_without_faiss_the_last_step_names_the_install_and_a_rerun_finishes_without_embedding(built, tmp_path,
                                                                                            monkeypatch):
    items = csv_items(built["data"])
    monkeypatch.setitem(sys.modules, "faiss", None)  # as if faiss-cpu were not installed
    with pytest.raises(SystemExit, match=r"the approximate images index \(30 vectors, --exact-below 0\) needs "
                                         r"faiss-cpu .*pip install 'conlip-plugin\[retrieval\]'; then run the same "
                                         r"command again"):
        IndexWriter(tmp_path / "idx", built["encoder"], str(built["data"]["csv"]), exact_below=0,
                    progress=False).run(items)
    with pytest.raises(SystemExit, match=r"searching .*approximate \(its images have a faiss index\) needs faiss"):
        Index(built["root"] / "approximate")
    monkeypatch.undo()
    monkeypatch.setattr(built["encoder"], "images", no_model)
    manifest = IndexWriter(tmp_path / "idx", built["encoder"], str(built["data"]["csv"]), exact_below=0,
                           progress=False).run(items)
    assert manifest["complete"] and manifest["search"]["images"]["kind"].startswith("IVF")


def test_a_gallery_known_to_need_faiss_is_refused_before_the_model_loads(built, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    monkeypatch.setattr(cli, "Encoder", no_model)
    with pytest.raises(SystemExit, match=r"indexing 20 or more images \(an approximate index from --exact-below 20 "
                                         r"on\) needs faiss-cpu .*; or pass a larger --exact-below"):
        cli.main(["index", "--model", "conlip-tiny", "--images", str(built["data"]["csv"]), "--csv-separator", ",",
                  "--out", str(tmp_path / "idx"), "--exact-below", "20"])


@pytest.mark.parametrize("module, distribution", [("fastapi", "fastapi"), ("uvicorn", "uvicorn"),
                                                  ("python_multipart", "python-multipart")])
def test_serve_without_the_web_packages_names_the_install(built, monkeypatch, module, distribution):
    monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.setattr(cli, "Index", no_model)
    with pytest.raises(SystemExit, match=rf"conlip-retrieval serve needs {distribution}, which is not installed: "
                                         rf"pip install 'conlip-plugin\[retrieval\]'"):
        cli.main(["serve", "--index", str(built["root"] / "exact")])


def test_bad_out_and_bad_shard_patterns_stop_before_the_model_loads(built, tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "Encoder", no_model)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    common = ["index", "--model", "conlip-tiny", "--images", str(built["data"]["csv"]), "--csv-separator", ","]
    with pytest.raises(SystemExit, match="--out .*a-file is a file; pass a folder"):
        cli.main([*common, "--out", str(a_file)])
    with pytest.raises(SystemExit, match="--out .*a-file/index cannot be created"):
        cli.main([*common, "--out", str(a_file / "index")])
    with pytest.raises(SystemExit, match=r"is not a valid shard pattern \(Unbalanced braces.*write ranges as "
                                         r"data/\{000000..000099\}.tar"):
        cli.main(["index", "--model", "conlip-tiny", "--images", str(tmp_path / "shard-{000000..000001.tar"),
                  "--out", str(tmp_path / "idx")])


def test_a_caption_column_that_is_not_there_is_named_unless_left_to_the_default(tmp_path):
    (tmp_path / "a.csv").write_text("filepath,title\nx.png,a caption\n")
    (tmp_path / "b.csv").write_text("filepath\nx.png\n")
    with pytest.raises(SystemExit, match=r"no caption column 'caption' \(columns: \['filepath', 'title'\]\); pass "
                                         r"the caption column as --csv-caption-key"):
        list(gallery_items(str(tmp_path / "a.csv"), "filepath", "caption", ","))
    assert [i.caption for i in gallery_items(str(tmp_path / "a.csv"), "filepath", None, ",")] == ["a caption"]
    assert [i.caption for i in gallery_items(str(tmp_path / "b.csv"), "filepath", None, ",")] == [None]


def test_searching_the_captions_of_an_index_without_any_is_refused(built, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        shutil.copy(built["data"]["root"] / "images" / f"{i:04d}.png", folder)
    IndexWriter(tmp_path / "idx", built["encoder"], str(folder), progress=False).run(gallery_items(str(folder)))
    query = built["encoder"].texts(["a red square"])[0].numpy()
    assert len(Index(tmp_path / "idx").search(query, "images", 5)) == 3
    with pytest.raises(NoCaptions):
        Index(tmp_path / "idx").search(query, "captions", 5)
    with pytest.raises(SystemExit, match="this index has no captions .*search against the images"):
        cli.main(["search", "--index", str(tmp_path / "idx"), "--text", "a red square", "--against", "captions",
                  "--device", "cpu"])


def test_a_moved_exported_folder_is_named_with_the_flag_that_finds_it(built, tmp_path, capsys):
    folder = retrieval_models.plain_open_clip_folder(tmp_path / "exported")
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(built["data"]["root"] / "images" / "0000.png", images)
    cli.main(["index", "--model", f"local-dir:{folder}", "--images", str(images), "--out", str(tmp_path / "idx"),
              "--workers", "0", "--no-progress"])
    moved = folder.rename(tmp_path / "moved")
    with pytest.raises(SystemExit, match=f"the folder {folder} is gone; pass --model local-dir:FOLDER"):
        cli.main(["search", "--index", str(tmp_path / "idx"), "--text", "x", "--device", "cpu"])
    cli.main(["search", "--index", str(tmp_path / "idx"), "--text", "x", "--model", f"local-dir:{moved}",
              "--device", "cpu", "--json"])
    assert '"rank": 1' in capsys.readouterr().out


def test_a_run_stopped_before_its_first_chunk_starts_over_with_new_settings(built, tmp_path):
    items = csv_items(built["data"])

    def stops_at_once():
        raise KeyboardInterrupt
        yield

    with pytest.raises(KeyboardInterrupt):
        IndexWriter(tmp_path / "idx", built["encoder"], "another source", progress=False).run(stops_at_once())
    manifest = IndexWriter(tmp_path / "idx", built["encoder"], str(built["data"]["csv"]), chunk_size=16,
                           progress=False).run(items)
    assert manifest["complete"] and manifest["counts"]["items"] == 30


def as_format_1(manifest_path: Path) -> None:
    manifest = json.loads(manifest_path.read_text())
    manifest["format"] = 1
    manifest_path.write_text(json.dumps(manifest))


def test_a_stopped_run_of_the_older_format_is_named_as_such(built, tmp_path):
    items = csv_items(built["data"])

    def stops_after_a_chunk():
        yield from items[:9]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        IndexWriter(tmp_path / "idx", built["encoder"], "src", chunk_size=8, progress=False).run(stops_after_a_chunk())
    as_format_1(tmp_path / "idx" / "manifest.json")
    with pytest.raises(SystemExit, match="idx holds a stopped run of format 1 \\(an older conlip-plugin\\); this one "
                                         "writes format 2. Delete .*idx and index again"):
        IndexWriter(tmp_path / "idx", built["encoder"], "src", chunk_size=8, progress=False).run(items)


def test_an_index_of_the_older_format_is_refused_with_the_command_that_rebuilds_it(built, tmp_path):
    shutil.copytree(built["root"] / "exact", tmp_path / "old")
    as_format_1(tmp_path / "old" / "manifest.json")
    with pytest.raises(SystemExit, match=f"is an index of format 1 .*reads format 2. Rebuild it: conlip-retrieval "
                                         f"index --model conlip-tiny --pretrained {built['ckpt'].resolve()} --images "
                                         f"{built['data']['csv']} --out NEW_INDEX"):
        Index(tmp_path / "old")


def test_a_gallery_of_k_or_fewer_vectors_is_searched_exactly(built, tmp_path):
    items = csv_items(built["data"])[:5]
    manifest = IndexWriter(tmp_path / "idx", built["encoder"], "five", exact_below=0, progress=False).run(items)
    assert manifest["search"] == {"images": {"kind": "exact"}, "captions": {"kind": "exact"}}
    with pytest.raises(ValueError, match="5 vectors: tuning recall@10 needs more than 10"):
        build_approximate(np.eye(5, 8, dtype=np.float32))


def test_a_sample_with_jpg_and_png_is_indexed_by_its_jpg_as_open_clip_train_reads_it(tmp_path):
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        for name, payload in (("000000.png", b"png bytes"), ("000000.jpg", b"the jpg's bytes"), ("000000.txt", b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    (item,) = shard_items(str(shard))
    assert item.read_bytes() == b"the jpg's bytes"


@pytest.mark.parametrize("text", ["inf", "nan", "0", "-1"])
def test_positive_float_refuses_what_no_limit_can_be(text):
    with pytest.raises(Exception, match="must be a finite number more than 0"):
        positive_float(text)


def test_the_query_model_is_hashed_once(built, monkeypatch):
    """search and serve check the query model against the index's by sha256, then load it: one pass over
    a checkpoint that can be gigabytes."""
    from conlip_plugin.retrieval import encoder as encoder_module

    hashed = []
    sha256 = encoder_module._sha256
    monkeypatch.setattr(encoder_module, "_sha256", lambda paths: hashed.append(paths) or sha256(paths))
    encoder = cli.query_encoder(Index(built["root"] / "exact"), None, None, "cpu")
    assert hashed == [[built["ckpt"].resolve()]] and encoder.identity == Index(built["root"] / "exact").identity


def test_a_strip_query_image_is_told_to_be_cropped(built, tmp_path):
    from PIL import Image

    Image.new("RGB", (1000, 4), "white").save(tmp_path / "strip.png")
    with pytest.raises(SystemExit, match=r"strip.png is 1000x4 pixels, an aspect ratio over 200:1.*; crop it to at "
                                         r"most 200:1"):
        cli.main(["search", "--index", str(built["root"] / "exact"), "--image", str(tmp_path / "strip.png"),
                  "--device", "cpu"])


def test_a_device_index_or_kind_this_machine_lacks_is_refused(monkeypatch):
    import argparse

    import torch

    from conlip_plugin.arguments import torch_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert torch_device("cuda:0") == "cuda:0"
    with pytest.raises(argparse.ArgumentTypeError, match=r"cuda:1, but torch sees 1 CUDA device\(s\) \(cuda:0 to "
                                                          r"cuda:0\)"):
        torch_device("cuda:1")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(argparse.ArgumentTypeError, match="mps, but torch sees no Apple GPU"):
        torch_device("mps")
