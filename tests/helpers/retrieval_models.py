"""Models and indexes for the conlip-retrieval tests, tiny and random: the five kinds of model the
tool serves (a ConLIP training checkpoint, ``BASE+conlip`` and ``BASE+conmlm-conmim`` training
checkpoints, a ConLIP checkpoint's exported ``local-dir:`` folder, and a plain open_clip model, its
own ViT and text transformer, as a ``local-dir:`` folder), and a finished index of the 30 coloured shapes of ``shapes_data`` built
in-process in about a second."""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Tuple

import torch

import shapes_data
from tiny_configs import native_base


def conlip_checkpoint(path: Path, seed: int = 0) -> Path:
    """A conlip-tiny checkpoint as open_clip_train writes one (``state_dict`` under ``epoch``); another
    seed, another model."""
    from conlip_plugin.integration.activation import activate

    activate()
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.create_model("conlip-tiny")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 1, "state_dict": model.state_dict()}, path)
    return path


def wrapped_base_checkpoint(root: Path, seed: int = 0, suffix: str = "conlip") -> str:
    """``BASE+SUFFIX`` on a base config registered from ``root/configs`` (as ``CONLIP_MODEL_CONFIGS``
    does for the CLI), saved as open_clip_train saves it; returns the model name."""
    from conlip_plugin.integration.activation import activate

    activate()
    import open_clip

    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "configs" / "rettest-native.json").write_text(json.dumps(native_base()))
    open_clip.add_model_config(root / "configs")
    torch.manual_seed(seed)
    name = f"rettest-native+{suffix}"
    model = open_clip.create_model(name)
    torch.save({"epoch": 1, "state_dict": model.state_dict()}, root / f"{name}.pt")
    return name


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
    wrapped = wrapped_base_checkpoint(root)
    mixed = wrapped_base_checkpoint(root, seed=1, suffix="conmlm-conmim")
    plain = plain_open_clip_folder(root / "plain")
    return {"conlip checkpoint": ("conlip-tiny", str(ckpt)), "exported folder": (f"local-dir:{exported}", ""),
            "BASE+conlip checkpoint": (wrapped, str(root / f"{wrapped}.pt")),
            "BASE+conmlm-conmim checkpoint": (mixed, str(root / f"{mixed}.pt")),
            "plain open_clip": (f"local-dir:{plain}", "")}


@dataclass
class TinyIndex:
    """A finished index and what made it."""

    path: Path
    checkpoint: Path
    data: dict
    encoder: object


def build_tiny_index(root: Path) -> TinyIndex:
    """Write the shapes set and a conlip-tiny checkpoint under ``root`` and index the set's PNG files
    (through its CSV) into ``root/index``."""
    from conlip_plugin.retrieval.encoder import Encoder
    from conlip_plugin.retrieval.sources import gallery_items
    from conlip_plugin.retrieval.store import IndexWriter

    data = shapes_data.write(root / "data")
    checkpoint = conlip_checkpoint(root / "tiny.pt")
    encoder = Encoder("conlip-tiny", str(checkpoint), "cpu")
    items = gallery_items(str(data["csv"]), "filepath", "title", ",")
    IndexWriter(root / "index", encoder, str(data["csv"]), workers=0, progress=False).run(items)
    return TinyIndex(root / "index", checkpoint, data, encoder)
