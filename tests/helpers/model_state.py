"""Model state for comparisons: training without dropout, and bit-for-bit equality of nested state."""
import torch
from torch import nn

from conlip_plugin.method.heads import Attention


def deterministic(model):
    """Train mode, but every dropout off (the tiny BERT and the heads have p = 0.1)."""
    model.train()
    for mod in model.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0
        if isinstance(mod, Attention):
            mod.dropout = 0.0
    return model


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_bitwise_equal(got, want, where: str = "") -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype and got.shape == want.shape, where
        assert torch.equal(_bits(got), _bits(want)), f"{where} differs from the checkpoint"
    elif isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for key in want:
            assert_bitwise_equal(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_bitwise_equal(g, w, f"{where}[{i}]")
    else:
        assert got == want, where
