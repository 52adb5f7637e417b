"""Files that appear whole or not at all: written under a temporary name, fsynced, renamed into place.

A rename within one folder is atomic, so a kill at any moment leaves the old file (or none) and at
most the temporary. The fsyncs, of the file and then of its folder, keep a crash of the machine from
making the rename durable before the data (a complete-looking name over an empty file).
"""
import contextlib
import os
from pathlib import Path
from typing import IO, Any, Iterator, Optional, Union

PathLike = Union[str, os.PathLike]


def temporary_path(path: PathLike) -> Path:
    """The default temporary for ``path``: ``NAME.tmp`` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".tmp")


def fsync_path(path: PathLike) -> None:
    """Flush a written file's data to disk (a symlink's target, if it is one)."""
    fd = os.open(path, os.O_RDONLY if os.name == "posix" else os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(folder: PathLike) -> None:
    """Make a rename in ``folder`` durable (POSIX only: elsewhere a folder cannot be opened)."""
    if os.name == "posix":
        fsync_path(folder)


def move_into_place(tmp: PathLike, path: PathLike, sync: bool = True) -> None:
    """Fsync the finished temporary ``tmp``, rename it over ``path`` and fsync the folder: for writers
    that hold their temporary open across calls (``atomic_path`` for the rest). ``sync=False`` skips
    the file's fsync, for a temporary that holds no data written here (a link to an existing file)."""
    if sync:
        fsync_path(tmp)
    os.replace(tmp, path)
    fsync_folder(Path(path).parent)


@contextlib.contextmanager
def atomic_path(path: PathLike, temporary: Optional[PathLike] = None, sync: bool = True) -> Iterator[Path]:
    """Yield the temporary path to write; on a clean exit it is fsynced and renamed over ``path``
    (``move_into_place``), on an error (a kill's signal included) it is removed. ``temporary`` names
    it when the caller's readers must not mistake it for a finished file (default: ``temporary_path(path)``)."""
    path = Path(path)
    tmp = Path(temporary) if temporary is not None else temporary_path(path)
    try:
        yield tmp
        move_into_place(tmp, path, sync)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_file(path: PathLike, mode: str = "wb", temporary: Optional[PathLike] = None,
                **open_kwargs: Any) -> Iterator[IO]:
    """``open(path, mode)`` for writing, through ``atomic_path``."""
    with atomic_path(path, temporary) as tmp, open(tmp, mode, **open_kwargs) as f:
        yield f


def write_atomic(path: PathLike, data: bytes, if_changed: bool = False) -> None:
    """Write ``data`` to ``path`` atomically. With ``if_changed`` an identical file is left alone, so
    that a rebuild keeps its files' times."""
    path = Path(path)
    if if_changed and path.is_file() and path.read_bytes() == data:
        return
    with atomic_file(path) as f:
        f.write(data)
