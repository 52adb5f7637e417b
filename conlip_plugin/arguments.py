"""argparse types the console commands share: a bad value stops at parsing with the flag named."""
import argparse
import math
from pathlib import Path


def positive_int(text: str) -> int:
    """A count that must be at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite amount more than 0 (nan and inf are refused)."""
    value = float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number more than 0, got {text}")
    return value


def fraction(text: str) -> float:
    """A share in (0, 1], such as a recall target."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 1, got {text}")
    return value


def port_number(text: str) -> int:
    """A TCP port; 0 lets the system pick a free one."""
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be from 0 to 65535 (0: any free port), got {value}")
    return value


def torch_device(text: str) -> str:
    """A torch device that exists here: a typo, or a GPU this machine lacks, stops at parsing instead of
    failing later (or, in open_clip_train, quietly running on the CPU)."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device ({str(err).splitlines()[0]}); "
                                         f"use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text}, but torch sees no CUDA device here; run on a GPU machine, "
                                             f"or pass --device cpu")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text}, but torch sees {count} CUDA device(s) (cuda:0 to "
                                             f"cuda:{count - 1})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}, but torch sees no Apple GPU (MPS) here; pass --device cpu")
    return text


def existing_file(text: str) -> Path:
    """A file that is there now (not a folder)."""
    path = Path(text).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file" + (" (it is a folder)" if path.is_dir() else ""))
    return path
