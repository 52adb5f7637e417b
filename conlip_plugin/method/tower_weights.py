"""Pretrained weights for the timm ViT image tower (``conlip_cfg.image_weights``).

Releases of the paper's ImageNet-21k ViT-B/16 (timm's ``vit_base_patch16_224.orig_in21k``) carry
pieces this classifier-free tower lacks (the class head, the older ``pre_logits`` layer): those are
dropped. Anything else that does not fit is refused before the tower is touched, so a wrong file
can neither half-load nor be silently resampled to fit.
"""
import copy
import json
import logging
import os
import re
import zipfile
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

PAPER_WEIGHTS = "vit_base_patch16_224.orig_in21k"
USE_PAPER_WEIGHTS = (
    f"Use timm's {PAPER_WEIGHTS} (the model.safetensors of the Hugging Face repository timm/{PAPER_WEIGHTS}: "
    f"the same ImageNet-21k ViT-B/16, in timm's layout) and set CONLIP_VIT_WEIGHTS (or conlip_cfg.image_weights "
    f"in a copy of the config) to that file."
)
SAME_ARCHITECTURE = (f"Use weights of vision_cfg.timm_model_name's architecture, e.g. {PAPER_WEIGHTS} for "
                     f"vit_base_patch16_224.")
IGNORED_PREFIXES = ("head.", "pre_logits.")
_HF_VIT_KEY = re.compile(r"(vit\.)?embeddings\.patch_embeddings\.")
_BLOCK = re.compile(r"blocks\.(\d+)\.")
_NPZ_BLOCK = re.compile(r"Transformer/encoderblock_(\d+)/")

# (depth, width, patch size): what must agree before timm may resample position embeddings to fit.
Arch = Tuple[int, int, Optional[Tuple[int, int]]]


def load_image_tower_weights(visual: nn.Module, path: str) -> None:
    """Load a timm ViT state dict (.safetensors/.pth/.bin) or a Google/big_vision .npz into the
    timm trunk of open_clip's image tower."""
    from timm.models.vision_transformer import VisionTransformer

    trunk = getattr(visual, "trunk", visual)
    if not isinstance(trunk, VisionTransformer):
        raise ValueError(f"conlip_cfg.image_weights needs a timm ViT image tower (vision_cfg.timm_model_name), "
                         f"not {type(trunk).__name__}; remove image_weights from a copy of the config.")
    if os.path.isdir(path):
        raise ValueError(_folder_message(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"conlip_cfg.image_weights: {path!r} is not a file (if it names an environment variable, set it). "
            f"Give a local timm ViT checkpoint, e.g. {PAPER_WEIGHTS} as .safetensors/.pth (the files of "
            f"timm/{PAPER_WEIGHTS}) or Google's original .npz, or remove image_weights from a copy of the config."
        )
    state = _npz_state(trunk, path) if path.endswith(".npz") else _checkpoint_state(trunk, path)
    trunk.load_state_dict(state, strict=False)  # checked above: all but a head the tower may have
    logging.info("ConLIP: loaded image tower weights from %s", path)


def _folder_message(path: str) -> str:
    config = os.path.join(path, "config.json")
    model_type = None
    if os.path.isfile(config):
        with open(config) as f:
            model_type = json.load(f).get("model_type")
    if model_type:
        return (f"conlip_cfg.image_weights: {path} holds a Hugging Face transformers {model_type!r} model (such as "
                f"google/vit-base-patch16-224-in21k); timm cannot convert transformers ViT weights (its "
                f"checkpoint_filter_fn has no conversion for their key names). {USE_PAPER_WEIGHTS}")
    return f"conlip_cfg.image_weights: {path} is a folder, not a weights file. {USE_PAPER_WEIGHTS}"


def _checkpoint_state(trunk: nn.Module, path: str) -> Dict[str, torch.Tensor]:
    """timm's own loader (safetensors, or torch.load with weights_only=True) and key filter."""
    import timm.models
    from timm.models.vision_transformer import checkpoint_filter_fn

    raw = timm.models.load_state_dict(path)
    if any(_HF_VIT_KEY.match(k) for k in raw):
        raise ValueError(f"conlip_cfg.image_weights: {path} has Hugging Face transformers ViT key names "
                         f"(embeddings.patch_embeddings...), which timm cannot convert. {USE_PAPER_WEIGHTS}")
    state = {k: v for k, v in checkpoint_filter_fn(raw, trunk).items() if not k.startswith(IGNORED_PREFIXES)}
    if "patch_embed.proj.weight" not in state:
        raise ValueError(f"conlip_cfg.image_weights: {path} is not a timm ViT state dict (it has no "
                         f"patch_embed.proj.weight). {USE_PAPER_WEIGHTS}")
    # From the raw kernel: the filter resamples one of another patch size to fit.
    patch = next((tuple(v.shape[-2:]) for k, v in raw.items() if k.endswith("patch_embed.proj.weight") and v.ndim == 4),
                 None)
    depth = len({m.group(1) for m in map(_BLOCK.match, state) if m})
    own = _loadable(trunk)
    problems = [f"missing {k}" for k in own if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in own]
    problems += [f"{k} is {tuple(v.shape)} here, {tuple(own[k].shape)} in the tower"
                 for k, v in state.items() if k in own and v.shape != own[k].shape]
    _refuse_misfit(trunk, path, (depth, state["patch_embed.proj.weight"].shape[0], patch), problems)
    return state


def _npz_state(trunk: nn.Module, path: str) -> Dict[str, torch.Tensor]:
    """timm's .npz loader fills a copy of the trunk; checked first, as it ignores extra blocks and
    resamples patch kernels, and after, as it leaves what the archive lacks untouched."""
    import numpy as np

    if not zipfile.is_zipfile(path):
        raise ValueError(f"conlip_cfg.image_weights: {path} is not a .npz archive. {USE_PAPER_WEIGHTS}")
    with np.load(path, allow_pickle=False) as w:
        kernels = [k for k in w.files if k == "embedding/kernel" or k.endswith("/embedding/kernel")]
        if not kernels:
            raise ValueError(f"conlip_cfg.image_weights: {path} is not a Google/big_vision ViT .npz (it has no "
                             f"embedding/kernel). {USE_PAPER_WEIGHTS}")
        prefix = kernels[0][:-len("embedding/kernel")]
        kernel = w[kernels[0]]
        stacked = f"{prefix}Transformer/encoderblock/LayerNorm_0/scale"
        if stacked in w.files:
            depth = w[stacked].shape[0]
        else:
            depth = len({m.group(1) for m in (_NPZ_BLOCK.match(k[len(prefix):]) for k in w.files
                                              if k.startswith(prefix)) if m})
    _refuse_misfit(trunk, path, (depth, kernel.shape[-1], tuple(kernel.shape[:2])), [])
    loaded = copy.deepcopy(trunk)
    with torch.no_grad():
        for p in loaded.parameters():
            p.fill_(float("nan"))
    try:
        loaded.load_pretrained(path)
    except (KeyError, RuntimeError, ValueError) as e:
        raise ValueError(f"conlip_cfg.image_weights: {path} does not fit the image tower (timm's .npz loader: "
                         f"{e}). {SAME_ARCHITECTURE}") from e
    state = _loadable(loaded)
    _refuse_misfit(trunk, path, None, [f"missing {k}" for k, v in state.items() if v.isnan().any()])
    return state


def _loadable(trunk: nn.Module) -> Dict[str, torch.Tensor]:
    """The trunk's tensors that pretrained weights fill: a head the tower has (open_clip's projection
    when timm_proj is '') is not the checkpoint's classifier, and keeps its initialisation."""
    return {k: v for k, v in trunk.state_dict().items() if not k.startswith(IGNORED_PREFIXES)}


def _refuse_misfit(trunk: nn.Module, path: str, found: Optional[Arch], problems: List[str]) -> None:
    patch = tuple(trunk.patch_embed.patch_size)
    tower = (len(trunk.blocks), trunk.embed_dim, patch)
    if found is not None and found[2] is None:
        found = found[:2] + (patch,)
    if (found is None or found == tower) and not problems:
        return
    describe = "depth {}, width {}, patch {}".format
    summary = f" (a ViT of {describe(*found)}; the tower is {describe(*tower)})" if found and found != tower else ""
    details = f": {'; '.join(problems[:6])}{' ...' if len(problems) > 6 else ''}" if problems else ""
    raise ValueError(f"conlip_cfg.image_weights: {path} does not fit the image tower{summary}{details}. "
                     f"{SAME_ARCHITECTURE}")
