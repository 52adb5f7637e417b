"""Token-level access to open_clip's towers: masked image tokens and text token states.

ConLIP needs, from each tower, every token state (not only the pooled embedding) and, for the
image tower, a learned mask token that replaces masked patch embeddings *before* position
embeddings are added (SimMIM). These adapters reuse the towers' own forward code, so the
instance embedding computed here is exactly what ``encode_image`` / ``encode_text`` return.
"""
from contextlib import contextmanager
from typing import Iterator, Optional, Tuple

import torch
from torch import nn

from open_clip.hf_model import ClsLastHiddenStatePooler, HFTextEncoder
from open_clip.timm_model import TimmModel


class TowerError(ValueError):
    pass


class MaskedViT:
    """Runs a timm ViT inside open_clip's ``TimmModel`` with some patch embeddings masked.

    The mask token is inserted by a forward hook on ``trunk.patch_embed``, so timm's own
    ``forward_features`` runs unchanged (position embeddings, gradient checkpointing included).
    """

    def __init__(self, visual: nn.Module, piece: str = "ConLIP"):
        trunk = getattr(visual, "trunk", None)
        if not isinstance(visual, TimmModel) or not hasattr(trunk, "patch_embed") or not hasattr(trunk, "forward_features"):
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
        self._masked: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        trunk.patch_embed.register_forward_hook(self._insert_mask_token)

    def grid_size(self, visual: nn.Module) -> Tuple[int, int]:
        h, w = visual.image_size
        return h // self.patch_size, w // self.patch_size

    def _insert_mask_token(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        if self._masked is None:
            return output
        patch_mask, token = self._masked
        shape = output.shape[:-1] + (1,)
        return torch.where(patch_mask.view(shape), token.to(output.dtype).view(-1), output)

    @contextmanager
    def _masking(self, patch_mask: Optional[torch.Tensor], token: Optional[torch.Tensor]) -> Iterator[None]:
        self._masked = None if patch_mask is None else (patch_mask, token)
        try:
            yield
        finally:
            self._masked = None

    def tokens(self, visual: nn.Module, images: torch.Tensor, patch_mask: Optional[torch.Tensor] = None,
               mask_token: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, 1+N, D) final-norm token states; masked patches carry the mask token at the input."""
        with self._masking(patch_mask, mask_token):
            return visual.trunk.forward_features(images)

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
