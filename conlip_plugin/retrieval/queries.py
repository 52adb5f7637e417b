"""Queries as the server runs them, for each of its APIs (ours and clip-retrieval's): embedded under one
model lock, query images decoded a few at a time outside it, request bodies read only up to a bound, and
the refusals of a query image worded once."""
import threading
from typing import Callable, List, Type, TypeVar

import numpy as np
from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from conlip_plugin.retrieval.encoder import MAX_ASPECT_RATIO, Encoder, ExtremeAspectRatio, ImageTooLarge, UnreadableImage, decode_image
from conlip_plugin.retrieval.store import Index, NoCaptions

DECODE_SLOTS = 2  # query images decoded at once: a 50-megapixel one takes about 150 MB as RGB
# An embedding as JSON: a float takes at most about 25 characters; the slack covers the other fields.
EMBEDDING_BYTES_PER_DIM = 64
EMBEDDING_SLACK = 64 * 1024
T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


class BodyTooLarge(Exception):
    """The request body went past the bound while it was being read."""


def megabytes(size: int) -> str:
    return f"{size / 2 ** 20:.2f} MB ({size:,} bytes)" if size >= 10_000 else f"{size:,} bytes"


def bounded(request: Request, most: int) -> Request:
    """The same request, whose body stream raises BodyTooLarge once more than ``most`` bytes arrived."""
    seen = 0
    receive = request.receive

    async def counting_receive():
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > most:
            raise BodyTooLarge
        return message

    return Request(request.scope, counting_receive)


async def read_body(request: Request, most: int, too_large: HTTPException) -> bytes:
    """The whole body, refused with ``too_large`` when its Content-Length or its bytes go past ``most``."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > most:
        raise too_large
    try:
        return await bounded(request, most).body()
    except BodyTooLarge:
        raise too_large from None


def parse_json(model: Type[M], raw: bytes) -> M:
    """The body as ``model``, whatever its Content-Type (clip-retrieval's clients send none); a problem
    is raised as the app's readable 422, each field named as being in the body."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as err:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in err.errors()]) from None


def image_refusal(name: str, err: Exception) -> HTTPException:
    """What a client is told when its query image ``name`` cannot be searched with, and what to change."""
    if isinstance(err, ExtremeAspectRatio):
        return HTTPException(422, f"{name} is {err}. Crop it to at most {MAX_ASPECT_RATIO}:1 (its long side at "
                                  f"most {MAX_ASPECT_RATIO} times its short side) and send it again.")
    if isinstance(err, ImageTooLarge):
        larger_limit = "" if err.by_pil else ", or restart conlip-retrieval serve with a larger --max-image-megapixels"
        return HTTPException(413, f"{name} is {err}. Send a smaller image{larger_limit}.")
    return HTTPException(415, f"{name} is not an image this server can read ({err}); send a PNG, JPEG, WebP, GIF, "
                              f"BMP or TIFF file.")


class QueryEngine:
    """Embeds queries with the index's model and searches the index. The model and the tokenizer are not
    safe to call from two threads at once; decoding a query image (seconds for a large one) runs outside
    that lock, so that it holds up no other search, but at most DECODE_SLOTS at once, as each can take
    hundreds of MB."""

    def __init__(self, index: Index, encoder: Encoder, max_query_pixels: int):
        self.index, self.encoder, self.max_query_pixels = index, encoder, max_query_pixels
        self.dim = int(index.manifest["embed_dim"])
        self.embedding_bytes = EMBEDDING_BYTES_PER_DIM * self.dim + EMBEDDING_SLACK  # a body of one embedding
        self._model = threading.Lock()
        self._decoding = threading.BoundedSemaphore(DECODE_SLOTS)

    def locked(self, call: Callable[..., T], *args) -> T:
        with self._model:
            return call(*args)

    def decode(self, data: bytes):
        with self._decoding:
            return decode_image(data, self.encoder.preprocess, self.max_query_pixels)

    def text_vector(self, text: str) -> np.ndarray:
        """Blocking: call from a worker thread."""
        return self.locked(self.encoder.texts, [text])[0].numpy()

    async def image_vector(self, data: bytes, name: str) -> np.ndarray:
        """The query image's embedding; an image that cannot be used raises its image_refusal."""
        try:
            pixels = await run_in_threadpool(self.decode, data)
        except (ExtremeAspectRatio, UnreadableImage, ImageTooLarge) as err:
            raise image_refusal(name, err) from err
        vector = await run_in_threadpool(self.locked, self.encoder.images, pixels.unsqueeze(0))
        return vector[0].numpy()

    def unit(self, values: List[float]) -> np.ndarray:
        """A client's own embedding scaled to unit length, refused unless it has the index's dimension."""
        vector = np.asarray(values, dtype=np.float64)
        if vector.shape != (self.dim,):
            raise HTTPException(400, f"the embedding has {vector.size} dimensions; this index holds {self.dim} "
                                     f"({self.index.identity.describe()}).")
        norm = float(np.linalg.norm(vector))
        if not np.isfinite(norm) or norm == 0:
            raise HTTPException(400, "the embedding is zero or not finite; send the model's output vector.")
        return (vector / norm).astype(np.float32)

    def search(self, vector: np.ndarray, against: str, k: int) -> List[dict]:
        """Blocking: call from a worker thread. Captions asked of an index without any are a 422."""
        try:
            return self.locked(self.index.search, vector, against, k)
        except NoCaptions as err:
            raise HTTPException(422, str(err)) from err
