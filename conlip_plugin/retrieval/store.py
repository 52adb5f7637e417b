"""The on-disk index: float16 embeddings, item metadata, the model's identity, and a faiss index for
large galleries. Built in chunks, each saved atomically, so a killed run resumes from the last whole
chunk; the manifest says ``complete`` only once every file is in place.

    INDEX/manifest.json       model identity and preprocessing, source, counts, search settings
    INDEX/items.arrow         one record per indexed item (key, path or shard range, caption): Arrow IPC
    INDEX/images.npy          float16 [items, dim], unit rows, in item order
    INDEX/captions.npy        float16 [captioned items, dim]; captions.rows.npy: their item rows
    INDEX/skipped.jsonl       items left out, each with the reason
    INDEX/{images,captions}.faiss   approximate indexes (large galleries only)
    INDEX/parts/              finished chunks of an unfinished run (removed when it completes)

Nothing holds the gallery whole: chunks go to disk as they are embedded, the final files are
assembled one chunk at a time, the faiss index is trained and filled from the vector files read a
block at a time; a finished index is read through memory maps, so a search reads the rows it returns.
"""
import dataclasses
import gc
import hashlib
import io
import itertools
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, NoReturn, Optional, Sequence, TypeVar, Union

import numpy as np

from conlip_plugin.atomic_files import atomic_file, atomic_path, write_atomic
from conlip_plugin.command_errors import fail
from conlip_plugin.retrieval.arrays import NpyRows, NpyWriter
from conlip_plugin.retrieval.distributed import Ranks
from conlip_plugin.retrieval.embedding import ChunkEmbedder, ImageEmbedder
from conlip_plugin.retrieval.encoder import Encoder, ModelIdentity
from conlip_plugin.retrieval.extras import require
from conlip_plugin.retrieval.metadata import ItemsReader, ItemsWriter
from conlip_plugin.retrieval.nearest import EXACT_BELOW, RECALL_K, TARGET_RECALL, ApproximateIndex, build_approximate, exact_search
from conlip_plugin.retrieval.sizing import DEFAULT_MAX_INDEX_MEMORY, BudgetTooSmall
from conlip_plugin.retrieval.sources import Item

FORMAT = 2  # 1: items.jsonl, read whole at load
T = TypeVar("T")
MODALITIES = ("images", "captions")
RESULT_FIELDS = ("key", "path", "shard", "caption")
SKIPPED_SHOWN = 5  # skipped items named when nothing could be read
_log = logging.getLogger("conlip_plugin.retrieval")


def _write_json(path: Path, value: object) -> None:
    write_atomic(path, (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode())


def _items_digest(items: List[Item]) -> str:
    """sha256 of a chunk's items as the source lists them (skipped ones too): a resumed run checks that
    its source still lists, chunk by chunk, what the stopped run embedded."""
    listed = json.dumps([dataclasses.astuple(item) for item in items], ensure_ascii=False)
    return hashlib.sha256(listed.encode()).hexdigest()


def _chunks(items: Iterable[Item], size: int) -> Iterator[List[Item]]:
    items = iter(items)
    while chunk := list(itertools.islice(items, size)):
        yield chunk


def rebuild_command(build: dict) -> str:
    """The ``conlip-retrieval index`` command that rebuilds an index of these build settings (a CSV's
    ``--csv-*`` flags are not recorded: the same as before)."""
    model = build.get("model") or {}
    pretrained = f" --pretrained {model['pretrained']}" if model.get("pretrained") else ""
    return (f"conlip-retrieval index --model {model.get('model', 'MODEL')}{pretrained} --images "
            f"{build.get('source', 'SRC')} --out NEW_INDEX (with a CSV's --csv-* flags as before)")


@dataclass
class BuildSettings:
    """What an index run was asked for; a resumed run must ask for the same."""

    source: str
    model: dict
    chunk_size: int

    def as_dict(self) -> dict:
        return {"source": self.source, "model": self.model, "chunk_size": self.chunk_size}


class IndexWriter:
    """Embeds items chunk by chunk into ``out``; ``run`` resumes a killed build of the same settings.

    ``encoder``: an ``Encoder`` (embedded in batches of ``batch_size``, decoded in ``workers``) or any
    ``ChunkEmbedder``. Under several ``ranks`` each embeds the chunks it owns and rank 0 assembles."""

    def __init__(self, out: Path, encoder: Union[Encoder, ChunkEmbedder], source: str, chunk_size: int = 4096,
                 batch_size: int = 64, workers: int = 0, exact_below: int = EXACT_BELOW,
                 target_recall: float = TARGET_RECALL, max_index_memory: int = DEFAULT_MAX_INDEX_MEMORY,
                 progress: bool = True, ranks: Ranks = Ranks()):
        self.out = Path(out)
        self.embedder = encoder if isinstance(encoder, ChunkEmbedder) else ImageEmbedder(encoder, batch_size, workers)
        self.settings = BuildSettings(source, self.embedder.identity.as_dict(), chunk_size)
        self.progress, self.ranks = progress, ranks
        self.exact_below, self.target_recall, self.max_index_memory = exact_below, target_recall, max_index_memory
        self.parts = self.out / "parts"

    def _part(self, number: int) -> Path:
        return self.parts / f"{number:06d}.npz"

    def _check_settings(self) -> Optional[dict]:
        """The manifest of an index of these settings (None for a new one); refuses an index of other
        settings, unless its run stopped before finishing a chunk (then this run starts it over)."""
        manifest_path = self.out / "manifest.json"
        if not manifest_path.is_file():
            if self.out.exists() and any(self.out.iterdir()):
                fail(f"{self.out} exists and is not an index (no manifest.json); pass an empty or new --out.")
            return None
        manifest = json.loads(manifest_path.read_text())
        unstarted = not manifest.get("complete") and not any(self.parts.glob("*.npz"))
        if unstarted:
            return None
        if manifest.get("format") != FORMAT:
            fail(f"{self.out} holds {'an index' if manifest.get('complete') else 'a stopped run'} of format "
                 f"{manifest.get('format')} (an older conlip-plugin); this one writes format {FORMAT}. Delete "
                 f"{self.out} and index again, or pass another --out.")
        if manifest.get("build") != self.settings.as_dict():
            old = manifest.get("build", {})
            fail(f"{self.out} holds an index of {old.get('source')!r} with "
                 f"{ModelIdentity(**old['model']).describe() if old.get('model') else 'another model'}, "
                 f"chunk size {old.get('chunk_size')}; this run asks for {self.settings.source!r} with "
                 f"{self.embedder.identity.describe()}, chunk size {self.settings.chunk_size}. "
                 f"Pass another --out, or delete {self.out} to rebuild.")
        return manifest

    def _start(self) -> Optional[dict]:
        """The finished manifest if the index is complete; else the run is set up (by rank 0, while the
        others wait) and None. Every rank checks the settings, so all stop alike on a refusal."""
        manifest = self._check_settings()
        self.ranks.barrier()  # no rank reads the manifest while rank 0 rewrites it
        if manifest is not None and manifest.get("complete"):
            return manifest
        if self.ranks.main:
            self.parts.mkdir(parents=True, exist_ok=True)
            _write_json(self.out / "manifest.json", {"format": FORMAT, "complete": False,
                                                     "build": self.settings.as_dict()})
        self.ranks.barrier()
        return None

    def _embed_chunk(self, number: int, items: List[Item], bar) -> None:
        chunk = self.embedder.embed_chunk(items, bar.update)
        records = [items[r].record() for r in chunk.rows]
        reasons = [{"key": items[i].key, "reason": reason} for i, reason in chunk.skipped]
        buffer = io.BytesIO()
        np.savez(buffer, images=chunk.images, captions=chunk.captions, caption_rows=chunk.caption_rows,
                 counts=np.asarray([len(chunk.images), len(chunk.captions)], dtype=np.int64),
                 records=np.frombuffer(json.dumps(records).encode(), dtype=np.uint8),
                 items_digest=np.frombuffer(_items_digest(items).encode(), dtype=np.uint8),
                 skipped=np.frombuffer(json.dumps(reasons).encode(), dtype=np.uint8))
        write_atomic(self._part(number), buffer.getvalue())
        for entry in reasons:
            _log.warning("skipped %s: %s", entry["key"], entry["reason"])

    def _check_unchanged(self, number: int, items: List[Item]) -> None:
        """Refuse to resume when finished chunk ``number`` no longer lists the same items."""
        with np.load(self._part(number)) as part:
            digest = part["items_digest"].tobytes().decode()
        size = self.settings.chunk_size
        if digest != _items_digest(items):
            where = f"from {items[0].key!r}" if items else "past the end of the source"
            fail(f"{self.settings.source!r} no longer lists the items the stopped run embedded: chunk {number} "
                 f"(items {number * size} to {(number + 1) * size - 1}, {where}) differs; the source changed. "
                 f"Delete {self.out} and index again.")

    def run(self, items: Iterable[Item], total: Optional[int] = None) -> Optional[dict]:
        """Embed every chunk of this rank not yet done, then (rank 0) write the final files; returns the
        manifest (None on the other ranks, which stop once their chunks are done)."""
        from tqdm import tqdm

        finished = self._start()
        if finished is not None:
            if self.ranks.main:
                shutil.rmtree(self.parts, ignore_errors=True)
            _log.info("%s is already complete; nothing to do", self.out)
            return finished
        size = self.settings.chunk_size
        done = {int(p.stem) for p in self.parts.glob("*.npz") if p.stem.isdigit()}
        if done and self.ranks.main:
            _log.info("resuming %s: %d chunk(s) of %d items were finished", self.out, len(done), size)
        bar = tqdm(total=total, unit="img", desc="embedding", disable=not self.progress or not self.ranks.main)
        chunks = 0
        for number, chunk in enumerate(_chunks(items, size)):
            chunks = number + 1
            if not self.ranks.owns(number):
                continue
            if number in done:
                self._check_unchanged(number, chunk)
                bar.update(len(chunk))
            else:
                self._embed_chunk(number, chunk, bar)
        for number in sorted(n for n in done if n >= chunks and self.ranks.owns(n)):
            self._check_unchanged(number, [])  # the source now ends before a chunk the stopped run finished
        bar.close()
        self.ranks.barrier()  # every rank's chunks are on disk
        if not self.ranks.main:
            return None
        return self._finish(chunks)

    def _finish(self, chunks: int) -> dict:
        """The final files from the chunks, one chunk in memory at a time; then the approximate indexes
        from the vector files read a block at a time, and the manifest."""
        dim = self.embedder.embed_dim
        counts = np.zeros(2, dtype=np.int64)
        for n in range(chunks):
            with np.load(self._part(n)) as part:
                counts += part["counts"]
        items, captions = (int(c) for c in counts)
        if not items:
            self._nothing_readable(chunks)
        image_file = NpyWriter(self.out / "images.npy", (items, dim), np.float16)
        caption_file = NpyWriter(self.out / "captions.npy", (captions, dim), np.float16)
        rows_file = NpyWriter(self.out / "captions.rows.npy", (captions,), np.int64)
        metadata = ItemsWriter(self.out / "items.arrow")
        skipped = 0
        with atomic_file(self.out / "skipped.jsonl", "w", encoding="utf-8") as skipped_file:
            for n in range(chunks):
                with np.load(self._part(n)) as part:
                    offset = image_file.rows  # a chunk's caption rows count from its own first image
                    image_file.write(part["images"])
                    caption_file.write(part["captions"])
                    rows_file.write(part["caption_rows"] + offset)
                    metadata.write(json.loads(part["records"].tobytes()))
                    for entry in json.loads(part["skipped"].tobytes()):
                        skipped_file.write(json.dumps(entry, ensure_ascii=False) + "\n")
                        skipped += 1
        for done in (image_file, caption_file, rows_file, metadata):
            done.close()
        gc.collect()
        images, caption_vectors = NpyRows(self.out / "images.npy"), NpyRows(self.out / "captions.npy")
        search = {"images": self._approximate("images", images, caption_vectors),
                  "captions": self._approximate("captions", caption_vectors, images)}
        manifest = {"format": FORMAT, "complete": True, "build": self.settings.as_dict(),
                    "model": self.embedder.identity.as_dict(), "preprocess_cfg": self.embedder.preprocess_cfg,
                    "embed_dim": dim, "counts": {"items": items, "captions": captions, "skipped": skipped},
                    "search": search}
        manifest = json.loads(json.dumps(manifest))  # as it reads back: tuples become lists
        _write_json(self.out / "manifest.json", manifest)
        shutil.rmtree(self.parts, ignore_errors=True)
        return manifest

    def _nothing_readable(self, chunks: int) -> NoReturn:
        """Stop naming what was skipped (every item was), one chunk's list at a time."""
        named, count = [], 0
        for n in range(chunks):
            with np.load(self._part(n)) as part:
                entries = json.loads(part["skipped"].tobytes())
            count += len(entries)
            named.extend(f"{s['key']} ({s['reason']})" for s in entries[:SKIPPED_SHOWN - len(named)])
        shown = ", ".join(named) + (f" and {count - len(named)} more" if count > len(named) else "")
        fail(f"no image of {self.settings.source!r} could be read ({count} skipped: {shown}); nothing to index.")

    def _approximate(self, modality: str, vectors: np.ndarray, other: np.ndarray) -> dict:
        """Exact search for a small gallery; else a faiss index, saved, with its measured recall, tuned on
        queries of both kinds: the modality's own vectors and the other's (text queries for images)."""
        if len(vectors) < self.exact_below or len(vectors) <= RECALL_K:  # too few to tune recall@10 on
            return {"kind": "exact"}
        faiss = require("faiss", f"the approximate {modality} index ({len(vectors):,} vectors, --exact-below "
                                 f"{self.exact_below:,})", then="; then run the same command again: the "
                                 "embeddings are saved, only this last step reruns")

        _log.info("building the approximate %s index over %d vectors", modality, len(vectors))
        try:
            built = build_approximate(vectors, self.target_recall, other_queries=other,
                                      max_bytes=self.max_index_memory)
        except BudgetTooSmall as err:
            fail(f"the approximate {modality} index: {err}; then run the same command again (the embeddings "
                 f"are saved, only this last step reruns).")
        with atomic_path(self.out / f"{modality}.faiss") as tmp:
            faiss.write_index(built.index, str(tmp))
        _log.info("approximate %s index %s, nprobe %d: recall@10 %.3f against exact search on %d queries "
                  "(gallery images and captions; own row left out)", modality, built.kind, built.nprobe,
                  built.recall, built.queries)
        entry = {"kind": built.kind, "nprobe": built.nprobe, "recall_at_10": built.recall,
                 "recall_queries": built.queries}
        del built  # the next modality's index is built after this one is freed
        gc.collect()
        return entry


class NoCaptions(LookupError):
    """A search against the captions of an index whose gallery had none."""


class Results(list):
    """``Index.search``'s results: a list of result dicts, with ``short_reason`` saying why fewer than the
    k asked came back (None when all k did)."""

    def __init__(self, results: Iterable[dict], short_reason: Optional[str] = None):
        super().__init__(results)
        self.short_reason = short_reason


class Index:
    """A finished index, read for searching through memory maps: the item metadata (``rows``), the
    float16 vectors of exact search, and the faiss indexes where built (``IO_FLAG_MMAP``); what stays
    in memory does not grow with the gallery beyond what faiss keeps (its centroids, list sizes)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        manifest_path = self.path / "manifest.json"
        if not manifest_path.is_file():
            fail(f"{self.path} is not an index (no manifest.json); build one with conlip-retrieval index.")
        self.manifest = self._read("manifest.json", lambda p: json.loads(p.read_text()))
        if self.manifest.get("format") != FORMAT:
            fail(f"{self.path} is an index of format {self.manifest.get('format')} (an older conlip-plugin's, "
                 f"whose metadata is read whole into memory); this conlip-plugin reads format {FORMAT}. Rebuild "
                 f"it: {rebuild_command(self.manifest.get('build') or {})}")
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
        self.metadata = self._read("items.arrow", ItemsReader)
        self.count = self.metadata.count
        self._caption_rows = self._read("captions.rows.npy", lambda p: np.load(p, mmap_mode="r"))
        sizes = {"images": self.count, "captions": len(self._caption_rows)}
        self.vectors: Dict[str, Optional[np.ndarray]] = {}
        self.approximate: Dict[str, Optional[ApproximateIndex]] = {}
        for modality in MODALITIES:
            settings = search[modality]
            if settings["kind"] == "exact":  # read a block at a time by exact_search
                vectors = self._read(f"{modality}.npy", lambda p: np.load(p, mmap_mode="r"))
                self.vectors[modality], self.approximate[modality] = vectors, None
                count, width = vectors.shape if vectors.ndim == 2 else (len(vectors), None)
            else:
                faiss = require("faiss", f"searching {self.path} (its {modality} have a faiss index)")
                ann = self._read(f"{modality}.faiss", lambda p: faiss.read_index(str(p), faiss.IO_FLAG_MMAP))
                self.vectors[modality] = None
                self.approximate[modality] = ApproximateIndex(ann, settings["kind"], settings["nprobe"],
                                                              settings["recall_at_10"], settings["recall_queries"])
                count, width = ann.ntotal, ann.d
            if count != sizes[modality] or width != dim:
                listed = "items.arrow" if modality == "images" else "captions.rows.npy"
                self._damaged(f"{modality}.{'npy' if settings['kind'] == 'exact' else 'faiss'} holds {count} "
                              f"vectors of {width} dimensions, where {listed} and the manifest call for "
                              f"{sizes[modality]} of {dim}")
        rows = self._caption_rows  # ascending by construction: its ends bound it
        if len(rows) and (rows[0] < 0 or rows[-1] >= self.count):
            self._damaged(f"captions.rows.npy names rows outside the {self.count} items")

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

    def rows(self, ids: Sequence[int]) -> List[dict]:
        """The metadata records of gallery rows ``ids``, in that order, read from items.arrow alone: the
        ``RESULT_FIELDS`` a search result carries, plus a shard member's ``offset`` and ``size`` (a record
        is what ``Item.from_record`` takes). IndexError for a row outside the gallery."""
        return self.metadata.rows(ids)

    def search(self, query: np.ndarray, against: str, k: int) -> Results:
        """The k best items for one unit query vector, against the images or the captions.

        k is honoured: the approximate index raises nprobe for a query whose probed lists hold fewer
        than k vectors. Fewer come back only when the gallery holds fewer than k vectors of that kind;
        the ``Results``' ``short_reason`` then says so (None otherwise), for a caller to pass on."""
        if against not in MODALITIES:
            raise ValueError(f"against must be one of {MODALITIES}, not {against!r}")
        if query.shape[-1] != self.manifest["embed_dim"]:
            raise ValueError(f"the query has {query.shape[-1]} dimensions; this index holds "
                             f"{self.manifest['embed_dim']} ({self.identity.describe()})")
        size = self.count if against == "images" else len(self._caption_rows)
        if against == "captions" and not size:
            raise NoCaptions(f"this index has no captions ({self.manifest['build']['source']} gave none), so "
                             f"there is nothing to search against the captions; search against the images")
        ann = self.approximate[against]
        query = np.asarray(query, dtype=np.float32)[None, :]
        scores, ids = ann.search(query, min(k, size)) if ann else exact_search(self.vectors[against], query, k)
        found = ids[0] >= 0
        scores, positions = scores[0][found], ids[0][found]
        rows = positions if against == "images" else np.asarray(self._caption_rows[positions])
        records = self.rows(rows)
        results = [{"rank": rank, "score": float(score), "row": int(row),
                    **{name: value for name, value in record.items() if name in RESULT_FIELDS}}
                   for rank, (score, row, record) in enumerate(zip(scores, rows, records), start=1)]
        reason = None
        if len(results) < k:
            reason = (f"the index holds {size} {against[:-1]} vector(s), fewer than k={k}" if size < k else
                      f"the approximate {against} index found {len(results)} of k={k} even probing every list")
        return Results(results, reason)
