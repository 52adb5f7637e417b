"""``conlip-retrieval serve``: a search page and a JSON API over one index.

    GET  /                          the page (static files of this package; nothing from the internet)
    GET  /api/info                  the index's model, counts, search kinds and dimension
    GET  /api/search?text=...&k=10&against=images|captions[&model=...&pretrained=...|fingerprint=...]
    POST /api/search/image          multipart: file (+ k, against, model, pretrained or fingerprint)
    POST /api/search/embedding      JSON: {"embedding": [...], "model", "pretrained" or "fingerprint", "k", "against"}
    GET  /api/items/{row}/image     an item's image bytes
    POST /knn-service, POST /metadata, GET /indices-list   clip-retrieval's back-end API (clip_retrieval_api)

Queries are embedded with the index's own model; a request that names another model, or an embedding
made by one, is refused (409) with both models named, since its scores would be meaningless. A request
names its model by strings only (the name, and the checkpoint path or sha256 fingerprint that
/api/info gives): the server opens no file a request names, since hashing paths sent over the network
would tell any client which files exist on the server, and their hashes. Errors are JSON
``{"detail": "..."}`` messages that say what to change. The bounds that keep slow, departing or too
many clients from holding the server up are in ``limits``; where its logs go, in ``server_logs``.
"""
import io
import mimetypes
import socket
from pathlib import Path
from typing import BinaryIO, List, Literal, Optional

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from conlip_plugin.data.files import fail
from conlip_plugin.retrieval.clip_retrieval_api import add_clip_retrieval_routes
from conlip_plugin.retrieval.encoder import Encoder, ModelIdentity
from conlip_plugin.retrieval.limits import ServingLimits, add_limits, header_deadline_protocol
from conlip_plugin.retrieval.queries import BodyTooLarge, QueryEngine, bounded, megabytes, parse_json, read_body
from conlip_plugin.retrieval.server_logs import server_logs
from conlip_plugin.retrieval.sources import Item
from conlip_plugin.retrieval.store import MODALITIES, Index

STATIC = Path(__file__).resolve().parent / "static"
MAX_K = 1000
MAX_QUERY_PIXELS = 50_000_000
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


def _too_large(size: str, limit: int) -> HTTPException:
    return HTTPException(413, f"the upload is {size}; this server takes query images up to {megabytes(limit)}. "
                              f"Send a smaller image, or restart conlip-retrieval serve with a larger "
                              f"--max-upload-mb.")


def _content_type(source: BinaryIO, name: str) -> str:
    """The image's MIME type from its header (PIL), else from the file name."""
    try:
        with Image.open(source) as img:
            sniffed = Image.MIME.get(img.format or "")
    except (OSError, ValueError, Image.DecompressionBombError):
        sniffed = None
    return sniffed or mimetypes.guess_type(name)[0] or "application/octet-stream"


def _where(location: tuple) -> str:
    """A validation error's place: 'k (query)', 'embedding.3 (body)', or just 'body'."""
    name = ".".join(str(part) for part in location[1:])
    return f"{name} ({location[0]})" if name else str(location[0])


def _check_k(raw: object) -> int:
    try:
        k = int(str(raw))
    except ValueError:
        k = 0
    if not 1 <= k <= MAX_K:
        raise HTTPException(422, f"k must be a whole number from 1 to {MAX_K}, not {raw!r}.")
    return k


def _check_against(raw: object) -> str:
    if raw not in MODALITIES:
        raise HTTPException(422, f"against must be one of {', '.join(MODALITIES)}, not {raw!r}.")
    return str(raw)


def create_app(index: Index, encoder: Encoder, max_upload_bytes: int,
               max_query_pixels: int = MAX_QUERY_PIXELS, index_name: Optional[str] = None,
               limits: ServingLimits = ServingLimits()) -> FastAPI:
    """The API and the page over ``index``, with clip-retrieval's routes beside ours (its indice name:
    ``index_name``, by default the index folder's name); ``encoder`` must hold the index's weights."""
    if not encoder.identity.same_model(index.identity):
        raise ValueError(f"the index {index.path} was built with {index.identity.describe()}, but the encoder "
                         f"holds {encoder.identity.describe()}; serve it with the index's model.")
    app = FastAPI(title="conlip-retrieval", description=f"search {index.path} ({index.identity.describe()})")
    engine = QueryEngine(index, encoder, max_query_pixels)
    dim = engine.dim

    def refuse_unless_index_model(model: Optional[str], pretrained: Optional[str], fingerprint: Optional[str],
                                  what: str, weights_needed: bool) -> None:
        """The model a request names must be the index's, compared as strings: the model name as
        /api/info gives it and, when weights are named (or needed: a client's own embedding), the
        index's checkpoint path or the sha256 fingerprint of its weight files."""
        recorded = index.identity
        if not (model or pretrained or fingerprint or weights_needed):
            return
        asked = ModelIdentity(model or recorded.model, pretrained, fingerprint)
        same = asked.model == recorded.model
        if fingerprint:
            same = same and fingerprint.lower() == (recorded.fingerprint or "")
        elif pretrained or weights_needed:
            same = same and pretrained == recorded.pretrained
        if not same:
            raise HTTPException(409, f"this index was built with {recorded.describe()}; {what} "
                                     f"{asked.describe()}, and embeddings of different models are not "
                                     f"comparable. Name the index's model as GET /api/info gives it (model, and "
                                     f"pretrained or the sha256 fingerprint), or search an index built with that "
                                     f"one.")

    def answer(query: dict, vector: np.ndarray, against: str, k: int) -> dict:
        return {"query": query, "against": against, "k": k, "results": engine.search(vector, against, k)}

    @app.exception_handler(RequestValidationError)
    async def readable_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{_where(error['loc'])}: {error['msg']}" for error in exc.errors())
        return JSONResponse({"detail": f"invalid request: {problems}."}, status_code=422)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/info")
    def info() -> dict:
        return {"model": index.identity.describe(), "identity": index.identity.as_dict(),
                "counts": index.manifest["counts"], "search": index.manifest["search"], "embed_dim": dim,
                "max_upload_bytes": max_upload_bytes, "max_k": MAX_K}

    @app.get("/api/search")
    def search_text(text: str = "", k: int = Query(10, ge=1, le=MAX_K), against: Against = "images",
                    model: Optional[str] = None, pretrained: Optional[str] = None,
                    fingerprint: Optional[str] = None) -> dict:
        if not text.strip():
            raise HTTPException(400, "text is empty; give the words to search for (?text=...).")
        refuse_unless_index_model(model, pretrained, fingerprint, "the request asks for", weights_needed=False)
        return answer({"text": text}, engine.text_vector(text), against, k)

    @app.post("/api/search/image")
    async def search_image(request: Request) -> dict:
        """Multipart ``file`` with ``k``, ``against``, ``model``, ``pretrained``, ``fingerprint`` fields. The
        body is read only up to the limit (plus the multipart framing), so an oversized upload costs no
        memory."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_upload_bytes + MULTIPART_SLACK:
            raise _too_large(f"{megabytes(int(declared))} in all", max_upload_bytes)
        try:
            form = await bounded(request, max_upload_bytes + MULTIPART_SLACK).form(max_files=1, max_fields=8)
        except BodyTooLarge:
            most = max_upload_bytes + MULTIPART_SLACK
            raise _too_large(f"more than {megabytes(most)}", max_upload_bytes) from None
        try:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise HTTPException(400, "no image in the request; send it as the multipart form field 'file'.")
            k, against = _check_k(form.get("k", 10)), _check_against(form.get("against", "images"))
            named = [form.get(field) or None for field in ("model", "pretrained", "fingerprint")]  # text: one file only
            refuse_unless_index_model(*named, "the request asks for", weights_needed=False)
            data = await upload.read(max_upload_bytes + 1)
            if len(data) > max_upload_bytes:
                raise _too_large(megabytes(upload.size or len(data)), max_upload_bytes)
            vector = await engine.image_vector(data, upload.filename or "the upload")
            query = {"image": upload.filename, "bytes": len(data)}
            return await run_in_threadpool(answer, query, vector, against, k)
        finally:
            await form.close()

    embedding_bytes = engine.embedding_bytes

    def embedding_answer(body: EmbeddingQuery) -> dict:
        refuse_unless_index_model(body.model, body.pretrained, body.fingerprint, "the embedding was made with",
                                  weights_needed=True)
        vector = engine.unit(body.embedding)
        asked = ModelIdentity(body.model, body.pretrained, body.fingerprint)
        query = {"embedding": dim, "model": asked.describe()}
        return answer(query, vector, body.against, body.k)

    @app.post("/api/search/embedding", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": EmbeddingQuery.model_json_schema()}}}})
    async def search_embedding(request: Request) -> dict:
        """For clients that embed their queries themselves (EmbeddingQuery as JSON); the vector is scaled
        to unit length. The body is read only up to what one embedding of the index's size needs."""
        too_large = HTTPException(413, f"the request body is over {megabytes(embedding_bytes)}, more than one "
                                       f"embedding of {dim} numbers takes; send one vector of the index's "
                                       f"dimension.")
        body = parse_json(EmbeddingQuery, await read_body(request, embedding_bytes, too_large))
        return await run_in_threadpool(embedding_answer, body)

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

    add_clip_retrieval_routes(app, engine, index_name or index.path.name, max_upload_bytes)
    add_limits(app, limits)
    return app


def _listening_socket(host: str, port: int) -> socket.socket:
    """Bound before the server starts, so a busy port is reported plainly and port 0 picks a free one."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as err:
        fail(f"cannot resolve --host {host!r} ({err}); pass an address such as 127.0.0.1.")
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        fail(f"cannot listen on {host}:{port} ({err.strerror}); pass another --port (0 picks a free one) "
             f"or --host.")
    sock.listen(128)
    return sock


def serve(index: Index, encoder: Encoder, host: str, port: int, max_upload_bytes: int,
          max_query_pixels: int = MAX_QUERY_PIXELS, index_name: Optional[str] = None,
          limits: ServingLimits = ServingLimits(), access_log: Optional[Path] = None) -> None:
    """Serve the page and the API until interrupted; prints the address (with the port actually bound)."""
    import uvicorn

    app = create_app(index, encoder, max_upload_bytes, max_query_pixels, index_name, limits)
    sock = _listening_socket(host, port)
    bound_port = sock.getsockname()[1]
    shown_host = f"[{host}]" if ":" in host else host
    print(f"serving {index.path} ({index.manifest['counts']['items']} images, {index.identity.describe()}) "
          f"at http://{shown_host}:{bound_port}/ (Ctrl+C stops)", flush=True)
    with server_logs(access_log) as logging_settings:
        config = uvicorn.Config(app, log_level="info", http=header_deadline_protocol(limits.read_timeout_s),
                                timeout_keep_alive=limits.keep_alive_s, limit_concurrency=limits.max_connections,
                                **logging_settings)
        uvicorn.Server(config).run(sockets=[sock])
