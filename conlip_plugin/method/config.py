"""The ``conlip_cfg`` section of a model config: every switch of the spec's Variants table."""
import math
from dataclasses import dataclass, fields
from typing import Optional

VARIANTS = ("conlip", "vanilla", "cl")
# ``recipe``: the instance loss open_clip_train builds from the run's flags (ClipLoss, SigLipLoss, ...),
# on the online embeddings; no momentum encoders, no queues, a learnable ``logit_scale``.
INSTANCE_LOSSES = ("dcl", "infonce", "recipe")
CHECKPOINT_POLICIES = ("full", "selective")


@dataclass(frozen=True)
class ConLIPCfg:
    """ConLIP's training-only hyperparameters (paper Table 6 defaults)."""

    variant: str = "conlip"
    conmlm: bool = True
    conmim: bool = True
    instance_loss: str = "dcl"
    in_batch_negatives: bool = True
    queue_size: int = 12288
    momentum: float = 0.99
    temperature: float = 0.05
    image_mask_ratio: float = 0.5
    image_mask_block: int = 0
    text_mask_ratio: float = 0.15
    text_mask_token_prob: float = 0.8
    text_random_token_prob: float = 0.1
    head_layers: int = 1
    head_shared: bool = False
    head_heads: Optional[int] = None
    head_mlp_ratio: float = 4.0
    head_dropout: float = 0.1
    image_weights: Optional[str] = None
    text_weights: bool = True
    image_checkpoint_blocks: int = 0
    image_checkpoint_policy: str = "full"
    mlm_weight: float = 1.0
    mim_weight: float = 1.0
    trim_text_multiple: int = 8
    max_nonfinite_steps: int = 3

    @classmethod
    def from_dict(cls, cfg: dict) -> "ConLIPCfg":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"conlip_cfg has unknown keys {unknown}; known keys are {sorted(known)}.")
        out = cls(**cfg)
        out.validate()
        return out

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"conlip_cfg: {msg}")

        need(self.variant in VARIANTS, f"variant must be one of {VARIANTS}, got {self.variant!r}")
        need(self.instance_loss in INSTANCE_LOSSES, f"instance_loss must be one of {INSTANCE_LOSSES}")
        need(self.queue_size >= 1, "queue_size must be >= 1")
        need(0.0 <= self.momentum < 1.0, "momentum must be in [0, 1)")
        need(self.temperature > 0, "temperature must be > 0")
        need(0.0 < self.image_mask_ratio < 1.0, "image_mask_ratio must be in (0, 1)")
        need(0.0 < self.text_mask_ratio < 1.0, "text_mask_ratio must be in (0, 1)")
        need(self.image_mask_block >= 0, "image_mask_block is a block size in pixels (0: per patch)")
        need(
            self.text_mask_token_prob >= 0 and self.text_random_token_prob >= 0
            and self.text_mask_token_prob + self.text_random_token_prob <= 1.0,
            "text_mask_token_prob + text_random_token_prob must be within [0, 1]",
        )
        need(self.head_layers >= 1, "head_layers must be >= 1")
        need(self.head_heads is None or self.head_heads >= 1, "head_heads must be >= 1 (or null: width / 64)")
        need(self.image_checkpoint_blocks >= 0, "image_checkpoint_blocks is a count of ViT blocks (0: none)")
        need(self.image_checkpoint_policy in CHECKPOINT_POLICIES,
             f"image_checkpoint_policy must be one of {CHECKPOINT_POLICIES} (what a recomputed block keeps: "
             f"nothing, or its matmul and attention outputs)")
        need(self.variant == "cl" or self.conmlm or self.conmim,
             "variant 'conlip'/'vanilla' needs conmlm or conmim (use variant 'cl' for neither)")
        need(not (self.variant == "cl" and self.instance_loss == "recipe"),
             "variant 'cl' with instance_loss 'recipe' adds nothing to the base model: train the base "
             "config itself (no conlip_cfg), or add heads with variant 'conlip' or 'vanilla'")
        need(isinstance(self.trim_text_multiple, int) and self.trim_text_multiple >= 0,
             "trim_text_multiple is a token count (training captions are cut to the batch's longest, rounded "
             "up to a multiple of it); 0 keeps the full context length")
        need(isinstance(self.max_nonfinite_steps, int) and self.max_nonfinite_steps >= 1,
             "max_nonfinite_steps is how many refused (non-finite) steps in a row stop the run: at least 1")
        for key in ("mlm_weight", "mim_weight"):
            value = getattr(self, key)
            need(isinstance(value, (int, float)) and math.isfinite(value) and value >= 0,
                 f"{key} must be a finite number >= 0, got {value!r}")

    @property
    def momentum_queues(self) -> bool:
        """DCL / InfoNCE train against momentum keys and queues; a recipe's own loss does not."""
        return self.instance_loss != "recipe"

    @property
    def uses_heads(self) -> bool:
        return self.variant != "cl"

    @property
    def mlm(self) -> bool:
        return self.uses_heads and self.conmlm

    @property
    def mim(self) -> bool:
        return self.uses_heads and self.conmim

    def heads_for(self, width: int) -> int:
        """Attention heads of a head of this width: as configured, else BERT's 64 dims per head."""
        return self.head_heads or max(1, width // 64)

    def head_pieces(self) -> str:
        return " and ".join(name for name, on in (("ConMLM", self.mlm), ("ConMIM", self.mim)) if on)

    @property
    def masked_image_pass(self) -> bool:
        """Pass (C) feeds the ConMIM queries and, in ConLIP, the ConMLM memory."""
        return self.mim or (self.mlm and self.variant == "conlip")

    @property
    def masked_text_pass(self) -> bool:
        """Pass (D) feeds the ConMLM queries and, in ConLIP, the ConMIM memory."""
        return self.mlm or (self.mim and self.variant == "conlip")

    def loss_names(self) -> dict:
        """Logged term names; a recipe's instance loss names its own (``contrastive_loss``, ...)."""
        prefix = "con" if self.variant == "conlip" else ""
        return {
            "instance": f"{self.instance_loss}_loss" if self.momentum_queues else None,
            "mlm": f"{prefix}mlm_loss",
            "mim": f"{prefix}mim_loss",
        }
