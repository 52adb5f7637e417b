"""Webdataset training shards: Karpathy-split pairs as shards (``train_shards``) and reproducible random
subsets of existing shards such as img2dataset's CC3M / CC12M output (``subset``, the paper's
200k / 5.3M / 9.5M pairs), each with the sizes.json open_clip reads its sample count from.
"""
import csv
import io
import itertools
import json
import random
import re
import sys
import tarfile
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from open_clip_train.data import expand_urls
from tqdm import tqdm

from conlip_plugin.atomic_files import atomic_file, write_atomic
from conlip_plugin.command_errors import fail, listing
from conlip_plugin.data.files import require_files, stable_hash
from conlip_plugin.data.karpathy import entry_captions, image_source, load_karpathy

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")  # open_clip_train.data.filter_no_caption_or_no_image
META_MEMBER = re.compile(r"__[^/]*__($|/)")  # members webdataset's tar reader skips
TAR_MTIME = 0.0  # fixed member times make rewritten shards byte-identical


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
        """All samples in the shards of this set."""
        return sum(self.sizes.values())


def shard_names(count: int) -> list[str]:
    """File names of `count` shards, zero-padded so that they sort and brace-expand in order."""
    width = max(5, len(str(count - 1)))
    return [f"{i:0{width}d}.tar" for i in range(count)]


def shard_pattern(out: Path, names: list[str]) -> str:
    """The brace pattern open_clip's --train-data takes for these shards."""
    return str(out / (names[0] if len(names) == 1 else f"{{{names[0][:-4]}..{names[-1][:-4]}}}.tar"))


def write_shard(path: Path, samples: Iterable[dict]) -> int:
    """Write samples (dicts of __key__ and extension -> bytes) to a shard atomically; returns their count."""
    from webdataset import TarWriter  # imports torch: loaded only by the shard commands

    count, previous = 0, None
    with atomic_file(path) as f:
        with TarWriter(f, encoder=False, mode=0o644, mtime=TAR_MTIME) as writer:
            for sample in samples:
                if sample["__key__"] == previous:
                    fail(f"two consecutive samples share the key {previous!r}; webdataset would merge them.")
                writer.write(sample)
                previous = sample["__key__"]
                count += 1
    return count


def warn_foreign_shards(out: Path, names: list[str]) -> None:
    """Shards left from an earlier run with other settings would be picked up by a glob; say so."""
    foreign = sorted(p.name for p in out.glob("*.tar") if p.name not in set(names))
    if foreign:
        print(f"note: {len(foreign)} other .tar files in {out} are not in this set ({listing(foreign)}); "
              f"sizes.json lists only this set", file=sys.stderr)


def sample_key(entry: dict, sentence: int) -> str:
    """A webdataset key: no dots (the reader splits the key at the first dot of the file name)."""
    return f"{Path(entry['filename']).stem.replace('.', '_')}_{sentence}"


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
        fail(f"images listed twice in the JSON (sample keys {listing(duplicates)}).")
    pairs.sort(key=lambda p: stable_hash(seed, p.key))  # the same shuffle on every Python version
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
    """Pairs as webdataset samples, reading each image only when its shard is written."""
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
    require_files(sorted({p.image for p in pairs}), "images", "--images must be the folder the JSON's "
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
    write_atomic(out / "sizes.json", json.dumps(summary.sizes, indent=1).encode())
    if write_csv:
        buffer = io.StringIO()
        writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
        writer.writerow(["filepath", "title"])
        writer.writerows([str(p.image.resolve()), p.caption] for p in pairs)
        summary.csv = out / f"{'-'.join(splits)}.csv"
        write_atomic(summary.csv, buffer.getvalue().encode("utf-8"))
    warn_foreign_shards(out, names)
    return summary


# ---------------------------------------------------------------- subsets of existing shards

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
        fail(f"{len(missing)} of {len(paths)} shards of {pattern!r} are missing: {listing(missing)}.")
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
    with atomic_file(out / "manifest.tsv", "w", encoding="utf-8") as manifest, \
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
    info = {"seed": seed, "count": count, "pattern": pattern, "shards": [str(p) for p in paths],
            "usable_samples": sum(usable), "unusable_samples": summary.skipped_unusable}
    write_atomic(out / "subset.json", json.dumps(info, indent=1).encode())
    write_atomic(out / "sizes.json", json.dumps(summary.sizes, indent=1).encode())
    warn_foreign_shards(out, names)
    return summary


def report_shards(summary: ShardSummary, out: Path) -> None:
    """Print what was written and skipped, and the --train-data pattern to hand open_clip."""
    names = list(summary.sizes)
    print(f"{summary.samples} samples in {len(names)} shards in {out} "
          f"({len(summary.written)} written, {len(summary.reused)} already complete)")
    if summary.images_per_split:
        print("images per split: " + ", ".join(f"{s} {n}" for s, n in summary.images_per_split.items()))
    if summary.skipped_empty:
        print(f"skipped {len(summary.skipped_empty)} empty captions: {listing(summary.skipped_empty)}")
    if summary.skipped_unusable:
        print(f"skipped {summary.skipped_unusable} samples without caption or image (open_clip skips them too)")
    print(f"open_clip: --train-data '{shard_pattern(out, names)}' --dataset-type webdataset "
          f"(sizes.json gives the sample count)")
