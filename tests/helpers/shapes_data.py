"""A tiny real image-caption set made on the spot: coloured shapes, captioned by colour and shape.

Used by the tests (the ``caption_data`` fixture). Writes PNG files, a CSV (``filepath``, ``title``)
and one webdataset shard with a ``sizes.json`` beside it.

    python tests/helpers/shapes_data.py OUT_DIR [--size 64]
"""
import argparse
import csv
import io
import json
import tarfile
from pathlib import Path
from typing import Dict, List, Tuple

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40),
           "purple": (140, 50, 170), "orange": (240, 140, 20)}
SHAPES = ("square", "circle", "triangle", "bar", "cross")


def draw(colour: str, shape: str, size: int = 64) -> Image.Image:
    img = Image.new("RGB", (size, size), (245, 245, 245))
    d = ImageDraw.Draw(img)
    c, m = COLOURS[colour], size // 5
    if shape == "square":
        d.rectangle([m, m, size - m, size - m], fill=c)
    elif shape == "circle":
        d.ellipse([m, m, size - m, size - m], fill=c)
    elif shape == "triangle":
        d.polygon([(size // 2, m), (m, size - m), (size - m, size - m)], fill=c)
    elif shape == "bar":
        d.rectangle([m, size // 2 - m // 2, size - m, size // 2 + m // 2], fill=c)
    else:
        d.rectangle([size // 2 - m // 2, m, size // 2 + m // 2, size - m], fill=c)
        d.rectangle([m, size // 2 - m // 2, size - m, size // 2 + m // 2], fill=c)
    return img


def samples(size: int = 64) -> List[Tuple[Image.Image, str]]:
    return [(draw(c, s, size), f"a {c} {s} on a white background") for c in COLOURS for s in SHAPES]


def write(root: Path, size: int = 64) -> Dict[str, object]:
    """Write the set under ``root``; returns the paths of the CSV and the shard, and the count."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    rows = []
    shard = root / "shard-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for i, (img, caption) in enumerate(samples(size)):
            path = root / "images" / f"{i:04d}.png"
            img.save(path)
            rows.append({"filepath": str(path), "title": caption})
            for ext, payload in (("png", path.read_bytes()), ("txt", caption.encode())):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    (root / "sizes.json").write_text(json.dumps({shard.name: len(rows)}))
    with open(root / "train.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["filepath", "title"])
        writer.writeheader()
        writer.writerows(rows)
    return {"root": root, "csv": root / "train.csv", "shard": shard, "count": len(rows)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", type=int, default=64)
    a = parser.parse_args()
    info = write(a.out, a.size)
    print(f"wrote {info['count']} pairs: {info['csv']} and {info['shard']}")
