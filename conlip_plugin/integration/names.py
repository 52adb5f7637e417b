"""Model names and config paths as the plugin resolves them for open_clip.

``BASE+conlip[-cl|-mlm|-mim|-vanilla]`` and ``BASE+conmlm``, ``+conmim``, ``+conmlm-conmim``,
``+mlm-mim`` put ConLIP's pieces onto any registered open_clip config without a JSON file to copy
(docs/recipes.md); ``${ENV}``, ``~`` and ``pkg://package/sub/path`` in a ConLIP config's path-valued
keys become local paths, so nothing is fetched from a hub. ``patches/config_paths.py`` puts both
into ``open_clip.factory.get_model_config``.
"""
import importlib.util
import os
import re
from pathlib import Path
from typing import Callable, Optional

_PKG = re.compile(r"^pkg://([A-Za-z_][\w.]*)(/.*)?$")
_ENV = re.compile(r"\$\{(\w+)\}|\$(\w+)")

WRAP_SEPARATOR = "+"
# ``BASE+SUFFIX`` model names: ConLIP's pieces on any open_clip model config, one switch each.
WRAP_SUFFIXES = {
    "conlip-cl": {"variant": "cl"},
    "conlip-mlm": {"variant": "conlip", "conmim": False},
    "conlip-mim": {"variant": "conlip", "conmlm": False},
    "conlip": {"variant": "conlip"},
    "conlip-vanilla": {"variant": "vanilla"},
    # The recipe's own instance loss (CLIP, SigLIP) plus token losses: no momentum encoders, no queues.
    "conmlm": {"variant": "conlip", "conmim": False, "instance_loss": "recipe"},
    "conmim": {"variant": "conlip", "conmlm": False, "instance_loss": "recipe"},
    "conmlm-conmim": {"variant": "conlip", "instance_loss": "recipe"},
    "mlm-mim": {"variant": "vanilla", "instance_loss": "recipe"},
}


def wrapped_config(model_name: str, lookup: Callable[[str], Optional[dict]]) -> Optional[dict]:
    """The config for ``BASE+SUFFIX`` (a key of ``WRAP_SUFFIXES``): BASE's towers plus a
    ``conlip_cfg`` with the paper's defaults; None if the name has no such suffix."""
    base_name, sep, suffix = model_name.rpartition(WRAP_SEPARATOR)
    if not sep or suffix not in WRAP_SUFFIXES:
        return None
    base = lookup(base_name)
    if base is None:
        raise KeyError(f"{model_name}: base model config {base_name!r} is not registered with open_clip; "
                       f"pick one of open_clip.list_models(), or register yours with CONLIP_MODEL_CONFIGS.")
    if is_conlip_config(base):
        raise ValueError(f"{model_name}: {base_name!r} is already a ConLIP config; use it directly.")
    cfg = dict(base)
    if "hf_model_name" not in cfg.get("text_cfg", {}):
        # ConLIP reads token states from open_clip's text transformer as a module of its own.
        cfg["custom_text"] = True
    cfg["conlip_cfg"] = dict(WRAP_SUFFIXES[suffix])
    return cfg


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"pkg://{name}: package {name!r} is not installed (pip install it).")
    return Path(list(spec.submodule_search_locations)[0])


def resolve_path(value: str, where: str) -> str:
    """Expand ``pkg://package/sub/path`` and ``${ENV}`` in a config string, refusing unset variables."""
    match = _PKG.match(value)
    if match:
        return str(_package_dir(match.group(1)) / (match.group(2) or "/").lstrip("/"))

    def env(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name not in os.environ:
            raise KeyError(
                f"{where} is {value!r}, but the environment variable {name} is not set: set it to the "
                f"local path (nothing is fetched from a hub), or copy the config and write the path in."
            )
        return os.environ[name]

    return os.path.expanduser(_ENV.sub(env, value))


def resolve_config_paths(model_cfg: dict, model_name: str = "") -> dict:
    """Resolve placeholders in the path-valued keys of a ConLIP model config, in place."""
    path_keys = (("text_cfg", "hf_model_name", True), ("text_cfg", "hf_tokenizer_name", True),
                 ("conlip_cfg", "image_weights", False))
    for section, key, required in path_keys:
        value = model_cfg.get(section, {}).get(key)
        if not isinstance(value, str):
            continue
        try:
            model_cfg[section][key] = resolve_path(value, f"{model_name} {section}.{key}".strip())
        except KeyError:
            # Image weights are read only when no full checkpoint follows; the loader names the gap.
            if required:
                raise
    return model_cfg


def is_conlip_config(model_cfg: Optional[dict]) -> bool:
    return isinstance(model_cfg, dict) and "conlip_cfg" in model_cfg

