"""The model that embeds a gallery and its queries: any open_clip model, with its identity.

The identity (model name, weights, and a sha256 of the weight files) is stored in the index, so a
search embeds its queries with the very model that embedded the gallery, and a query from another
model is refused with both names instead of returning meaningless neighbours.
"""
import hashlib
import io
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional

import torch
from PIL import Image, UnidentifiedImageError

from conlip_plugin.integration.activation import activate

HASH_BLOCK = 1 << 22
# open_clip resizes an image's short side to the model's input, so a 1 x 20,000,000 strip would become
# gigabytes; beyond this ratio the centre crop shows almost nothing of the image anyway.
MAX_ASPECT_RATIO = 200


class UnreadableImage(ValueError):
    """An item's bytes are not an image PIL can decode (the message says why)."""


class ExtremeAspectRatio(UnreadableImage):
    """An image whose long side is over MAX_ASPECT_RATIO times its short side: readable, but not worth
    embedding, and a client must be told to crop it rather than to send another format. Still an
    UnreadableImage, so the indexer skips it with this reason."""


class ImageTooLarge(ValueError):
    """A query image with more pixels than the caller allows (``max_pixels``), refused before its pixels
    are decoded, since a small compressed file can decode to gigabytes. ``by_pil``: PIL's own limit
    refused it, which no caller's limit lifts."""

    def __init__(self, reason: str, max_pixels: int, by_pil: bool = False):
        super().__init__(reason)
        self.max_pixels, self.by_pil = max_pixels, by_pil


def _sha256(paths: List[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(HASH_BLOCK):
                digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelIdentity:
    """Which weights embedded an index. ``fingerprint`` is the sha256 of the weight files (None for a
    random-init model or a pretrained tag), so a checkpoint that moved is still recognised."""

    model: str
    pretrained: Optional[str]
    fingerprint: Optional[str]

    @classmethod
    def of(cls, model: str, pretrained: Optional[str]) -> "ModelIdentity":
        files: List[Path] = []
        if model.startswith("local-dir:"):
            folder = Path(model[len("local-dir:"):])
            model = "local-dir:" + str(folder.resolve())
            files = sorted(p for p in folder.iterdir() if p.name.startswith("open_clip_")) if folder.is_dir() else []
        if pretrained and Path(pretrained).is_file():
            pretrained = str(Path(pretrained).resolve())
            files.append(Path(pretrained))
        return cls(model, pretrained or None, _sha256(files) if files else None)

    def describe(self) -> str:
        weights = self.pretrained or ("the folder's weights" if self.model.startswith("local-dir:")
                                      else "weights" if self.fingerprint else "random init")
        short = f", sha256 {self.fingerprint[:12]}" if self.fingerprint else ""
        return f"{self.model} ({weights}{short})"

    def same_model(self, other: "ModelIdentity") -> bool:
        """The same architecture with the same weights: the same config name (for exported folders, whose
        files include the config, the same files) and the same weight files wherever they now are."""
        both_folders = self.model.startswith("local-dir:") and other.model.startswith("local-dir:")
        if not both_folders and self.model != other.model:
            return False
        if self.fingerprint or other.fingerprint:
            return self.fingerprint == other.fingerprint
        return self.pretrained == other.pretrained

    def as_dict(self) -> dict:
        return asdict(self)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _unreadable(err: Exception) -> UnreadableImage:
    reason = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(err))
    return UnreadableImage(f"{type(err).__name__}: {reason}")


def decode_image(data: bytes, preprocess, max_pixels: Optional[int] = None) -> torch.Tensor:
    """Bytes to the model's input tensor; anything PIL cannot read raises UnreadableImage, and an image
    over ``max_pixels`` raises ImageTooLarge before its pixels are decoded; so does one PIL refuses itself
    (over twice ``Image.MAX_IMAGE_PIXELS``; between once and twice it only warns)."""
    if not data:
        raise UnreadableImage("empty file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageTooLarge(f"{width}x{height} pixels ({width * height / 1e6:.1f} megapixels), over the "
                                    f"limit of {max_pixels / 1e6:g} megapixels", max_pixels)
            if max(width, height) > MAX_ASPECT_RATIO * max(1, min(width, height)):
                raise ExtremeAspectRatio(f"{width}x{height} pixels, an aspect ratio over {MAX_ASPECT_RATIO}:1; "
                                         f"resized to the model's input it would take gigabytes")
            img.load()
            return preprocess(img.convert("RGB"))
    except (ImageTooLarge, UnreadableImage):
        raise
    except Image.DecompressionBombError as err:  # PIL's own check, in Image.open or in a format's decoder
        if max_pixels is None:
            raise _unreadable(err) from err
        raise ImageTooLarge(f"over PIL's own limit ({err})", max_pixels, by_pil=True) from err
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise _unreadable(err) from err


class Encoder:
    """An open_clip model in eval mode with its preprocessing and tokenizer; outputs unit-norm float32
    rows on the CPU. On a GPU the towers run under fp16 autocast (the index stores float16 anyway)."""

    def __init__(self, model: str, pretrained: Optional[str] = None, device: Optional[str] = None,
                 identity: Optional[ModelIdentity] = None):
        """``identity``: ``ModelIdentity.of(model, pretrained)`` when the caller already has it (hashing
        a multi-gigabyte checkpoint takes seconds)."""
        activate()
        import open_clip

        self.identity = identity or ModelIdentity.of(model, pretrained)
        self.device = torch.device(device or default_device())
        name = self.identity.model
        try:
            self.model, _, self.preprocess = open_clip.create_model_and_transforms(
                name, pretrained=self.identity.pretrained, device=self.device)
        except (RuntimeError, FileNotFoundError, ValueError) as err:
            raise SystemExit(f"error: cannot load model {self.identity.describe()}: {str(err).rstrip('.')}. Check "
                             f"--model (a registered name, BASE+conlip, or local-dir:FOLDER) and --pretrained (the "
                             f"checkpoint file it was trained as; a pretrained tag needs its download, so offline "
                             f"pass the downloaded file's path).") from err
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(name)
        self.preprocess_cfg = dict(getattr(self.model.visual, "preprocess_cfg", {}) or {})
        with torch.no_grad():
            self.embed_dim = int(self.texts(["a"]).shape[1])

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.float16, enabled=self.device.type == "cuda")

    @torch.no_grad()
    def images(self, batch: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            out = self.model.encode_image(batch.to(self.device, non_blocking=True))
        return torch.nn.functional.normalize(out.float(), dim=-1).cpu()

    @torch.no_grad()
    def texts(self, captions: List[str]) -> torch.Tensor:
        with self._autocast():
            out = self.model.encode_text(self.tokenizer(captions).to(self.device))
        return torch.nn.functional.normalize(out.float(), dim=-1).cpu()

    def image_bytes(self, data: bytes, max_pixels: Optional[int] = None) -> torch.Tensor:
        """One query image, as bytes, to its embedding (UnreadableImage if it is not one, ImageTooLarge
        if it has more than ``max_pixels``)."""
        return self.images(decode_image(data, self.preprocess, max_pixels).unsqueeze(0))[0]


def loader_workers(requested: Optional[int]) -> int:
    """Decoding workers: as asked, else all but one core (at most 8)."""
    if requested is not None:
        return requested
    return max(0, min(8, (os.cpu_count() or 1) - 1))
