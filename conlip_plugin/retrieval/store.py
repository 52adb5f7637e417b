"""The on-disk index: float16 embeddings, item metadata, the model's identity, and a faiss index for
large galleries. Built in chunks, each saved atomically, so a killed run resumes from the last whole
chunk; the manifest says ``complete`` only once every file is in place.

    INDEX/manifest.json       model identity and preprocessing, source, counts, search settings
    INDEX/items.jsonl         one record per indexed item (key, path or shard range, caption)
    INDEX/images.npy          float16 [items, dim], unit rows, in item order
    INDEX/captions.npy        float16 [captioned items, dim]; captions.rows.npy: their item rows
    INDEX/skipped.jsonl       items left out, each with the reason
    INDEX/{images,captions}.faiss   approximate indexes (large galleries only)
    INDEX/parts/              finished chunks of an unfinished run (removed when it completes)
"""
import dataclasses
import hashlib
import io
import itertools
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, NoReturn, Optional, Sequence, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..data.files import fail, listing, write_atomic
from .encoder import Encoder, ModelIdentity, UnreadableImage, decode_image
from .extras import require
from .nearest import (EXACT_BELOW, RECALL_K, TARGET_RECALL, ApproximateIndex, build_approximate,
                      exact_search)
from .sources import Item

FORMAT = 1
T = TypeVar("T")
MODALITIES = ("images", "captions")
RESULT_FIELDS = ("key", "path", "shard", "caption")
_log = logging.getLogger("conlip_plugin.retrieval")


def _save_npy(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    write_atomic(path, buffer.getvalue())


def _write_json(path: Path, value: object) -> None:
    write_atomic(path, (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode())


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


def _items_digest(items: List[Item]) -> str:
    """sha256 of a chunk's items as the source lists them (skipped ones too): a resumed run checks that
    its source still lists, chunk by chunk, what the stopped run embedded."""
    listed = json.dumps([dataclasses.astuple(item) for item in items], ensure_ascii=False)
    return hashlib.sha256(listed.encode()).hexdigest()


def _collate(batch):
    good = [(i, t) for i, t, _ in batch if t is not None]
    bad = [(i, reason) for i, _, reason in batch if reason is not None]
    tensors = torch.stack([t for _, t in good]) if good else None
    return [i for i, _ in good], tensors, bad


@dataclass
class BuildSettings:
    """What an index run was asked for; a resumed run must ask for the same."""

    source: str
    model: dict
    chunk_size: int

    def as_dict(self) -> dict:
        return {"source": self.source, "model": self.model, "chunk_size": self.chunk_size}


class IndexWriter:
    """Embeds items chunk by chunk into ``out``; ``run`` resumes a killed build of the same settings."""

    def __init__(self, out: Path, encoder: Encoder, source: str, chunk_size: int = 4096, batch_size: int = 64,
                 workers: int = 0, exact_below: int = EXACT_BELOW, target_recall: float = TARGET_RECALL,
                 progress: bool = True):
        self.out, self.encoder = Path(out), encoder
        self.settings = BuildSettings(source, encoder.identity.as_dict(), chunk_size)
        self.batch_size, self.workers, self.progress = batch_size, workers, progress
        self.exact_below, self.target_recall = exact_below, target_recall
        self.parts = self.out / "parts"

    def _start(self) -> int:
        """Chunks already finished (0 for a new index); refuses an index of other settings, unless its run
        stopped before finishing a chunk (then this run starts it over)."""
        manifest_path = self.out / "manifest.json"
        if manifest_path.is_file():
            manifest = json.loads(manifest_path.read_text())
            unstarted = not manifest.get("complete") and not (self.parts / f"{0:06d}.npz").is_file()
            if manifest.get("build") != self.settings.as_dict() and not unstarted:
                old = manifest.get("build", {})
                fail(f"{self.out} holds an index of {old.get('source')!r} with "
                     f"{ModelIdentity(**old['model']).describe() if old.get('model') else 'another model'}, "
                     f"chunk size {old.get('chunk_size')}; this run asks for {self.settings.source!r} with "
                     f"{self.encoder.identity.describe()}, chunk size {self.settings.chunk_size}. "
                     f"Pass another --out, or delete {self.out} to rebuild.")
            if manifest.get("complete"):
                return -1
        elif self.out.exists() and any(self.out.iterdir()):
            fail(f"{self.out} exists and is not an index (no manifest.json); pass an empty or new --out.")
        self.parts.mkdir(parents=True, exist_ok=True)
        _write_json(manifest_path, {"format": FORMAT, "complete": False, "build": self.settings.as_dict()})
        return sum(1 for _ in itertools.takewhile(lambda n: (self.parts / f"{n:06d}.npz").is_file(),
                                                  itertools.count()))

    def _embed_chunk(self, number: int, items: List[Item], bar) -> None:
        loader = DataLoader(_Decoded(items, self.encoder.preprocess), batch_size=self.batch_size,
                            num_workers=self.workers, collate_fn=_collate,
                            pin_memory=self.encoder.device.type == "cuda")
        rows, vectors, skipped = [], [], []
        for positions, tensors, bad in loader:
            if tensors is not None:
                rows.extend(positions)
                vectors.append(self.encoder.images(tensors).half().numpy())
            skipped.extend(bad)
            bar.update(len(positions) + len(bad))
        kept = sorted(range(len(rows)), key=rows.__getitem__)
        rows = [rows[j] for j in kept]
        images = np.concatenate(vectors)[kept] if vectors else np.zeros((0, self.encoder.embed_dim), np.float16)
        captioned = [j for j, r in enumerate(rows) if items[r].caption]
        captions = [items[rows[j]].caption for j in captioned]
        text = [self.encoder.texts(captions[s:s + self.batch_size]).half().numpy()
                for s in range(0, len(captions), self.batch_size)]
        records = [items[r].record() for r in rows]
        reasons = [{"key": items[i].key, "reason": reason} for i, reason in sorted(skipped)]
        buffer = io.BytesIO()
        np.savez(buffer, images=images,
                 captions=np.concatenate(text) if text else np.zeros((0, self.encoder.embed_dim), np.float16),
                 caption_rows=np.asarray(captioned, dtype=np.int64),
                 records=np.frombuffer(json.dumps(records).encode(), dtype=np.uint8),
                 items_digest=np.frombuffer(_items_digest(items).encode(), dtype=np.uint8),
                 skipped=np.frombuffer(json.dumps(reasons).encode(), dtype=np.uint8))
        write_atomic(self.parts / f"{number:06d}.npz", buffer.getvalue())
        for entry in reasons:
            _log.warning("skipped %s: %s", entry["key"], entry["reason"])

    def _check_unchanged(self, number: int, items: List[Item]) -> None:
        """Refuse to resume when finished chunk ``number`` no longer lists the same items."""
        with np.load(self.parts / f"{number:06d}.npz") as part:
            digest = part["items_digest"].tobytes().decode() if "items_digest" in part.files else None
        if digest is None:
            fail(f"{self.out} is a stopped run of an older conlip-plugin, whose chunks cannot be checked against "
                 f"the source; delete {self.out} and index again.")
        size = self.settings.chunk_size
        if digest != _items_digest(items):
            where = f"from {items[0].key!r}" if items else "past the end of the source"
            fail(f"{self.settings.source!r} no longer lists the items the stopped run embedded: chunk {number} "
                 f"(items {number * size} to {(number + 1) * size - 1}, {where}) differs; the source changed. "
                 f"Delete {self.out} and index again.")

    def run(self, items: Iterable[Item], total: Optional[int] = None) -> dict:
        """Embed every item not yet done, then write the final files; returns the manifest."""
        from tqdm import tqdm

        done = self._start()
        if done < 0:
            shutil.rmtree(self.parts, ignore_errors=True)
            _log.info("%s is already complete; nothing to do", self.out)
            return json.loads((self.out / "manifest.json").read_text())
        size = self.settings.chunk_size
        items = iter(items)
        for number in range(done):
            self._check_unchanged(number, list(itertools.islice(items, size)))
        skipped_before = done * size
        bar = tqdm(total=total, initial=skipped_before, unit="img", desc="embedding", disable=not self.progress)
        if skipped_before:
            _log.info("resuming %s: %d chunk(s) of %d items were finished", self.out, done, size)
        number = done
        while chunk := list(itertools.islice(items, size)):
            self._embed_chunk(number, chunk, bar)
            number += 1
        bar.close()
        return self._finish(number)

    def _finish(self, chunks: int) -> dict:
        loaded = []
        for n in range(chunks):
            with np.load(self.parts / f"{n:06d}.npz") as part:
                loaded.append({name: part[name] for name in part.files})
        records = [r for p in loaded for r in json.loads(p["records"].tobytes())]
        skipped = [s for p in loaded for s in json.loads(p["skipped"].tobytes())]
        dim = self.encoder.embed_dim
        offset, caption_rows = 0, []
        for p in loaded:  # a chunk's caption rows count from its own first image
            caption_rows.append(p["caption_rows"] + offset)
            offset += len(p["images"])
        images = np.concatenate([p["images"] for p in loaded]) if loaded else np.zeros((0, dim), np.float16)
        captions = np.concatenate([p["captions"] for p in loaded]) if loaded else np.zeros((0, dim), np.float16)
        caption_rows = np.concatenate(caption_rows) if loaded else np.zeros(0, np.int64)
        if not records:
            fail(f"no image of {self.settings.source!r} could be read ({len(skipped)} skipped: "
                 f"{listing([s['key'] + ' (' + s['reason'] + ')' for s in skipped])}); nothing to index.")
        write_atomic(self.out / "items.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                       for r in records).encode())
        write_atomic(self.out / "skipped.jsonl", "".join(json.dumps(s, ensure_ascii=False) + "\n"
                                                         for s in skipped).encode())
        _save_npy(self.out / "images.npy", images)
        _save_npy(self.out / "captions.npy", captions)
        _save_npy(self.out / "captions.rows.npy", caption_rows.astype(np.int64))
        search = {"images": self._approximate("images", images, captions),
                  "captions": self._approximate("captions", captions, images)}
        manifest = {"format": FORMAT, "complete": True, "build": self.settings.as_dict(),
                    "model": self.encoder.identity.as_dict(), "preprocess_cfg": self.encoder.preprocess_cfg,
                    "embed_dim": dim, "counts": {"items": len(records), "captions": int(len(captions)),
                                                 "skipped": len(skipped)}, "search": search}
        manifest = json.loads(json.dumps(manifest))  # as it reads back: tuples become lists
        _write_json(self.out / "manifest.json", manifest)
        shutil.rmtree(self.parts, ignore_errors=True)
        return manifest

    def _approximate(self, modality: str, vectors: np.ndarray, other: np.ndarray) -> dict:
        """Exact search for a small gallery; else a faiss index, saved, with its measured recall, tuned on
        queries of both kinds: the modality's own vectors and the other's (text queries for images)."""
        if len(vectors) < self.exact_below or len(vectors) <= RECALL_K:  # too few to tune recall@10 on
            return {"kind": "exact"}
        faiss = require("faiss", f"the approximate {modality} index ({len(vectors):,} vectors, --exact-below "
                                 f"{self.exact_below:,})", then="; then run the same command again: the "
                                 "embeddings are saved, only this last step reruns")

        _log.info("building the approximate %s index over %d vectors", modality, len(vectors))
        built = build_approximate(vectors, self.target_recall, other_queries=other)
        faiss.write_index(built.index, str(self.out / f"{modality}.faiss.tmp"))
        os.replace(self.out / f"{modality}.faiss.tmp", self.out / f"{modality}.faiss")
        _log.info("approximate %s index %s, nprobe %d: recall@10 %.3f against exact search on %d queries "
                  "(gallery images and captions; own row left out)", modality, built.kind, built.nprobe,
                  built.recall, built.queries)
        return {"kind": built.kind, "nprobe": built.nprobe, "recall_at_10": built.recall,
                "recall_queries": built.queries}


class NoCaptions(LookupError):
    """A search against the captions of an index whose gallery had none."""


class Index:
    """A finished index, read for searching: float32 vectors in memory, faiss indexes where built."""

    def __init__(self, path: Path):
        self.path = Path(path)
        manifest_path = self.path / "manifest.json"
        if not manifest_path.is_file():
            fail(f"{self.path} is not an index (no manifest.json); build one with conlip-retrieval index.")
        self.manifest = self._read("manifest.json", lambda p: json.loads(p.read_text()))
        if self.manifest.get("format") != FORMAT:
            fail(f"{self.path} is an index of format {self.manifest.get('format')}; this conlip-plugin reads "
                 f"format {FORMAT}. Rebuild it with conlip-retrieval index.")
        if not self.manifest.get("complete"):
            fail(f"{self.path} is unfinished (its index run was stopped); run the same conlip-retrieval index "
                 f"command again to finish it.")
        try:
            self.identity = ModelIdentity(**self.manifest["model"])
            dim, search = int(self.manifest["embed_dim"]), {}
            for modality in MODALITIES:
                entry = self.manifest["search"][modality]
                search[modality] = {"kind": "exact"} if entry["kind"] == "exact" else {
                    "kind": str(entry["kind"]), "nprobe": int(entry["nprobe"]),
                    "recall_at_10": float(entry["recall_at_10"]), "recall_queries": int(entry["recall_queries"])}
        except (KeyError, TypeError, ValueError) as err:
            self._damaged(f"manifest.json has a missing or malformed field ({err!r})")
        self.items = self._read("items.jsonl", lambda p: [json.loads(line) for line in p.read_text().splitlines()])
        self.vector_rows: Dict[str, np.ndarray] = {"images": np.arange(len(self.items)),
                                            "captions": self._read("captions.rows.npy", np.load)}
        self.vectors: Dict[str, Optional[np.ndarray]] = {}
        self.approximate: Dict[str, Optional[ApproximateIndex]] = {}
        for modality in MODALITIES:
            settings = search[modality]
            if settings["kind"] == "exact":  # float32 once, so each query is one matrix product
                vectors = self._read(f"{modality}.npy", lambda p: np.load(p).astype(np.float32))
                self.vectors[modality], self.approximate[modality] = vectors, None
                count, width = vectors.shape if vectors.ndim == 2 else (len(vectors), None)
            else:
                faiss = require("faiss", f"searching {self.path} (its {modality} have a faiss index)")
                ann = self._read(f"{modality}.faiss", lambda p: faiss.read_index(str(p)))
                self.vectors[modality] = None
                self.approximate[modality] = ApproximateIndex(ann, settings["kind"], settings["nprobe"],
                                                              settings["recall_at_10"], settings["recall_queries"])
                count, width = ann.ntotal, ann.d
            if count != len(self.vector_rows[modality]) or width != dim:
                listed = "items.jsonl" if modality == "images" else "captions.rows.npy"
                self._damaged(f"{modality}.{'npy' if settings['kind'] == 'exact' else 'faiss'} holds {count} "
                              f"vectors of {width} dimensions, where {listed} and the manifest call for "
                              f"{len(self.vector_rows[modality])} of {dim}")
        rows = self.vector_rows["captions"]
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self.items)):
            self._damaged(f"captions.rows.npy names rows outside the {len(self.items)} items")

    def _damaged(self, why: str) -> NoReturn:
        fail(f"the index {self.path} is damaged: {why}. Rebuild it with conlip-retrieval index (into a new "
             f"--out, or after deleting {self.path}).")

    def _read(self, name: str, read: Callable[[Path], T]) -> T:
        """``read(path)`` of one index file; a missing or unreadable file names itself and the fix."""
        try:
            return read(self.path / name)
        except (OSError, ValueError, RuntimeError, EOFError) as err:
            first_line = next(iter(str(err).strip().splitlines()), "")
            self._damaged(f"{name} cannot be read ({type(err).__name__}: {first_line})")

    def search(self, query: np.ndarray, against: str, k: int) -> List[dict]:
        """The k best items for one unit query vector, against the images or the captions."""
        if against not in MODALITIES:
            raise ValueError(f"against must be one of {MODALITIES}, not {against!r}")
        if query.shape[-1] != self.manifest["embed_dim"]:
            raise ValueError(f"the query has {query.shape[-1]} dimensions; this index holds "
                             f"{self.manifest['embed_dim']} ({self.identity.describe()})")
        rows = self.vector_rows[against]
        if against == "captions" and not len(rows):
            raise NoCaptions(f"this index has no captions ({self.manifest['build']['source']} gave none), so "
                             f"there is nothing to search against the captions; search against the images")
        k = min(k, len(rows))
        ann = self.approximate[against]
        query = np.asarray(query, dtype=np.float32)[None, :]
        scores, ids = ann.search(query, k) if ann else exact_search(self.vectors[against], query, k)
        results = []
        for score, position in zip(scores[0], ids[0]):
            if position < 0:  # faiss pads with -1 when the probed lists hold fewer than k vectors
                continue
            row = int(rows[position])
            shown = {name: value for name, value in self.items[row].items() if name in RESULT_FIELDS}
            results.append({"rank": len(results) + 1, "score": float(score), "row": row, **shown})
        return results

    def rows(self, ids: Sequence[int]) -> List[dict]:
        """The metadata (RESULT_FIELDS) of gallery rows ``ids``, in their order, as search results carry it;
        an id outside the gallery raises IndexError naming it and the range."""
        count = len(self.items)
        outside = [row for row in ids if not 0 <= row < count]
        if outside:
            raise IndexError(f"no item {outside[0]}; this index holds items 0 to {count - 1}")
        return [{name: value for name, value in self.items[row].items() if name in RESULT_FIELDS} for row in ids]
