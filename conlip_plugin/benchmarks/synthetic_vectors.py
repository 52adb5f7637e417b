"""Synthetic unit vectors with neighbourhood structure, for the benchmarks: a Gaussian mixture of
uniformly random centres (the same at every gallery size), and a ``ChunkEmbedder`` that gives a chunk
of items such vectors instead of embedding their images, so that the store's real path (chunks,
metadata, assembly, faiss) is measured at sizes no model could embed on a CPU.
"""
from typing import Iterator, List, Tuple

import numpy as np

from conlip_plugin.retrieval.embedding import EmbeddedChunk
from conlip_plugin.retrieval.encoder import ModelIdentity
from conlip_plugin.retrieval.sources import Item

DRAW_BLOCK = 1 << 16


def mixture_centres(count: int, dim: int, seed: int) -> np.ndarray:
    """``count`` uniformly random unit vectors: the mixture's centres, the same for every gallery size."""
    centres = np.random.default_rng([seed, 0]).standard_normal((count, dim), dtype=np.float32)
    return centres / np.linalg.norm(centres, axis=1, keepdims=True)


def draw_mixture(count: int, centres: np.ndarray, noise: float, rng: np.random.Generator,
                 dtype: type) -> Tuple[np.ndarray, np.ndarray]:
    """``count`` unit rows and their centres: a uniformly chosen centre plus isotropic Gaussian noise of
    per-coordinate std ``noise/√dim`` (a noise vector of norm ≈ ``noise``), normalised to unit length.

    Uniform random vectors in 256 dimensions are all about equally far apart, so their "nearest"
    neighbours mean nothing; the centres give neighbourhoods, the noise makes them overlap."""
    dim = centres.shape[1]
    out = np.empty((count, dim), dtype=dtype)
    labels = np.empty(count, dtype=np.int64)
    for start in range(0, count, DRAW_BLOCK):
        rows = min(DRAW_BLOCK, count - start)
        label = rng.integers(len(centres), size=rows)
        block = centres[label] + np.float32(noise / np.sqrt(dim)) * rng.standard_normal((rows, dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start:start + rows], labels[start:start + rows] = block, label
    return out, labels


def synthetic_gallery(n: int, dim: int, centres: int, noise: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """The gallery as an index stores it: float16 unit rows (and each row's centre)."""
    return draw_mixture(n, mixture_centres(centres, dim, seed), noise, np.random.default_rng([seed, 1]), np.float16)


def synthetic_queries(count: int, dim: int, centres: int, noise: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Held-out queries from the gallery's mixture, float32 as the encoder gives them; the same set at
    every gallery size."""
    return draw_mixture(count, mixture_centres(centres, dim, seed), noise, np.random.default_rng([seed, 2]),
                        np.float32)


def describe_mixture(centres: int, noise: float, dim: int, seed: int) -> str:
    return (f"Gaussian mixture: {centres} centres (uniformly random unit vectors, seed {seed}); each vector is "
            f"a uniformly chosen centre plus isotropic Gaussian noise of per-coordinate std {noise}/sqrt({dim}) "
            f"(noise norm ~{noise}), normalised to unit length; gallery float16, queries float32, "
            f"queries drawn separately (not in the gallery)")


def synthetic_items(n: int) -> Iterator[Item]:
    """``n`` gallery items as a folder of files would list them (no file exists: the embedder never reads
    them), numbered in their keys."""
    return (Item(key=f"{i:09d}.jpg", path=f"/gallery/{i // 10_000:05d}/{i:09d}.jpg") for i in range(n))


class SyntheticEmbedder:
    """Mixture vectors for a chunk of ``synthetic_items``, drawn from the chunk's first item number, so
    that a chunk's vectors do not depend on which rank or run makes them; no captions."""

    def __init__(self, dim: int, centres: int, noise: float, seed: int):
        self.identity, self.embed_dim, self.preprocess_cfg = ModelIdentity("synthetic", None, None), dim, {}
        self.noise, self.seed = noise, seed
        self.centres = mixture_centres(centres, dim, seed)

    def embed_chunk(self, items: List[Item], progress) -> EmbeddedChunk:
        first = int(items[0].key.split(".")[0])
        images, _ = draw_mixture(len(items), self.centres, self.noise, np.random.default_rng([self.seed, 1, first]),
                                 np.float16)
        progress(len(items))
        return EmbeddedChunk(list(range(len(items))), images, np.zeros((0, self.embed_dim), np.float16),
                             np.zeros(0, np.int64), [])
