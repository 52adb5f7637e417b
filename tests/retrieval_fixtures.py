"""A tiny retrieval index built in-process, for the conlip-retrieval tests.

A random-init conlip-tiny checkpoint (seeded, so two seeds are two different models) embeds the 30
coloured shapes of ``shapes_data`` in well under a second; no training and no subprocess.
"""
from dataclasses import dataclass
from pathlib import Path

import torch

import shapes_data


@dataclass
class TinyIndex:
    """A finished index and what made it."""

    path: Path
    checkpoint: Path
    data: dict
    encoder: object

    @property
    def model(self) -> str:
        return "conlip-tiny"


def tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """A random conlip-tiny saved as open_clip_train saves a checkpoint; another seed, another model."""
    from conlip_plugin.activation import activate

    activate()
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.create_model("conlip-tiny")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 1, "state_dict": model.state_dict()}, path)
    return path


def build_tiny_index(root: Path, seed: int = 0, source: str = "csv") -> TinyIndex:
    """Write the shapes set and a checkpoint under ``root`` and index the set (``source``: "csv" for
    the PNG files, "shard" for the webdataset shard) into ``root/index``."""
    from conlip_plugin.retrieval.encoder import Encoder
    from conlip_plugin.retrieval.sources import gallery_items
    from conlip_plugin.retrieval.store import IndexWriter

    data = shapes_data.write(root / "data")
    checkpoint = tiny_checkpoint(root / "tiny.pt", seed)
    encoder = Encoder("conlip-tiny", str(checkpoint), "cpu")
    items = (gallery_items(str(data["csv"]), "filepath", "title", ",") if source == "csv"
             else gallery_items(str(data["shard"])))
    gallery = str(data["csv"] if source == "csv" else data["shard"])
    IndexWriter(root / "index", encoder, gallery, workers=0, progress=False).run(items)
    return TinyIndex(root / "index", checkpoint, data, encoder)
