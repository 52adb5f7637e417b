"""Skip bad training samples by name and count them per epoch, for webdataset and CSV data.

Why: in open_clip_train 3.3 a webdataset error only warns ``Handling webdataset error (...).
Ignoring.`` without the sample's key (and from DataLoader workers), a sample without caption or
image vanishes silently, an empty caption trains as an empty string, a tar cut at a member
boundary ends its shard quietly, and a CSV row whose image is missing or corrupt crashes the run
mid-epoch; nobody learns how much data a 60-hour run lost.
What: replaces, in ``open_clip_train.data``, ``filter_no_caption_or_no_image`` (also drops empty
captions), ``log_and_continue`` (the decode-error handler), ``tarfile_to_samples_nothrow``
(whose handler is bound at import) and ``CsvDataset`` (skips and replaces a bad row), all looked
up when the datasets are built; wraps ``get_wds_dataset`` to open the skip report before its
workers start, and ``open_clip_train.train.train_one_epoch`` (bound by ``open_clip_train.main``
at import) to log each skipped sample as it is met and a summary by reason after each epoch,
rank 0 summing all ranks (``conlip_plugin.reliability.skipped_samples`` has the machinery).
For: open_clip_torch 3.3.x with webdataset <= 0.2.86.
"""
import functools
import inspect
import logging
import sys
from typing import Callable, Optional, Tuple

from conlip_plugin.data import training_readers as readers
from conlip_plugin.reliability import skipped_samples as se

_passed: Optional[Tuple[str, str]] = None


def filter_no_caption_or_no_image(sample: dict) -> bool:
    """open_clip's filter, recording what it drops and also dropping empty captions.

    It runs just before the decode stage in both of open_clip's pipelines, so the sample it last
    let through is the one a decode error belongs to."""
    global _passed
    source, key = str(sample.get("__url__")), sample.get("__key__")
    problem = se.sample_problem(sample)
    if problem:
        se.record(se.Skip(source, key, problem))
        return False
    _passed = source, key
    return True


def _caught_in(exn: BaseException) -> str:
    """The function whose ``except`` clause holds ``exn``: the webdataset stage that failed."""
    return exn.__traceback__.tb_frame.f_code.co_name if exn.__traceback__ else ""


def log_and_continue(exn: Exception) -> bool:
    """open_clip's webdataset error handler: record the sample (or shard) lost, then go on."""
    if _caught_in(exn) == "_decode":
        source, key = _passed or ("an unknown shard", None)
        se.record(se.Skip(source, key, se.decode_reason(exn), se.detail(exn)))
    else:
        se.record(se.Skip(se.shard_of(exn), None, se.tar_reason(exn), se.detail(exn).split(" @ ")[0],
                          shard=True))
    return True


def tarfile_to_samples_nothrow(src):
    """open_clip's training tar stage, reporting each unreadable or damaged shard once."""
    from open_clip_train.data import group_by_keys_nothrow

    return group_by_keys_nothrow(readers.tar_members(src))


class _Draining:
    """The epoch's DataLoader, logging the skips recorded so far after every batch."""

    def __init__(self, loader, report: se.SkipReport):
        self._loader = loader
        self._report = report

    def __iter__(self):
        for batch in self._loader:
            self._report.drain()
            yield batch

    def __len__(self) -> int:
        return len(self._loader)

    def __getattr__(self, name: str):
        return getattr(self._loader, name)


def _log_epoch(report: se.SkipReport, epoch: int, args) -> None:
    """Rank 0 names the other ranks' new skips and logs the summary of all ranks."""
    import torch.distributed as dist
    from open_clip_train.distributed import is_master

    per_rank = [report.end_epoch()]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        mine, per_rank = per_rank[0], [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, mine)
    if not is_master(args):
        return
    for rank, skips in enumerate(per_rank):
        if rank != args.rank:
            report.name_for(rank, skips)
    logging.log(*se.summary(epoch, [skips.counts for skips in per_rank]))


def _reporting_epochs(train_one_epoch: Callable) -> Callable:
    signature = inspect.signature(train_one_epoch)

    @functools.wraps(train_one_epoch)
    def reporting_train_one_epoch(*args, **kwargs):
        report = se.current_report()
        if report is None:
            return train_one_epoch(*args, **kwargs)
        bound = signature.bind(*args, **kwargs).arguments
        info = bound["data"]["train"]
        loader = info.dataloader
        info.dataloader = _Draining(loader, report)
        try:
            result = train_one_epoch(*args, **kwargs)
        finally:
            info.dataloader = loader
            report.drain()
        _log_epoch(report, bound["epoch"], bound["args"])
        return result

    return reporting_train_one_epoch


def _opening_report(get_wds_dataset: Callable) -> Callable:
    @functools.wraps(get_wds_dataset)
    def reporting_get_wds_dataset(*args, **kwargs):
        se.open_report()
        return get_wds_dataset(*args, **kwargs)

    reporting_get_wds_dataset._conlip_sample_errors = True
    return reporting_get_wds_dataset


def apply() -> None:
    import open_clip_train.data as data
    import open_clip_train.train as train

    if getattr(data.get_wds_dataset, "_conlip_sample_errors", False):
        return
    data.filter_no_caption_or_no_image = filter_no_caption_or_no_image
    data.log_and_continue = log_and_continue
    data.tarfile_to_samples_nothrow = tarfile_to_samples_nothrow
    data.CsvDataset = readers.CsvDataset
    data.get_wds_dataset = _opening_report(data.get_wds_dataset)
    train.train_one_epoch = _reporting_epochs(train.train_one_epoch)
    main = sys.modules.get("open_clip_train.main")
    if main is not None:
        main.train_one_epoch = train.train_one_epoch
