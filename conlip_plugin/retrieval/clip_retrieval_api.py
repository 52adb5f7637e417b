"""clip-retrieval's back-end API beside ours, so that its ``ClipClient`` and its web front end search a
conlip-retrieval index as they would a ``clip-retrieval back`` server.

    GET  /indices-list   ["NAME"]: the one index this server holds
    POST /knn-service    JSON {text | image (base64) | embedding_input, modality, num_images, num_result_ids,
                         indice_name, ...} -> [{id, similarity, url, image_path, caption, key}, ...]
    POST /metadata       JSON {ids, indice_name} -> [{id, metadata: {url, image_path, caption, key}}, ...]

Bodies are read as JSON whatever their Content-Type, as clip-retrieval's clients send none. An ``id`` is
the item's gallery row, for image and caption results alike; ``url`` is this server's
``/api/items/{id}/image``. The options this server cannot honour are answered plainly: ``image_url`` and
``use_mclip`` are refused (400, naming the option), since the server fetches no URL a request names and
embeds text with the index's own model only; ``deduplicate``, ``use_safety_model``,
``use_violence_detector`` and ``aesthetic_score``/``aesthetic_weight`` are accepted and not applied (the
``X-Conlip-Ignored`` response header names those a request turned on), as clip-retrieval's own back end
does without a safety model or aesthetic embeddings loaded; the ClipClient turns them on by default.
"""
import base64
import binascii
from typing import List, Literal, Optional, Union

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from conlip_plugin.retrieval.queries import QueryEngine, megabytes, parse_json, read_body

MAX_NUM_IMAGES = 1000  # results with their metadata, as our own API's largest k
MAX_RESULT_IDS = 10_000  # ids with their similarity only: clip-retrieval's front end asks for 3,000
JSON_SLACK = 64 * 1024  # the other fields of a request beside its image or its ids
BYTES_PER_ID = 24  # an id as JSON, with its comma
AGAINST = {"image": "images", "text": "captions"}
IGNORED = ("deduplicate", "use_safety_model", "use_violence_detector", "aesthetic_score", "aesthetic_weight")


class KnnQuery(BaseModel):
    """A ``/knn-service`` request, with clip-retrieval's field names."""

    text: Optional[str] = None
    image: Optional[str] = None
    image_url: Optional[str] = None
    embedding_input: Optional[List[float]] = None
    modality: Literal["image", "text"] = "image"
    num_images: int = Field(40, ge=1, le=MAX_NUM_IMAGES)
    num_result_ids: Optional[int] = Field(None, ge=1, le=MAX_RESULT_IDS)
    indice_name: Optional[str] = None
    use_mclip: bool = False
    deduplicate: bool = False
    use_safety_model: bool = False
    use_violence_detector: bool = False
    aesthetic_score: Union[int, str, None] = None  # clip-retrieval's front end sends "" for none
    aesthetic_weight: Union[float, str, None] = None


class MetadataQuery(BaseModel):
    """A ``/metadata`` request: gallery rows, as ``/knn-service`` gives them."""

    ids: List[int] = Field(max_length=MAX_RESULT_IDS)
    indice_name: Optional[str] = None


def _metadata(fields: dict, base_url: str, row: int) -> dict:
    """An item's metadata under clip-retrieval's column names, with the URL its image is served at."""
    meta = {"url": f"{base_url}api/items/{row}/image", "image_path": fields.get("path"),
            "caption": fields.get("caption"), "key": fields.get("key")}
    return {name: value for name, value in meta.items() if value is not None}


def _ignored(query: KnnQuery) -> List[str]:
    """The options a request turned on that this server does not apply."""
    return [name for name in IGNORED if getattr(query, name) not in (None, "", False)]


def _the_question(query: KnnQuery) -> str:
    """Which one of text, image and embedding_input the request asks with; anything else is a clear 400."""
    if query.image_url is not None:
        raise HTTPException(400, "image_url: this server fetches no URL a request names (it may have no internet, "
                                 "and fetching for clients would reach into its network); download the image and "
                                 "send its bytes base64-encoded as image.")
    if query.use_mclip:
        raise HTTPException(400, "use_mclip: this server embeds text with the index's own model only, not "
                                 "multilingual CLIP; send use_mclip false.")
    given = [name for name, value in (("text", query.text), ("image", query.image),
                                      ("embedding_input", query.embedding_input)) if value]
    if len(given) != 1:
        found = f"got {' and '.join(given)}" if given else "got none"
        raise HTTPException(400, f"send exactly one of text, image (base64) and embedding_input; {found}.")
    if given[0] == "text" and not query.text.strip():
        raise HTTPException(400, "text is blank; give the words to search for.")
    return given[0]


def _image_bytes(encoded: str, most: int) -> bytes:
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as err:
        raise HTTPException(400, f"image is not base64 ({err}); send the image file's bytes base64-encoded, as "
                                 f"ClipClient.query(image=PATH) does.") from None
    if len(data) > most:
        raise HTTPException(413, f"the image is {megabytes(len(data))}; this server takes query images up to "
                                 f"{megabytes(most)}. Send a smaller image, or restart conlip-retrieval serve "
                                 f"with a larger --max-upload-mb.")
    return data


def add_clip_retrieval_routes(app: FastAPI, engine: QueryEngine, index_name: str, max_upload_bytes: int) -> None:
    """clip-retrieval's three routes on ``app``, over ``engine``'s index, which they call ``index_name``."""
    knn_bytes = max(4 * (max_upload_bytes // 3 + 1), engine.embedding_bytes) + JSON_SLACK
    metadata_bytes = BYTES_PER_ID * MAX_RESULT_IDS + JSON_SLACK

    def check_name(name: Optional[str]) -> None:
        if name is not None and name != index_name:
            raise HTTPException(404, f"no index named {name!r}; this server holds {index_name!r} "
                                     f"(GET /indices-list).")

    def too_large(what: str, most: int) -> HTTPException:
        return HTTPException(413, f"the request body is over {megabytes(most)}, more than {what} takes.")

    @app.get("/indices-list")
    def indices_list() -> List[str]:
        return [index_name]

    @app.post("/knn-service")
    async def knn_service(request: Request) -> JSONResponse:
        """The nearest items to a text, a base64 image or an embedding, as clip-retrieval answers: the best
        ``num_result_ids`` (default ``num_images``), the first ``num_images`` with their metadata."""
        body = await read_body(request, knn_bytes, too_large(
            f"a query image of --max-upload-mb {megabytes(max_upload_bytes)} base64-encoded", knn_bytes))
        query = parse_json(KnnQuery, body)
        check_name(query.indice_name)
        asked = _the_question(query)
        if asked == "text":
            vector = await run_in_threadpool(engine.text_vector, query.text)
        elif asked == "image":
            vector = await engine.image_vector(_image_bytes(query.image, max_upload_bytes), "the image")
        else:
            vector = engine.unit(query.embedding_input)
        k = query.num_result_ids or query.num_images
        results = await run_in_threadpool(engine.search, vector, AGAINST[query.modality], k)
        base_url = str(request.base_url)
        answer = [{"id": r["row"], "similarity": r["score"],
                   **(_metadata(r, base_url, r["row"]) if r["rank"] <= query.num_images else {})} for r in results]
        ignored = _ignored(query)
        headers = {"X-Conlip-Ignored": ", ".join(ignored)} if ignored else None
        return JSONResponse(answer, headers=headers)

    @app.post("/metadata")
    async def metadata(request: Request) -> List[dict]:
        """The metadata of result ids, for a front end that shows more results than it first asked for."""
        body = await read_body(request, metadata_bytes, too_large(f"{MAX_RESULT_IDS:,} ids", metadata_bytes))
        query = parse_json(MetadataQuery, body)
        check_name(query.indice_name)
        try:
            rows = await run_in_threadpool(engine.index.rows, query.ids)
        except IndexError as err:
            raise HTTPException(404, f"{err}; send ids that /knn-service gave.") from None
        base_url = str(request.base_url)
        return [{"id": row, "metadata": _metadata(fields, base_url, row)} for row, fields in zip(query.ids, rows)]
