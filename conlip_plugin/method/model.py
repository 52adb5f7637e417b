"""The ConLIP model: open_clip's ``CustomTextCLIP`` plus ConLIP's training-only pieces.

In eval mode it is the plain open_clip model (no masking, no state change, no collective), so every
open_clip tool can use it. In train mode its forward runs the passes (A)-(D), the momentum passes
and both heads for :class:`conlip_plugin.method.loss.ConLIPLoss`. The momentum encoders and queues
change only in an optimizer post-step hook, so a step the AMP scaler skips changes neither. With
``instance_loss: recipe`` there are none: the base model's outputs plus the heads', for
:class:`conlip_plugin.method.loss.RecipeWithTokenLosses`.
"""
import dataclasses
import math
import os
import weakref
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from open_clip.model import CustomTextCLIP

from conlip_plugin.integration.checkpoint_loading import (
    TRAINING_ONLY_PREFIXES,
    adopt_checkpoint_image_size,
    complete_plain_weights,
    reconcile_training_state,
)
from conlip_plugin.method.config import ConLIPCfg
from conlip_plugin.reliability.finite_steps import StepGuard
from conlip_plugin.method.heads import ConditionedHead, MLMPredictionHead, init_head_weights
from conlip_plugin.method.masking import IGNORE_INDEX, PatchMasker, TextMasker, patchify, true_positions_first
from conlip_plugin.method.momentum import FeatureQueue, ema_update_, gather_keys, momentum_copy
from conlip_plugin.method.tower_weights import load_image_tower_weights
from conlip_plugin.method.towers import TimmViTTokens, TowerError, causal_text_reader, image_tokens_for, text_tokens_for


def _require_dir(path: Optional[str], what: str) -> str:
    if not path or not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"{what} must be a local Hugging Face folder (config.json, tokenizer files, weights); got "
            f"{path!r}. Nothing is fetched from a hub: download it once, then point the config (or the "
            f"environment variable it names) at the folder."
        )
    return path


class ConLIP(CustomTextCLIP):
    def __init__(
            self,
            embed_dim: int,
            vision_cfg: dict,
            text_cfg: dict,
            conlip_cfg: dict,
            quick_gelu: bool = False,
            init_logit_scale: float = math.log(1 / 0.07),
            init_logit_bias: Optional[float] = None,
            nonscalar_logit_scale: bool = False,
            cast_dtype: Optional[torch.dtype] = None,
            output_dict: bool = False,
    ):
        cfg = ConLIPCfg.from_dict(conlip_cfg)
        if init_logit_bias is not None and cfg.momentum_queues:
            raise ValueError(f"ConLIP's instance loss {cfg.instance_loss!r} has no logit bias (--siglip): to "
                             f"keep SigLIP's loss and add the token losses, use conlip_cfg.instance_loss "
                             f"'recipe' (the BASE+conmlm-conmim names).")
        text_cfg = dict(text_cfg)
        is_hf = "hf_model_name" in text_cfg
        if is_hf:
            _require_dir(text_cfg.get("hf_model_name"), "text_cfg.hf_model_name")
            _require_dir(text_cfg.get("hf_tokenizer_name"), "text_cfg.hf_tokenizer_name")
        # create_model clears hf_model_pretrained when a full checkpoint will be loaded afterwards.
        load_tower_weights = bool(text_cfg.get("hf_model_pretrained", True))
        if is_hf:
            text_cfg["hf_model_pretrained"] = load_tower_weights and cfg.text_weights
        # DCL / InfoNCE fix tau; a recipe's loss learns its own scale (and SigLIP's bias).
        super().__init__(
            embed_dim, vision_cfg, text_cfg, quick_gelu=quick_gelu,
            init_logit_scale=math.log(1.0 / cfg.temperature) if cfg.momentum_queues else init_logit_scale,
            init_logit_bias=init_logit_bias, nonscalar_logit_scale=nonscalar_logit_scale,
            cast_dtype=cast_dtype, output_dict=output_dict,
        )
        self.conlip_cfg = cfg
        self.embed_dim = embed_dim
        if load_tower_weights and cfg.image_weights:
            load_image_tower_weights(self.visual, cfg.image_weights)

        if cfg.momentum_queues:
            self.logit_scale.requires_grad_(False)
            # Momentum copies come after the pretrained weights are in.
            self.momentum_visual = momentum_copy(self.visual)
            self.momentum_text = momentum_copy(self.text)
            self.image_queue = FeatureQueue(cfg.queue_size, embed_dim)
            self.text_queue = FeatureQueue(cfg.queue_size, embed_dim)
        # Token-level access to each tower (towers.py), for the heads only; CL uses the towers' forwards.
        pieces = cfg.head_pieces()
        self.image_adapter = image_tokens_for(self.visual, pieces) if cfg.uses_heads else None
        self.text_adapter = text_tokens_for(self.text, pieces) if cfg.uses_heads else None
        # open_clip's causal text tower takes only full-context ids through its own forward; trimmed
        # captions (text_padding.py) go through the adapter, whose causal mask follows their length.
        self._causal_text = causal_text_reader(self.text)
        if cfg.image_checkpoint_blocks and not cfg.uses_heads:
            raise TowerError("conlip_cfg.image_checkpoint_blocks applies to the heads' image passes; a 'cl' "
                             "model has none: set it to 0 and use --grad-checkpointing instead.")
        if cfg.image_checkpoint_blocks and not isinstance(self.image_adapter, TimmViTTokens):
            raise TowerError("conlip_cfg.image_checkpoint_blocks needs a timm ViT; use --grad-checkpointing instead.")
        self._build_masking_and_heads(cfg, text_cfg)

        self._ddp_params_and_buffers_to_ignore = [
            n for n, _ in list(self.named_parameters()) + list(self.named_buffers())
            if n.startswith(("momentum_visual.", "momentum_text.", "image_queue.", "text_queue."))
        ]
        # The hand-off from the training forward to the optimizer post-step hook: the forward leaves
        # the (image, text) momentum keys of the global batch here, and ``momentum_step`` writes them
        # to the queues after a real optimizer step and clears it. A step the AMP scaler skips never
        # runs the hook, so its keys are replaced by the next forward's and never enqueued.
        self.keys_to_enqueue: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self.step_guard = StepGuard(cfg.max_nonfinite_steps)
        self._register_step_hooks()
        # Masks drawn by a no-gradient training forward, for the re-run of the same batch (see _masks).
        self._drawn_masks: List[tuple] = []
        # Plain weights first get their momentum copies; then the settings are compared; then the
        # momentum copies are resized with the towers.
        self.register_load_state_dict_pre_hook(complete_plain_weights)
        self.register_load_state_dict_pre_hook(reconcile_training_state)
        self.register_load_state_dict_pre_hook(adopt_checkpoint_image_size)

    def _build_masking_and_heads(self, cfg: ConLIPCfg, text_cfg: dict) -> None:
        vit, txt = self.image_adapter, self.text_adapter
        if cfg.masked_image_pass:
            self.image_mask_token = nn.Parameter(torch.zeros(vit.width))
            nn.init.trunc_normal_(self.image_mask_token, std=0.02)
            self.patch_masker = PatchMasker(
                vit.grid_size(self.visual), vit.patch_size, cfg.image_mask_ratio, cfg.image_mask_block)
        if cfg.masked_text_pass:
            mask_id, special_ids = txt.masking_ids(text_cfg, "ConMLM")
            if txt.learned_mask:
                self.text_mask_token = nn.Parameter(torch.zeros(txt.width))
                nn.init.trunc_normal_(self.text_mask_token, std=0.02)
            self.text_masker = TextMasker(
                txt.vocab_size, mask_id, special_ids, cfg.text_mask_ratio,
                cfg.text_mask_token_prob, cfg.text_random_token_prob)
        head_kw = dict(layers=cfg.head_layers, shared=cfg.head_shared, mlp_ratio=cfg.head_mlp_ratio,
                       dropout=cfg.head_dropout)
        if cfg.mlm:
            self.mlm_head = ConditionedHead(txt.width, vit.width, cfg.heads_for(txt.width), **head_kw)
            self.mlm_predictor = MLMPredictionHead(txt.width, txt.vocab_size)
            self.mlm_head.apply(init_head_weights)
            self.mlm_predictor.apply(init_head_weights)
        if cfg.mim:
            self.mim_head = ConditionedHead(vit.width, txt.width, cfg.heads_for(vit.width), **head_kw)
            self.mim_predictor = nn.Linear(vit.width, vit.patch_size * vit.patch_size * 3)
            self.mim_head.apply(init_head_weights)
            self.mim_predictor.apply(init_head_weights)

    # --- momentum encoders and queues: once per real optimizer step --------------------------

    def _register_step_hooks(self) -> None:
        """Before each step of an optimizer of this model: refuse it if a gradient is not finite
        (finite_steps.py); after it: the EMA and the enqueue, weighed by whether it was applied."""
        model_ref = weakref.ref(self)

        def before_optimizer_step(optimizer, args, kwargs) -> None:
            model = model_ref()
            if model is not None and model._is_stepped_by(optimizer):
                model.step_guard.before_step(optimizer)

        def after_optimizer_step(optimizer, args, kwargs) -> None:
            model = model_ref()
            if model is not None and model._is_stepped_by(optimizer):
                accept = model.step_guard.after_step(optimizer)
                if model.conlip_cfg.momentum_queues:
                    model.momentum_step(accept)

        for handle in (register_optimizer_step_pre_hook(before_optimizer_step),
                       register_optimizer_step_post_hook(after_optimizer_step)):
            weakref.finalize(self, handle.remove)

    def _is_stepped_by(self, optimizer: torch.optim.Optimizer) -> bool:
        mine = {id(p) for p in self.parameters() if p.requires_grad}
        return any(id(p) in mine for group in optimizer.param_groups for p in group["params"])

    def _online_and_momentum_params(self) -> tuple:
        online = list(self.visual.parameters()) + list(self.text.parameters())
        momentum = list(self.momentum_visual.parameters()) + list(self.momentum_text.parameters())
        return momentum, online

    @torch.no_grad()
    def momentum_step(self, accept: Optional[torch.Tensor] = None) -> None:
        """EMA of the momentum encoders, then write the last training batch's keys to the queues;
        both weighed by ``accept`` (a device 0-d tensor: 0 for a refused step) when it is given."""
        momentum, online = self._online_and_momentum_params()
        ema_update_(momentum, online, self.conlip_cfg.momentum, accept)
        if self.keys_to_enqueue is not None:
            image_keys, text_keys = self.keys_to_enqueue
            self.image_queue.enqueue(image_keys, accept)
            self.text_queue.enqueue(text_keys, accept)
            self.keys_to_enqueue = None

    # --- forward ------------------------------------------------------------------------------

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        super().set_grad_checkpointing(enable)
        for name in ("mlm_head", "mim_head"):
            if hasattr(self, name):
                getattr(self, name).grad_checkpointing = enable

    def forward(self, image: Optional[torch.Tensor] = None, text: Optional[torch.Tensor] = None):
        if not self.training or image is None or text is None:
            return super().forward(image, text)
        return self.forward_train(image, text)

    def _follow_input_size(self) -> None:
        """After ``visual.set_input_size`` (open_clip's ``force_image_size``, e.g. fine-tuning at
        336 from a 224 checkpoint), resize the momentum tower and the patch masker to match."""
        if hasattr(self, "momentum_visual") and hasattr(getattr(self.visual, "trunk", None), "patch_embed"):
            online, momentum = self.visual.trunk.patch_embed, self.momentum_visual.trunk.patch_embed
            if momentum.img_size != online.img_size:
                self.momentum_visual.set_input_size(online.img_size)
        masker = getattr(self, "patch_masker", None)
        grid = masker and self.image_adapter.grid_size(self.visual)
        if masker is not None and masker.grid_size != grid:
            cfg = self.conlip_cfg
            self.patch_masker = PatchMasker(grid, self.image_adapter.patch_size, cfg.image_mask_ratio,
                                            cfg.image_mask_block)

    def _masks(self, image: torch.Tensor, text: torch.Tensor) -> tuple:
        """This batch's (patch mask, masked ids, MLM labels, text positions to mask).

        open_clip_train's ``--accum-freq`` runs each micro-batch twice, first without gradient to
        cache its features, then with gradient on the very same tensors; the second run takes the
        first's masks, so each micro-batch is masked once and its cached token terms are the ones
        the gradient run recomputes. Entries hold weak references: they go with the batch.
        """
        self._drawn_masks = [e for e in self._drawn_masks if e[0]() is not None and e[1]() is not None]
        for entry in self._drawn_masks:
            if entry[0]() is image and entry[1]() is text:
                self._drawn_masks.remove(entry)
                return entry[2]
        cfg = self.conlip_cfg
        patch_mask = self.patch_masker(image.shape[0], image.device) if cfg.masked_image_pass else None
        text_masks = self.text_masker(text) if cfg.masked_text_pass else (None, None, None)
        masks = (patch_mask, *text_masks)
        if not torch.is_grad_enabled():
            self._drawn_masks.append((weakref.ref(image), weakref.ref(text), masks))
        return masks

    def _text_instance(self, tower: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """``tower``'s instance embedding of ``ids``, which may be shorter than the context."""
        reader = self._causal_text
        return tower(ids) if reader is None else reader.embedding(tower, reader.tokens(tower, ids), ids)

    def forward_train(self, image: torch.Tensor, text: torch.Tensor) -> Dict[str, torch.Tensor]:
        cfg, vit, txt = self.conlip_cfg, self.image_adapter, self.text_adapter
        b = image.shape[0]
        self._follow_input_size()
        patch_mask, masked_ids, mlm_labels, to_mask = self._masks(image, text)

        if cfg.masked_image_pass:  # passes (A) and (C) as one batch
            both = vit.tokens(self.visual, torch.cat([image, image]),
                              torch.cat([torch.zeros_like(patch_mask), patch_mask]), self.image_mask_token,
                              cfg.image_checkpoint_blocks, cfg.image_checkpoint_policy)
            image_tokens, masked_image_tokens = both[:b], both[b:]
        elif cfg.uses_heads:
            image_tokens = vit.tokens(self.visual, image, checkpoint_blocks=cfg.image_checkpoint_blocks,
                                      checkpoint_policy=cfg.image_checkpoint_policy)
        if cfg.masked_text_pass:  # passes (B) and (D) as one batch
            embed_mask = torch.cat([torch.zeros_like(to_mask), to_mask]) if txt.learned_mask else None
            both = txt.tokens(self.text, torch.cat([text, masked_ids]), embed_mask, getattr(self, "text_mask_token", None))
            text_tokens, masked_text_tokens = both[:b], both[b:]
        elif cfg.uses_heads:
            text_tokens = txt.tokens(self.text, text)

        if cfg.uses_heads:
            image_embedding = vit.embedding(self.visual, image_tokens)
            text_embedding = txt.embedding(self.text, text_tokens, text)
        else:
            image_embedding, text_embedding = self.visual(image), self._text_instance(self.text, text)
        out = {
            "image_features": F.normalize(image_embedding, dim=-1),
            "text_features": F.normalize(text_embedding, dim=-1),
            "logit_scale": self.logit_scale.exp(),
        }
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        if cfg.momentum_queues:
            with torch.no_grad():
                image_keys = gather_keys(F.normalize(self.momentum_visual(image).float(), dim=-1))
                text_keys = gather_keys(F.normalize(self._text_instance(self.momentum_text, text).float(), dim=-1))
            self.keys_to_enqueue = (image_keys, text_keys)
            out.update(image_momentum_features=image_keys, text_momentum_features=text_keys,
                       image_queue=self.image_queue.features, text_queue=self.text_queue.features)
        conditioned = cfg.variant == "conlip"
        if cfg.mlm:
            # ConLIP: [complete image's instance state (A, with gradient) ; masked image's patches (C)].
            if conditioned:
                memory, memory_mask = vit.conditioned_memory(image_tokens, masked_image_tokens)
            else:
                memory, memory_mask = image_tokens, None
            states = self.mlm_head(masked_text_tokens, txt.attention_mask(masked_ids), memory, memory_mask)
            # A fixed number of positions per caption (the chosen ones, then ignored filler).
            picked = true_positions_first(mlm_labels != IGNORE_INDEX, self.text_masker.max_chosen(text.shape[1]))
            rows = torch.take_along_dim(states, picked[..., None], dim=1)
            out["mlm_logits"] = self.mlm_predictor(rows).flatten(0, 1)
            out["mlm_labels"] = mlm_labels.gather(1, picked).flatten()
        if cfg.mim:
            # ConLIP: [complete text's instance state (B, with gradient) ; masked text's tokens (D)].
            if conditioned:
                memory, memory_mask = txt.conditioned_memory(self.text, text_tokens, text, masked_text_tokens,
                                                             masked_ids)
            else:
                memory, memory_mask = text_tokens, txt.attention_mask(text)
            states = self.mim_head(masked_image_tokens[:, 1:], None, memory, memory_mask)
            picked = true_positions_first(patch_mask, self.patch_masker.masked_count)
            rows = torch.take_along_dim(states, picked[..., None], dim=1)
            out["mim_predictions"] = self.mim_predictor(rows).flatten(0, 1)
            targets = torch.take_along_dim(patchify(image, vit.patch_size), picked[..., None], dim=1)
            out["mim_targets"] = targets.flatten(0, 1)
        return out

    def get_extra_state(self) -> dict:
        """Saved with the weights, so that a load can tell which ConLIP settings made a checkpoint."""
        return {"conlip_cfg": dataclasses.asdict(self.conlip_cfg), "embed_dim": int(self.embed_dim)}

    def set_extra_state(self, state: dict) -> None:
        """Nothing to restore: ``reconcile_training_state`` compared the settings before the load."""

    def inference_state_dict(self) -> Dict[str, torch.Tensor]:
        """The weights of the plain open_clip model: training-only pieces dropped."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(TRAINING_ONLY_PREFIXES)}
