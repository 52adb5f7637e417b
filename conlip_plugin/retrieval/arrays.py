"""``.npy`` files of a gallery's vectors, written and read a block at a time: ``NpyWriter`` assembles
one from the chunks without holding them all (``np.save``'s file, byte for byte, under its name only
once every row is written); ``NpyRows`` reads rows of one without their pages staying in the
process's resident memory, as those of a memory map held open would while faiss is built."""
import math
import mmap
from pathlib import Path
from typing import Tuple, Union

import numpy as np

from conlip_plugin.atomic_files import move_into_place, temporary_path


class NpyWriter:
    """Write ``shape[0]`` rows in blocks with ``write``, then ``close`` to move the file into place."""

    def __init__(self, path: Path, shape: Tuple[int, ...], dtype: np.dtype):
        self.path, self.tmp = Path(path), temporary_path(path)
        self.shape, self.dtype, self.rows = tuple(shape), np.dtype(dtype), 0
        self._file = open(self.tmp, "wb")
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape}
        np.lib.format.write_array_header_1_0(self._file, header)

    def write(self, block: np.ndarray) -> None:
        if block.shape[1:] != self.shape[1:] or self.rows + len(block) > self.shape[0]:
            raise ValueError(f"a block of shape {block.shape} does not fit rows {self.rows}.. of {self.shape}")
        self._file.write(np.ascontiguousarray(block, dtype=self.dtype).tobytes())
        self.rows += len(block)

    def close(self) -> None:
        if self.rows != self.shape[0]:
            raise ValueError(f"{self.rows} rows written of {self.shape[0]}")
        self._file.close()
        move_into_place(self.tmp, self.path)


class NpyRows:
    """The rows of a ``.npy`` file, read on demand: each read maps the file, copies the rows asked
    (a slice or an array of row numbers) and unmaps it, so the pages read are the kernel's page cache,
    not this process's resident memory."""

    def __init__(self, path: Path):
        self.path = Path(path)
        mapped = np.load(self.path, mmap_mode="r")
        self.shape, self.dtype, self._offset = mapped.shape, mapped.dtype, mapped.offset
        del mapped

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: Union[slice, np.ndarray]) -> np.ndarray:
        if not len(self):
            return np.zeros((0, *self.shape[1:]), self.dtype)[rows]
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            whole = np.frombuffer(mapped, self.dtype, count=math.prod(self.shape), offset=self._offset)
            picked = np.array(whole.reshape(self.shape)[rows])
            del whole  # the buffer must be released before the map closes
        return picked
