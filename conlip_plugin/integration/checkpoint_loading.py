"""How checkpoints load into a ConLIP model: ``load_state_dict`` pre-hooks the model registers.

open_clip loads strictly, so plain open_clip weights, checkpoints of another image size (fine-tuning
at 336 from 224) and checkpoints of other ConLIP settings need help first. Each checkpoint records
the ``conlip_cfg`` and ``embed_dim`` that made it: continuing a run (``--resume``) under other
structural settings is refused, naming both; starting one from it (``--pretrained``, inside
:func:`initialising_from_checkpoint`) loads what fits and starts the rest fresh, saying which.
"""
import logging
import math
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Dict, Iterator, List, Optional

from torch import nn
from open_clip.model import resize_pos_embed

EXTRA_STATE = "_extra_state"
TRAINING_ONLY_PREFIXES = (
    "momentum_visual.", "momentum_text.", "image_queue.", "text_queue.", "image_mask_token", "text_mask_token",
    "mlm_head.", "mlm_predictor.", "mim_head.", "mim_predictor.", EXTRA_STATE,
)
MOMENTUM_TWINS = (("momentum_visual.", "visual."), ("momentum_text.", "text."))
# conlip_cfg keys that decide which tensors a model has, or their shapes.
STRUCTURAL_KEYS = ("variant", "conmlm", "conmim", "queue_size", "head_layers", "head_shared", "head_heads",
                   "head_mlp_ratio")
NOT_COMPARED = ("image_weights", "text_weights", "image_checkpoint_blocks", "image_checkpoint_policy",
                "trim_text_multiple", "max_nonfinite_steps")
_INITIALISING: ContextVar[bool] = ContextVar("conlip_initialising_from_checkpoint", default=False)


@contextmanager
def initialising_from_checkpoint() -> Iterator[None]:
    """Loads in here start a new run from a checkpoint (open_clip's ``pretrained=``): pieces the
    checkpoint lacks, or holds in another shape, start fresh instead of failing the load."""
    token = _INITIALISING.set(True)
    try:
        yield
    finally:
        _INITIALISING.reset(token)


def adopt_checkpoint_image_size(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """A checkpoint fine-tuned at another image size (e.g. 336) carries its position embeddings:
    resize each image tower to them before loading, so that the checkpoint loads as it was
    trained (open_clip 3.3 resizes position embeddings of its own ViT only, not of timm towers)."""
    if not hasattr(getattr(module.visual, "trunk", None), "patch_embed"):
        _resize_momentum_pos_embed(module, state_dict, prefix)
        return
    for name in ("visual", "momentum_visual"):
        tower = getattr(module, name, None)
        if tower is None:
            continue
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
    current = getattr(getattr(module, "momentum_visual", None), "positional_embedding", None)
    if saved is None or current is None or saved.shape == current.shape:
        return
    as_online = {"visual.positional_embedding": saved}
    resize_pos_embed(as_online, module)
    state_dict[key] = as_online["visual.positional_embedding"]


def _momentum_twin(key: str, state_dict: dict, prefix: str):
    """The loaded online tower's tensor a momentum tensor starts as, if the checkpoint has it."""
    twin = next((key.replace(m, o, 1) for m, o in MOMENTUM_TWINS if key.startswith(m)), None)
    return None if twin is None or prefix + twin not in state_dict else state_dict[prefix + twin].clone()


def _start_missing_bias(own: dict, state_dict: dict, prefix: str) -> None:
    """SigLIP's ``logit_bias`` (``--siglip``) on weights trained without one starts at its initial value."""
    if "logit_bias" in own and prefix + "logit_bias" not in state_dict:
        state_dict[prefix + "logit_bias"] = own["logit_bias"]
        logging.info("ConLIP: the checkpoint has no logit_bias; it starts at %.3g", float(own["logit_bias"]))


def complete_plain_weights(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Plain open_clip weights (no momentum encoders, queues or heads): the momentum encoders start
    as copies of the loaded towers, the heads and queues as initialised. With DCL / InfoNCE the
    temperature stays ConLIP's (a CLIP checkpoint's learned ``logit_scale`` is not τ); a model on its
    recipe's own loss keeps the checkpoint's ``logit_scale`` (and ``logit_bias``) and trains them."""
    if prefix + EXTRA_STATE in state_dict or any(k.startswith(prefix + "momentum_") for k in state_dict):
        return
    if not any(k.startswith(prefix + "visual.") for k in state_dict):
        return
    own = module.state_dict()
    for key, value in own.items():
        if key.startswith(TRAINING_ONLY_PREFIXES):
            twin = _momentum_twin(key, state_dict, prefix)
            state_dict[prefix + key] = value if twin is None else twin
    if module.conlip_cfg.momentum_queues:
        state_dict[prefix + "logit_scale"] = own["logit_scale"]
    _start_missing_bias(own, state_dict, prefix)
    logging.info("ConLIP: loaded plain open_clip weights; %s", "momentum encoders copied from them, heads and "
                 "queues fresh" if module.conlip_cfg.momentum_queues else "heads fresh, logit_scale kept")


def _changed(saved: Optional[dict], own: dict) -> Dict[str, tuple]:
    """{conlip_cfg key: (checkpoint's value, this model's)} for every key that differs and matters
    after the model is built (not where its first weights came from, nor what is recomputed)."""
    if saved is None:
        return {}
    return {k: (saved["conlip_cfg"].get(k), v) for k, v in own["conlip_cfg"].items()
            if k not in NOT_COMPARED and saved["conlip_cfg"].get(k) != v}


def _saved_embed_dim(state_dict: dict, prefix: str, saved: Optional[dict]) -> Optional[int]:
    """From the recorded settings, else (checkpoints from before they were recorded) the queue width."""
    if saved is not None:
        return saved["embed_dim"]
    queue = state_dict.get(prefix + "image_queue.features")
    return None if queue is None else int(queue.shape[1])


def _names(keys: List[str]) -> str:
    return ", ".join(sorted({k.split(".")[0] for k in keys})) or "nothing"


def reconcile_training_state(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Compare the checkpoint's ConLIP settings and training-only tensors with this model's: refuse
    to continue a run under other structural settings; complete an initialisation from it."""
    theirs = {k[len(prefix):] for k in state_dict if k.startswith(prefix)}
    if not theirs:  # nothing under this prefix (e.g. a DDP wrapper's keys): torch's strict load says so
        return
    own, mine = module.state_dict(), module.get_extra_state()
    if module.conlip_cfg.momentum_queues:  # tau is the config's, whatever the checkpoint was trained with
        state_dict[prefix + "logit_scale"] = own["logit_scale"]
    if _INITIALISING.get():
        _start_missing_bias(own, state_dict, prefix)
    saved = state_dict.get(prefix + EXTRA_STATE)
    embed_dim = _saved_embed_dim(state_dict, prefix, saved)
    if embed_dim is not None and embed_dim != mine["embed_dim"]:
        raise ValueError(f"this checkpoint's towers embed into {embed_dim} dimensions, this model's into "
                         f"{mine['embed_dim']}: its weights cannot fill this model. Use the model config it was "
                         f"trained with (params.txt in its run folder names it).")
    changed = _changed(saved, mine)
    structural = {k: v for k, v in changed.items() if k in STRUCTURAL_KEYS}
    training = {k for k in own if k.startswith(TRAINING_ONLY_PREFIXES) and k != EXTRA_STATE}
    missing = sorted(training - theirs)
    unused = sorted(k for k in theirs - set(own) if k.startswith(TRAINING_ONLY_PREFIXES))
    # The momentum towers' shapes follow the towers (another image size is adopted below).
    reshaped = sorted(k for k in training & theirs if not k.startswith(("momentum_visual.", "momentum_text."))
                      and state_dict[prefix + k].shape != own[k].shape)
    state_dict[prefix + EXTRA_STATE] = mine
    if not (structural or missing or unused or reshaped):
        if changed:
            logging.warning("ConLIP: the checkpoint was made with other conlip_cfg values; now in force: %s",
                            "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
        return
    settings = "; ".join(f"conlip_cfg.{k} {a!r} in the checkpoint, {b!r} here" for k, (a, b) in structural.items())
    pieces = (f"the checkpoint lacks {_names(missing)}; only the checkpoint has {_names(unused)}; "
              f"other shape: {_names(reshaped)}")
    if not _INITIALISING.get():
        raise ValueError(
            f"this checkpoint was trained with other ConLIP settings ({settings or pieces}), so its run cannot "
            f"continue with this model config. To continue it, resume with the config it was trained with "
            f"(params.txt in its run folder names it); to start a new run from its weights, pass it as "
            f"--pretrained instead.")
    for key in missing + reshaped:
        twin = _momentum_twin(key, state_dict, prefix) if key in missing else None
        state_dict[prefix + key] = own[key] if twin is None else twin
    for key in unused:
        del state_dict[prefix + key]
    logging.warning("ConLIP: starting from a checkpoint of other settings (%s): loaded the towers and what fits; "
                    "started fresh: %s; not used: %s", settings or "same settings", _names(missing + reshaped),
                    _names(unused))
