"""Gallery items from a folder of images, an open_clip-style CSV or webdataset shards.

Items come in a fixed order (sorted files, CSV rows, shard members), so an interrupted index run
can skip what it finished by position. An item names where its image bytes are; nothing is decoded
here. Every source is streamed: a folder is walked one directory at a time, a CSV read in blocks of
rows, so that listing a gallery holds no more than a block of it whatever its size.
"""
import itertools
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional

import braceexpand

from conlip_plugin.command_errors import fail
from conlip_plugin.data.files import normalize_caption
from conlip_plugin.data.shards import tar_samples
from conlip_plugin.reliability.skipped_samples import IMAGE_EXTENSIONS

DEFAULT_CAPTION_KEY = "title"  # open_clip_train's --csv-caption-key default
CSV_BLOCK_ROWS = 65536

FOLDER_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass(frozen=True)
class Item:
    """One gallery entry: a file (``path``), or a byte range of a shard (``shard``, ``offset``, ``size``).
    ``problem`` marks an entry known to be unusable before any decoding (a sample without an image, a
    shard that is missing or cut short), so that it is skipped and counted with the others."""

    key: str
    caption: Optional[str] = None
    path: Optional[str] = None
    shard: Optional[str] = None
    offset: int = 0
    size: int = 0
    problem: Optional[str] = None

    def read_bytes(self) -> bytes:
        if self.problem is not None:
            raise OSError(self.problem)
        if self.path is not None:
            return Path(self.path).read_bytes()
        with open(self.shard, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)

    def record(self) -> dict:
        """The metadata stored with the embedding (None fields left out)."""
        return {k: v for k, v in (("key", self.key), ("caption", self.caption), ("path", self.path),
                                  ("shard", self.shard), ("offset", self.offset if self.shard else None),
                                  ("size", self.size if self.shard else None)) if v is not None}

    @classmethod
    def from_record(cls, record: dict) -> "Item":
        return cls(**record)


def _caption(text: Optional[str]) -> Optional[str]:
    """A stored caption: whitespace collapsed; an empty one counts as none."""
    caption = normalize_caption(text) if text is not None else ""
    return caption or None


def _sorted_files(folder: Path) -> Iterator[Path]:
    """Files under ``folder`` in ``sorted(folder.rglob("*"))``'s order (paths compare part by part; linked
    folders are not entered, as rglob does not), one directory's listing in memory at a time."""
    with os.scandir(folder) as listed:
        entries = sorted(listed, key=lambda entry: entry.name)
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            yield from _sorted_files(Path(entry.path))
        elif entry.is_file():
            yield Path(entry.path)


def folder_items(root: Path) -> Iterator[Item]:
    """Image files under ``root`` (recursive, sorted); a sidecar ``NAME.txt`` is the image's caption."""
    for path in _sorted_files(root):
        if path.suffix.lower() not in FOLDER_IMAGE_SUFFIXES:
            continue
        sidecar = path.with_suffix(".txt")
        caption = _caption(sidecar.read_text(errors="replace")) if sidecar.is_file() else None
        yield Item(key=str(path.relative_to(root)), caption=caption, path=str(path.resolve()))


def csv_items(csv_path: Path, img_key: str, caption_key: Optional[str], separator: str) -> Iterator[Item]:
    """Rows of a CSV as open_clip_train reads it (pandas, ``--csv-separator``), read in blocks of
    ``CSV_BLOCK_ROWS``; relative image paths are taken from the working directory, as open_clip does,
    else from the CSV's folder. Captions come from ``caption_key``, which must exist, or (None) from a
    ``title`` column if there is one. The columns are checked here, before any item is asked for."""
    import pandas as pd

    try:
        blocks = pd.read_csv(csv_path, sep=separator, dtype=str, keep_default_na=False, chunksize=CSV_BLOCK_ROWS)
        first = next(blocks, None)
    except (OSError, ValueError) as err:
        fail(f"{csv_path}: cannot read this CSV ({err}); check --csv-separator (open_clip's default is a tab).")
    columns = list(first.columns) if first is not None else []
    if img_key not in columns:
        fail(f"{csv_path} has no column {img_key!r} (columns: {columns}); pass --csv-img-key "
             f"(and --csv-separator if the header was not split: open_clip's default separator is a tab).")
    if caption_key is None:
        caption_key = DEFAULT_CAPTION_KEY if DEFAULT_CAPTION_KEY in columns else None
    elif caption_key not in columns:
        fail(f"{csv_path} has no caption column {caption_key!r} (columns: {columns}); pass the "
             f"caption column as --csv-caption-key, or leave the flag out to index the images without captions.")
    return _csv_rows(csv_path, itertools.chain([first], blocks), img_key, caption_key)


def _csv_rows(csv_path: Path, blocks, img_key: str, caption_key: Optional[str]) -> Iterator[Item]:
    for frame in blocks:
        captions = frame[caption_key].tolist() if caption_key else [None] * len(frame)
        for name, caption in zip(frame[img_key].tolist(), captions):
            path = Path(name)
            if not path.is_absolute() and not path.exists() and (csv_path.parent / path).exists():
                path = csv_path.parent / path
            yield Item(key=name, caption=_caption(caption), path=str(path.resolve()))


def shard_items(pattern: str) -> Iterator[Item]:
    """Samples of webdataset shards (a braceexpand pattern, expanded here so that a malformed one stops
    the command at once), grouped as open_clip_train groups them: the image is the first of its image
    extensions present (jpg, png, jpeg, webp), ``txt`` the caption. A missing shard, or the rest of one
    cut short, becomes one item with its ``problem``: img2dataset output often has such gaps."""
    try:
        shards = list(braceexpand.braceexpand(pattern))
    except braceexpand.UnbalancedBracesError as err:
        fail(f"--images {pattern!r} is not a valid shard pattern ({err}); write ranges as "
             f"data/{{000000..000099}}.tar.")
    return _shard_samples(shards)


def _shard_samples(shards: List[str]) -> Iterator[Item]:
    for shard in shards:
        path = Path(shard)
        if not path.is_file():
            yield Item(key=path.name, shard=str(path), problem="shard not found")
            continue
        try:
            with tarfile.open(path, "r:") as tar:
                for key, members in tar_samples(tar):
                    image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
                    text = members.get("txt")
                    caption = _caption(tar.extractfile(text).read().decode("utf-8", "replace")) if text else None
                    if image is None:
                        yield Item(key=f"{path.name}/{key}", caption=caption, shard=str(path.resolve()),
                                   problem=f"the sample has no image member (it has: {', '.join(sorted(members))})")
                        continue
                    yield Item(key=f"{path.name}/{key}", caption=caption, shard=str(path.resolve()),
                               offset=image.offset_data, size=image.size)
                problem = _where_reading_stopped(path, tar.offset)
                if problem:
                    yield Item(key=f"{path.name} (from the break on)", shard=str(path.resolve()), problem=problem)
        except (tarfile.TarError, OSError, EOFError) as err:
            yield Item(key=f"{path.name} (from the break on)", shard=str(path.resolve()),
                       problem=f"shard cut short or damaged ({err}); the samples before the break are indexed")


def _where_reading_stopped(path: Path, offset: int) -> Optional[str]:
    """Why tarfile stopped at ``offset``, unless it is tar's end-of-archive marker (two zero blocks):
    tarfile ends its iteration quietly both where a shard is cut short and at a damaged member header."""
    with open(path, "rb") as f:
        f.seek(offset)
        marker = f.read(2 * tarfile.BLOCKSIZE)
    if len(marker) < 2 * tarfile.BLOCKSIZE:
        return ("shard cut short (it ends without tar's end-of-archive blocks); the samples before the break "
                "are indexed, the last of them perhaps without all its members")
    if marker.strip(b"\0"):
        return (f"damaged member header at byte {offset:,}; the samples before it are indexed, the rest of "
                f"the shard is not")
    return None


def is_shard_pattern(source: str) -> bool:
    """Shards are streamed (their count is unknown up front); folders and CSVs are listed first."""
    return source.endswith(".tar") or "{" in source


def gallery_items(source: str, csv_img_key: str = "filepath", csv_caption_key: Optional[str] = None,
                  csv_separator: str = "\t") -> Iterator[Item]:
    """The items of ``source``: a folder, a ``.csv``/``.tsv`` file, or a ``.tar`` shard pattern."""
    path = Path(source)
    if path.is_dir():
        return folder_items(path)
    if is_shard_pattern(source):
        return shard_items(source)
    if not path.exists():
        fail(f"--images {source} not found; pass an existing folder, CSV/TSV file or .tar shard pattern.")
    if path.suffix.lower() in (".csv", ".tsv"):
        return csv_items(path, csv_img_key, csv_caption_key, csv_separator)
    fail(f"--images {source!r} is neither a folder, a .csv/.tsv file nor a .tar shard pattern; "
         f"pass one of those.")
