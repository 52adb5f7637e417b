"""The routes of ``conlip-retrieval serve``'s own API and page, each group added by one function.

Queries are embedded with the index's own model (``QueryEngine``); the checks and refusals a request
meets are in ``request_checks``. A body is read only up to what its route needs (an image of
``--max-upload-mb``, one embedding of the index's dimension), so an oversized request costs no memory.
"""
import io
import mimetypes
from pathlib import Path
from typing import BinaryIO, List, Literal, Optional

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from conlip_plugin.retrieval.encoder import ModelIdentity
from conlip_plugin.retrieval.queries import BodyTooLarge, QueryEngine, bounded, megabytes, parse_json, read_body
from conlip_plugin.retrieval.request_checks import (MAX_K, checked_against, checked_k, refuse_unless_index_model,
                                                    upload_too_large)
from conlip_plugin.retrieval.sources import Item
from conlip_plugin.retrieval.store import Index

STATIC = Path(__file__).resolve().parent / "static"
# A multipart body carries boundaries, part headers and the small form fields besides the file.
MULTIPART_SLACK = 64 * 1024
Against = Literal["images", "captions"]


class EmbeddingQuery(BaseModel):
    """A query embedded by the client, with the model that embedded it."""

    embedding: List[float]
    model: str
    pretrained: Optional[str] = None
    fingerprint: Optional[str] = None  # sha256 of the weights (GET /api/info), for clients on other machines
    k: int = Field(10, ge=1, le=MAX_K)
    against: Against = "images"


def _content_type(source: BinaryIO, name: str) -> str:
    """The image's MIME type from its header (PIL), else from the file name."""
    try:
        with Image.open(source) as img:
            sniffed = Image.MIME.get(img.format or "")
    except (OSError, ValueError, Image.DecompressionBombError):
        sniffed = None
    return sniffed or mimetypes.guess_type(name)[0] or "application/octet-stream"


def _answer(engine: QueryEngine, query: dict, vector: np.ndarray, against: str, k: int) -> dict:
    return {"query": query, "against": against, "k": k, "results": engine.search(vector, against, k)}


def add_page(app: FastAPI) -> None:
    """The search page and its static files (of this package; nothing from the internet)."""

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")


def add_info(app: FastAPI, index: Index, engine: QueryEngine, max_upload_bytes: int) -> None:
    """GET /api/info: what a client needs to query the index (its model, counts, search kinds, bounds)."""

    @app.get("/api/info")
    def info() -> dict:
        return {"model": index.identity.describe(), "identity": index.identity.as_dict(),
                "counts": index.manifest["counts"], "search": index.manifest["search"], "embed_dim": engine.dim,
                "max_upload_bytes": max_upload_bytes, "max_k": MAX_K}


def add_text_search(app: FastAPI, index: Index, engine: QueryEngine) -> None:
    """GET /api/search?text=...: a query in words."""

    @app.get("/api/search")
    def search_text(text: str = "", k: int = Query(10, ge=1, le=MAX_K), against: Against = "images",
                    model: Optional[str] = None, pretrained: Optional[str] = None,
                    fingerprint: Optional[str] = None) -> dict:
        if not text.strip():
            raise HTTPException(400, "text is empty; give the words to search for (?text=...).")
        refuse_unless_index_model(index.identity, model, pretrained, fingerprint, "the request asks for",
                                  weights_needed=False)
        return _answer(engine, {"text": text}, engine.text_vector(text), against, k)


def add_image_search(app: FastAPI, index: Index, engine: QueryEngine, max_upload_bytes: int) -> None:
    """POST /api/search/image: a query image, multipart."""
    most = max_upload_bytes + MULTIPART_SLACK

    @app.post("/api/search/image")
    async def search_image(request: Request) -> dict:
        """Multipart ``file`` with ``k``, ``against``, ``model``, ``pretrained``, ``fingerprint`` fields. The
        body is read only up to the limit (plus the multipart framing), so an oversized upload costs no
        memory."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > most:
            raise upload_too_large(f"{megabytes(int(declared))} in all", max_upload_bytes)
        try:
            form = await bounded(request, most).form(max_files=1, max_fields=8)
        except BodyTooLarge:
            raise upload_too_large(f"more than {megabytes(most)}", max_upload_bytes) from None
        try:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise HTTPException(400, "no image in the request; send it as the multipart form field 'file'.")
            k, against = checked_k(form.get("k", 10)), checked_against(form.get("against", "images"))
            named = [form.get(field) or None for field in ("model", "pretrained", "fingerprint")]  # text: one file only
            refuse_unless_index_model(index.identity, *named, "the request asks for", weights_needed=False)
            data = await upload.read(max_upload_bytes + 1)
            if len(data) > max_upload_bytes:
                raise upload_too_large(megabytes(upload.size or len(data)), max_upload_bytes)
            vector = await engine.image_vector(data, upload.filename or "the upload")
            query = {"image": upload.filename, "bytes": len(data)}
            return await run_in_threadpool(_answer, engine, query, vector, against, k)
        finally:
            await form.close()


def add_embedding_search(app: FastAPI, index: Index, engine: QueryEngine) -> None:
    """POST /api/search/embedding: a query the client embedded itself; the model that made it must be
    the index's, weights included."""
    too_large = HTTPException(413, f"the request body is over {megabytes(engine.embedding_bytes)}, more than one "
                                   f"embedding of {engine.dim} numbers takes; send one vector of the index's "
                                   f"dimension.")

    def embedding_answer(body: EmbeddingQuery) -> dict:
        refuse_unless_index_model(index.identity, body.model, body.pretrained, body.fingerprint,
                                  "the embedding was made with", weights_needed=True)
        vector = engine.unit(body.embedding)
        asked = ModelIdentity(body.model, body.pretrained, body.fingerprint)
        query = {"embedding": engine.dim, "model": asked.describe()}
        return _answer(engine, query, vector, body.against, body.k)

    @app.post("/api/search/embedding", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": EmbeddingQuery.model_json_schema()}}}})
    async def search_embedding(request: Request) -> dict:
        """For clients that embed their queries themselves (EmbeddingQuery as JSON); the vector is scaled
        to unit length. The body is read only up to what one embedding of the index's size needs."""
        body = parse_json(EmbeddingQuery, await read_body(request, engine.embedding_bytes, too_large))
        return await run_in_threadpool(embedding_answer, body)


def add_item_images(app: FastAPI, index: Index) -> None:
    """GET /api/items/{row}/image: an item's image bytes."""

    @app.get("/api/items/{row}/image")
    def item_image(row: int) -> Response:
        """A file item streams from its file (with ETag, Last-Modified and Range); a shard member is read
        whole, as it is one byte range of a larger file."""
        if not 0 <= row < index.count:
            raise HTTPException(404, f"no item {row}; this index holds items 0 to {index.count - 1}.")
        item = Item.from_record(index.rows([row])[0])
        try:
            if item.path is not None:
                with open(item.path, "rb") as f:  # before the FileResponse, which finds a missing file too late
                    media_type = _content_type(f, item.path)
                return FileResponse(item.path, media_type=media_type)
            data = item.read_bytes()
        except OSError as err:
            raise HTTPException(404, f"the image of item {row} ({item.path or item.shard}) cannot be read "
                                     f"({err}); the gallery has moved since the index was built.") from err
        return Response(data, media_type=_content_type(io.BytesIO(data), item.key))
