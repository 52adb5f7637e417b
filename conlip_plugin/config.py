"""The ``conlip_cfg`` section of a model config: every switch of the spec's Variants table."""
import importlib.util
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Optional

VARIANTS = ("conlip", "vanilla", "cl")
INSTANCE_LOSSES = ("dcl", "infonce")
_PKG = re.compile(r"^pkg://([A-Za-z_][\w.]*)(/.*)?$")
_ENV = re.compile(r"\$\{(\w+)\}|\$(\w+)")


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
        need(self.variant == "cl" or self.conmlm or self.conmim,
             "variant 'conlip'/'vanilla' needs conmlm or conmim (use variant 'cl' for neither)")

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
        prefix = "con" if self.variant == "conlip" else ""
        return {
            "instance": f"{self.instance_loss}_loss",
            "mlm": f"{prefix}mlm_loss",
            "mim": f"{prefix}mim_loss",
        }


WRAP_SEPARATOR = "+"
# ``BASE+SUFFIX`` model names: ConLIP's pieces on any open_clip model config, one switch each.
WRAP_SUFFIXES = {
    "conlip-cl": {"variant": "cl"},
    "conlip-mlm": {"variant": "conlip", "conmim": False},
    "conlip-mim": {"variant": "conlip", "conmlm": False},
    "conlip": {"variant": "conlip"},
    "conlip-vanilla": {"variant": "vanilla"},
}


def wrapped_config(model_name: str, lookup: Callable[[str], Optional[dict]]) -> Optional[dict]:
    """The config for ``BASE+conlip[-cl|-mlm|-mim|-vanilla]``: BASE's towers plus a ``conlip_cfg``
    with the paper's defaults; None if the name has no such suffix."""
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

