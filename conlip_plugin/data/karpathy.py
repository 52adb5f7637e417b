"""Karpathy's split JSON, and the Karpathy test split in the layout clip_benchmark reads offline.

clip_benchmark fetches the Karpathy-split annotation files with ``wget`` when they are missing;
offline that leaves a 0-byte file and every later run fails. ``eval_layout`` writes those files
from Karpathy's own split JSON and places the test images where clip_benchmark looks, so the
evaluation never downloads anything; ``check`` validates such a layout, reading the annotation files
as clip_benchmark does (``read_flickr_annotation``, ``read_coco_annotation``).
"""
import json
import os
import shutil
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from conlip_plugin.atomic_files import atomic_path, write_atomic
from conlip_plugin.command_errors import fail, listing
from conlip_plugin.data.files import normalize_caption, require_files

FLICKR_HEADER = "image,caption"  # clip_benchmark's Flickr reader skips the first line unread
FLICKR_SEPARATOR = ".jpg,"  # ...and splits every other line at this string, which must occur once


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
    """What a checked layout holds, as clip_benchmark will count it."""

    images: int
    captions: int


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
    """An entry's captions, normalised; a sentence without 'raw' is the empty caption (refused in the test
    split, skipped in training)."""
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
        fail(f"{json_path}: test images listed twice: {listing(duplicates)}; clip_benchmark would merge them.")
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
    with atomic_path(target, sync=link == "copy") as tmp:  # a link brings no new data to sync
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


def eval_layout(dataset_name: str, karpathy_json: Path, images: Path, out: Path, link: str = "symlink",
                expect_images: int | None = None) -> LayoutCounts:
    """Write the Karpathy test split as clip_benchmark reads it offline, then check the result."""
    dataset = EVAL_DATASETS[dataset_name]
    items = karpathy_test_split(load_karpathy(karpathy_json, dataset), dataset, images, karpathy_json)
    require_files([item.source for item in items], "test images",
                   "--images must be the image folder" + (" holding val2014/." if dataset.karpathy_name == "coco"
                                                          else " (flickr30k-images)."))
    image_dir = out / dataset.image_dir
    image_dir.mkdir(parents=True, exist_ok=True)
    for item in tqdm(items, desc=f"{link} images", unit="image"):
        place_image(item.source, image_dir / item.name, link)
    text = flickr_annotation(items) if dataset_name == "flickr30k" else coco_annotation(items)
    write_atomic(out / dataset.annotation, text.encode("utf-8"))
    return check(dataset_name, out, expect_images)


def _fix_hint(dataset_name: str, root: Path) -> str:
    """The command that writes a correct layout, for the end of every error message of ``check``."""
    return (f"Run `conlip-prepare eval-layout --dataset {dataset_name} "
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
        fail(f"{annotation}: {len(without)} images have no captions ({listing(without)}); "
             f"retrieval recall would count them as misses. {fix}")
    require_files([image_dir / name for name, _ in items], f"images referenced by {annotation}",
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
