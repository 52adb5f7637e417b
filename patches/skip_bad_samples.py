"""Skip bad training samples by name and count them per epoch, for webdataset and CSV data.

Why: in open_clip_train 3.3 a webdataset error only warns without the sample's key, samples
without caption vanish silently, a cut tar ends its shard quietly and a bad CSV row crashes the
run. What: replaces, in ``open_clip_train.data``, ``filter_no_caption_or_no_image``,
``log_and_continue``, ``tarfile_to_samples_nothrow`` and ``CsvDataset``; wraps ``get_wds_dataset``
(opens the skip report) and ``open_clip_train.train.train_one_epoch`` (logs skips, a summary per
epoch; ``conlip_plugin.reliability.skipped_samples`` has the machinery).
For: open_clip_torch 3.3.x with webdataset 0.2.5 to 0.2.86 (decode errors are recognised as
raised in ``webdataset.filters._decode``; activation refuses a webdataset without it).
"""
import functools
import inspect
import logging
from typing import Callable, Optional, Tuple

from conlip_plugin.data import training_readers as readers
from conlip_plugin.integration.patching import for_each_main, replace, wrap
from conlip_plugin.reliability import skipped_samples as se

PATCH = __name__.rpartition(".")[2]
DECODE_STAGE = "_decode"

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
    if _caught_in(exn) == DECODE_STAGE:
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

    return reporting_get_wds_dataset


def _rebind_epoch(main) -> None:
    import open_clip_train.train as train

    wrap(train, "train_one_epoch", _reporting_epochs, patch=PATCH, also=(main,))


def apply() -> None:
    import open_clip_train.data as data
    import open_clip_train.train as train

    replace(data, "filter_no_caption_or_no_image", filter_no_caption_or_no_image, patch=PATCH)
    replace(data, "log_and_continue", log_and_continue, patch=PATCH)
    replace(data, "tarfile_to_samples_nothrow", tarfile_to_samples_nothrow, patch=PATCH)
    replace(data, "CsvDataset", readers.CsvDataset, patch=PATCH)
    wrap(data, "get_wds_dataset", _opening_report, patch=PATCH)
    wrap(train, "train_one_epoch", _reporting_epochs, patch=PATCH)
    for_each_main(PATCH, _rebind_epoch)
