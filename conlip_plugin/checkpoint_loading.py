"""How checkpoints load into a ConLIP model: ``load_state_dict`` pre-hooks the model registers.

A full ConLIP checkpoint (open_clip_train's ``epoch_N.pt``) loads as saved. Two other kinds need
help before the strict load open_clip does: plain open_clip weights (no momentum encoders, queues
or heads) and checkpoints saved at another image size (fine-tuning at 336 from 224).
"""
import logging
import math

from torch import nn
from open_clip.model import resize_pos_embed

TRAINING_ONLY_PREFIXES = (
    "momentum_visual.", "momentum_text.", "image_queue.", "text_queue.", "image_mask_token", "text_mask_token",
    "mlm_head.", "mlm_predictor.", "mim_head.", "mim_predictor.",
)
MOMENTUM_TWINS = (("momentum_visual.", "visual."), ("momentum_text.", "text."))


def adopt_checkpoint_image_size(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """A checkpoint fine-tuned at another image size (e.g. 336) carries its position embeddings:
    resize each image tower to them before loading, so that the checkpoint loads as it was
    trained (open_clip 3.3 resizes position embeddings of its own ViT only, not of timm towers)."""
    if not hasattr(getattr(module.visual, "trunk", None), "patch_embed"):
        _resize_momentum_pos_embed(module, state_dict, prefix)
        return
    for name in ("visual", "momentum_visual"):
        tower = getattr(module, name)
        trunk = tower.trunk
        saved = state_dict.get(f"{prefix}{name}.trunk.pos_embed")
        current = getattr(trunk, "pos_embed", None)
        if saved is None or current is None or saved.shape == current.shape:
            continue
        patches = saved.shape[1] - (0 if getattr(trunk, "no_embed_class", False) else trunk.num_prefix_tokens)
        side = math.isqrt(patches)
        if side * side == patches:
            patch = trunk.patch_embed.patch_size
            size = side * int(patch[0] if isinstance(patch, (tuple, list)) else patch)
            logging.info("ConLIP: %s was saved at image size %d; resizing it to match", name, size)
            tower.set_input_size(size)


def _resize_momentum_pos_embed(module: nn.Module, state_dict: dict, prefix: str) -> None:
    """open_clip's own ViT: ``load_checkpoint`` resizes ``visual.positional_embedding`` to the
    model's grid (e.g. ``force_image_size``) but not the momentum tower's; resize it the same way."""
    key = prefix + "momentum_visual.positional_embedding"
    saved = state_dict.get(key)
    current = getattr(module.momentum_visual, "positional_embedding", None)
    if saved is None or current is None or saved.shape == current.shape:
        return
    as_online = {"visual.positional_embedding": saved}
    resize_pos_embed(as_online, module)
    state_dict[key] = as_online["visual.positional_embedding"]


def complete_plain_weights(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Plain open_clip weights (no momentum encoders, queues or heads): the momentum encoders start
    as copies of the loaded towers, the heads and queues as initialised, and the temperature stays
    ConLIP's (a CLIP checkpoint's learned ``logit_scale`` is not τ)."""
    if any(k.startswith(prefix + "momentum_") for k in state_dict):
        return
    if not any(k.startswith(prefix + "visual.") for k in state_dict):
        return
    own = module.state_dict()
    for key, value in own.items():
        if not key.startswith(TRAINING_ONLY_PREFIXES):
            continue
        twin = next((key.replace(m, o, 1) for m, o in MOMENTUM_TWINS if key.startswith(m)), None)
        if twin is not None and prefix + twin in state_dict:
            state_dict[prefix + key] = state_dict[prefix + twin].clone()
        else:
            state_dict[prefix + key] = value
    state_dict[prefix + "logit_scale"] = own["logit_scale"]
    logging.info("ConLIP: loaded plain open_clip weights; momentum encoders copied from them, heads and queues fresh")
