"""Bad training samples: skip them, name each one, and count them per epoch.

A web-scale run meets broken images, empty captions and damaged shards: training must go on, but
every skip must be visible. DataLoader workers report each skip as one JSON line appended to a file
named in ``CONLIP_SKIPPED_SAMPLES_FILE`` (inherited under any start method); each rank's main
process reads the new lines after every batch and sums them at the epoch's end.
The readers that meet the bad samples are in ``conlip_plugin/data/training_readers.py``;
``patches/skip_bad_samples.py`` wires both into open_clip_train; docs/reliability.md has the rest.
"""
import atexit
import json
import logging
import os
import re
import tarfile
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, List, Optional, Set, Tuple

from PIL import UnidentifiedImageError

ENV = "CONLIP_SKIPPED_SAMPLES_FILE"

# Reasons: a sample (webdataset sample or CSV row) ...
MISSING_CAPTION = "missing caption"
MISSING_IMAGE = "missing image"
MISSING_BOTH = "missing image and caption"
EMPTY_CAPTION = "empty caption"
CAPTION_NOT_UTF8 = "caption not UTF-8"
NOT_AN_IMAGE = "not an image"
CORRUPT_IMAGE = "corrupt image"
MISSING_FILE = "missing file"
UNREADABLE_FILE = "unreadable file"
# ... or a shard, of which nothing (unreadable) or only the part before the damage was read.
UNREADABLE_SHARD = "unreadable shard"
TRUNCATED_TAR = "truncated tar"
CORRUPT_TAR = "corrupt tar"

IMAGE_EXTENSIONS = ("jpg", "png", "jpeg", "webp")  # what open_clip_train renames to "image"
MAX_NAMED_PER_RANK = 1000  # per epoch, sent to rank 0 for out.log; the rest only in that rank's log
_OBJECT_REPR = re.compile(r"(?: @)?\s*<[^<>]* object at 0x[0-9a-fA-F]+>")


@dataclass(frozen=True)
class Skip:
    """One skip: a sample (``shard=False``) or the unread rest of a shard (``key``: the last
    sample read before the damage, None if none was)."""

    source: str
    key: Optional[str]
    reason: str
    detail: str = ""
    shard: bool = False

    @property
    def ident(self) -> Tuple[str, Optional[str], str, bool]:
        return self.source, self.key, self.reason, self.shard


def describe(skip: Skip) -> str:
    """The log line that names a skip."""
    detail = f" ({skip.detail})" if skip.detail else ""
    if not skip.shard:
        return f"Skipped sample {skip.key!r} of {skip.source}: {skip.reason}{detail}"
    if skip.key is None:
        return f"Skipped shard {skip.source}: {skip.reason}{detail}"
    return f"Skipped the rest of shard {skip.source} after sample {skip.key!r}: {skip.reason}{detail}"


def detail(exn: BaseException) -> str:
    """``Type: message``, without the ``<... object at 0x...>`` reprs that PIL and webdataset put
    in messages (webdataset appends `` @ <stream>``)."""
    message = _OBJECT_REPR.sub("", str(exn)).strip()
    return f"{type(exn).__name__}: {message}" if message else type(exn).__name__


def sample_problem(sample: dict) -> Optional[str]:
    """Why a webdataset sample (undecoded, as grouped from the tar) cannot train, or None."""
    has_caption = "txt" in sample
    has_image = any(ext in sample for ext in IMAGE_EXTENSIONS)
    if not has_caption and not has_image:
        return MISSING_BOTH
    if not has_caption:
        return MISSING_CAPTION
    if not has_image:
        return MISSING_IMAGE
    if not sample["txt"].decode("utf-8", errors="replace").strip():
        return EMPTY_CAPTION
    return None


def decode_reason(exn: BaseException) -> str:
    """The reason for an error while decoding a sample's fields or reading a CSV row's image."""
    if isinstance(exn, UnicodeDecodeError):
        return CAPTION_NOT_UTF8
    if isinstance(exn, UnidentifiedImageError):
        return NOT_AN_IMAGE
    if isinstance(exn, FileNotFoundError):
        return MISSING_FILE
    if isinstance(exn, (PermissionError, IsADirectoryError)):
        return UNREADABLE_FILE
    return CORRUPT_IMAGE


def tar_reason(exn: BaseException) -> str:
    """The reason for an error while reading a shard's tar stream."""
    if isinstance(exn, EOFError) or (isinstance(exn, tarfile.ReadError) and "unexpected end" in str(exn)):
        return TRUNCATED_TAR
    if isinstance(exn, tarfile.TarError):
        return CORRUPT_TAR
    return UNREADABLE_SHARD


def shard_of(exn: BaseException) -> str:
    """The shard that webdataset 0.2.86 names on a tar-stage error: ``url_opener`` and
    ``tar_file_expander`` append the URL to ``args``, ``tar_file_iterator`` appends
    `` @ <stream>`` to the message."""
    if exn.args and isinstance(exn.args[-1], str) and (len(exn.args) > 1 or " @ " not in exn.args[-1]):
        return exn.args[-1]
    message = str(exn.args[0]) if exn.args else ""
    return message.rpartition(" @ ")[2] if " @ " in message else "an unknown shard"


def record(skip: Skip) -> None:
    """Record a skip for this rank's main process; callable from any DataLoader worker.

    Without a report (open_report was not called: not a training run), log it here instead."""
    path = os.environ.get(ENV)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND) if path else None
    except FileNotFoundError:  # removed from the temp folder: the main process recreates it
        fd = None
    if fd is None:
        logging.warning(describe(skip))
        return
    try:
        os.write(fd, (json.dumps(asdict(skip)) + "\n").encode())
    finally:
        os.close(fd)


def count(skips: Iterable[Skip]) -> Dict[str, Dict[str, int]]:
    """Skips by kind (``samples``, ``shards``) and reason."""
    counts: Dict[str, Counter] = {"samples": Counter(), "shards": Counter()}
    for skip in skips:
        counts["shards" if skip.shard else "samples"][skip.reason] += 1
    return {kind: dict(sorted(by_reason.items())) for kind, by_reason in counts.items()}


def _amount(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _listed(by_reason: Dict[str, int]) -> str:
    return ", ".join(f"{reason}: {n}" for reason, n in sorted(by_reason.items()))


def summary(epoch: int, per_rank: List[Dict[str, Dict[str, int]]]) -> Tuple[int, str]:
    """(log level, line) summarising an epoch's skips over all ranks: INFO when there were none."""
    total: Dict[str, Counter] = {"samples": Counter(), "shards": Counter()}
    for counts in per_rank:
        for kind in total:
            total[kind].update(counts.get(kind, {}))
    samples, shards = (sum(total[kind].values()) for kind in ("samples", "shards"))
    if not samples and not shards:
        return logging.INFO, f"Epoch {epoch}: skipped no samples"
    line = f"Epoch {epoch}: skipped {_amount(samples, 'sample')}"
    if samples:
        line += f" ({_listed(total['samples'])})"
    if shards:
        line += f" and {_amount(shards, 'shard')} ({_listed(total['shards'])})"
    if len(per_rank) > 1:
        ranks = "; ".join(
            f"rank {rank}: {sum(c.get('samples', {}).values())}/{sum(c.get('shards', {}).values())}"
            for rank, c in enumerate(per_rank))
        line += f" over {len(per_rank)} ranks (samples/shards {ranks})"
    return logging.WARNING, line


@dataclass
class EpochSkips:
    """What one rank's main process sends rank 0 at the end of an epoch."""

    counts: Dict[str, Dict[str, int]]
    named: List[Skip] = field(default_factory=list)
    unlisted: int = 0


class SkipReport:
    """The main process's reader of the skips it and its DataLoader workers record.

    A sample met twice in an epoch (the epoch wraps around the data, or shards are resampled)
    counts once; each is named in the log the first time the run meets it."""

    def __init__(self, path: str):
        self.path = path
        self.pid = os.getpid()
        self._offset = 0
        self._epoch: Dict[tuple, Skip] = {}
        self._named: Set[tuple] = set()
        self._fresh: List[Skip] = []

    def drain(self) -> None:
        """Read the complete lines recorded since the last call; log the new samples."""
        try:
            size = os.stat(self.path).st_size
        except FileNotFoundError:  # a temp-folder cleaner removed it during a long run
            open(self.path, "ab").close()
            self._offset = 0
            return
        if size <= self._offset:
            return
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self._offset += end
        for line in data[:end].splitlines():
            skip = Skip(**json.loads(line))
            self._epoch.setdefault(skip.ident, skip)
            if skip.ident not in self._named:
                self._named.add(skip.ident)
                self._fresh.append(skip)
                logging.warning(describe(skip))

    def end_epoch(self) -> EpochSkips:
        """The epoch's counts and newly named skips; the next epoch starts from zero."""
        self.drain()
        result = EpochSkips(count(self._epoch.values()), self._fresh[:MAX_NAMED_PER_RANK],
                            max(0, len(self._fresh) - MAX_NAMED_PER_RANK))
        self._epoch, self._fresh = {}, []
        return result

    def name_for(self, rank: int, skips: EpochSkips) -> None:
        """Log another rank's newly named skips that this log has not named yet."""
        for skip in skips.named:
            if skip.ident not in self._named:
                self._named.add(skip.ident)
                logging.warning(f"rank {rank}: {describe(skip)}")
        if skips.unlisted:
            logging.warning(f"rank {rank}: {skips.unlisted} more skips are named only in rank {rank}'s own log")


_report: Optional[SkipReport] = None


def _remove(path: str, pid: int) -> None:
    if os.getpid() == pid and os.path.exists(path):
        os.remove(path)


def open_report() -> SkipReport:
    """This process's report, created (with the file its workers will append to) on first use.

    Call it in the main process before DataLoader workers start: dataset construction does."""
    global _report
    if _report is None or _report.pid != os.getpid():
        fd, path = tempfile.mkstemp(prefix="conlip-skipped-", suffix=".jsonl")
        os.close(fd)
        os.environ[ENV] = path
        atexit.register(_remove, path, os.getpid())
        _report = SkipReport(path)
    return _report


def current_report() -> Optional[SkipReport]:
    """This process's report if it opened one (a training run with a CSV or webdataset)."""
    return _report if _report is not None and _report.pid == os.getpid() else None
