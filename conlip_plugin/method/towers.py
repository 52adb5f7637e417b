"""Token-level access to open_clip's towers: masked image tokens and text token states.

ConLIP needs every token state of a tower (not only the pooled embedding), a mask token that
replaces masked patch embeddings before position embeddings are added (SimMIM), and the tower's
own instance embedding. One adapter per tower family, all with one interface; each reuses the
tower's own modules, so its instance embedding is exactly what ``encode_image`` / ``encode_text``
return (tests check this for every family). What each family's instance embedding and mask token
are: docs/recipes.md.
"""
import inspect
from typing import List, Optional, Tuple

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from open_clip.hf_model import ClsLastHiddenStatePooler, HFTextEncoder
from open_clip.timm_model import TimmModel
from open_clip.transformer import TextTransformer, VisionTransformer, text_global_pool


class TowerError(ValueError):
    pass


# What a selectively recomputed block keeps: the outputs of its matmuls and attention (most of its
# FLOPs); norms, activations, residual adds and dropout are recomputed in backward.
_KEPT_OPS = {getattr(torch.ops.aten, name).default for name in (
    "mm", "addmm", "bmm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
    if hasattr(torch.ops.aten, name)}


def _keep_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _KEPT_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    return create_selective_checkpoint_contexts(_keep_matmuls)


# Tensors a selective region keeps go through saved_tensors_hooks (and so are counted by them) where
# torch has the switch (2.12 and later); older releases pass them by.
_SELECTIVE = {"context_fn": _selective_contexts}
if "respect_saved_tensors_hooks" in inspect.signature(checkpoint).parameters:
    _SELECTIVE["respect_saved_tensors_hooks"] = True


def recomputed(block: nn.Module, x: torch.Tensor, policy: str) -> torch.Tensor:
    """``block(x)``, its activations recomputed in backward: all of them (``full``), or all but its
    matmul and attention outputs (``selective``)."""
    if policy == "selective":
        return checkpoint(block, x, use_reentrant=False, **_SELECTIVE)
    return checkpoint(block, x, use_reentrant=False)


_NO_PATCH_DROPOUT = (
    "{piece} reads every patch token (a masked patch keeps its slot, SimMIM), so the image tower "
    "cannot drop patches: set vision_cfg.patch_dropout to 0 and leave out --force-patch-dropout."
)


def _where_masked(x: torch.Tensor, mask: Optional[torch.Tensor], token: Optional[torch.Tensor]) -> torch.Tensor:
    if mask is None:
        return x
    return torch.where(mask.view(x.shape[:-1] + (1,)), token.to(x.dtype), x)


class CLSFirstImageTokens:
    """What every image adapter shares: token states start with the CLS (instance) state."""

    @staticmethod
    def conditioned_memory(complete: torch.Tensor, masked: torch.Tensor) -> Tuple[torch.Tensor, None]:
        """The ConMLM memory: [complete image's CLS state ; masked image's patch states]; no padding."""
        return torch.cat([complete[:, :1], masked[:, 1:]], dim=1), None


class TimmViTTokens(CLSFirstImageTokens):
    """A timm ViT inside open_clip's ``TimmModel``: timm's ``forward_features`` with the mask token
    put between the patch and the position embeddings, and optionally some blocks recomputed."""

    def __init__(self, visual: nn.Module, piece: str):
        trunk = visual.trunk
        needed = ("patch_embed", "_pos_embed", "patch_drop", "norm_pre", "blocks", "norm", "forward_head")
        if not all(hasattr(trunk, n) for n in needed):
            raise TowerError(f"{piece} needs a timm VisionTransformer trunk, got {type(trunk).__name__}.")
        if getattr(trunk, "num_prefix_tokens", 0) != 1 or getattr(trunk, "cls_token", None) is None:
            raise TowerError(f"{piece} needs a ViT with exactly one CLS token and no register tokens.")
        if getattr(trunk, "global_pool", None) != "token" or getattr(trunk, "attn_pool", None) is not None:
            raise TowerError(f"{piece}'s image instance embedding is the CLS state: set vision_cfg.timm_pool to 'token'.")
        if not isinstance(trunk.patch_drop, nn.Identity):
            raise TowerError(_NO_PATCH_DROPOUT.format(piece=piece))
        patch = trunk.patch_embed.patch_size
        self.patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        self.width = int(trunk.embed_dim)

    def grid_size(self, visual: nn.Module) -> Tuple[int, int]:
        h, w = visual.image_size
        return h // self.patch_size, w // self.patch_size

    @staticmethod
    def tokens(visual: nn.Module, images: torch.Tensor, patch_mask: Optional[torch.Tensor] = None,
               mask_token: Optional[torch.Tensor] = None, checkpoint_blocks: int = 0,
               checkpoint_policy: str = "full") -> torch.Tensor:
        """(B, 1+N, D) final-norm token states; ``checkpoint_blocks`` leading blocks are recomputed
        in backward (all of them once open_clip's ``--grad-checkpointing`` is set on the tower),
        as ``checkpoint_policy`` says (:func:`recomputed`)."""
        trunk = visual.trunk
        x = _where_masked(trunk.patch_embed(images), patch_mask, mask_token)
        x = trunk.norm_pre(trunk.patch_drop(trunk._pos_embed(x)))
        recompute = len(trunk.blocks) if trunk.grad_checkpointing else checkpoint_blocks
        for i, block in enumerate(trunk.blocks):
            if i < recompute and torch.is_grad_enabled():
                x = recomputed(block, x, "full" if trunk.grad_checkpointing else checkpoint_policy)
            else:
                x = block(x)
        return trunk.norm(x)

    @staticmethod
    def embedding(visual: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        return visual.head(visual.trunk.forward_head(tokens))


class OpenClipViTTokens(CLSFirstImageTokens):
    """open_clip's own ``VisionTransformer`` (CLS pooling, norm before pooling)."""

    def __init__(self, visual: VisionTransformer, piece: str):
        if visual.attn_pool is not None or visual.final_ln_after_pool or visual.pool_type != "tok":
            raise TowerError(
                f"{piece} needs the ViT's instance embedding to be its CLS state: open_clip's ViT with "
                f"pool_type 'tok', no attentional pooling and final_ln_after_pool false."
            )
        if getattr(visual.patch_dropout, "prob", 0.0) > 0:
            raise TowerError(_NO_PATCH_DROPOUT.format(piece=piece))
        self.patch_size = int(visual.patch_size[0])
        self.width = int(visual.conv1.out_channels)

    @staticmethod
    def grid_size(visual: nn.Module) -> Tuple[int, int]:
        return tuple(visual.grid_size)

    @staticmethod
    def tokens(visual: nn.Module, images: torch.Tensor, patch_mask: Optional[torch.Tensor] = None,
               mask_token: Optional[torch.Tensor] = None, checkpoint_blocks: int = 0,
               checkpoint_policy: str = "full") -> torch.Tensor:
        """(B, 1+N, D) token states after ``ln_post``; ``checkpoint_blocks`` is not used here
        (open_clip's ``--grad-checkpointing`` recomputes every block of this tower)."""
        x = visual.conv1(images).flatten(2).transpose(1, 2)
        x = _where_masked(x, patch_mask, mask_token)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        x = visual.ln_pre(visual.patch_dropout(x))
        return visual.ln_post(visual.transformer(x))

    @staticmethod
    def embedding(visual: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        pooled, _ = visual._global_pool(tokens)
        return pooled @ visual.proj if visual.proj is not None else pooled


def image_tokens_for(visual: nn.Module, piece: str = "ConLIP"):
    if isinstance(visual, TimmModel):
        return TimmViTTokens(visual, piece)
    if isinstance(visual, VisionTransformer):
        return OpenClipViTTokens(visual, piece)
    raise TowerError(
        f"{piece} needs a patch-token ViT image tower (open_clip's ViT, or a timm ViT through "
        f"vision_cfg.timm_model_name); this config builds {type(visual).__name__}."
    )


class HFTextTokens:
    """A Hugging Face encoder with its CLS token first (BERT, RoBERTa, ...)."""

    def __init__(self, text: HFTextEncoder, piece: str):
        if not isinstance(text.pooler, ClsLastHiddenStatePooler):
            raise TowerError(
                f"{piece}'s text instance embedding is the raw CLS state: set text_cfg.hf_pooler_type "
                f"to 'cls_last_hidden_state_pooler'."
            )
        config = text.config
        missing = [k for k in ("pad_token_id", "vocab_size", "hidden_size") if getattr(config, k, None) is None]
        if missing:
            raise TowerError(f"{piece} needs an encoder config with {missing}.")
        self.pad_id = int(config.pad_token_id)
        self.width = int(config.hidden_size)
        self.vocab_size = int(config.vocab_size)
        self.learned_mask = False

    def masking_ids(self, text_cfg: dict, piece: str) -> Tuple[Optional[int], List[int]]:
        """The tokenizer's [MASK] id and its special ids (never masked)."""
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(text_cfg["hf_tokenizer_name"])
        if tok.mask_token_id is None:
            raise TowerError(f"{piece} needs a tokenizer with a mask token; {text_cfg['hf_tokenizer_name']} has none.")
        return tok.mask_token_id, [self.pad_id, *tok.all_special_ids]

    def attention_mask(self, ids: torch.Tensor) -> torch.Tensor:
        return ids != self.pad_id

    def tokens(self, text: nn.Module, ids: torch.Tensor, embed_mask: Optional[torch.Tensor] = None,
               mask_embedding: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, L, D) last hidden states, with the attention mask the tower derives itself."""
        return text.transformer(input_ids=ids, attention_mask=self.attention_mask(ids).long()).last_hidden_state

    @staticmethod
    def embedding(text: nn.Module, tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return text.proj(tokens[:, text.pooler.cls_token_position])

    def conditioned_memory(self, text: nn.Module, complete: torch.Tensor, complete_ids: torch.Tensor,
                           masked: torch.Tensor, masked_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The ConMIM memory: [complete text's CLS ; masked text's tokens after its CLS], padding masked out."""
        memory = torch.cat([complete[:, :1], masked[:, 1:]], dim=1)
        valid = self.attention_mask(masked_ids)
        return memory, torch.cat([torch.ones_like(valid[:, :1]), valid[:, 1:]], dim=1)


class OpenClipTextTokens:
    """open_clip's own causal ``TextTransformer`` (CLIP BPE tokenizer, end-of-text pooling)."""

    def __init__(self, text: TextTransformer, piece: str):
        if text.cls_emb is not None:
            raise TowerError(f"{piece} does not support a text transformer with an appended CLS (CoCa).")
        self.pad_id = int(text.pad_id)
        self.width = int(text.width)
        self.vocab_size = int(text.vocab_size)
        self.learned_mask = True

    def masking_ids(self, text_cfg: dict, piece: str) -> Tuple[Optional[int], List[int]]:
        """No [MASK] id (a learned embedding stands in); padding, start and end of text are special."""
        from open_clip.tokenizer import SimpleTokenizer

        if text_cfg.get("hf_tokenizer_name"):
            raise TowerError(
                f"{piece} with open_clip's text transformer supports the CLIP BPE tokenizer only; this config "
                f"tokenizes with {text_cfg['hf_tokenizer_name']!r}. Use a base config with the CLIP tokenizer, "
                f"or a Hugging Face text tower (text_cfg.hf_model_name)."
            )
        tok = SimpleTokenizer()
        return None, [self.pad_id, tok.sot_token_id, tok.eot_token_id]

    def attention_mask(self, ids: torch.Tensor) -> torch.Tensor:
        return ids != self.pad_id

    def tokens(self, text: nn.Module, ids: torch.Tensor, embed_mask: Optional[torch.Tensor] = None,
               mask_embedding: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, L, D) states after ``ln_final``; masked positions get the learned mask embedding."""
        cast_dtype = text.transformer.get_cast_dtype()
        x = _where_masked(text.token_embedding(ids).to(cast_dtype), embed_mask, mask_embedding)
        # The causal mask is built for the context length; captions cut to the batch's longest are shorter.
        attn_mask = None if text.attn_mask is None else text.attn_mask[: ids.shape[1], : ids.shape[1]]
        if text.use_pad_mask:
            pad = text._build_additive_mask(ids, ids.shape[1], x.dtype)
            attn_mask = pad if attn_mask is None else attn_mask.unsqueeze(0) + pad
        x = x + text.positional_embedding[: ids.shape[1]].to(cast_dtype)
        return text.ln_final(text.transformer(x, attn_mask=attn_mask))

    @staticmethod
    def _instance_index(text: nn.Module, tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)[..., None].float()
        return text_global_pool(positions, ids, text.pool_type, getattr(text, "eos_id", None)).long().squeeze(-1)

    @staticmethod
    def embedding(text: nn.Module, tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        pooled = text_global_pool(tokens, ids, text.pool_type, getattr(text, "eos_id", None))
        if text.text_projection is None:
            return pooled
        if isinstance(text.text_projection, nn.Linear):
            return text.text_projection(pooled)
        return pooled @ text.text_projection

    def conditioned_memory(self, text: nn.Module, complete: torch.Tensor, complete_ids: torch.Tensor,
                           masked: torch.Tensor, masked_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The ConMIM memory: [complete text's end-of-text state ; masked text's tokens], padding and
        the masked pass's own end-of-text slot masked out."""
        rows = torch.arange(complete.shape[0], device=complete.device)
        instance = complete[rows, self._instance_index(text, complete, complete_ids)][:, None]
        valid = self.attention_mask(masked_ids)
        own = torch.zeros_like(valid)
        own[rows, self._instance_index(text, masked, masked_ids)] = True
        return torch.cat([instance, masked], dim=1), torch.cat([torch.ones_like(valid[:, :1]), valid & ~own], dim=1)


def causal_text_reader(text: nn.Module) -> Optional[OpenClipTextTokens]:
    """An adapter for open_clip's causal text tower, or None (another tower, or one it cannot read)."""
    if not isinstance(text, TextTransformer):
        return None
    try:
        return OpenClipTextTokens(text, "ConLIP")
    except TowerError:
        return None


def text_tokens_for(text: nn.Module, piece: str = "ConLIP"):
    if isinstance(text, HFTextEncoder):
        return HFTextTokens(text, piece)
    if isinstance(text, TextTransformer):
        return OpenClipTextTokens(text, piece)
    raise TowerError(f"{piece} needs a Hugging Face text encoder or open_clip's TextTransformer, got {type(text).__name__}.")
