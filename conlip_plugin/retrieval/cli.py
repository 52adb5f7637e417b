"""``conlip-retrieval``: embed a gallery with any open_clip model, search it, serve a search page.

    conlip-retrieval index  --model NAME [--pretrained CKPT] --images SRC --out INDEX
    conlip-retrieval search --index INDEX (--text "..." | --image PATH) [--k 10] [--against captions] [--json]
    conlip-retrieval serve  --index INDEX [--host 127.0.0.1] [--port 8000]

SRC is a folder of images (a sidecar NAME.txt is an image's caption), a CSV/TSV read with open_clip's
``--csv-*`` flags, or webdataset shards (a braceexpand pattern such as ``data/{000000..000009}.tar``).

``index`` runs on several GPUs or nodes under torchrun or srun (``torchrun --nproc-per-node 8 -m
conlip_plugin.retrieval.cli index ...``): the ranks share the chunks, rank 0 writes the index.
"""
import argparse
import itertools
import json
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np

from conlip_plugin.arguments import fraction, non_negative_int, port_number, positive_float, positive_int, torch_device
from conlip_plugin.command_errors import fail
from conlip_plugin.retrieval.encoder import MAX_ASPECT_RATIO, Encoder, ExtremeAspectRatio, ModelIdentity, UnreadableImage, loader_workers
from conlip_plugin.retrieval.extras import require
from conlip_plugin.retrieval.limits import ServingLimits
from conlip_plugin.retrieval.nearest import EXACT_BELOW, RECALL_K, TARGET_RECALL
from conlip_plugin.retrieval.distributed import from_environment
from conlip_plugin.retrieval.sizing import DEFAULT_MAX_INDEX_MEMORY, format_bytes, memory_size
from conlip_plugin.retrieval.sources import gallery_items
from conlip_plugin.retrieval.store import MODALITIES, Index, IndexWriter, NoCaptions

SKIPPED_PRINTED = 5


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="conlip-retrieval", description=__doc__.split("\n\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)

    index = verbs.add_parser("index", help="embed a gallery (resumes a stopped run of the same command)")
    index.add_argument("--model", required=True, help="open_clip model: a registered name, BASE+conlip, "
                                                      "or local-dir:FOLDER (an exported model)")
    index.add_argument("--pretrained", default=None, help="checkpoint file or pretrained tag (none: random init)")
    index.add_argument("--images", required=True, help="folder, CSV/TSV, or .tar shard pattern")
    index.add_argument("--out", required=True, type=Path, help="index folder to write")
    index.add_argument("--csv-img-key", default="filepath")
    index.add_argument("--csv-caption-key", default=None,
                       help="caption column (default: title when the CSV has one, else no captions)")
    index.add_argument("--csv-separator", default="\t", help="as open_clip_train: a tab unless given")
    index.add_argument("--batch-size", type=positive_int, default=64)
    index.add_argument("--workers", type=non_negative_int, default=None,
                       help="image decoding processes (default: cores - 1)")
    index.add_argument("--chunk-size", type=positive_int, default=4096,
                       help="items per saved chunk: a stopped run loses at most one chunk")
    index.add_argument("--exact-below", type=non_negative_int, default=EXACT_BELOW,
                       help="galleries smaller than this are searched exactly; larger ones get a faiss index")
    index.add_argument("--target-recall", type=fraction, default=TARGET_RECALL,
                       help="recall@10 against exact search the faiss index is tuned to reach")
    index.add_argument("--max-index-memory", type=memory_size, default=DEFAULT_MAX_INDEX_MEMORY,
                       help=f"memory each faiss index may take, e.g. 4G (default "
                            f"{format_bytes(DEFAULT_MAX_INDEX_MEMORY)}): float16 codes while they fit, else "
                            f"product quantisation")
    index.add_argument("--device", type=torch_device, default=None, help="default: cuda when there is one, else cpu")
    index.add_argument("--no-progress", action="store_true")

    search = verbs.add_parser("search", help="the best matches of a text or an image")
    search.add_argument("--index", required=True, type=Path)
    query = search.add_mutually_exclusive_group(required=True)
    query.add_argument("--text")
    query.add_argument("--image", type=Path)
    search.add_argument("--k", type=positive_int, default=10)
    search.add_argument("--against", choices=MODALITIES, default="images",
                        help="search the gallery's images (default) or its captions")
    search.add_argument("--json", action="store_true", help="print a JSON list of results")
    add_model_override(search)

    serve = verbs.add_parser("serve", help="a search page and JSON API over an index")
    serve.add_argument("--index", required=True, type=Path)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=port_number, default=8000, help="0: any free port (the URL is printed)")
    serve.add_argument("--max-upload-mb", type=positive_float, default=10.0, help="largest query image file accepted")
    serve.add_argument("--max-image-megapixels", type=query_megapixels, default=50.0,
                       help="largest query image accepted, in decoded pixels (checked before decoding; at most "
                            "where PIL itself refuses, twice Image.MAX_IMAGE_PIXELS)")
    serve.add_argument("--index-name", default=None,
                       help="the index's name in clip-retrieval's API (/indices-list; default: the folder's name)")
    serve.add_argument("--read-timeout", type=positive_float, default=ServingLimits.read_timeout_s,
                       help="seconds a client has to send a request's headers, and then its body; the "
                            "connection is closed (headers) or answered 408 (body) past it")
    serve.add_argument("--max-requests", type=positive_int, default=ServingLimits.max_requests,
                       help="requests at work at once; one more is answered 503 with Retry-After")
    serve.add_argument("--max-connections", type=positive_int, default=ServingLimits.max_connections,
                       help="open connections, idle ones included (uvicorn's limit_concurrency; 503 beyond)")
    serve.add_argument("--access-log", type=Path, default=None,
                       help="append one line per request to this file (default: no access log)")
    add_model_override(serve)
    return parser


def query_megapixels(text: str) -> float:
    """``--max-image-megapixels``: PIL itself refuses images over twice ``Image.MAX_IMAGE_PIXELS``, so a
    larger value would let nothing more through."""
    from PIL import Image

    value, most = positive_float(text), 2 * Image.MAX_IMAGE_PIXELS / 1e6
    if value > most:
        raise argparse.ArgumentTypeError(f"must be at most {most:.1f}, where PIL itself refuses images (twice "
                                         f"Image.MAX_IMAGE_PIXELS), got {text}")
    return value


def add_model_override(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="embed queries with this model; it must be the index's "
                                                      "(default: the model recorded in the index)")
    parser.add_argument("--pretrained", default=None, help="the weights (alone: the index's model with these "
                                                           "weights, e.g. after the checkpoint moved)")
    parser.add_argument("--device", type=torch_device, default=None,
                        help="for query embedding; default: cuda when there is one, else cpu")


def query_encoder(index: Index, model: Optional[str], pretrained: Optional[str], device: Optional[str]) -> Encoder:
    """The encoder for queries: the index's own model, or one that is provably the same weights."""
    recorded = index.identity
    if model is None and pretrained is None:
        if recorded.pretrained and Path(recorded.pretrained).suffix and not Path(recorded.pretrained).exists():
            fail(f"{index.path} was built with {recorded.describe()}, and {recorded.pretrained} is gone; "
                 f"pass --pretrained (and --model) naming the same weights where they are now.")
        folder = recorded.model[len("local-dir:"):] if recorded.model.startswith("local-dir:") else None
        if folder and not Path(folder).is_dir():
            fail(f"{index.path} was built with {recorded.describe()}, and the folder {folder} is gone; pass "
                 f"--model local-dir:FOLDER naming the exported folder where it is now.")
        model, pretrained = recorded.model, recorded.pretrained
    model = model or recorded.model  # --pretrained alone: the index's architecture with those weights
    asked = ModelIdentity.of(model, pretrained)
    if not asked.same_model(recorded):
        fail(f"the index {index.path} was built with {recorded.describe()}; queries would be embedded with "
             f"{asked.describe()}, other weights whose embeddings do not share the index's space. Search "
             f"with the index's model, or build an index with this one.")
    return Encoder(model, pretrained, device, identity=asked)


def show(results: List[dict], as_json: bool) -> None:
    if as_json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
        return
    for r in results:
        where = r.get("path") or r["key"]
        print(f"{r['rank']:>3}  {r['score']:.4f}  {where}" + (f"  {r['caption']}" if r.get("caption") else ""))


def check_out(out: Path) -> None:
    """``--out`` must be a folder this process can create or write, found before the model loads."""
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file; pass a folder for the index (new, empty, or a stopped run's).")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        fail(f"--out {out} cannot be created ({err.strerror or err}); pass a folder in a writable place.")
    if not os.access(out, os.W_OK):
        fail(f"--out {out} is not writable; pass a folder in a writable place.")


def run_index(args: argparse.Namespace) -> None:
    check_out(args.out)
    items = gallery_items(args.images, args.csv_img_key, args.csv_caption_key, args.csv_separator)
    # The first items are listed before the model loads: a source's errors come first, and so does a
    # missing faiss for a gallery known to need it (known from its first exact_below items, no more).
    needs_faiss = max(args.exact_below, RECALL_K + 1)
    first = list(itertools.islice(items, min(needs_faiss, EXACT_BELOW)))
    if len(first) >= needs_faiss:
        require("faiss", f"indexing {len(first):,} or more images (an approximate index from --exact-below "
                         f"{args.exact_below:,} on)", then="; or pass a larger --exact-below for exact search")
    ranks, device = from_environment(args.device)
    encoder = Encoder(args.model, args.pretrained, device)
    writer = IndexWriter(args.out, encoder, args.images, chunk_size=args.chunk_size, batch_size=args.batch_size,
                         workers=loader_workers(args.workers), exact_below=args.exact_below,
                         target_recall=args.target_recall, max_index_memory=args.max_index_memory,
                         progress=not args.no_progress, ranks=ranks)
    manifest = writer.run(itertools.chain(first, items))
    if manifest is None:
        print(f"rank {ranks.rank} of {ranks.world}: its chunks of {args.images} are embedded into {args.out}; "
              f"rank 0 writes the index")
        return
    counts = manifest["counts"]
    print(f"indexed {counts['items']} images ({counts['captions']} with captions) of {args.images} with "
          f"{encoder.identity.describe()} into {args.out}")
    if counts["skipped"]:
        with open(args.out / "skipped.jsonl", encoding="utf-8") as f:
            skipped = [json.loads(line) for line in itertools.islice(f, SKIPPED_PRINTED + 1)]
        named = [f"{entry['key']} ({entry['reason']})" for entry in skipped[:SKIPPED_PRINTED]]
        more = counts["skipped"] - len(named)
        print(f"skipped {counts['skipped']} unreadable item(s): {', '.join(named)}"
              f"{f' and {more} more' if more else ''}; all in {args.out}/skipped.jsonl")
    for modality, search in manifest["search"].items():
        if search["kind"] != "exact":
            print(f"{modality}: approximate index {search['kind']}, nprobe {search['nprobe']}, recall@10 "
                  f"{search['recall_at_10']:.3f} against exact search on {search['recall_queries']} queries "
                  f"(the gallery's images and captions; the lower recall of the two)")
    print(f"search it: conlip-retrieval search --index {args.out} --text \"...\"")


def run_search(args: argparse.Namespace) -> None:
    index = Index(args.index)
    encoder = query_encoder(index, args.model, args.pretrained, args.device)
    if args.text is not None:
        if not args.text.strip():
            fail("--text is empty; give the words to search for.")
        query = encoder.texts([args.text])[0]
    else:
        try:
            query = encoder.image_bytes(args.image.read_bytes())
        except FileNotFoundError:
            fail(f"--image {args.image} not found.")
        except OSError as err:
            fail(f"--image {args.image} cannot be read ({err.strerror or err}); pass an image file.")
        except ExtremeAspectRatio as err:
            fail(f"--image {args.image} is {err}; crop it to at most {MAX_ASPECT_RATIO}:1.")
        except UnreadableImage as err:
            fail(f"--image {args.image} is not an image PIL can read ({err}).")
    try:
        results = index.search(query.numpy().astype(np.float32), args.against, args.k)
    except NoCaptions as err:
        fail(f"{err} (--against images).")
    show(results, args.json)
    if results.short_reason:
        print(f"note: {len(results)} result(s), not {args.k}: {results.short_reason}", file=sys.stderr)


def run_serve(args: argparse.Namespace) -> None:
    for module in ("fastapi", "uvicorn", "python_multipart"):
        require(module, "conlip-retrieval serve")
    from conlip_plugin.retrieval.server import serve

    index = Index(args.index)
    encoder = query_encoder(index, args.model, args.pretrained, args.device)
    limits = ServingLimits(read_timeout_s=args.read_timeout, max_requests=args.max_requests,
                           max_connections=args.max_connections)
    serve(index, encoder, args.host, args.port, int(args.max_upload_mb * 1024 * 1024),
          int(args.max_image_megapixels * 1_000_000), args.index_name, limits, args.access_log)


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("conlip_plugin.retrieval").setLevel(logging.INFO)
    {"index": run_index, "search": run_search, "serve": run_serve}[args.verb](args)


if __name__ == "__main__":
    main()
