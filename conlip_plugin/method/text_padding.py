"""Captions cut to the batch's longest before a training step: the step pays for the caption, not
the padding.

Only for towers whose results ignore trailing padding (Hugging Face encoders with CLS pooling,
open_clip's causal text transformer with ``argmax``, ``first`` or ``eos`` pooling). Lengths round up
to a multiple so that ``torch.compile`` meets few shapes. The cut runs in the DataLoader's collate
step, in the loader workers, so the step gains no device sync; ``patches/trim_captions.py``
installs it. What it saves: docs/speed.md.
"""
from typing import Any, Callable, Optional

import torch

EXACT_TEXT_POOLING = ("argmax", "first", "eos")


def trimmed_length(ids: torch.Tensor, pad_id: int, multiple: int) -> int:
    """The longest caption's length (its last non-pad column + 1), rounded up to ``multiple``,
    at most the context length."""
    used = (ids != pad_id).any(dim=0).nonzero()
    longest = int(used.max()) + 1 if used.numel() else 1
    return min(ids.shape[1], -(-longest // multiple) * multiple)


def trim_padding(ids: torch.Tensor, pad_id: int, multiple: int) -> torch.Tensor:
    """``ids`` (B, L) without the trailing columns that are padding in every row (a contiguous copy)."""
    return ids[:, :trimmed_length(ids, pad_id, multiple)].contiguous()


def inexact_reason(model_cfg: dict) -> Optional[str]:
    """Why cutting trailing padding would change this model's text results, or None if it would not."""
    text_cfg = model_cfg.get("text_cfg", {})
    if "hf_model_name" in text_cfg:
        return None
    pool = text_cfg.get("pool_type", "argmax")
    if text_cfg.get("embed_cls"):
        return "its text transformer appends a CLS token (CoCa), which ConLIP does not read"
    if text_cfg.get("no_causal_mask", False):
        return "its text transformer attends without a causal mask, so every position sees the padding"
    if pool not in EXACT_TEXT_POOLING:
        return f"its text transformer pools with {pool!r}, which reads a position that moves with the padding"
    return None


class TrimCaptions:
    """A DataLoader collate function, then the texts of each ``(images, texts)`` batch trimmed.

    A plain class (not a closure) so that spawned loader workers can unpickle it.
    """

    def __init__(self, collate: Callable[[Any], Any], pad_id: int, multiple: int):
        self.collate = collate
        self.pad_id = pad_id
        self.multiple = multiple

    def __call__(self, samples: Any) -> Any:
        batch = self.collate(samples)
        images, texts = batch
        trimmed = trim_padding(texts, self.pad_id, self.multiple)
        return (images, trimmed) if isinstance(batch, tuple) else [images, trimmed]
