"""Masking on device, inside the forward: BERT-style text masking and SimMIM-style patch masking."""
import math
from typing import Iterable, Optional, Tuple

import torch
from torch import nn

IGNORE_INDEX = -100


class TextMasker(nn.Module):
    """Masks ``ratio`` of each caption's non-special tokens (at least one), 80/10/10 by default.

    Returns the corrupted ids, MLM labels (the original id at chosen positions, -100 elsewhere)
    and where the mask token goes. With ``mask_token_id`` None (a vocabulary without one, e.g.
    CLIP's BPE) those positions keep their id and the tower puts a learned mask embedding there.
    Random replacements are drawn from the non-special vocabulary, so a corrupted caption keeps
    its padding (and so its attention mask) unchanged.
    """

    def __init__(
            self,
            vocab_size: int,
            mask_token_id: Optional[int],
            special_ids: Iterable[int],
            ratio: float = 0.15,
            mask_token_prob: float = 0.8,
            random_token_prob: float = 0.1,
    ):
        super().__init__()
        special = set(int(i) for i in special_ids) | ({mask_token_id} if mask_token_id is not None else set())
        special = torch.tensor(sorted(special))
        allowed = torch.ones(vocab_size, dtype=torch.bool)
        allowed[special] = False
        self.register_buffer("special_ids", special, persistent=False)
        self.register_buffer("replacement_ids", allowed.nonzero().squeeze(1), persistent=False)
        self.mask_token_id = mask_token_id
        self.ratio = ratio
        self.mask_token_prob = mask_token_prob
        self.random_token_prob = random_token_prob

    def max_chosen(self, length: int) -> int:
        """An upper bound on the tokens :meth:`choose` picks in a row of ``length`` ids, known
        before the ids are: the fixed number of MLM predictions per caption."""
        return min(length, max(1, math.ceil(self.ratio * length)))

    def eligible(self, ids: torch.Tensor) -> torch.Tensor:
        return ~torch.isin(ids, self.special_ids)

    def choose(self, ids: torch.Tensor) -> torch.Tensor:
        """Exactly ``max(1, round(ratio * n))`` of the ``n`` eligible tokens per row (none if n = 0)."""
        eligible = self.eligible(ids)
        count = eligible.sum(dim=1, keepdim=True)
        k = torch.clamp(torch.round(count.double() * self.ratio), min=1)
        k = torch.minimum(k, count)
        scores = torch.rand(ids.shape, device=ids.device).masked_fill(~eligible, 2.0)
        rank = scores.argsort(dim=1).argsort(dim=1)
        return rank < k

    def forward(self, ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        chosen = self.choose(ids)
        labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
        u = torch.rand(ids.shape, device=ids.device)
        to_mask = chosen & (u < self.mask_token_prob)
        to_random = chosen & (u >= self.mask_token_prob) & (u < self.mask_token_prob + self.random_token_prob)
        pick = torch.randint(len(self.replacement_ids), ids.shape, device=ids.device)
        corrupted = ids
        if self.mask_token_id is not None:
            corrupted = torch.where(to_mask, torch.full_like(ids, self.mask_token_id), ids)
        corrupted = torch.where(to_random, self.replacement_ids[pick], corrupted)
        return corrupted, labels, to_mask


class PatchMasker(nn.Module):
    """Chooses exactly ``round(ratio * N)`` of the N patches of each image, uniformly at random.

    With ``block`` > 0 (pixels, a multiple of the patch size) whole SimMIM-style blocks are masked:
    exactly ``round(ratio * number_of_blocks)`` of them.
    """

    def __init__(self, grid_size: Tuple[int, int], patch_size: int, ratio: float = 0.5, block: int = 0):
        super().__init__()
        self.grid_size = tuple(grid_size)
        self.ratio = ratio
        self.scale = 1
        if block:
            if block % patch_size or self.grid_size[0] % (block // patch_size) or self.grid_size[1] % (block // patch_size):
                raise ValueError(
                    f"conlip_cfg.image_mask_block={block} must be a multiple of the patch size {patch_size} "
                    f"that divides the {self.grid_size} patch grid; use 0 for per-patch masking."
                )
            self.scale = block // patch_size
        self.masked_blocks = int(round(ratio * (self.grid_size[0] // self.scale) * (self.grid_size[1] // self.scale)))
        self.masked_count = self.masked_blocks * self.scale * self.scale

    def forward(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """A (B, N) boolean mask, True where the patch is masked (``masked_count`` per row), in
        row-major patch order."""
        gh, gw = self.grid_size[0] // self.scale, self.grid_size[1] // self.scale
        rank = torch.rand(batch_size, gh * gw, device=device).argsort(dim=1).argsort(dim=1)
        mask = (rank < self.masked_blocks).view(batch_size, gh, gw)
        if self.scale > 1:
            mask = mask.repeat_interleave(self.scale, dim=1).repeat_interleave(self.scale, dim=2)
        return mask.flatten(1)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C), patches in row-major order, pixels as (row, col, channel)."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def true_positions_first(mask: torch.Tensor, count: int) -> torch.Tensor:
    """(B, count) column indices: each row's True positions in order, then its False ones.

    The fixed-size stand-in for ``x[mask]``: no host sync and no data-dependent shape, so a
    training step compiles as one graph. ``count`` must be at least the most Trues in any row.
    """
    return mask.to(torch.uint8).argsort(dim=1, descending=True, stable=True)[:, :count]

