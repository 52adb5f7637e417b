"""How much the token-level heads attend to the other modality's instance slot (paper Table 2).

ConLIP's claim is mechanistic: conditioning the heads on the complete image's (text's) CLS makes
them use it. This measures, over real batches, the cross-attention weight from the masked text's
tokens to memory slot 0 (the image CLS) in the ConMLM head, and from the masked image's patches
to slot 0 (the text CLS) in the ConMIM head. Slot 0 is the complete other modality's CLS for
ConLIP and Vanilla alike (with a CLS-first text tower), so their numbers compare directly.
"""
from typing import Dict, Iterable, List, Tuple

import torch

from conlip_plugin.method.model import ConLIP
from conlip_plugin.method.towers import HFTextTokens


def _instance_slot_weights(weights: torch.Tensor, valid_queries: torch.Tensor) -> torch.Tensor:
    """Weights (B, heads, Q, S) on slot 0, for the valid queries only, flattened."""
    slot = weights[..., 0]
    keep = valid_queries[:, None, :].expand_as(slot)
    return slot[keep].double()


@torch.no_grad()
def instance_slot_attention(model: ConLIP, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]]) -> Dict[str, dict]:
    """Mean and standard deviation of the cross-attention weight on the instance slot.

    Runs the training forward (masking, both heads) without dropout, leaving the momentum
    encoders and queues as they were; per layer of each head (a shared layer applied twice
    reports the last application), over every valid query of every batch.
    """
    heads = {name: getattr(model, f"{name}_head") for name in ("mlm", "mim") if hasattr(model, f"{name}_head")}
    if not heads:
        raise ValueError("this model has no token-level heads (a CL model): nothing to analyse")
    if "mim" in heads and model.conlip_cfg.variant == "vanilla" and not isinstance(model.text_adapter, HFTextTokens):
        raise ValueError(
            "a Vanilla model on open_clip's causal text tower: its ConMIM memory starts with the start-of-text "
            "state, not the caption's instance state, so slot 0 does not compare with ConLIP's; analyse "
            "models with a CLS-first (Hugging Face) text tower."
        )
    was_training, pending = model.training, model.keys_to_enqueue
    model.eval()
    samples: Dict[str, List[torch.Tensor]] = {}
    for head in heads.values():
        head.record_cross_attention(True)
    try:
        for images, texts in batches:
            model.forward_train(images, texts)
            for name, head in heads.items():
                for i, layer in enumerate(head.layers):
                    w = layer.cross_attn.last_weights
                    valid = head.last_query_mask
                    if valid is None:
                        valid = torch.ones(w.shape[0], w.shape[2], dtype=torch.bool, device=w.device)
                    samples.setdefault(f"{name}_layer{i}", []).append(_instance_slot_weights(w, valid))
    finally:
        for head in heads.values():
            head.record_cross_attention(False)
        model.keys_to_enqueue = pending
        model.train(was_training)
    out = {}
    for key, parts in samples.items():
        values = torch.cat(parts)
        out[key] = {"mean": values.mean().item(), "std": values.std(unbiased=False).item(), "count": values.numel()}
    return out
