"""One chunk of gallery items to its embeddings: images decoded in loader workers and embedded by the
image tower, captions by the text tower. A failure to read an item is kept with its reason, not raised.

``IndexWriter`` takes any ``ChunkEmbedder``; ``ImageEmbedder`` is the model's, and the benchmark's
synthetic vectors are another, so that it measures the store's real path at sizes no model could embed.
"""
from dataclasses import dataclass
from typing import List, Protocol, Tuple, runtime_checkable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from conlip_plugin.retrieval.encoder import Encoder, ModelIdentity, UnreadableImage, decode_image
from conlip_plugin.retrieval.sources import Item


@dataclass
class EmbeddedChunk:
    """A chunk's embeddings: ``rows`` are the positions (in the chunk, ascending) of the items embedded,
    ``images[j]`` item ``rows[j]``'s, ``captions[i]`` that of item ``rows[caption_rows[i]]``'s caption;
    ``skipped`` the positions left out, each with its reason."""

    rows: List[int]
    images: np.ndarray
    captions: np.ndarray
    caption_rows: np.ndarray
    skipped: List[Tuple[int, str]]


@runtime_checkable
class ChunkEmbedder(Protocol):
    """What an index records of its model (identity, embedding width, preprocessing), and the chunk's
    embeddings; ``progress(n)`` is called as items are done."""

    identity: ModelIdentity
    embed_dim: int
    preprocess_cfg: dict

    def embed_chunk(self, items: List[Item], progress) -> EmbeddedChunk:
        ...


class _Decoded(Dataset):
    """A chunk's items decoded and preprocessed in loader workers; a failure is returned, not raised."""

    def __init__(self, items: List[Item], preprocess):
        self.items, self.preprocess = items, preprocess

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        item = self.items[i]
        try:
            return i, decode_image(item.read_bytes(), self.preprocess), None
        except (UnreadableImage, OSError) as err:
            return i, None, str(err)
        except MemoryError:  # one image the decoder cannot hold must not stop, on every rerun, the whole index
            return i, None, "out of memory while decoding it"


def _collate(batch):
    good = [(i, t) for i, t, _ in batch if t is not None]
    bad = [(i, reason) for i, _, reason in batch if reason is not None]
    tensors = torch.stack([t for _, t in good]) if good else None
    return [i for i, _ in good], tensors, bad


class ImageEmbedder:
    """An ``Encoder``'s towers over a chunk, in batches of ``batch_size``, decoding in ``workers``."""

    def __init__(self, encoder: Encoder, batch_size: int, workers: int):
        self.encoder, self.batch_size, self.workers = encoder, batch_size, workers
        self.identity, self.embed_dim = encoder.identity, encoder.embed_dim
        self.preprocess_cfg = encoder.preprocess_cfg

    def embed_chunk(self, items: List[Item], progress) -> EmbeddedChunk:
        encoder = self.encoder
        loader = DataLoader(_Decoded(items, encoder.preprocess), batch_size=self.batch_size,
                            num_workers=self.workers, collate_fn=_collate, pin_memory=encoder.device.type == "cuda")
        rows, vectors, skipped = [], [], []
        for positions, tensors, bad in loader:
            if tensors is not None:
                rows.extend(positions)
                vectors.append(encoder.images(tensors).half().numpy())
            skipped.extend(bad)
            progress(len(positions) + len(bad))
        kept = sorted(range(len(rows)), key=rows.__getitem__)
        rows = [rows[j] for j in kept]
        empty = np.zeros((0, self.embed_dim), np.float16)
        images = np.concatenate(vectors)[kept] if vectors else empty
        captioned = [j for j, r in enumerate(rows) if items[r].caption]
        captions = [items[rows[j]].caption for j in captioned]
        text = [encoder.texts(captions[s:s + self.batch_size]).half().numpy()
                for s in range(0, len(captions), self.batch_size)]
        return EmbeddedChunk(rows, images, np.concatenate(text) if text else empty,
                             np.asarray(captioned, dtype=np.int64), sorted(skipped))
