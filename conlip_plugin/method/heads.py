"""ConMLM / ConMIM heads: non-causal self-attention over the queries, cross-attention to a
memory, feed-forward (one BERT-like post-norm layer by default), plus their output maps."""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class Attention(nn.Module):
    """Multi-head attention on the fused scaled-dot-product kernels; keys may have another width."""

    def __init__(self, dim: int, heads: int, kv_dim: Optional[int] = None, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"conlip_cfg.head_heads={heads} must divide the head width {dim}; "
                             f"use a divisor of {dim}, or null for width / 64.")
        kv_dim = kv_dim or dim
        self.heads = heads
        self.dropout = dropout
        self.record_weights = False
        self.last_weights: Optional[torch.Tensor] = None
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(kv_dim, dim)
        self.v = nn.Linear(kv_dim, dim)
        self.out = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, memory_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``memory_mask``: (B, S) bool, True where a key may be attended to."""
        q, k, v = self._split(self.q(x)), self._split(self.k(memory)), self._split(self.v(memory))
        attn_mask = None if memory_mask is None else memory_mask[:, None, None, :]
        if self.record_weights:
            # The explicit form, for analysis (paper Table 2): keeps the (B, heads, Q, S) weights.
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
            if attn_mask is not None:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            weights = scores.softmax(dim=-1)
            self.last_weights = weights.detach()
            y = F.dropout(weights, self.dropout, self.training) @ v
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).flatten(2))


class ConditionedLayer(nn.Module):
    """Self-attention (queries), cross-attention (memory), feed-forward; post-norm as in BERT."""

    def __init__(self, dim: int, memory_dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.1):
        super().__init__()
        self.self_attn = Attention(dim, heads, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim, eps=1e-12)
        self.cross_attn = Attention(dim, heads, kv_dim=memory_dim, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-12)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.norm3 = nn.LayerNorm(dim, eps=1e-12)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, query_mask: Optional[torch.Tensor], memory: torch.Tensor,
                memory_mask: Optional[torch.Tensor]) -> torch.Tensor:
        x = self.norm1(x + self.drop(self.self_attn(x, x, query_mask)))
        x = self.norm2(x + self.drop(self.cross_attn(x, memory, memory_mask)))
        return self.norm3(x + self.drop(self.mlp(x)))


class ConditionedHead(nn.Module):
    """``layers`` conditioned layers; with ``shared`` one layer is applied ``layers`` times (Table 4)."""

    def __init__(self, dim: int, memory_dim: int, heads: int, layers: int = 1, shared: bool = False,
                 mlp_ratio: float = 4.0, dropout: float = 0.1):
        super().__init__()
        count = 1 if shared else layers
        self.layers = nn.ModuleList(ConditionedLayer(dim, memory_dim, heads, mlp_ratio, dropout) for _ in range(count))
        self.depth = layers
        self.grad_checkpointing = False
        self.last_query_mask: Optional[torch.Tensor] = None

    def record_cross_attention(self, enable: bool) -> None:
        """Keep each layer's cross-attention weights (and the query mask) of the next forwards."""
        for layer in self.layers:
            layer.cross_attn.record_weights = enable
            layer.cross_attn.last_weights = None
        self.last_query_mask = None

    def forward(self, x: torch.Tensor, query_mask: Optional[torch.Tensor], memory: torch.Tensor,
                memory_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.layers[0].cross_attn.record_weights:
            self.last_query_mask = query_mask
        for i in range(self.depth):
            layer = self.layers[i % len(self.layers)]
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, query_mask, memory, memory_mask, use_reentrant=False)
            else:
                x = layer(x, query_mask, memory, memory_mask)
        return x


class MLMPredictionHead(nn.Module):
    """BERT's prediction head: dense, GELU, LayerNorm, decoder to the vocabulary."""

    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.transform = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim, eps=1e-12))
        self.decoder = nn.Linear(dim, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x))


def init_head_weights(module: nn.Module) -> None:
    """BERT's initialisation (the heads start from random weights, paper §4.1)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
