"""Bad training data: skipped, named and counted per epoch (unit tier, then the real open_clip_train CLI).

``write_corrupt_shards`` / ``write_corrupt_csv`` build data sets that mix good samples with every
kind of damage and return what was injected; the expected log is computed from that, not from
the plugin's code.
"""
import io
import json
import multiprocessing
import random
import re
import sys
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
from PIL import Image

from conlip_plugin.data import training_readers as readers
from conlip_plugin.reliability import skipped_samples as se
from conlip_plugin.patches import skip_bad_samples as patch

PYTHON = sys.executable
BATCH = 8

# Each kind of bad webdataset sample, and the reason the log must give for it.
BAD_SAMPLES = {
    "truncated jpeg": "corrupt image",
    "not an image": "not an image",
    "missing caption": "missing caption",
    "missing image": "missing image",
    "empty caption": "empty caption",
    "blank caption": "empty caption",
}
# Each kind of bad CSV row, and its reason.
BAD_ROWS = {
    "missing file": "missing file",
    "truncated png": "corrupt image",
    "not an image": "not an image",
    "empty caption": "empty caption",
}
LONG_CAPTION = "word " * 2000  # 10,000 characters: the tokenizer truncates it, it trains


def image_bytes(i: int, fmt: str = "JPEG", size: int = 32) -> bytes:
    """A small image whose colour depends on ``i``."""
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (i * 37 % 256, i * 91 % 256, i * 13 % 256)).save(buf, fmt)
    return buf.getvalue()


def sample_files(kind: str, i: int) -> Dict[str, bytes]:
    """The tar members of sample ``i`` of a kind: "good", "long caption" or one of BAD_SAMPLES."""
    jpg, caption = image_bytes(i), f"a photo of colour number {i}".encode()
    files = {
        "good": {"jpg": jpg, "txt": caption},
        "long caption": {"jpg": jpg, "txt": LONG_CAPTION.encode()},
        "truncated jpeg": {"jpg": jpg[: len(jpg) // 2], "txt": caption},
        "not an image": {"jpg": b"<html><body>404 Not Found</body></html>", "txt": caption},
        "missing caption": {"jpg": jpg},
        "missing image": {"txt": caption},
        "empty caption": {"jpg": jpg, "txt": b""},
        "blank caption": {"jpg": jpg, "txt": b" \t\n "},
    }
    return files[kind]


def write_tar(path: Path, samples: List[Tuple[str, Dict[str, bytes]]], cut: Optional[str] = None,
              cut_at: int = 0) -> None:
    """Write ``samples`` as a tar; ``cut`` "inside" or "boundary" cuts it short at sample ``cut_at``
    (inside its first member's data, or just before its first header)."""
    buf, starts = io.BytesIO(), []
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, files in samples:
            starts.append(buf.tell())
            for ext, payload in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    raw = buf.getvalue()
    if cut == "inside":
        raw = raw[: starts[cut_at] + 512 + 40]
    elif cut == "boundary":
        raw = raw[: starts[cut_at]]
    path.write_bytes(raw)


@dataclass
class CorruptSet:
    """What a corrupt data set holds: ``train_data`` for --train-data, the number of samples that
    train, and each (source, key, reason) skip that the log must name (key None: a whole shard)."""

    train_data: str
    good: int
    samples: List[Tuple[str, str, str]] = field(default_factory=list)
    shards: List[Tuple[str, Optional[str], str]] = field(default_factory=list)
    long_caption_key: Optional[str] = None

    def expected_counts(self) -> Dict[str, Dict[str, int]]:
        return {"samples": dict(Counter(r for _, _, r in self.samples)),
                "shards": dict(Counter(r for _, _, r in self.shards))}


def write_corrupt_shards(root: Path, good: int, bad_each: int = 1, per_shard: int = 50,
                         cut_shards: bool = True, missing_shard: bool = True) -> CorruptSet:
    """Shards of ``good`` good samples (the first with a 10,000-character caption) and
    ``bad_each`` samples of every BAD_SAMPLES kind, in a seeded random order; then, when
    ``cut_shards``, two more shards of 8 good samples cut short after 4 (inside a member, and at
    a member boundary); when ``missing_shard``, a shard URL that does not exist."""
    root.mkdir(parents=True, exist_ok=True)
    kinds = ["good"] * (good - 1) + [k for k in BAD_SAMPLES for _ in range(bad_each)]
    random.Random(0).shuffle(kinds)
    kinds.insert(0, "long caption")
    result = CorruptSet("", good, long_caption_key="000000000")
    urls = []
    for start in range(0, len(kinds), per_shard):
        shard = start // per_shard
        url = str(root / f"mixed-{shard:04d}.tar")
        samples = [(f"{shard:04d}{i:05d}", kind) for i, kind in enumerate(kinds[start:start + per_shard])]
        write_tar(Path(url), [(key, sample_files(kind, start + i)) for i, (key, kind) in enumerate(samples)])
        result.samples += [(url, key, BAD_SAMPLES[kind]) for key, kind in samples if kind in BAD_SAMPLES]
        urls.append(url)
    if cut_shards:
        for cut in ("inside", "boundary"):
            url = str(root / f"cut-{cut}.tar")
            write_tar(Path(url), [(f"{cut}{i:03d}", sample_files("good", i)) for i in range(8)], cut, cut_at=4)
            result.shards.append((url, f"{cut}003", "truncated tar"))
            result.good += 4
            urls.append(url)
    if missing_shard:
        url = str(root / "missing.tar")
        result.shards.append((url, None, "unreadable shard"))
        urls.append(url)
    result.train_data = "::".join(urls)
    return result


def write_corrupt_csv(root: Path, good: int, bad_each: int = 1) -> CorruptSet:
    """A CSV (filepath,title) of ``good`` rows with PNG files and ``bad_each`` rows of every
    BAD_ROWS kind, in a seeded random order; the missing file is never written."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    kinds = ["good"] * good + [k for k in BAD_ROWS for _ in range(bad_each)]
    random.Random(0).shuffle(kinds)
    csv_path = root / "train.csv"
    result = CorruptSet(str(csv_path), good)
    lines = ["filepath,title"]
    for row, kind in enumerate(kinds):
        path, png = root / "images" / f"{row:05d}.png", image_bytes(row, "PNG")
        if kind == "truncated png":
            path.write_bytes(png[: len(png) // 2])
        elif kind == "not an image":
            path.write_bytes(b"<html><body>404 Not Found</body></html>")
        elif kind != "missing file":
            path.write_bytes(png)
        lines.append(f"{path},{'' if kind == 'empty caption' else f'a picture of colour {row}'}")
        if kind != "good":
            result.samples.append((str(csv_path), f"row {row}", BAD_ROWS[kind]))
    csv_path.write_text("\n".join(lines) + "\n")
    return result


SUMMARY = re.compile(r"Epoch \d+: skipped (?:no samples|\d+ samples?(?: \(([^)]*)\))?(?: and \d+ shards? \(([^)]*)\))?)")


def _by_reason(text: Optional[str]) -> Dict[str, int]:
    return {reason: int(n) for reason, n in (part.rsplit(": ", 1) for part in text.split(", "))} if text else {}


def summaries(log: str) -> List[Dict[str, Dict[str, int]]]:
    """Each epoch summary line of a log, parsed into counts by kind and reason."""
    return [{"samples": _by_reason(m.group(1)), "shards": _by_reason(m.group(2))}
            for m in map(SUMMARY.search, log.splitlines()) if m]


def warnings_naming(log: str, words: List[str]) -> List[str]:
    return [line for line in log.splitlines() if "| WARNING |" in line and all(w in line for w in words)]


def assert_named(log: str, corrupt: CorruptSet) -> None:
    for source, key, reason in corrupt.samples:
        assert warnings_naming(log, [f"Skipped sample '{key}' of {source}: {reason}"]), (key, reason)
    for source, key, reason in corrupt.shards:
        words = [f"Skipped shard {source}: {reason}"] if key is None else \
            [f"Skipped the rest of shard {source} after sample '{key}': {reason}"]
        assert warnings_naming(log, words), (source, reason)


def cli_args(name: str, data: str, kind: str, **extra) -> List[str]:
    args = ["--model", "conlip-tiny", "--batch-size", str(BATCH), "--epochs", "1", "--lr", "5e-4",
            "--warmup", "1", "--precision", "fp32", "--device", "cpu", "--seed", "0", "--name", name,
            "--save-frequency", "0", "--workers", "1", "--train-data", data, "--dataset-type", kind]
    if kind == "csv":
        args += ["--csv-separator", ",", "--csv-img-key", "filepath", "--csv-caption-key", "title"]
    for flag, value in extra.items():
        args += [f"--{flag.replace('_', '-')}", str(value)]
    return args


# ----------------------------------------------------------------------------------- fast tier


@pytest.fixture
def recorded(monkeypatch):
    """A fresh report for this test; returns a function reading every record made so far."""
    monkeypatch.setattr(se, "_report", None)
    monkeypatch.delenv(se.ENV, raising=False)
    path = Path(se.open_report().path)
    return lambda: [se.Skip(**json.loads(line)) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("kind,reason", [*BAD_SAMPLES.items(), ("good", None), ("long caption", None)])
def test_sample_problem_before_decoding(kind, reason):
    """The filter sees undecoded bytes: damaged images pass it and fail in the decode stage."""
    problem = se.sample_problem(sample_files(kind, 3))
    assert problem == (reason if reason in ("missing caption", "missing image", "empty caption") else None)
    assert se.sample_problem({}) == "missing image and caption"


def test_decode_reason_names_real_image_errors(tmp_path):
    def error(data: bytes) -> Exception:
        with pytest.raises(Exception) as info:
            Image.open(io.BytesIO(data)).load()
        return info.value

    jpg = image_bytes(1)
    assert se.decode_reason(error(jpg[: len(jpg) // 2])) == "corrupt image"
    assert se.decode_reason(error(b"no image here")) == "not an image"
    with pytest.raises(UnicodeDecodeError) as not_utf8:
        b"\xff\xfe caption".decode("utf-8")
    assert se.decode_reason(not_utf8.value) == "caption not UTF-8"
    with pytest.raises(FileNotFoundError) as missing:
        Image.open(tmp_path / "nope.png")
    assert se.decode_reason(missing.value) == "missing file"
    assert "object at 0x" not in se.detail(error(b"no image here"))


def test_shard_of_reads_the_url_webdataset_attaches(tmp_path):
    from webdataset.tariterators import tar_file_expander, url_opener

    caught = []
    catch = lambda exn: caught.append(exn) or True  # noqa: E731
    list(url_opener([{"url": str(tmp_path / "gone.tar")}], handler=catch))
    cut = tmp_path / "cut.tar"
    write_tar(cut, [(f"k{i}", sample_files("good", i)) for i in range(3)], "inside", cut_at=1)
    list(tar_file_expander(url_opener([{"url": str(cut)}]), handler=catch))
    assert [se.shard_of(e) for e in caught[:1] + caught[2:]] == [str(tmp_path / "gone.tar"), str(cut)]
    assert str(cut) in se.shard_of(caught[1])  # caught in tar_file_iterator: "... @ <stream of cut.tar>"
    assert [se.tar_reason(e) for e in caught] == ["unreadable shard", "truncated tar", "truncated tar"]
    assert se.shard_of(OSError("pipe:curl -s http://x/0.tar")) == "pipe:curl -s http://x/0.tar"  # () + (url,)
    assert se.shard_of(ValueError("k.txt: duplicate file name", None, None)) == "an unknown shard"


def test_tar_members_report_each_damaged_shard_once(tmp_path, recorded):
    import gzip

    samples = [(f"k{i}", sample_files("good", i)) for i in range(5)]
    whole, gz, inside, boundary = (tmp_path / n for n in ("whole.tar", "whole.tar.gz", "inside.tar", "boundary.tar"))
    write_tar(whole, samples)
    gz.write_bytes(gzip.compress(whole.read_bytes()))
    write_tar(inside, samples, "inside", cut_at=2)
    write_tar(boundary, samples, "boundary", cut_at=3)
    urls = [whole, gz, inside, boundary, tmp_path / "missing.tar"]
    members = list(readers.tar_members({"url": str(u)} for u in urls))
    assert len(members) == 2 * 10 + 4 + 6
    assert {(s.source, s.key, s.reason, s.shard) for s in recorded()} == {
        (str(inside), "k1", "truncated tar", True),
        (str(boundary), "k2", "truncated tar", True),
        (str(tmp_path / "missing.tar"), None, "unreadable shard", True)}


def test_pipeline_names_every_bad_sample_with_shard_and_key(tmp_path, recorded):
    """open_clip's training pipeline stages, in this process, with the patched functions."""
    import webdataset as wds

    corrupt = write_corrupt_shards(tmp_path, good=12, per_shard=10)
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(corrupt.train_data), patch.tarfile_to_samples_nothrow,
        wds.select(patch.filter_no_caption_or_no_image), wds.decode("pilrgb", handler=patch.log_and_continue),
        wds.to_tuple("jpg", "txt"))
    trained = list(pipeline)
    assert len(trained) == corrupt.good
    assert LONG_CAPTION in [caption for _, caption in trained]
    skips = recorded()
    assert sorted((s.source, s.key, s.reason) for s in skips if not s.shard) == sorted(corrupt.samples)
    assert sorted((s.source, s.key, s.reason) for s in skips if s.shard) == sorted(corrupt.shards, key=str)


def test_validation_pipeline_handler_names_the_shard(tmp_path, recorded):
    """open_clip's validation pipeline keeps webdataset's tar stage, with log_and_continue as handler."""
    import webdataset as wds

    write_tar(tmp_path / "cut.tar", [(f"k{i}", sample_files("good", i)) for i in range(4)], "inside", cut_at=2)
    pipeline = wds.DataPipeline(
        wds.SimpleShardList([str(tmp_path / "cut.tar"), str(tmp_path / "gone.tar")]),
        wds.tarfile_to_samples(handler=patch.log_and_continue), wds.select(patch.filter_no_caption_or_no_image),
        wds.decode("pilrgb", handler=patch.log_and_continue))
    assert len(list(pipeline)) == 2
    reasons = {(s.reason, s.shard) for s in recorded()}
    assert reasons == {("truncated tar", True), ("unreadable shard", True)}
    assert all(str(tmp_path) in s.source for s in recorded())


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_skips_recorded_in_worker_processes_reach_the_report(recorded, caplog, method):
    report = se.current_report()
    skips = [se.Skip("s.tar", f"k{i}", "corrupt image") for i in range(3)]
    child = multiprocessing.get_context(method).Process(target=se.record, args=(skips[0],))
    child.start()
    child.join()
    assert child.exitcode == 0
    for skip in skips[1:] + skips[:1]:  # k0 twice: counted and named once
        se.record(skip)
    with caplog.at_level("WARNING"):
        report.drain()
    assert [r.getMessage() for r in caplog.records] == [se.describe(s) for s in skips]
    epoch = report.end_epoch()
    assert epoch.counts == {"samples": {"corrupt image": 3}, "shards": {}} and epoch.named == skips
    se.record(skips[0])  # met again next epoch: counted again, not named again
    assert report.end_epoch() == se.EpochSkips({"samples": {"corrupt image": 1}, "shards": {}}, [], 0)
    Path(report.path).unlink()  # a temp-folder cleaner: the report recreates its file and goes on
    report.drain()
    se.record(skips[1])
    assert report.end_epoch().counts == {"samples": {"corrupt image": 1}, "shards": {}}


def test_summary_lines():
    import logging

    assert se.summary(3, [se.count([])]) == (logging.INFO, "Epoch 3: skipped no samples")
    counts = se.count([se.Skip("a", "1", "not an image"), se.Skip("a", "2", "empty caption"),
                       se.Skip("a", "3", "not an image"), se.Skip("b", None, "unreadable shard", shard=True)])
    level, line = se.summary(0, [counts])
    assert level == logging.WARNING
    assert line == "Epoch 0: skipped 3 samples (empty caption: 1, not an image: 2) and 1 shard (unreadable shard: 1)"
    _, line = se.summary(1, [counts, se.count([se.Skip("c", "9", "not an image")])])
    assert line.startswith("Epoch 1: skipped 4 samples (empty caption: 1, not an image: 3) and 1 shard")
    assert line.endswith("over 2 ranks (samples/shards rank 0: 3/1; rank 1: 1/0)")
    assert summaries(line) == [{"samples": {"empty caption": 1, "not an image": 3}, "shards": {"unreadable shard": 1}}]


def test_csv_rows_are_replaced_and_recorded(tmp_path, recorded):
    import torch

    corrupt = write_corrupt_csv(tmp_path, good=8)
    dataset = readers.CsvDataset(corrupt.train_data, lambda img: torch.tensor(img.convert("RGB").size),
                                 "filepath", "title", sep=",", tokenizer=lambda texts: [texts[0]])
    loaded = [dataset[i] for i in range(len(dataset))]
    assert all(caption.startswith("a picture of colour") for _, caption in loaded)
    assert {(s.source, s.key, s.reason) for s in recorded()} == set(corrupt.samples)
    assert all(f"{tmp_path / 'images'}" in s.detail for s in recorded())


def test_csv_with_no_usable_rows_says_what_to_check(tmp_path, recorded):
    (tmp_path / "train.csv").write_text("filepath,title\n" + "".join(f"/nowhere/{i}.png,a cat\n" for i in range(40)))
    dataset = readers.CsvDataset(tmp_path / "train.csv", None, "filepath", "title", sep=",")
    with pytest.raises(RuntimeError, match=r"32 consecutive rows .* from row 5 .*'row 5'.*/nowhere/5.png.*--csv-img-key"):
        dataset[5]


# ------------------------------------------------------------------------ through the real CLI


@pytest.mark.slow
def test_webdataset_run_skips_names_and_counts_bad_samples(tmp_path, run):
    corrupt = write_corrupt_shards(tmp_path / "data", good=24, per_shard=15)
    assert corrupt.good % BATCH == 0
    # One more sample than train: the epoch reads every shard to its end, then wraps around.
    args = cli_args("wds", corrupt.train_data, "webdataset", train_num_samples=corrupt.good + 1)
    run([PYTHON, "-m", "open_clip_train.main", *args], tmp_path)
    log = (tmp_path / "logs" / "wds" / "out.log").read_text()
    assert "Train Epoch: 0" in log and "Handling webdataset error" not in log
    assert_named(log, corrupt)
    assert summaries(log) == [corrupt.expected_counts()]
    named = [line for line in log.splitlines() if "Skipped " in line]
    assert len(named) == len(corrupt.samples) + len(corrupt.shards), "each skip is named once"
    assert not warnings_naming(log, [f"'{corrupt.long_caption_key}'"]), "the 10,000-character caption trains"


@pytest.mark.slow
def test_csv_run_skips_names_and_counts_bad_rows(tmp_path, run):
    corrupt = write_corrupt_csv(tmp_path / "data", good=20)
    assert (corrupt.good + len(corrupt.samples)) % BATCH == 0  # every row is read in the epoch
    run([PYTHON, "-m", "open_clip_train.main", *cli_args("csv", corrupt.train_data, "csv")], tmp_path)
    log = (tmp_path / "logs" / "csv" / "out.log").read_text()
    assert "Train Epoch: 0" in log
    assert_named(log, corrupt)
    for _, key, _ in corrupt.samples:
        row = int(key.split()[1])
        assert warnings_naming(log, [f"'{key}'", f"{row:05d}.png"]), "the line names the image file"
    assert summaries(log) == [corrupt.expected_counts()]


@pytest.mark.slow
def test_csv_two_ranks_rank0_names_and_counts_all(tmp_path, run):
    corrupt = write_corrupt_csv(tmp_path / "data", good=28)
    torchrun = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547"]
    run([*torchrun, "-m", "open_clip_train.main", *cli_args("ddp", corrupt.train_data, "csv")], tmp_path)
    log = (tmp_path / "logs" / "ddp" / "out.log").read_text()
    assert_named(log, corrupt)
    assert warnings_naming(log, ["rank 1: Skipped sample"]), "rank 1's skips reach out.log"
    assert summaries(log) == [corrupt.expected_counts()]
    assert "over 2 ranks" in log
