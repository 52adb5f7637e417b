"""BERT-style text masking and SimMIM-style patch masking (spec step 0)."""
import math

import pytest
import torch

from conlip_plugin.method.masking import IGNORE_INDEX, PatchMasker, TextMasker

VOCAB, MASK_ID, PAD_ID = 30522, 103, 0
SPECIAL = [0, 100, 101, 102, 103]


def _masker(**kw):
    return TextMasker(vocab_size=VOCAB, mask_token_id=MASK_ID, special_ids=SPECIAL, **kw)


def _captions(rows, length, seed, min_words=0):
    """[CLS] words [SEP] [PAD]... with a random number of ordinary words per row (some UNK too)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((rows, length), PAD_ID, dtype=torch.long)
    for r in range(rows):
        n = int(torch.randint(min_words, length - 1, (1,), generator=g))
        words = torch.randint(1000, VOCAB, (n,), generator=g)
        ids[r, 0] = 101
        ids[r, 1:1 + n] = words
        if n >= 3:  # an [UNK] inside the caption is special too
            ids[r, 1 + n // 2] = 100
        ids[r, 1 + n] = 102
    return ids


def _expected_count(n_eligible):
    return 0 if n_eligible == 0 else max(1, round(0.15 * n_eligible))


def test_text_masker_counts_labels_and_specials():
    torch.manual_seed(0)
    masker = _masker()
    ids = _captions(400, 64, seed=1)
    # rows with no eligible token at all: [CLS] [SEP] and [CLS] [UNK] [SEP]
    ids[0] = PAD_ID
    ids[0, :2] = torch.tensor([101, 102])
    ids[1] = PAD_ID
    ids[1, :3] = torch.tensor([101, 100, 102])
    corrupted, labels, _ = masker(ids)
    assert corrupted.shape == ids.shape and labels.shape == ids.shape
    special = torch.tensor(SPECIAL)
    seen_counts = set()
    for r in range(ids.shape[0]):
        row, lab, cor = ids[r].tolist(), labels[r].tolist(), corrupted[r].tolist()
        n = sum(1 for t in row if t not in SPECIAL)
        chosen = [j for j in range(len(row)) if lab[j] != IGNORE_INDEX]
        assert len(chosen) == _expected_count(n), (r, n)
        seen_counts.add(n)
        for j in range(len(row)):
            if row[j] in SPECIAL:
                assert lab[j] == IGNORE_INDEX
                assert cor[j] == row[j]  # special tokens never change
            elif j in chosen:
                assert lab[j] == row[j]  # label = original id
            else:
                assert lab[j] == IGNORE_INDEX
                assert cor[j] == row[j]  # unchosen tokens never change
    # padding, and so the attention mask, is untouched
    assert torch.equal(corrupted == PAD_ID, ids == PAD_ID)
    assert not torch.isin(corrupted[labels != IGNORE_INDEX], special[special != MASK_ID]).any()
    assert 0 in seen_counts and len(seen_counts) > 30  # many caption lengths were exercised


def test_text_masker_small_captions_get_at_least_one():
    torch.manual_seed(1)
    masker = _masker()
    for n in range(1, 8):
        ids = torch.tensor([[101] + list(range(2000, 2000 + n)) + [102] + [PAD_ID] * 3])
        _, labels, _ = masker(ids)
        assert int((labels != IGNORE_INDEX).sum()) == _expected_count(n) >= 1


def test_text_masker_chooses_uniformly_among_eligible():
    """Every eligible position is chosen with frequency k/n over many draws."""
    torch.manual_seed(2)
    masker = _masker()
    n = 20  # k = 3
    row = [101] + list(range(5000, 5000 + n)) + [102, 0, 0]
    ids = torch.tensor([row] * 4000)
    _, labels, _ = masker(ids)
    freq = (labels != IGNORE_INDEX).double().mean(0)
    p = _expected_count(n) / n
    sigma = math.sqrt(p * (1 - p) / ids.shape[0])
    for j in range(1, n + 1):
        assert abs(float(freq[j]) - p) < 5 * sigma
    assert float(freq[0]) == 0.0 and float(freq[n + 1]) == 0.0


def test_text_masker_80_10_10_split():
    torch.manual_seed(3)
    masker = _masker()
    ids = _captions(3000, 64, seed=4, min_words=40)
    corrupted, labels, _ = masker(ids)
    chosen = labels != IGNORE_INDEX
    total = int(chosen.sum())
    assert total >= 20000
    orig, cor = ids[chosen].tolist(), corrupted[chosen].tolist()
    n_mask = n_random = n_same = 0
    random_ids = []
    for o, c in zip(orig, cor):
        if c == MASK_ID:
            n_mask += 1
        elif c == o:
            n_same += 1
        else:
            n_random += 1
            random_ids.append(c)
    for count, p in ((n_mask, 0.8), (n_random, 0.1), (n_same, 0.1)):
        sigma = math.sqrt(total * p * (1 - p))
        assert abs(count - total * p) < 5 * sigma, (count, total, p)
    # random replacements are never special ids and are spread over the vocabulary
    assert not any(t in SPECIAL for t in random_ids)
    assert all(0 <= t < VOCAB for t in random_ids)
    assert len(set(random_ids)) > 0.9 * len(random_ids)
    assert min(random_ids) < 2000 and max(random_ids) > VOCAB - 2000


def test_text_masker_replacement_pool_excludes_specials():
    masker = _masker()
    pool = set(masker.replacement_ids.tolist())
    assert len(pool) == VOCAB - len(SPECIAL)
    assert not pool & set(SPECIAL)


# --------------------------------------------------------------------------------------------
# PatchMasker
# --------------------------------------------------------------------------------------------

def test_patch_masker_exact_count_and_distinct_masks():
    torch.manual_seed(5)
    masker = PatchMasker(grid_size=(14, 14), patch_size=16, ratio=0.5)
    mask = masker(16, torch.device("cpu"))
    assert mask.shape == (16, 196) and mask.dtype == torch.bool
    k = round(0.5 * 196)
    for b in range(16):
        assert int(mask[b].sum()) == k
    rows = {tuple(mask[b].tolist()) for b in range(16)}
    assert len(rows) == 16


def test_patch_masker_uniform_frequency():
    torch.manual_seed(6)
    masker = PatchMasker(grid_size=(14, 14), patch_size=16, ratio=0.5)
    draws = 4000
    freq = masker(draws, torch.device("cpu")).double().mean(0)
    sigma = math.sqrt(0.25 / draws)
    for j in range(196):
        assert abs(float(freq[j]) - 0.5) < 5 * sigma, j


@pytest.mark.parametrize("ratio", [0.3, 0.75])
def test_patch_masker_other_ratios(ratio):
    torch.manual_seed(7)
    mask = PatchMasker(grid_size=(14, 14), patch_size=16, ratio=ratio)(8, torch.device("cpu"))
    for b in range(8):
        assert int(mask[b].sum()) == round(ratio * 196) == PatchMasker((14, 14), 16, ratio).masked_count


def test_patch_masker_blocks():
    torch.manual_seed(8)
    masker = PatchMasker(grid_size=(14, 14), patch_size=16, ratio=0.5, block=32)
    mask = masker(64, torch.device("cpu"))
    assert mask.shape == (64, 196)
    k_blocks = round(0.5 * 49)
    for b in range(64):
        grid = mask[b].view(14, 14).tolist()  # row-major patch order
        n_blocks = 0
        for bi in range(7):
            for bj in range(7):
                cells = [grid[2 * bi + di][2 * bj + dj] for di in range(2) for dj in range(2)]
                assert len(set(cells)) == 1, (b, bi, bj)  # whole 2x2 blocks
                n_blocks += cells[0]
        assert n_blocks == k_blocks
        assert int(mask[b].sum()) == k_blocks * 4 == masker.masked_count  # MIM reads exactly this many rows
    assert len({tuple(mask[b].tolist()) for b in range(64)}) == 64
    # every block is masked sometimes
    block_freq = mask.view(64, 7, 2, 7, 2)[:, :, 0, :, 0].double().mean(0)
    assert (block_freq > 0).all() and (block_freq < 1).all()


@pytest.mark.parametrize("block", [8, 24, 48, 17])
def test_patch_masker_rejects_invalid_blocks(block):
    with pytest.raises(ValueError):
        PatchMasker(grid_size=(14, 14), patch_size=16, ratio=0.5, block=block)


def test_patch_masker_accepts_valid_block_on_non_square_grid():
    torch.manual_seed(9)
    mask = PatchMasker(grid_size=(4, 6), patch_size=16, ratio=0.5, block=32)(3, torch.device("cpu"))
    assert mask.shape == (3, 24)
    for b in range(3):
        assert int(mask[b].sum()) == round(0.5 * 6) * 4
        grid = mask[b].view(4, 6)
        for bi in range(2):
            for bj in range(3):
                blk = grid[2 * bi:2 * bi + 2, 2 * bj:2 * bj + 2]
                assert bool(blk.all()) or not bool(blk.any())
