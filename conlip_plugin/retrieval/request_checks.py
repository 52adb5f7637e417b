"""What a request to ``conlip-retrieval serve`` may ask, and the status and message of each refusal.

Every refusal is an ``HTTPException`` whose JSON ``{"detail": ...}`` says what to change: 409 for a
model other than the index's (its scores would be meaningless), 413 for a body over its bound, 422 for
a field out of range. Models are compared as strings (name, checkpoint path or sha256 fingerprint as
GET /api/info gives them): the server opens no file a request names, since hashing paths sent over
the network would tell any client which files exist on the server, and their hashes.
"""
from typing import Optional

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from conlip_plugin.retrieval.encoder import ModelIdentity
from conlip_plugin.retrieval.queries import megabytes
from conlip_plugin.retrieval.store import MODALITIES

MAX_K = 1000


def refuse_unless_index_model(recorded: ModelIdentity, model: Optional[str], pretrained: Optional[str],
                              fingerprint: Optional[str], what: str, weights_needed: bool) -> None:
    """409 unless the model a request names is the index's (``recorded``): the model name and, when
    weights are named (or needed: a client's own embedding), the index's checkpoint path or the sha256
    fingerprint of its weight files."""
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


def upload_too_large(size: str, limit: int) -> HTTPException:
    """413 for a query image over ``--max-upload-mb`` (``size``: how large it was, in words)."""
    return HTTPException(413, f"the upload is {size}; this server takes query images up to {megabytes(limit)}. "
                              f"Send a smaller image, or restart conlip-retrieval serve with a larger "
                              f"--max-upload-mb.")


def checked_k(raw: object) -> int:
    """``k`` of a multipart form (FastAPI checks it in a query string or JSON body)."""
    try:
        k = int(str(raw))
    except ValueError:
        k = 0
    if not 1 <= k <= MAX_K:
        raise HTTPException(422, f"k must be a whole number from 1 to {MAX_K}, not {raw!r}.")
    return k


def checked_against(raw: object) -> str:
    """``against`` of a multipart form."""
    if raw not in MODALITIES:
        raise HTTPException(422, f"against must be one of {', '.join(MODALITIES)}, not {raw!r}.")
    return str(raw)


def _where(location: tuple) -> str:
    """A validation error's place: 'k (query)', 'embedding.3 (body)', or just 'body'."""
    name = ".".join(str(part) for part in location[1:])
    return f"{name} ({location[0]})" if name else str(location[0])


def add_readable_validation_errors(app: FastAPI) -> None:
    """FastAPI's 422 for a malformed field, as one sentence naming each field and its problem."""

    @app.exception_handler(RequestValidationError)
    async def readable_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{_where(error['loc'])}: {error['msg']}" for error in exc.errors())
        return JSONResponse({"detail": f"invalid request: {problems}."}, status_code=422)
