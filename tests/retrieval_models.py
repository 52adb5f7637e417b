"""The three kinds of model the retrieval tool serves, tiny and random: a ConLIP training checkpoint,
its exported ``local-dir:`` folder, and a plain open_clip model (its own ViT and text transformer) as a
``local-dir:`` folder."""
import json
from pathlib import Path
from typing import Dict, Tuple

import torch

from tiny_configs import native_base


def conlip_checkpoint(path: Path, seed: int = 0) -> Path:
    """A conlip-tiny checkpoint as open_clip_train writes one (``state_dict`` under ``epoch``)."""
    from conlip_plugin.activation import activate

    activate()
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.create_model("conlip-tiny")
    torch.save({"epoch": 1, "state_dict": model.state_dict()}, path)
    return path


def plain_open_clip_folder(folder: Path, seed: int = 0) -> Path:
    """open_clip's own architecture in the ``local-dir:`` layout open_clip reads with no plugin."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    cfg = native_base()
    model = open_clip.CLIP(**cfg)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {
        "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}))
    return folder


def all_kinds(root: Path) -> Dict[str, Tuple[str, str]]:
    """kind -> (--model, --pretrained or '') for each kind, written under ``root``."""
    from conlip_plugin.export import export_inference_model

    root.mkdir(parents=True, exist_ok=True)
    ckpt = conlip_checkpoint(root / "conlip-tiny.pt")
    exported = export_inference_model("conlip-tiny", str(ckpt), str(root / "exported"))
    plain = plain_open_clip_folder(root / "plain")
    return {"conlip checkpoint": ("conlip-tiny", str(ckpt)), "exported folder": (f"local-dir:{exported}", ""),
            "plain open_clip": (f"local-dir:{plain}", "")}
