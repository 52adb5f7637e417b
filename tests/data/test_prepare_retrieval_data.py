"""The data package's retrieval tools (``conlip-prepare``) on miniature Karpathy splits of real images
(skimage.data).

The evaluation layouts are read back by clip_benchmark's own loader and retrieval metric, the
training shards by open_clip_train's own shard reader and size lookup; expected values come from
the fixture JSON, never from the code under test.
"""
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from conlip_plugin import atomic_files
from conlip_plugin.data import files, karpathy, prepare, shards

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "prepare_retrieval_data.py"
SKIMAGE_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "hubble_deep_field",
                 "immunohistochemistry")


def _norm(text: str) -> str:
    return " ".join(text.split())


def _jpeg(name: str) -> bytes:
    from PIL import Image
    from skimage import data

    image = Image.fromarray(getattr(data, name)())
    image.thumbnail((40, 40))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _sentences(tag: str, count: int) -> list:
    """Distinct captions, with the characters a line-based format could trip over."""
    variants = [f"{tag}: a photo, with commas, of something", f'{tag} says "hello"\nacross two lines',
                f"{tag}   with\textra   spaces ", f"{tag} café crème, photo.jpg of a thing", f"{tag} plain",
                f"{tag} sixth caption", f"{tag} seventh caption"]
    return [{"raw": variants[i], "tokens": []} for i in range(count)]


@pytest.fixture(scope="session")
def fixtures(tmp_path_factory):
    """Miniature dataset_flickr30k.json / dataset_coco.json with their image folders."""
    root = tmp_path_factory.mktemp("karpathy")
    jpegs = {name: _jpeg(name) for name in SKIMAGE_NAMES}
    assert len(set(jpegs.values())) == len(jpegs)  # the pairing tests tell images apart by content

    flickr_dir = root / "flickr30k-images"
    flickr_dir.mkdir()
    flickr_splits = ["test", "test", "test", "val", "train", "train", "train", "train"]
    flickr = []
    for i, (name, split) in enumerate(zip(SKIMAGE_NAMES, flickr_splits)):
        filename = f"{1000092795 + i}.jpg"
        (flickr_dir / filename).write_bytes(jpegs[name])
        flickr.append({"filename": filename, "imgid": i, "split": split, "sentids": [],
                       "sentences": _sentences(f"flickr {name}", 5)})
    flickr[5]["sentences"][2]["raw"] = "   "  # an empty training caption
    flickr_json = root / "dataset_flickr30k.json"
    flickr_json.write_text(json.dumps({"images": flickr, "dataset": "flickr30k"}))

    coco_dir = root / "coco"
    coco_splits = [("val2014", "test", 5), ("val2014", "test", 6), ("val2014", "test", 5), ("val2014", "test", 7),
                   ("val2014", "val", 5), ("train2014", "train", 5), ("train2014", "train", 6),
                   ("val2014", "restval", 5)]
    coco = []
    for i, (name, (folder, split, n)) in enumerate(zip(SKIMAGE_NAMES, coco_splits)):
        cocoid = 391895 + 7 * i
        filename = f"COCO_{folder}_{cocoid:012d}.jpg"
        (coco_dir / folder).mkdir(parents=True, exist_ok=True)
        (coco_dir / folder / filename).write_bytes(jpegs[name])
        coco.append({"filepath": folder, "filename": filename, "imgid": i, "split": split, "cocoid": cocoid,
                     "sentids": [], "sentences": _sentences(f"coco {name}", n)})
    coco[6]["sentences"][0]["raw"] = ""  # empty training captions, in train and restval
    coco[7]["sentences"][4]["raw"] = " \n "
    coco_json = root / "dataset_coco.json"
    coco_json.write_text(json.dumps({"images": coco, "dataset": "coco"}))
    return {"root": root, "flickr_json": flickr_json, "flickr_images": flickr_dir, "flickr": flickr,
            "coco_json": coco_json, "coco_images": coco_dir, "coco": coco}


def _source(fx: dict, dataset: str, entry: dict) -> Path:
    return fx["flickr_images"] / entry["filename"] if dataset == "flickr30k" else \
        fx["coco_images"] / entry["filepath"] / entry["filename"]


def _pairs(entries: list, splits: tuple) -> Counter:
    """(file name, caption) of every non-empty caption of the splits, straight from the JSON."""
    return Counter((e["filename"], _norm(s["raw"])) for e in entries if e["split"] in splits
                   for s in e["sentences"] if s["raw"].strip())


def _layout(fx: dict, dataset: str, out: Path, link: str = "symlink"):
    key = "flickr" if dataset == "flickr30k" else "coco"
    return karpathy.eval_layout(dataset, fx[f"{key}_json"], fx[f"{key}_images"], out, link)


def _build(dataset: str, root: Path, transform=None):
    """clip_benchmark's own loader, with any attempt to download turned into a test failure."""
    from clip_benchmark.datasets import builder

    def no_download(command, shell=False):
        raise AssertionError(f"clip_benchmark tried to download: {command}")

    original, builder.call = builder.call, no_download
    try:
        return builder.build_dataset(dataset_name="flickr30k" if dataset == "flickr30k" else "mscoco_captions",
                                     root=str(root), transform=transform, split="test", download=False,
                                     task="zeroshot_retrieval")
    finally:
        builder.call = original


def _loaded_pairs(dataset: str, ds) -> Counter:
    """(file name, caption) pairs as clip_benchmark's dataset object serves them."""
    if dataset == "flickr30k":
        names = [name for name, _ in ds.data]
    else:
        names = [ds.coco.loadImgs(i)[0]["file_name"] for i in ds.ids]
    return Counter((names[i], caption) for i in range(len(ds)) for caption in ds[i][1])


@pytest.mark.parametrize("dataset", ["flickr30k", "mscoco"])
def test_eval_layout_is_read_by_clip_benchmark(fixtures, tmp_path, capsys, dataset):
    entries = fixtures["flickr" if dataset == "flickr30k" else "coco"]
    expected = _pairs(entries, ("test",))
    n_images = sum(e["split"] == "test" for e in entries)
    out = tmp_path / dataset

    counts = _layout(fixtures, dataset, out)
    assert (counts.images, counts.captions) == (n_images, sum(expected.values()))
    prepare.main(["check", "--dataset", dataset, "--root", str(out), "--expect-images", str(n_images)])
    assert f"{n_images} images, {sum(expected.values())} captions" in capsys.readouterr().out

    ds = _build(dataset, out)
    assert len(ds) == n_images
    assert _loaded_pairs(dataset, ds) == expected
    image_dir = out if dataset == "flickr30k" else out / "val2014"
    assert sorted(p.name for p in image_dir.glob("*.jpg")) == sorted(e["filename"] for e in entries
                                                                   if e["split"] == "test")
    for e in entries:
        if e["split"] == "test":
            assert (image_dir / e["filename"]).is_symlink()
            assert (image_dir / e["filename"]).read_bytes() == _source(fixtures, dataset, e).read_bytes()


@pytest.mark.parametrize("dataset", ["flickr30k", "mscoco"])
def test_clip_benchmark_retrieval_pairs_each_caption_with_its_image(fixtures, tmp_path, dataset):
    """clip_benchmark's retrieval metric on the layout with an oracle model: recall@1 is 1 only when every
    caption is paired with the right image file (the pipeline that fails with IndexError on an empty file)."""
    import torch
    from PIL import Image
    from clip_benchmark.datasets.builder import image_captions_collate_fn
    from clip_benchmark.metrics import zeroshot_retrieval

    entries = fixtures["flickr" if dataset == "flickr30k" else "coco"]
    pixels = {hashlib.sha1(Image.open(_source(fixtures, dataset, e)).convert("RGB").tobytes()).digest(): i
              for i, e in enumerate(entries)}
    caption_image = {_norm(s["raw"]): i for i, e in enumerate(entries) for s in e["sentences"]}

    class Oracle:
        def encode_image(self, ids):
            return torch.nn.functional.one_hot(ids, len(entries)).float()

        encode_text = encode_image

    out = tmp_path / dataset
    _layout(fixtures, dataset, out, link="copy")
    ds = _build(dataset, out, transform=lambda image: torch.tensor(pixels[hashlib.sha1(image.tobytes()).digest()]))
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=image_captions_collate_fn)
    tokenizer = lambda texts: torch.tensor([caption_image[t] for t in texts])  # noqa: E731
    metrics = zeroshot_retrieval.evaluate(Oracle(), loader, tokenizer, "cpu", amp=False, recall_k_list=[1])
    assert metrics == {"image_retrieval_recall@1": 1.0, "text_retrieval_recall@1": 1.0}


@pytest.mark.parametrize("link", ["symlink", "hardlink", "copy"])
def test_link_modes_and_rerun(fixtures, tmp_path, link):
    """Each mode, also when rerun over a layout that another mode placed."""
    out = tmp_path / "flickr"
    _layout(fixtures, "flickr30k", out, "copy" if link == "symlink" else "symlink")
    _layout(fixtures, "flickr30k", out, link)
    for e in fixtures["flickr"]:
        if e["split"] != "test":
            continue
        placed, source = out / e["filename"], fixtures["flickr_images"] / e["filename"]
        assert placed.is_symlink() == (link == "symlink")
        assert os.path.samefile(placed, source) == (link != "copy")
        assert placed.read_bytes() == source.read_bytes()
    _layout(fixtures, "flickr30k", out, link)  # a rerun over an existing layout
    assert karpathy.check("flickr30k", out).images == 3


def test_layout_inside_the_image_folder_keeps_the_images(fixtures, tmp_path):
    """--out equal to --images must not replace an image by a link to itself."""
    import shutil

    images = tmp_path / "flickr30k-images"
    shutil.copytree(fixtures["flickr_images"], images)
    before = {p.name: p.read_bytes() for p in images.iterdir()}
    karpathy.eval_layout("flickr30k", fixtures["flickr_json"], images, images)
    assert {p.name: p.read_bytes() for p in images.glob("*.jpg")} == before
    assert not any(p.is_symlink() for p in images.iterdir())


@pytest.mark.slow
def test_zero_byte_annotation_left_by_failed_download_is_named(fixtures, tmp_path, monkeypatch):
    """Reproduce clip_benchmark offline: its wget creates the output file, then fails."""
    from clip_benchmark.datasets import builder

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wget = bin_dir / "wget"
    wget.write_text('#!/bin/sh\nfor a in "$@"; do case "$a" in --output-document=*) : > "${a#*=}";; esac; done\n'
                    'exit 4\n')
    wget.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    root = tmp_path / "flickr"
    root.mkdir()
    ds = builder.build_dataset(dataset_name="flickr30k", root=str(root), split="test", download=False,
                               task="zeroshot_retrieval")
    annotation = root / "flickr30k_test_karpathy.txt"
    assert len(ds) == 0 and annotation.stat().st_size == 0  # the silent failure this guards against

    with pytest.raises(SystemExit) as err:
        prepare.main(["check", "--dataset", "flickr30k", "--root", str(root)])
    message = str(err.value)
    assert str(annotation) in message and "0 bytes" in message and "wget" in message and "eval-layout" in message

    _layout(fixtures, "flickr30k", root)  # the fix the message names
    assert karpathy.check("flickr30k", root).captions == 15


def test_zero_byte_coco_annotation_is_named(fixtures, tmp_path):
    out = tmp_path / "coco"
    _layout(fixtures, "mscoco", out)
    (out / "coco_test_karpathy.json").write_bytes(b"")
    with pytest.raises(SystemExit, match=r"coco_test_karpathy\.json is empty \(0 bytes\)"):
        karpathy.check("mscoco", out)


@pytest.mark.parametrize("dataset", ["flickr30k", "mscoco"])
def test_missing_or_empty_image_is_named(fixtures, tmp_path, dataset):
    out = tmp_path / dataset
    _layout(fixtures, dataset, out)
    image_dir = out if dataset == "flickr30k" else out / "val2014"
    victim, emptied = sorted(image_dir.glob("*.jpg"))[:2]
    victim.unlink()
    with pytest.raises(SystemExit, match=f"1 images referenced by .* missing: {victim}"):
        karpathy.check(dataset, out)
    emptied.unlink()
    emptied.write_bytes(b"")
    with pytest.raises(SystemExit, match=f"empty \\(0 bytes\\): {emptied}"):
        karpathy.check(dataset, out)
    with pytest.raises(SystemExit, match="lists 3 images, expected 1000"):
        _layout(fixtures, "flickr30k", tmp_path / "other")
        karpathy.check("flickr30k", tmp_path / "other", expect_images=1000)


def test_missing_source_image_is_named(fixtures, tmp_path):
    import shutil

    images = tmp_path / "coco"
    shutil.copytree(fixtures["coco_images"], images)
    gone = images / "val2014" / fixtures["coco"][1]["filename"]
    gone.unlink()
    with pytest.raises(SystemExit, match=f"1 test images missing: {gone}.*holding val2014"):
        karpathy.eval_layout("mscoco", fixtures["coco_json"], images, tmp_path / "out")


def _broken(fx: dict, tmp_path: Path, case: str) -> tuple:
    """(dataset, JSON path) for one kind of broken input."""
    path = tmp_path / "broken.json"
    data = json.loads(fx["flickr_json"].read_text())
    if case == "missing":
        return "flickr30k", tmp_path / "nope.json"
    if case == "truncated":
        path.write_text(fx["flickr_json"].read_text()[:100])
    elif case == "no images":
        path.write_text(json.dumps({"dataset": "flickr30k", "annotations": []}))
    elif case == "wrong dataset":
        return "flickr30k", fx["coco_json"]
    elif case == "empty test caption":
        data["images"][1]["sentences"][3]["raw"] = " "
        path.write_text(json.dumps(data))
    elif case == "separator in caption":
        data["images"][0]["sentences"][0]["raw"] = "see image.jpg, then this"
        path.write_text(json.dumps(data))
    return "flickr30k", path


@pytest.mark.parametrize("case, message", [
    ("missing", r"nope\.json not found"),
    ("truncated", r"broken\.json is not valid JSON"),
    ("no images", r"broken\.json has no 'images' list"),
    ("wrong dataset", r"dataset_coco\.json is Karpathy's 'coco' split, not 'flickr30k'"),
    ("empty test caption", r"test image 1000092796\.jpg has empty captions \(sentences \[3\]\)"),
    ("separator in caption", r"must not contain '\.jpg,'"),
])
def test_broken_inputs_give_clear_errors(fixtures, tmp_path, case, message):
    dataset, path = _broken(fixtures, tmp_path, case)
    with pytest.raises(SystemExit, match=message):
        karpathy.eval_layout(dataset, path, fixtures["flickr_images"], tmp_path / "out")
    assert not (tmp_path / "out" / "flickr30k_test_karpathy.txt").exists()


@pytest.mark.slow
def test_command_line(fixtures, tmp_path, run):
    """The former script, now a thin wrapper of conlip-prepare, as a subprocess: success, a clear error
    with exit status 1, an unknown dataset."""
    out = tmp_path / "coco"
    proc = run([sys.executable, str(SCRIPT), "eval-layout", "--dataset", "mscoco", "--karpathy-json",
                str(fixtures["coco_json"]), "--images", str(fixtures["coco_images"]), "--out", str(out)], tmp_path)
    assert "mscoco: 4 images, 23 captions" in proc.stdout and "--dataset mscoco_captions" in proc.stdout
    run([sys.executable, str(SCRIPT), "check", "--dataset", "mscoco", "--root", str(out), "--expect-images", "4"],
        tmp_path)
    (out / "val2014" / fixtures["coco"][0]["filename"]).unlink()
    bad = subprocess.run([sys.executable, str(SCRIPT), "check", "--dataset", "mscoco", "--root", str(out)],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and fixtures["coco"][0]["filename"] in bad.stderr
    wrong = subprocess.run([sys.executable, str(SCRIPT), "check", "--dataset", "coco", "--root", str(out)],
                           capture_output=True, text=True)
    assert wrong.returncode == 2 and "invalid choice: 'coco'" in wrong.stderr


def _read_shards(paths: list) -> list:
    """Samples as open_clip_train's webdataset pipeline reads them."""
    from open_clip_train.data import tarfile_to_samples_nothrow

    return list(tarfile_to_samples_nothrow([{"url": str(p)} for p in paths]))


def test_train_shards_hold_the_train_pairs(fixtures, tmp_path, capsys):
    import pandas as pd
    from open_clip_train.data import get_dataset_size

    out = tmp_path / "shards"
    prepare.main(["train-shards", "--karpathy-json", str(fixtures["coco_json"]),
                  "--images", str(fixtures["coco_images"]), "--out", str(out), "--shard-size", "4", "--csv"])
    printed = capsys.readouterr().out
    entries = fixtures["coco"]
    splits = ("train", "restval")
    by_name = {e["filename"]: _source(fixtures, "mscoco", e).read_bytes() for e in entries}
    expected = Counter((by_name[name], caption) for (name, caption), n in _pairs(entries, splits).items()
                       for _ in range(n))
    n_empty = sum(not s["raw"].strip() for e in entries if e["split"] in splits for s in e["sentences"])
    assert n_empty == 2 and f"skipped {n_empty} empty captions" in printed

    tars = sorted(out.glob("*.tar"))
    samples = _read_shards(tars)
    assert Counter((s["jpg"], s["txt"].decode()) for s in samples) == expected
    assert len({s["__key__"] for s in samples}) == len(samples) and all(set(s) >= {"jpg", "txt"} for s in samples)

    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {p.name: len(_read_shards([p])) for p in tars}
    assert len(tars) == -(-sum(expected.values()) // 4) and set(sizes.values()) <= {1, 2, 3, 4}
    pattern = printed.split("--train-data '")[1].split("'")[0]
    assert get_dataset_size(pattern) == (sum(expected.values()), len(tars))

    table = pd.read_csv(out / "train-restval.csv", sep="\t")
    assert list(table.columns) == ["filepath", "title"]
    assert Counter((Path(f).read_bytes(), t) for f, t in zip(table.filepath, table.title)) == expected


def test_train_shards_resume(fixtures, tmp_path):
    out = tmp_path / "shards"
    args = (fixtures["flickr_json"], fixtures["flickr_images"], out, ["train"], 3)
    first = shards.train_shards(*args)
    assert first.reused == [] and len(first.written) == len(first.sizes) >= 3
    assert first.samples == sum(_pairs(fixtures["flickr"], ("train",)).values()) and len(first.skipped_empty) == 1
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out.glob("*.tar"))}

    again = shards.train_shards(*args)
    assert again.written == [] and again.reused == list(before)
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.tar")} == before

    deleted, truncated, foreign = sorted(before)[:3]
    (out / deleted).unlink()
    (out / truncated).write_bytes(before[truncated][2][:1000])
    (out / foreign).write_bytes(before[deleted][2])  # a complete shard, but not this one
    resumed = shards.train_shards(*args)
    assert resumed.written == [deleted, truncated, foreign] and len(resumed.reused) == len(before) - 3
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == {n: b for n, (_, _, b) in before.items()}
    assert not list(out.glob("*.tmp"))


def _source_shards(fx: dict, folder: Path) -> dict:
    """Three img2dataset-like shards (jpg, txt, json); one sample per shard lacks its caption, one has a png."""
    jpegs = [p.read_bytes() for p in sorted(fx["flickr_images"].glob("*.jpg"))]
    samples = {}
    folder.mkdir()
    for s in range(3):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(10):
                key = f"{s:05d}{i:04d}"
                members = {"jpg": jpegs[(s + i) % len(jpegs)], "txt": f"caption {key}".encode(),
                           "json": json.dumps({"key": key}).encode()}
                if i == 4:
                    del members["txt"]
                if i == 7:
                    members["png"] = members.pop("jpg")
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                samples[key] = members
    return samples


def test_subset_is_reproducible_and_complete(fixtures, tmp_path):
    source = _source_shards(fixtures, tmp_path / "cc")
    usable = {k for k, m in source.items() if "txt" in m}
    a = shards.subset(str(tmp_path / "cc" / "{00000..00002}.tar"), 12, 0, tmp_path / "a", shard_size=5)
    b = shards.subset(str(tmp_path / "cc" / "{00002,00000,00001}.tar"), 12, 0, tmp_path / "b", shard_size=5)
    c = shards.subset(str(tmp_path / "cc" / "{00000..00002}.tar"), 12, 1, tmp_path / "c", shard_size=5)
    assert a.sizes == b.sizes == c.sizes == {"00000.tar": 5, "00001.tar": 5, "00002.tar": 2}
    assert a.skipped_unusable == 3

    def chosen(out: Path) -> list:
        samples = _read_shards(sorted(out.glob("*.tar")))
        for s in samples:  # every member copied unchanged
            assert {k: v for k, v in s.items() if not k.startswith("__")} == source[s["__key__"]]
        manifest = (out / "manifest.tsv").read_text().splitlines()
        assert manifest[0] == "key\tshard\tsource"
        assert [row.split("\t")[0] for row in manifest[1:]] == [s["__key__"] for s in samples]
        assert json.loads((out / "sizes.json").read_text()) == {p.name: len(_read_shards([p]))
                                                                 for p in sorted(out.glob("*.tar"))}
        return [s["__key__"] for s in samples]

    keys_a, keys_b, keys_c = chosen(tmp_path / "a"), chosen(tmp_path / "b"), chosen(tmp_path / "c")
    assert len(set(keys_a)) == 12 and set(keys_a) <= usable
    assert keys_a == keys_b and set(keys_a) != set(keys_c)
    for name in a.sizes:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()

    everything = shards.subset(str(tmp_path / "cc" / "*.tar").replace("*", "{00000..00002}"), len(usable), 3,
                            tmp_path / "all")
    assert set(chosen(tmp_path / "all")) == usable
    with pytest.raises(SystemExit, match=f"only {len(usable)} with caption and image"):
        shards.subset(str(tmp_path / "cc" / "{00000..00002}.tar"), len(usable) + 1, 0, tmp_path / "d")
    with pytest.raises(SystemExit, match="holds input shards"):
        shards.subset(str(tmp_path / "cc" / "{00000..00002}.tar"), 3, 0, tmp_path / "cc")
    assert everything.samples == len(usable)


def test_subset_selection_covers_every_shard(fixtures, tmp_path):
    """Across seeds, every usable sample gets chosen (no bias towards the first shards), always exactly N."""
    source = _source_shards(fixtures, tmp_path / "cc")
    paths = sorted((tmp_path / "cc").glob("*.tar"))
    usable = [shards.count_usable(p)[0] for p in paths]
    seen = Counter()
    for seed in range(40):
        keys = [sample["__key__"] for _, sample in shards.selected_samples(paths, usable, 9, seed)]
        assert len(set(keys)) == 9
        seen.update(keys)
    assert set(seen) == {k for k, m in source.items() if "txt" in m}


def test_truncated_shard_is_named(fixtures, tmp_path):
    _source_shards(fixtures, tmp_path / "cc")
    victim = tmp_path / "cc" / "00001.tar"
    victim.write_bytes(victim.read_bytes()[:700])
    with pytest.raises(SystemExit, match=r"00001\.tar: cannot read this shard .*re-download it"):
        shards.subset(str(tmp_path / "cc" / "{00000..00002}.tar"), 3, 0, tmp_path / "out")


def test_annotation_without_images_is_refused(fixtures, tmp_path):
    root = tmp_path / "flickr"
    _layout(fixtures, "flickr30k", root)
    annotation = root / "flickr30k_test_karpathy.txt"
    annotation.write_text(annotation.read_text().splitlines()[0] + "\n")
    with pytest.raises(SystemExit, match="lists no images"):
        karpathy.check("flickr30k", root)


def test_shared_helpers(tmp_path):
    """The one caption normaliser, atomic write and stable hash that every data tool uses."""
    assert files.normalize_caption("  a\n b\tc ") == "a b c"
    assert files.normalize_caption(None) == "" and files.normalize_caption(0) == "0"
    assert files.stable_hash(3, "key") == hashlib.sha256(b"3:key").digest()

    path = tmp_path / "f.json"
    atomic_files.write_atomic(path, b"one")
    before = path.stat()
    atomic_files.write_atomic(path, b"one", if_changed=True)
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    atomic_files.write_atomic(path, b"two", if_changed=True)
    assert path.read_bytes() == b"two" and not list(tmp_path.glob("*.tmp"))
