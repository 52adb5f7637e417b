#!/usr/bin/env python
"""Retrieval data for ConLIP: clip_benchmark's offline evaluation layout and webdataset training shards.

clip_benchmark fetches the Karpathy-split annotation files with ``wget`` when they are missing;
offline that leaves a 0-byte file and every later run fails. ``eval-layout`` writes those files
from Karpathy's own split JSON and places the test images where clip_benchmark looks, so the
evaluation never downloads anything; ``check`` validates such a layout. ``train-shards`` turns the
JSON's training splits into webdataset shards for open_clip, and ``subset`` draws a reproducible
random subset (the paper's 200k / 5.3M / 9.5M pairs) from existing shards such as img2dataset's
CC3M / CC12M output.

Usage:
    # Karpathy test split in clip_benchmark's layout, checked after writing
    python scripts/prepare_retrieval_data.py eval-layout --dataset flickr30k \\
        --karpathy-json dataset_flickr30k.json --images flickr30k-images --out data/flickr30k
    python scripts/prepare_retrieval_data.py eval-layout --dataset mscoco \\
        --karpathy-json dataset_coco.json --images coco --out data/mscoco   # coco/ holds val2014/
    clip_benchmark eval --dataset flickr30k --dataset_root data/flickr30k --task zeroshot_retrieval ...
    clip_benchmark eval --dataset mscoco_captions --dataset_root data/mscoco --task zeroshot_retrieval ...

    # re-check a layout, e.g. after clip_benchmark failed with an IndexError
    python scripts/prepare_retrieval_data.py check --dataset flickr30k --root data/flickr30k --expect-images 1000

    # Karpathy train + restval pairs as shards with sizes.json (and a CSV for --dataset-type csv)
    python scripts/prepare_retrieval_data.py train-shards --karpathy-json dataset_coco.json \\
        --images coco --out shards/coco-train --csv

    # 5.3M random pairs out of CC3M + CC12M shards, the same pairs for the same seed and shard files
    python scripts/prepare_retrieval_data.py subset \\
        --shards '/data/cc3m/{00000..00331}.tar::/data/cc12m/{00000..01242}.tar' \\
        --count 5300000 --seed 0 --out /data/cc5m
"""

import argparse
import csv
import hashlib
import io
import itertools
import json
import os
import random
import re
import shutil
import sys
import tarfile
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, NoReturn

from open_clip_train.data import expand_urls
from tqdm import tqdm

FLICKR_HEADER = "image,caption"  # clip_benchmark's Flickr reader skips the first line unread
FLICKR_SEPARATOR = ".jpg,"  # ...and splits every other line at this string, which must occur once
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")  # open_clip_train.data.filter_no_caption_or_no_image
META_MEMBER = re.compile(r"__[^/]*__($|/)")  # members webdataset's tar reader skips
TAR_MTIME = 0.0  # fixed member times make rewritten shards byte-identical
SHOWN = 5  # offending items named in an error message


@dataclass(frozen=True)
class EvalDataset:
    """Where and how clip_benchmark reads one retrieval dataset's Karpathy test split."""

    benchmark_name: str  # clip_benchmark's --dataset
    karpathy_name: str  # the "dataset" field of Karpathy's split JSON
    annotation: str  # annotation file, relative to the root
    image_dir: str  # folder the annotation's file names are relative to, relative to the root
    test_images: int  # size of the full Karpathy test split
    test_captions: int


EVAL_DATASETS = {
    "flickr30k": EvalDataset("flickr30k", "flickr30k", "flickr30k_test_karpathy.txt", ".", 1000, 5000),
    "mscoco": EvalDataset("mscoco_captions", "coco", "coco_test_karpathy.json", "val2014", 5000, 25010),
}


@dataclass(frozen=True)
class EvalImage:
    """One image of a test split, as clip_benchmark's loader will yield it."""

    name: str  # file name relative to the dataset's image folder
    image_id: int  # COCO image id (the JSON's cocoid); unused for Flickr
    source: Path
    captions: list[str]


@dataclass(frozen=True)
class LayoutCounts:
    images: int
    captions: int


@dataclass(frozen=True)
class Pair:
    """One training sample: an image and one of its captions."""

    key: str
    image: Path
    caption: str


@dataclass
class ShardSummary:
    """What train-shards or subset wrote, so that nothing is dropped without being reported."""

    sizes: dict[str, int]
    written: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    images_per_split: dict[str, int] = field(default_factory=dict)
    skipped_empty: list[str] = field(default_factory=list)  # keys of empty captions (train-shards)
    skipped_unusable: int = 0  # samples without caption or image (subset)
    csv: Path | None = None

    @property
    def samples(self) -> int:
        return sum(self.sizes.values())


def fail(message: str) -> NoReturn:
    """Stop with a message naming the problem and the fix (exit status 1)."""
    raise SystemExit(f"error: {message}")


def _listing(items: list) -> str:
    shown = ", ".join(str(i) for i in items[:SHOWN])
    return shown + (f" and {len(items) - SHOWN} more" if len(items) > SHOWN else "")


def normalize_caption(raw: object) -> str:
    """Collapse all whitespace (newlines included) to single spaces: Flickr's annotation file and the CSV
    are line based, and stray whitespace is only noise to a tokenizer."""
    return " ".join(str(raw).split()) if raw is not None else ""


def _write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file and a rename, so an interrupted run never leaves a partial file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _require_files(paths: Iterable[Path], what: str, fix: str) -> None:
    """Fail naming every missing or empty file (the first few), so one run reports them all."""
    missing, empty = [], []
    for path in paths:
        try:
            size = path.stat().st_size  # follows symlinks: a dangling link counts as missing
        except OSError:
            missing.append(path)
            continue
        if size == 0:
            empty.append(path)
    problems = ([f"{len(missing)} {what} missing: {_listing(missing)}"] if missing else []) + \
               ([f"{len(empty)} {what} empty (0 bytes): {_listing(empty)}"] if empty else [])
    if problems:
        fail("; ".join(problems) + f". {fix}")


# ---------------------------------------------------------------- Karpathy split JSON

def load_karpathy(path: Path, dataset: EvalDataset | None = None) -> list[dict]:
    """The JSON's image entries, failing clearly on a missing, truncated or mismatched file."""
    if not path.is_file():
        fail(f"Karpathy split JSON {path} not found; pass the dataset_flickr30k.json / dataset_coco.json file.")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        fail(f"{path} is not valid JSON ({e}); the file is truncated or not Karpathy's split JSON.")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        fail(f"{path} has no 'images' list; it is not Karpathy's split JSON (dataset_*.json).")
    if dataset is not None and data.get("dataset", dataset.karpathy_name) != dataset.karpathy_name:
        fail(f"{path} is Karpathy's '{data['dataset']}' split, not '{dataset.karpathy_name}'; "
             f"pass the matching --dataset or JSON.")
    for index, entry in enumerate(data["images"]):
        for name in ("filename", "split", "sentences"):
            if not isinstance(entry, dict) or name not in entry:
                fail(f"{path}: images[{index}] has no '{name}'; it is not Karpathy's split JSON.")
    return data["images"]


def image_source(images: Path, entry: dict) -> Path:
    """COCO entries name their folder (filepath: train2014/val2014); Flickr images lie flat."""
    return images / entry.get("filepath", "") / entry["filename"]


def entry_captions(entry: dict) -> list[str]:
    return [normalize_caption(s.get("raw") if isinstance(s, dict) else None) for s in entry["sentences"]]


# ---------------------------------------------------------------- eval-layout and check

def karpathy_test_split(entries: list[dict], dataset: EvalDataset, images: Path, json_path: Path) -> list[EvalImage]:
    """The Karpathy test split, validated against what clip_benchmark's loader can represent."""
    items = []
    for entry in entries:
        if entry["split"] != "test":
            continue
        captions = entry_captions(entry)
        empty = [i for i, c in enumerate(captions) if not c]
        if empty or not captions:
            fail(f"{json_path}: test image {entry['filename']} has empty captions (sentences {empty or 'none'}); "
                 f"the evaluation set would be incomplete. Fix the JSON.")
        if dataset.karpathy_name == "coco" and "cocoid" not in entry:
            fail(f"{json_path}: test image {entry['filename']} has no 'cocoid'; use Karpathy's dataset_coco.json.")
        items.append(EvalImage(entry["filename"], entry.get("cocoid", 0), image_source(images, entry), captions))
    if not items:
        fail(f"{json_path} has no images with split 'test'.")
    names = Counter(item.name for item in items)
    ids = Counter(item.image_id for item in items) if dataset.karpathy_name == "coco" else Counter()
    duplicates = [n for n, c in names.items() if c > 1] + [i for i, c in ids.items() if c > 1]
    if duplicates:
        fail(f"{json_path}: test images listed twice: {_listing(duplicates)}; clip_benchmark would merge them.")
    return items


def flickr_annotation(items: list[EvalImage]) -> str:
    """flickr30k_test_karpathy.txt: a header line, then one 'file.jpg,caption' line per caption."""
    lines = [FLICKR_HEADER]
    for item in items:
        for caption in item.captions:
            line = f"{item.name},{caption}"
            if not item.name.endswith(".jpg") or line.count(FLICKR_SEPARATOR) != 1:
                fail(f"cannot write {line!r}: clip_benchmark splits each line at '{FLICKR_SEPARATOR}', so the "
                     f"file name must end in .jpg and the caption must not contain '{FLICKR_SEPARATOR}'.")
            lines.append(line)
    return "\n".join(lines) + "\n"


def coco_annotation(items: list[EvalImage]) -> str:
    """coco_test_karpathy.json: COCO captions format, all that torchvision's CocoCaptions reads."""
    captions = [(item.image_id, caption) for item in items for caption in item.captions]
    annotations = [{"id": n, "image_id": image_id, "caption": caption}
                   for n, (image_id, caption) in enumerate(captions, start=1)]
    return json.dumps({"images": [{"id": item.image_id, "file_name": item.name} for item in items],
                       "annotations": annotations}, ensure_ascii=False)


def place_image(source: Path, target: Path, link: str) -> None:
    """Symlink, hard-link or copy one image; never replaces the source itself (--out inside --images),
    and keeps a target an earlier run placed the same way, so reruns are cheap."""
    if target.exists():
        if target.parent.resolve() / target.name == source.parent.resolve() / source.name:
            return
        if os.path.samefile(source, target) and target.is_symlink() == (link == "symlink"):
            return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    try:
        if link == "symlink":
            os.symlink(source.resolve(), tmp)
        elif link == "hardlink":
            os.link(source, tmp)
        else:
            shutil.copyfile(source, tmp)
    except OSError as e:
        fail(f"cannot {link} {source} to {tmp}: {e}" + (" (use --link symlink or copy across file systems)"
                                                      if link == "hardlink" else ""))
    os.replace(tmp, target)


def eval_layout(dataset_name: str, karpathy_json: Path, images: Path, out: Path, link: str = "symlink",
                expect_images: int | None = None) -> LayoutCounts:
    """Write the Karpathy test split as clip_benchmark reads it offline, then check the result."""
    dataset = EVAL_DATASETS[dataset_name]
    items = karpathy_test_split(load_karpathy(karpathy_json, dataset), dataset, images, karpathy_json)
    _require_files([item.source for item in items], "test images",
                   "--images must be the image folder" + (" holding val2014/." if dataset.karpathy_name == "coco"
                                                          else " (flickr30k-images)."))
    image_dir = out / dataset.image_dir
    image_dir.mkdir(parents=True, exist_ok=True)
    for item in tqdm(items, desc=f"{link} images", unit="image"):
        place_image(item.source, image_dir / item.name, link)
    text = flickr_annotation(items) if dataset_name == "flickr30k" else coco_annotation(items)
    _write_atomic(out / dataset.annotation, text.encode("utf-8"))
    return check(dataset_name, out, expect_images)


def _fix_hint(dataset_name: str, root: Path) -> str:
    return (f"Run `python scripts/prepare_retrieval_data.py eval-layout --dataset {dataset_name} "
            f"--karpathy-json KARPATHY_JSON --images IMAGES --out {root}`.")


def read_flickr_annotation(path: Path) -> list[tuple[str, list[str]]]:
    """Parse as clip_benchmark.datasets.flickr.Flickr does, failing where it would fail or misread."""
    data: dict[str, list[str]] = defaultdict(list)
    try:
        with open(path, encoding="utf-8") as f:
            header = f.readline()
            if FLICKR_SEPARATOR in header:
                fail(f"{path}: the first line is a caption line, but clip_benchmark skips the first line "
                     f"as a header; add the header line '{FLICKR_HEADER}'.")
            for number, line in enumerate(f, start=2):
                line = line.strip()
                if not line:
                    continue
                parts = line.split(FLICKR_SEPARATOR)
                if len(parts) != 2 or not parts[1].strip():
                    fail(f"{path}:{number}: clip_benchmark needs 'name.jpg,caption' with exactly one "
                         f"'{FLICKR_SEPARATOR}' and a non-empty caption, got {line[:100]!r}.")
                data[parts[0] + ".jpg"].append(parts[1])
    except UnicodeDecodeError as e:
        fail(f"{path} is not UTF-8 text ({e}).")
    return list(data.items())


def read_coco_annotation(path: Path) -> tuple[list[tuple[str, list[str]]], int]:
    """Images and captions as torchvision's CocoCaptions yields them, and the count of ignored captions."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        fail(f"{path} is not valid JSON ({e}); the file is truncated or not an annotation file.")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        fail(f"{path} lacks the COCO 'images' and 'annotations' lists.")
    try:
        names = {image["id"]: image["file_name"] for image in data["images"]}
        annotation_ids = [a["id"] for a in data["annotations"]]
        pairs = [(a["image_id"], a["caption"]) for a in data["annotations"]]
    except (KeyError, TypeError) as e:
        fail(f"{path}: an image lacks 'id'/'file_name' or an annotation lacks 'id'/'image_id'/'caption' ({e}).")
    if len(names) != len(data["images"]) or len(set(annotation_ids)) != len(annotation_ids):
        fail(f"{path} repeats image or annotation ids; pycocotools would silently merge them.")
    captions: dict[object, list[str]] = defaultdict(list)
    for image_id, caption in pairs:
        if image_id in names:
            if not isinstance(caption, str) or not caption.strip():
                fail(f"{path}: image {names[image_id]} has an empty caption.")
            captions[image_id].append(caption)
    ignored = len(pairs) - sum(len(c) for c in captions.values())
    return [(names[i], captions[i]) for i in sorted(names)], ignored


def check(dataset_name: str, root: Path, expect_images: int | None = None) -> LayoutCounts:
    """Validate a layout before clip_benchmark sees it: it would try to download whatever is missing."""
    dataset = EVAL_DATASETS[dataset_name]
    fix = _fix_hint(dataset_name, root)
    if not root.is_dir():
        fail(f"dataset root {root} does not exist (clip_benchmark would try to download it). {fix}")
    annotation = root / dataset.annotation
    if not annotation.is_file():
        fail(f"{annotation} is missing (clip_benchmark would try to wget it). {fix}")
    if annotation.stat().st_size == 0:
        fail(f"{annotation} is empty (0 bytes): this is what clip_benchmark leaves behind when its wget download "
             f"fails offline, and every later run then fails (IndexError). Delete it and write it from the "
             f"Karpathy JSON: {fix}")
    image_dir = root / dataset.image_dir
    if not image_dir.is_dir():
        fail(f"{image_dir} is missing (clip_benchmark would try to download and unzip {dataset.image_dir}.zip; "
             f"delete a 0-byte {root / (dataset.image_dir + '.zip')} if one is there). {fix}")
    ignored = 0
    if dataset_name == "flickr30k":
        items = read_flickr_annotation(annotation)
    else:
        items, ignored = read_coco_annotation(annotation)
    if not items:
        fail(f"{annotation} lists no images: clip_benchmark would crash on it (IndexError). {fix}")
    without = [name for name, captions in items if not captions]
    if without:
        fail(f"{annotation}: {len(without)} images have no captions ({_listing(without)}); "
             f"retrieval recall would count them as misses. {fix}")
    _require_files([image_dir / name for name, _ in items], f"images referenced by {annotation}",
                   f"Place them there (or rerun eval-layout). {fix}")
    counts = LayoutCounts(len(items), sum(len(c) for _, c in items))
    if expect_images is not None and counts.images != expect_images:
        fail(f"{annotation} lists {counts.images} images, expected {expect_images}. {fix}")
    print(f"{dataset_name}: {counts.images} images, {counts.captions} captions in {root} "
          f"(clip_benchmark: --dataset {dataset.benchmark_name} --dataset_root {root})")
    if ignored:
        print(f"note: {ignored} captions in {annotation} belong to no listed image; clip_benchmark ignores them",
              file=sys.stderr)
    if (counts.images, counts.captions) != (dataset.test_images, dataset.test_captions):
        print(f"note: the full Karpathy test split of {dataset_name} has {dataset.test_images} images and "
              f"{dataset.test_captions} captions; scores on this layout are not comparable to published ones",
              file=sys.stderr)
    return counts


# ---------------------------------------------------------------- shards

def shard_names(count: int) -> list[str]:
    width = max(5, len(str(count - 1)))
    return [f"{i:0{width}d}.tar" for i in range(count)]


def shard_pattern(out: Path, names: list[str]) -> str:
    """The brace pattern open_clip's --train-data takes for these shards."""
    return str(out / (names[0] if len(names) == 1 else f"{{{names[0][:-4]}..{names[-1][:-4]}}}.tar"))


def write_shard(path: Path, samples: Iterable[dict]) -> int:
    """Write samples (dicts of __key__ and extension -> bytes) to a shard atomically; returns their count."""
    from webdataset import TarWriter  # imports torch: loaded only by the shard commands

    tmp = path.with_name(path.name + ".tmp")
    count, previous = 0, None
    with open(tmp, "wb") as f:
        with TarWriter(f, encoder=False, mode=0o644, mtime=TAR_MTIME) as writer:
            for sample in samples:
                if sample["__key__"] == previous:
                    fail(f"two consecutive samples share the key {previous!r}; webdataset would merge them.")
                writer.write(sample)
                previous = sample["__key__"]
                count += 1
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return count


def warn_foreign_shards(out: Path, names: list[str]) -> None:
    """Shards left from an earlier run with other settings would be picked up by a glob; say so."""
    foreign = sorted(p.name for p in out.glob("*.tar") if p.name not in set(names))
    if foreign:
        print(f"note: {len(foreign)} other .tar files in {out} are not in this set ({_listing(foreign)}); "
              f"sizes.json lists only this set", file=sys.stderr)


def sample_key(entry: dict, sentence: int) -> str:
    """A webdataset key: no dots (the reader splits the key at the first dot of the file name)."""
    return f"{Path(entry['filename']).stem.replace('.', '_')}_{sentence}"


def shuffle_order(key: str, seed: int) -> bytes:
    """Hash order: a shuffle that is the same on every Python version, so reruns rebuild the same shards."""
    return hashlib.sha256(f"{seed}:{key}".encode()).digest()


def train_pairs(entries: list[dict], images: Path, splits: list[str], seed: int,
                summary: ShardSummary) -> list[Pair]:
    """Every (image, caption) pair of the splits in a seeded shuffled order (a shard holds no single
    image's captions together: they would be false negatives in one batch); empty captions skipped."""
    pairs = []
    for entry in entries:
        if entry["split"] not in splits:
            continue
        summary.images_per_split[entry["split"]] = summary.images_per_split.get(entry["split"], 0) + 1
        source = image_source(images, entry)
        for sentence, caption in enumerate(entry_captions(entry)):
            key = sample_key(entry, sentence)
            if caption:
                pairs.append(Pair(key, source, caption))
            else:
                summary.skipped_empty.append(key)
    duplicates = [k for k, c in Counter(p.key for p in pairs).items() if c > 1]
    if duplicates:
        fail(f"images listed twice in the JSON (sample keys {_listing(duplicates)}).")
    pairs.sort(key=lambda p: shuffle_order(p.key, seed))
    return pairs


def shard_members(pairs: list[Pair]) -> list[tuple[str, int]]:
    """(member name, size) as TarWriter writes these pairs: extensions in sorted order."""
    return [m for p in pairs for m in ((f"{p.key}.jpg", p.image.stat().st_size),
                                       (f"{p.key}.txt", len(p.caption.encode("utf-8"))))]


def shard_is_complete(path: Path, pairs: list[Pair]) -> bool:
    """An existing shard is kept only if it holds exactly these members with these sizes."""
    try:
        with tarfile.open(path, "r:") as tar:
            members = [(m.name, m.size) for m in tar]
    except (OSError, tarfile.TarError):
        return False
    return members == shard_members(pairs)


def pair_samples(pairs: Iterable[Pair]) -> Iterator[dict]:
    for pair in pairs:
        yield {"__key__": pair.key, "jpg": pair.image.read_bytes(), "txt": pair.caption.encode("utf-8")}


def train_shards(karpathy_json: Path, images: Path, out: Path, splits: list[str], shard_size: int = 1000,
                 write_csv: bool = False, seed: int = 0) -> ShardSummary:
    """Karpathy-split pairs as webdataset shards plus sizes.json; complete shards of a previous run are kept."""
    if shard_size < 1:
        fail("--shard-size must be at least 1.")
    summary = ShardSummary(sizes={})
    pairs = train_pairs(load_karpathy(karpathy_json), images, splits, seed, summary)
    if not pairs:
        fail(f"{karpathy_json} has no captioned images in the splits {splits}.")
    _require_files(sorted({p.image for p in pairs}), "images", "--images must be the folder the JSON's "
                   "filenames are relative to (for COCO: the folder holding train2014/ and val2014/).")
    out.mkdir(parents=True, exist_ok=True)
    chunks = [pairs[i:i + shard_size] for i in range(0, len(pairs), shard_size)]
    names = shard_names(len(chunks))
    with tqdm(total=len(pairs), desc="train shards", unit="pair") as bar:
        for name, chunk in zip(names, chunks):
            if shard_is_complete(out / name, chunk):
                summary.reused.append(name)
            else:
                write_shard(out / name, pair_samples(chunk))
                summary.written.append(name)
            summary.sizes[name] = len(chunk)
            bar.update(len(chunk))
    _write_atomic(out / "sizes.json", json.dumps(summary.sizes, indent=1).encode())
    if write_csv:
        buffer = io.StringIO()
        writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
        writer.writerow(["filepath", "title"])
        writer.writerows([str(p.image.resolve()), p.caption] for p in pairs)
        summary.csv = out / f"{'-'.join(splits)}.csv"
        _write_atomic(summary.csv, buffer.getvalue().encode("utf-8"))
    warn_foreign_shards(out, names)
    return summary


# ---------------------------------------------------------------- subset

def tar_samples(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, tarfile.TarInfo]]]:
    """Group a shard's members into samples as open_clip_train's reader does: consecutive members with
    the same key (the name up to the first dot of its file name) form a sample, a repeated extension
    starts a new one; extensions are compared in lower case."""
    from webdataset.tariterators import base_plus_ext

    key, members = None, {}
    for info in tar:
        if not info.isreg() or META_MEMBER.match(info.name):
            continue
        prefix, extension = base_plus_ext(info.name)
        if prefix is None:
            continue
        if prefix != key or extension.lower() in members:
            if members:
                yield key, members
            key, members = prefix, {}
        members[extension.lower()] = info
    if members:
        yield key, members


def is_usable(members: dict[str, tarfile.TarInfo]) -> bool:
    """open_clip trains only on samples with a caption and an image."""
    return "txt" in members and any(e in members for e in IMAGE_EXTENSIONS)


@contextmanager
def reading_shard(path: Path) -> Iterator[tarfile.TarFile]:
    """An input shard, opened for reading; a truncated or corrupt one stops the run, named."""
    try:
        with tarfile.open(path, "r:*") as tar:
            yield tar
    except (OSError, EOFError, tarfile.TarError) as error:
        fail(f"{path}: cannot read this shard ({error}); re-download it, or leave it out of the pattern.")


def count_usable(path: Path) -> tuple[int, int]:
    """(usable, unusable) samples of a shard, from its member headers only."""
    with reading_shard(path) as tar:
        flags = [is_usable(members) for _, members in tar_samples(tar)]
    return sum(flags), len(flags) - sum(flags)


def selected_samples(paths: list[Path], usable: list[int], count: int, seed: int) -> Iterator[tuple[Path, dict]]:
    """Selection sampling (Knuth's algorithm S): exactly `count` of the usable samples, each subset equally
    likely, streamed in shard order. Uses only random.random(), whose sequence for a seed Python keeps
    unchanged across versions, so the subset depends only on the seed and the sorted shard list."""
    from webdataset.tariterators import base_plus_ext

    rng = random.Random(seed)
    needed, left = count, sum(usable)
    for path, n in zip(paths, usable):
        if needed == 0:
            break
        if n == 0:
            continue
        with reading_shard(path) as tar:
            for key, members in tar_samples(tar):
                if not is_usable(members):
                    continue
                if needed >= left or rng.random() * left < needed:
                    sample = {"__key__": key}
                    for info in members.values():
                        sample[base_plus_ext(info.name)[1]] = tar.extractfile(info).read()
                    yield path, sample
                    needed -= 1
                left -= 1
    if needed:
        fail("the shards changed between the counting and the copying pass; rerun.")


def subset(pattern: str, count: int, seed: int, out: Path, shard_size: int = 10000) -> ShardSummary:
    """A reproducible random subset of existing shards: first pass counts, second pass copies the chosen."""
    if count < 1 or shard_size < 1:
        fail("--count and --shard-size must be at least 1.")
    paths = [Path(p) for p in sorted(set(expand_urls(pattern)[0]))]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        fail(f"{len(missing)} of {len(paths)} shards of {pattern!r} are missing: {_listing(missing)}.")
    if any(p.parent.resolve() == out.resolve() for p in paths):
        fail(f"--out {out} holds input shards, which this would overwrite; choose another folder.")
    counts = [count_usable(p) for p in tqdm(paths, desc="counting", unit="shard")]
    usable = [u for u, _ in counts]
    summary = ShardSummary(sizes={}, skipped_unusable=sum(n for _, n in counts))
    if count > sum(usable):
        fail(f"asked for {count} samples, but the {len(paths)} shards hold only {sum(usable)} with caption and image.")
    out.mkdir(parents=True, exist_ok=True)
    names = shard_names(-(-count // shard_size))
    chosen = selected_samples(paths, usable, count, seed)
    manifest_tmp = out / "manifest.tsv.tmp"
    with open(manifest_tmp, "w", encoding="utf-8") as manifest, \
            tqdm(total=count, desc="copying", unit="sample") as bar:
        manifest.write("key\tshard\tsource\n")

        def logged(samples: Iterable[tuple[Path, dict]], name: str) -> Iterator[dict]:
            for source, sample in samples:
                manifest.write(f"{sample['__key__']}\t{name}\t{source}\n")
                bar.update()
                yield sample

        for name in names:
            summary.sizes[name] = write_shard(out / name, logged(itertools.islice(chosen, shard_size), name))
            summary.written.append(name)
    os.replace(manifest_tmp, out / "manifest.tsv")
    info = {"seed": seed, "count": count, "pattern": pattern, "shards": [str(p) for p in paths],
            "usable_samples": sum(usable), "unusable_samples": summary.skipped_unusable}
    _write_atomic(out / "subset.json", json.dumps(info, indent=1).encode())
    _write_atomic(out / "sizes.json", json.dumps(summary.sizes, indent=1).encode())
    warn_foreign_shards(out, names)
    return summary


# ---------------------------------------------------------------- command line

def report_shards(summary: ShardSummary, out: Path) -> None:
    names = list(summary.sizes)
    print(f"{summary.samples} samples in {len(names)} shards in {out} "
          f"({len(summary.written)} written, {len(summary.reused)} already complete)")
    if summary.images_per_split:
        print("images per split: " + ", ".join(f"{s} {n}" for s, n in summary.images_per_split.items()))
    if summary.skipped_empty:
        print(f"skipped {len(summary.skipped_empty)} empty captions: {_listing(summary.skipped_empty)}")
    if summary.skipped_unusable:
        print(f"skipped {summary.skipped_unusable} samples without caption or image (open_clip skips them too)")
    print(f"open_clip: --train-data '{shard_pattern(out, names)}' --dataset-type webdataset "
          f"(sizes.json gives the sample count)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("eval-layout", help="write clip_benchmark's offline layout of the Karpathy test split")
    p.add_argument("--dataset", required=True, choices=sorted(EVAL_DATASETS))
    p.add_argument("--karpathy-json", required=True, type=Path, help="dataset_flickr30k.json or dataset_coco.json")
    p.add_argument("--images", required=True, type=Path,
                   help="flickr30k-images/, or the COCO folder holding val2014/")
    p.add_argument("--out", required=True, type=Path, help="the --dataset_root to give clip_benchmark")
    p.add_argument("--link", default="symlink", choices=["symlink", "copy", "hardlink"])
    p.add_argument("--expect-images", type=int)

    p = commands.add_parser("check", help="validate a layout written by eval-layout (or by hand)")
    p.add_argument("--dataset", required=True, choices=sorted(EVAL_DATASETS))
    p.add_argument("--root", required=True, type=Path)
    p.add_argument("--expect-images", type=int)

    p = commands.add_parser("train-shards", help="Karpathy splits as webdataset shards with sizes.json")
    p.add_argument("--karpathy-json", required=True, type=Path)
    p.add_argument("--images", required=True, type=Path,
                   help="flickr30k-images/, or the COCO folder holding train2014/ and val2014/")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--splits", nargs="+", default=["train", "restval"], choices=["train", "restval", "val", "test"])
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--csv", action="store_true", help="also write SPLITS.csv (filepath, title; tab separated)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pair order")

    p = commands.add_parser("subset", help="reproducible random subset of existing webdataset shards")
    p.add_argument("--shards", required=True, help="brace pattern(s), '::'-separated, e.g. '/d/{00000..00331}.tar'")
    p.add_argument("--count", required=True, type=int)
    p.add_argument("--seed", required=True, type=int)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--shard-size", type=int, default=10000)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "eval-layout":
        eval_layout(args.dataset, args.karpathy_json, args.images, args.out, args.link, args.expect_images)
    elif args.command == "check":
        check(args.dataset, args.root, args.expect_images)
    elif args.command == "train-shards":
        summary = train_shards(args.karpathy_json, args.images, args.out, args.splits, args.shard_size,
                               args.csv, args.seed)
        report_shards(summary, args.out)
        if summary.csv:
            print(f"csv: {summary.csv} (open_clip: --train-data {summary.csv} --dataset-type csv)")
    else:
        report_shards(subset(args.shards, args.count, args.seed, args.out, args.shard_size), args.out)
        print(f"manifest of the chosen keys: {args.out / 'manifest.tsv'}")


if __name__ == "__main__":
    main()
