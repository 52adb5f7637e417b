"""open_clip_train's shard and CSV readers, made to skip a bad sample instead of ending the run.

Each skip is recorded through ``conlip_plugin/reliability/skipped_samples.py``, which names and
counts them; ``patches/skip_bad_samples.py`` puts these readers in open_clip_train's place.
"""
import math
import os
from typing import Iterable, Iterator, Union

from PIL import Image
from torch.utils.data import Dataset

from conlip_plugin.reliability.skipped_samples import (
    EMPTY_CAPTION, TRUNCATED_TAR, UNREADABLE_SHARD, Skip, decode_reason, describe, detail, open_report, record,
    shard_of, tar_reason)

MAX_CONSECUTIVE_BAD_ROWS = 32
_BLOCK = 512


class _TarEnd:
    """A shard's byte stream that keeps its first and last 512 bytes.

    tarfile's stream mode ends quietly when a tar is cut at a member boundary; a complete
    uncompressed tar ends with a zero block, which tells the two apart."""

    def __init__(self, raw):
        self._raw = raw
        self._head = b""
        self._tail = b""

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        if len(self._head) < _BLOCK:
            self._head = (self._head + data)[:_BLOCK]
        self._tail = (self._tail + data[-_BLOCK:])[-_BLOCK:]
        return data

    def cut_short(self) -> bool:
        """Whether an uncompressed tar stream ends without a zero block (read to its end first)."""
        while self.read(1 << 16):
            pass
        return self._head[257:262] == b"ustar" and self._tail.strip(b"\0") != b""


def _unreadable_shard(exn: Exception) -> bool:
    record(Skip(shard_of(exn), None, UNREADABLE_SHARD, detail(exn), shard=True))
    return True


def tar_members(sources: Iterable[dict]) -> Iterator[dict]:
    """Shards to tar members, as webdataset's ``url_opener`` + ``tar_file_expander``, except
    that a shard that cannot be opened, or whose tar ends early or is damaged, is recorded once
    with the last sample read before the damage, and the rest of that shard is skipped."""
    from webdataset.tariterators import base_plus_ext, tar_file_iterator, url_opener

    for source in url_opener(sources, handler=_unreadable_shard):
        url, last = source["url"], None
        stream = _TarEnd(source["stream"])
        try:
            for member in tar_file_iterator(stream):
                member["__url__"] = url
                last = member["fname"]
                yield member
            cut_short = stream.cut_short()
        except Exception as exn:
            record(Skip(url, last and base_plus_ext(last)[0], tar_reason(exn), detail(exn), shard=True))
            continue
        if cut_short:
            record(Skip(url, last and base_plus_ext(last)[0], TRUNCATED_TAR,
                        "the file ends without the tar end-of-archive block", shard=True))


class CsvDataset(Dataset):
    """open_clip_train's CSV dataset (same arguments), except that a row whose image or caption
    cannot be used is recorded and replaced by the next usable row, instead of ending the run.

    A map-style dataset must return a sample for every index, hence the replacement. Many
    consecutive bad rows are no longer bad samples but a wrong path or column: that raises."""

    def __init__(self, input_filename, transforms, img_key, caption_key, sep="\t", tokenizer=None):
        import pandas as pd

        df = pd.read_csv(input_filename, sep=sep)
        self.images = df[img_key].tolist()
        self.captions = df[caption_key].tolist()
        self.transforms = transforms
        self.tokenize = tokenizer
        self.source = str(input_filename)
        open_report()

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, idx: int):
        skips = []
        for step in range(min(len(self), MAX_CONSECUTIVE_BAD_ROWS)):
            loaded = self.load(idx + step)
            if not isinstance(loaded, Skip):
                return loaded
            record(loaded)
            skips.append(loaded)
        raise RuntimeError(
            f"{len(skips)} consecutive rows of {self.source} from row {idx} cannot be used, the first: "
            f"{describe(skips[0])}. That is not a few bad samples: check that --csv-img-key and "
            f"--csv-caption-key name the right columns and that the image paths exist as seen from "
            f"{os.getcwd()}.")

    def load(self, row: int) -> Union[tuple, Skip]:
        """Row ``row`` (modulo the length) as (image, tokens), or the Skip that says why not."""
        row %= len(self)
        key, caption, path = f"row {row}", _text(self.captions[row]), str(self.images[row])
        if not caption.strip():
            return Skip(self.source, key, EMPTY_CAPTION, f"image {path}")
        try:
            with Image.open(path) as img:
                image = self.transforms(img)
        except Exception as exn:
            return Skip(self.source, key, decode_reason(exn), f"file {path}: {detail(exn)}")
        return image, self.tokenize([caption])[0]


def _text(caption) -> str:
    """A CSV caption as text: pandas reads an empty field as NaN (which open_clip trains as "nan")."""
    if caption is None or (isinstance(caption, float) and math.isnan(caption)):
        return ""
    return str(caption)
