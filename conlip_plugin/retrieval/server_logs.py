"""Where ``conlip-retrieval serve``'s logs go, such that writing them never holds up serving.

uvicorn writes its logs from the event loop, each line straight to its stream: when nobody reads the
server's stdout or stderr (a pipe left full), every request waits on the write. Here uvicorn's loggers
only put records on a bounded queue, dropping them when it is full, and a thread writes them out: uvicorn's
own messages to stderr, and the per-request access log (off unless asked for) to a file of its own.
"""
import logging
import queue
import sys
from contextlib import contextmanager
from logging.handlers import QueueHandler, QueueListener
from pathlib import Path
from typing import Iterator, List, Optional

from conlip_plugin.command_errors import fail

QUEUED_RECORDS = 10_000  # records waiting for their writer before new ones are dropped


class _DroppingQueueHandler(QueueHandler):
    """Puts a record on its queue without waiting; when the queue is full the record is dropped and
    counted, as a log line is worth less than an answer."""

    dropped = 0

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1


def _queued(logger_name: str, target: logging.Handler, fmt: str) -> QueueListener:
    """``logger_name``'s records handed to ``target`` by a writer thread; started, for the caller to stop."""
    target.setFormatter(logging.Formatter(fmt))
    records: "queue.Queue[logging.LogRecord]" = queue.Queue(QUEUED_RECORDS)
    logger = logging.getLogger(logger_name)
    logger.handlers = [_DroppingQueueHandler(records)]
    logger.propagate = False
    listener = QueueListener(records, target, respect_handler_level=True)
    listener.start()
    return listener


@contextmanager
def server_logs(access_log: Optional[Path]) -> Iterator[dict]:
    """uvicorn's logs routed through queues for as long as the server runs; yields the uvicorn.Config
    arguments that keep uvicorn from configuring them itself. ``access_log``: a file that gets one line
    per request (appended to), or None for no access log."""
    handle = None
    if access_log is not None:
        try:
            handle = logging.FileHandler(access_log, encoding="utf-8")
        except OSError as err:
            fail(f"--access-log {access_log} cannot be opened ({err.strerror or err}); pass a file in a "
                 f"writable folder.")
    listeners: List[QueueListener] = [_queued("uvicorn", logging.StreamHandler(sys.stderr),
                                              "%(levelname)s %(message)s")]
    if handle is not None:
        listeners.append(_queued("uvicorn.access", handle, "%(asctime)s %(message)s"))
    try:
        yield {"log_config": None, "access_log": handle is not None}
    finally:
        for listener in listeners:
            listener.stop()
        if handle is not None:
            handle.close()
