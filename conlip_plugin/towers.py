"""Token-level access to open_clip's towers: masked image tokens and text token states.

ConLIP needs, from each tower, every token state (not only the pooled embedding) and, for the
image tower, a learned mask token that replaces masked patch embeddings *before* position
embeddings are added (SimMIM). These adapters reuse the towers' own modules, so the instance
embedding computed here is exactly what ``encode_image`` / ``encode_text`` return (a test checks).
"""
from typing import Optional, Tuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from open_clip.hf_model import ClsLastHiddenStatePooler, HFTextEncoder
from open_clip.timm_model import TimmModel


class TowerError(ValueError):
    pass


class MaskedViT:
    """Runs a timm ViT inside open_clip's ``TimmModel`` with some patch embeddings masked.

    The forward is timm's ``forward_features`` (patch embedding, position embedding, patch
    dropout, pre-norm, blocks, final norm) with the mask token put in between the patch and the
    position embeddings, and an optional number of leading blocks recomputed in backward.
    """

    def __init__(self, visual: nn.Module, piece: str = "ConLIP"):
        trunk = getattr(visual, "trunk", None)
        needed = ("patch_embed", "_pos_embed", "patch_drop", "norm_pre", "blocks", "norm", "forward_head")
        if not isinstance(visual, TimmModel) or not all(hasattr(trunk, n) for n in needed):
            raise TowerError(
                f"{piece} needs a patch-token ViT image tower (open_clip's timm adapter around a timm "
                f"VisionTransformer, vision_cfg.timm_model_name), got {type(visual).__name__}."
            )
        if getattr(trunk, "num_prefix_tokens", 0) != 1 or getattr(trunk, "cls_token", None) is None:
            raise TowerError(f"{piece} needs a ViT with exactly one CLS token and no register tokens.")
        if getattr(trunk, "global_pool", None) != "token" or getattr(trunk, "attn_pool", None) is not None:
            raise TowerError(
                f"{piece}'s image instance embedding is the CLS state: set vision_cfg.timm_pool to 'token'."
            )
        patch = trunk.patch_embed.patch_size
        self.patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        self.width = int(trunk.embed_dim)

    def grid_size(self, visual: nn.Module) -> Tuple[int, int]:
        h, w = visual.image_size
        return h // self.patch_size, w // self.patch_size

    @staticmethod
    def tokens(visual: nn.Module, images: torch.Tensor, patch_mask: Optional[torch.Tensor] = None,
               mask_token: Optional[torch.Tensor] = None, checkpoint_blocks: int = 0) -> torch.Tensor:
        """(B, 1+N, D) final-norm token states; masked patches carry the mask token at the input.

        ``checkpoint_blocks`` leading blocks are recomputed in backward (all of them once
        open_clip's ``--grad-checkpointing`` has been set on the tower).
        """
        trunk = visual.trunk
        x = trunk.patch_embed(images)
        if patch_mask is not None:
            x = torch.where(patch_mask.view(x.shape[:-1] + (1,)), mask_token.to(x.dtype), x)
        x = trunk.norm_pre(trunk.patch_drop(trunk._pos_embed(x)))
        recompute = len(trunk.blocks) if trunk.grad_checkpointing else checkpoint_blocks
        for i, block in enumerate(trunk.blocks):
            if i < recompute and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return trunk.norm(x)

    @staticmethod
    def embedding(visual: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """The tower's pooled, projected output, computed from its token states."""
        return visual.head(visual.trunk.forward_head(tokens))


class BertTokens:
    """Token states and the CLS instance embedding of open_clip's Hugging Face text tower."""

    def __init__(self, text: nn.Module, piece: str = "ConLIP"):
        if not isinstance(text, HFTextEncoder):
            raise TowerError(
                f"{piece} needs a Hugging Face text tower (text_cfg.hf_model_name), got {type(text).__name__}."
            )
        if not isinstance(text.pooler, ClsLastHiddenStatePooler):
            raise TowerError(
                f"{piece}'s text instance embedding is the raw CLS state: set text_cfg.hf_pooler_type "
                f"to 'cls_last_hidden_state_pooler'."
            )
        config = text.config
        missing = [k for k in ("pad_token_id", "vocab_size", "hidden_size") if getattr(config, k, None) is None]
        if missing:
            raise TowerError(f"{piece} needs a BERT-like text config; {missing} missing from it.")
        self.pad_id = int(config.pad_token_id)
        self.width = int(config.hidden_size)

    def attention_mask(self, ids: torch.Tensor) -> torch.Tensor:
        return ids != self.pad_id

    def tokens(self, text: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """(B, L, D) last hidden states, with the same attention mask the tower derives itself."""
        return text.transformer(input_ids=ids, attention_mask=self.attention_mask(ids).long()).last_hidden_state

    @staticmethod
    def embedding(text: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        return text.proj(tokens[:, text.pooler.cls_token_position])
