"""Give registered model configs their own image preprocessing (``preprocess_cfg``).

Why: open_clip 3.3 takes a model's preprocessing from its defaults (OpenAI mean/std) plus a
pretrained tag's settings, and a top-level ``preprocess_cfg`` in a model JSON reaches the model
constructor (``TypeError``), so models trained with other normalisation were evaluated on wrongly
scaled images. What: wraps ``open_clip.factory.get_model_config`` so the config it returns carries
no ``preprocess_cfg``, and ``create_model`` (and its ``open_clip`` alias) so the registered config's
section applies over open_clip's defaults; a pretrained tag, the image size and
``force_preprocess_cfg`` still win. For: open_clip_torch 3.3.x.
"""
import functools
import inspect
from numbers import Number
from typing import Any, Callable, Dict, Optional

from conlip_plugin.integration.patching import original_of, wrap

KEY = "preprocess_cfg"
_CHOICES = {"mode": ("RGB",), "interpolation": ("bicubic", "bilinear", "random"),
            "resize_mode": ("shortest", "longest", "squash")}


def _check(model_name: str, model_cfg: dict) -> Dict[str, Any]:
    """The config's ``preprocess_cfg`` without ``size`` (the model's image size governs), validated."""
    from open_clip.transform import PreprocessCfg

    section = model_cfg.get(KEY) or {}
    where = f"model config {model_name!r}: {KEY}"
    if not isinstance(section, dict):
        raise ValueError(f"{where} must be an object such as {{\"mean\": [0.5, 0.5, 0.5], \"std\": [0.5, 0.5, 0.5]}}.")
    known = set(inspect.signature(PreprocessCfg).parameters)
    unknown = sorted(set(section) - known)
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}; open_clip's keys are {sorted(known)}.")
    for key in ("mean", "std"):
        value = section.get(key)
        if value is not None and not (isinstance(value, (list, tuple)) and len(value) == 3
                                      and all(isinstance(v, Number) for v in value)):
            raise ValueError(f"{where}.{key} must be three numbers, one per RGB channel; got {value!r}.")
    if any(v <= 0 for v in section.get("std") or ()):
        raise ValueError(f"{where}.std must be positive; got {section['std']!r}.")
    for key, allowed in _CHOICES.items():
        if key in section and section[key] not in allowed:
            raise ValueError(f"{where}.{key} must be one of {allowed}; got {section[key]!r}.")
    size = section.get("size")
    image_size = model_cfg.get("vision_cfg", {}).get("image_size")
    if size is not None and size != image_size:
        raise ValueError(f"{where}.size is {size!r} but vision_cfg.image_size is {image_size!r}: the size follows "
                         f"the image tower; remove {KEY}.size (use --force-image-size to change both).")
    return {k: v for k, v in section.items() if k != "size"}


def registered_preprocess(lookup: Callable[[str], Optional[dict]], model_name: str,
                          pretrained: Optional[str] = None) -> Dict[str, Any]:
    """What a model created by name takes from its registered config's ``preprocess_cfg``:
    nothing for ``local-dir:`` / ``hf-hub:`` names (their ``open_clip_config.json`` has its own), and
    no key that the pretrained tag sets."""
    from open_clip.factory import parse_model_name
    from open_clip.pretrained import get_pretrained_cfg

    schema, identifier = parse_model_name(model_name)
    name = identifier.replace("/", "-")
    model_cfg = None if schema else lookup(name)
    if not model_cfg:
        return {}
    own = _check(name, model_cfg)
    tag = get_pretrained_cfg(name, pretrained) if pretrained else {}
    return {k: v for k, v in own.items() if k not in tag}


def _dropping_section(lookup: Callable) -> Callable:
    @functools.wraps(lookup)
    def get_model_config(model_name):
        model_cfg = lookup(model_name)
        if isinstance(model_cfg, dict):
            model_cfg.pop(KEY, None)
        return model_cfg

    return get_model_config


def _applying_section(lookup: Callable) -> Callable[[Callable], Callable]:
    from open_clip.transform import merge_preprocess_dict

    def wrapper(create: Callable) -> Callable:
        signature = inspect.signature(create)

        @functools.wraps(create)
        def create_model(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            own = registered_preprocess(lookup, bound.arguments["model_name"], bound.arguments.get("pretrained"))
            if own:
                forced = bound.arguments.get("force_preprocess_cfg") or {}
                bound.arguments["force_preprocess_cfg"] = merge_preprocess_dict(own, forced)
            return create(*bound.args, **bound.kwargs)

        return create_model

    return wrapper


def apply() -> None:
    import open_clip
    import open_clip.factory as factory

    patch = __name__.rpartition(".")[2]
    wrap(factory, "get_model_config", _dropping_section, patch=patch)
    lookup = original_of(factory, "get_model_config", patch)
    wrap(factory, "create_model", _applying_section(lookup), patch=patch, also=(open_clip,))
