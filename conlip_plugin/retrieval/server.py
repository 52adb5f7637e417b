"""``conlip-retrieval serve``: a search page and a JSON API over one index.

    GET  /                          the page (static files of this package; nothing from the internet)
    GET  /api/info                  the index's model, counts, search kinds and dimension
    GET  /api/search?text=...&k=10&against=images|captions[&model=...&pretrained=...|fingerprint=...]
    POST /api/search/image          multipart: file (+ k, against, model, pretrained or fingerprint)
    POST /api/search/embedding      JSON: {"embedding": [...], "model", "pretrained" or "fingerprint", "k", "against"}
    GET  /api/items/{row}/image     an item's image bytes
    POST /knn-service, POST /metadata, GET /indices-list   clip-retrieval's back-end API (clip_retrieval_api)

Queries are embedded with the index's own model. The routes are added by ``routes`` (ours) and
``clip_retrieval_api``; what a request may ask, and each refusal's status and message, is in
``request_checks``; the bounds that keep slow, departing or too many clients from holding the server
up are in ``limits``; where its logs go, in ``server_logs``.
"""
import socket
from pathlib import Path
from typing import Optional

from fastapi import FastAPI

from conlip_plugin.command_errors import fail
from conlip_plugin.retrieval.clip_retrieval_api import add_clip_retrieval_routes
from conlip_plugin.retrieval.encoder import Encoder
from conlip_plugin.retrieval.limits import ServingLimits, add_limits, header_deadline_protocol
from conlip_plugin.retrieval.queries import QueryEngine
from conlip_plugin.retrieval.request_checks import add_readable_validation_errors
from conlip_plugin.retrieval.routes import (add_embedding_search, add_image_search, add_info, add_item_images,
                                            add_page, add_text_search)
from conlip_plugin.retrieval.server_logs import server_logs
from conlip_plugin.retrieval.store import Index

MAX_QUERY_PIXELS = 50_000_000


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
    add_readable_validation_errors(app)
    add_page(app)
    add_info(app, index, engine, max_upload_bytes)
    add_text_search(app, index, engine)
    add_image_search(app, index, engine, max_upload_bytes)
    add_embedding_search(app, index, engine)
    add_item_images(app, index)
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
