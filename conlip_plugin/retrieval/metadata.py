"""Item metadata as an Arrow IPC file (``items.arrow``): written one record batch per chunk as the
chunks are assembled, read through a memory map so that a search touches only the rows it returns.

Arrow's file format, uncompressed, is random-access on a memory map: opening it reads the footer and
each batch's header, and a row's strings are read from the page they lie in. Parquet would compress
better, but a row read from Parquet decodes its whole row-group page.
"""
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from conlip_plugin.atomic_files import move_into_place, temporary_path
from conlip_plugin.retrieval.extras import require

FIELDS = (("key", "string"), ("caption", "string"), ("path", "string"), ("shard", "string"),
          ("offset", "int64"), ("size", "int64"))


def _arrow():
    return require("pyarrow", "the index's item metadata (items.arrow)")


def schema():
    pa = _arrow()
    return pa.schema([pa.field(name, getattr(pa, kind)(), nullable=name != "key") for name, kind in FIELDS])


class ItemsWriter:
    """Appends item records (``Item.record()`` dicts) batch by batch to ``path``; the file appears under
    its name only on ``close``, so an interrupted assembly leaves no partial file."""

    def __init__(self, path: Path):
        pa = _arrow()
        self.path, self.tmp = Path(path), temporary_path(path)
        self._schema = schema()
        self._sink = pa.OSFile(str(self.tmp), "wb")
        self._writer = pa.ipc.new_file(self._sink, self._schema)

    def write(self, records: List[dict]) -> None:
        pa = _arrow()
        self._writer.write_batch(pa.RecordBatch.from_pylist(records, schema=self._schema))

    def close(self) -> None:
        self._writer.close()
        self._sink.close()
        move_into_place(self.tmp, self.path)


class ItemsReader:
    """``items.arrow`` memory-mapped: ``rows(ids)`` reads those records only."""

    def __init__(self, path: Path):
        pa = _arrow()
        self._reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
        if self._reader.schema != schema():
            raise ValueError(f"its columns are {self._reader.schema.names}, not {[name for name, _ in FIELDS]}")
        sizes = [self._reader.get_batch(i).num_rows for i in range(self._reader.num_record_batches)]
        self._starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self.count = int(self._starts[-1])

    def rows(self, ids: Sequence[int]) -> List[dict]:
        """The records of rows ``ids`` (in that order), None fields left out as ``Item.record`` does."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.count):
            outside = int(ids[(ids < 0) | (ids >= self.count)][0])
            raise IndexError(f"no item {outside}; this index holds items 0 to {self.count - 1}")
        batches = np.searchsorted(self._starts, ids, side="right") - 1
        found: Dict[int, dict] = {}
        for batch in np.unique(batches):
            local = ids[batches == batch] - self._starts[batch]
            picked = self._reader.get_batch(int(batch)).take(_arrow().array(local))
            for row, record in zip(ids[batches == batch].tolist(), picked.to_pylist()):
                found[row] = {name: value for name, value in record.items() if value is not None}
        return [found[row] for row in ids.tolist()]

