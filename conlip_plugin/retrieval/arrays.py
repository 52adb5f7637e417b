"""A ``.npy`` file of known shape written block by block, so that a gallery's vectors are assembled
from its chunks without holding them all; the file is ``np.save``'s, byte for byte, and appears
under its name only once every row is written."""
import os
from pathlib import Path
from typing import Tuple

import numpy as np


class NpyWriter:
    """Write ``shape[0]`` rows in blocks with ``write``, then ``close`` to move the file into place."""

    def __init__(self, path: Path, shape: Tuple[int, ...], dtype: np.dtype):
        self.path, self.tmp = Path(path), Path(path).with_name(Path(path).name + ".tmp")
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
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)
