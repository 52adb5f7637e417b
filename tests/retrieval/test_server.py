"""The conlip-retrieval API (server.create_app) through starlette's TestClient, on a tiny in-process index."""
import asyncio
import hashlib
import io
import json
import shutil
import threading

import numpy as np
import pytest
from PIL import Image

from retrieval_models import build_tiny_index, conlip_checkpoint

pytest.importorskip("fastapi", reason="the server needs pip install 'conlip-plugin[retrieval]'")
from fastapi.testclient import TestClient  # noqa: E402

from conlip_plugin.retrieval import encoder as encoder_module  # noqa: E402
from conlip_plugin.retrieval import queries as queries_module  # noqa: E402
from conlip_plugin.retrieval.encoder import Encoder, ImageTooLarge, ModelIdentity, UnreadableImage  # noqa: E402
from conlip_plugin.retrieval.queries import EMBEDDING_BYTES_PER_DIM, EMBEDDING_SLACK  # noqa: E402
from conlip_plugin.retrieval.routes import MULTIPART_SLACK  # noqa: E402
from conlip_plugin.retrieval.server import _listening_socket, create_app  # noqa: E402
from conlip_plugin.retrieval.sources import gallery_items  # noqa: E402
from conlip_plugin.retrieval.store import Index, IndexWriter  # noqa: E402

LIMIT = 50_000


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread):
    return build_tiny_index(tmp_path_factory.mktemp("retrieval-server"))


@pytest.fixture(scope="module")
def index(tiny) -> Index:
    return Index(tiny.path)


@pytest.fixture(scope="module")
def client(tiny, index) -> TestClient:
    return TestClient(create_app(index, tiny.encoder, LIMIT))


def _png(tiny, row: int) -> bytes:
    return (tiny.data["root"] / "images" / f"{row:04d}.png").read_bytes()


def _encoded(img: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt)
    return buffer.getvalue()


def _expected_scores(tiny, text: str, against: str) -> dict:
    """Item row -> score, recomputed in float64 from the stored float16 vectors."""
    query = tiny.encoder.texts([text])[0].numpy().astype(np.float64)
    vectors = np.load(tiny.path / f"{against}.npy").astype(np.float64)
    rows = np.arange(len(vectors)) if against == "images" else np.load(tiny.path / "captions.rows.npy")
    return {int(row): float(score) for row, score in zip(rows, vectors @ query)}


def test_info(client, tiny):
    info = client.get("/api/info").json()
    assert info["counts"] == {"items": 30, "captions": 30, "skipped": 0}
    assert info["embed_dim"] == tiny.encoder.embed_dim
    assert info["search"] == {"images": {"kind": "exact"}, "captions": {"kind": "exact"}}
    assert info["model"] == tiny.encoder.identity.describe() and str(tiny.checkpoint) in info["model"]
    assert info["max_upload_bytes"] == LIMIT


@pytest.mark.parametrize("against", ["images", "captions"])
def test_text_search_scores_match_float64(client, tiny, against):
    text = "a red square on a white background"
    response = client.get("/api/search", params={"text": text, "k": 7, "against": against})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["query"] == {"text": text} and body["against"] == against
    results = body["results"]
    assert [r["rank"] for r in results] == list(range(1, 8))
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    expected = _expected_scores(tiny, text, against)
    for r in results:
        assert {"row", "key", "path", "caption"} <= set(r)
        assert r["path"] == str(tiny.data["root"] / "images" / f"{r['row']:04d}.png")
        assert r["score"] == pytest.approx(expected[r["row"]], abs=1e-3)
    best = sorted(expected.values(), reverse=True)
    assert scores == pytest.approx(best[:7], abs=1e-3)


@pytest.mark.parametrize("params, status, words", [
    ({"text": "  "}, 400, "text is empty"),
    ({}, 400, "text is empty"),
    ({"text": "a", "k": 0}, 422, "k (query)"),
    ({"text": "a", "k": 1001}, 422, "less than or equal to 1000"),
    ({"text": "a", "against": "pixels"}, 422, "'images' or 'captions'"),
])
def test_text_search_bad_requests(client, params, status, words):
    response = client.get("/api/search", params=params)
    assert response.status_code == status
    assert words in response.json()["detail"]


@pytest.fixture(scope="module")
def captionless(tiny, tmp_path_factory) -> TestClient:
    """The shapes' PNG files indexed as a folder, which has no sidecar text files: an index with no captions."""
    folder = str(tiny.data["root"] / "images")
    out = tmp_path_factory.mktemp("captionless") / "index"
    IndexWriter(out, tiny.encoder, folder, workers=0, progress=False).run(gallery_items(folder))
    return TestClient(create_app(Index(out), tiny.encoder, LIMIT))


def test_searching_captions_that_the_index_lacks(captionless, tiny):
    """Each kind of query against the captions of an index without any is refused, and told to search the
    images, instead of getting an empty list as if nothing matched."""
    assert captionless.get("/api/info").json()["counts"]["captions"] == 0
    vector = tiny.encoder.texts(["a red square"])[0].tolist()
    answers = {
        "text": captionless.get("/api/search", params={"text": "a red square", "against": "captions"}),
        "image": captionless.post("/api/search/image", files={"file": ("q.png", _png(tiny, 1), "image/png")},
                                  data={"against": "captions"}),
        "embedding": captionless.post("/api/search/embedding", json={
            "embedding": vector, "model": "conlip-tiny", "pretrained": str(tiny.checkpoint), "against": "captions"})}
    for kind, response in answers.items():
        assert response.status_code == 422, (kind, response.text)
        detail = response.json()["detail"]
        assert "no captions" in detail and "search against the images" in detail, (kind, detail)
    images = captionless.get("/api/search", params={"text": "a red square", "k": 3})
    assert images.status_code == 200 and len(images.json()["results"]) == 3


def test_named_model_must_be_the_index(client, tiny, tmp_path):
    recorded = tiny.encoder.identity
    for params in ({"model": "conlip-tiny", "pretrained": str(tiny.checkpoint)}, {"model": "conlip-tiny"},
                   {"pretrained": str(tiny.checkpoint)}, {"fingerprint": recorded.fingerprint},
                   {"model": "conlip-tiny", "fingerprint": recorded.fingerprint.upper()}):
        ok = client.get("/api/search", params={"text": "a", **params})
        assert ok.status_code == 200, (params, ok.text)
    other = conlip_checkpoint(tmp_path / "other.pt", seed=1)
    for params in ({"model": "ViT-B-32"}, {"model": "conlip-tiny", "pretrained": str(other)},
                   {"pretrained": str(other)}, {"fingerprint": "0" * 64},
                   {"model": "ViT-B-32", "fingerprint": recorded.fingerprint}):
        response = client.get("/api/search", params={"text": "a", **params})
        assert response.status_code == 409
        detail = response.json()["detail"]
        assert recorded.describe() in detail and "GET /api/info" in detail
        asked = ModelIdentity(params.get("model", "conlip-tiny"), params.get("pretrained"), params.get("fingerprint"))
        assert asked.describe() in detail
    refused = client.post("/api/search/image", files={"file": ("q.png", _png(tiny, 0), "image/png")},
                          data={"model": "conlip-tiny", "pretrained": str(other)})
    assert refused.status_code == 409 and str(other) in refused.json()["detail"]


def test_the_server_opens_no_file_a_request_names(client, tiny, tmp_path, monkeypatch):
    """A path sent over HTTP is compared as a string: neither hashed nor checked for existence, so a
    client learns nothing about the server's files."""
    secret = tmp_path / "secret.pt"
    secret.write_bytes(b"not for clients")
    digest = hashlib.sha256(secret.read_bytes()).hexdigest()

    def no_file_access(*args, **kwargs):
        raise AssertionError("the server read a file a request named")

    monkeypatch.setattr(encoder_module, "_sha256", no_file_access)
    monkeypatch.setattr(ModelIdentity, "of", no_file_access)
    vector = tiny.encoder.texts(["a"])[0].tolist()
    for model in ("conlip-tiny", f"local-dir:{tmp_path}"):
        answers = [
            client.get("/api/search", params={"text": "a", "model": model, "pretrained": str(secret)}),
            client.post("/api/search/image", files={"file": ("q.png", _png(tiny, 0), "image/png")},
                        data={"model": model, "pretrained": str(secret)}),
            client.post("/api/search/embedding", json={"embedding": vector, "model": model,
                                                       "pretrained": str(secret)})]
        for response in answers:
            assert response.status_code == 409, response.text
            assert digest[:12] not in response.text and str(secret) in response.json()["detail"]


def test_image_upload_finds_itself(client, tiny):
    response = client.post("/api/search/image", files={"file": ("query.png", _png(tiny, 7), "image/png")},
                           data={"k": "5", "against": "images"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["query"] == {"image": "query.png", "bytes": len(_png(tiny, 7))}
    assert len(body["results"]) == 5
    assert body["results"][0]["row"] == 7 and body["results"][0]["score"] == pytest.approx(1.0, abs=2e-3)


@pytest.mark.parametrize("size", [LIMIT + 1, LIMIT + MULTIPART_SLACK + 1])
def test_upload_over_the_limit(client, size):
    """Just over the limit is caught on the file part; far over, by Content-Length before any parsing."""
    response = client.post("/api/search/image", files={"file": ("big.png", b"\0" * size, "image/png")})
    assert response.status_code == 413
    detail = response.json()["detail"]
    assert f"{LIMIT:,} bytes" in detail and "--max-upload-mb" in detail
    assert f"{size:,} bytes" in detail or "in all" in detail


def _endless_post(app, path: str, content_type: bytes, head: bytes, most: int) -> tuple:
    """POST a body with no Content-Length that never ends (chunks of 8 KiB after ``head``) straight to
    the ASGI app; returns the status, the JSON detail and how many bytes the server pulled."""
    pulled, sent = 0, []
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
             "query_string": b"", "server": ("test", 80), "client": ("test", 1),
             "headers": [(b"content-type", content_type)]}

    async def receive():
        nonlocal pulled
        if pulled > 100 * most:
            return {"type": "http.disconnect"}
        body = head if pulled == 0 else b"\0" * 8192
        pulled += len(body)
        return {"type": "http.request", "body": body, "more_body": True}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:]))["detail"], pulled


def test_upload_without_length_is_read_only_to_the_bound(tiny, index):
    """A chunked upload that never ends is cut off once past the limit: the server stops reading."""
    head = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
    status, detail, pulled = _endless_post(create_app(index, tiny.encoder, LIMIT), "/api/search/image",
                                           b"multipart/form-data; boundary=xyz", head, LIMIT)
    assert status == 413 and "--max-upload-mb" in detail
    assert pulled <= LIMIT + MULTIPART_SLACK + 8192


def test_embedding_body_is_read_only_to_what_one_vector_needs(client, tiny, index):
    bound = EMBEDDING_BYTES_PER_DIM * tiny.encoder.embed_dim + EMBEDDING_SLACK
    status, detail, pulled = _endless_post(create_app(index, tiny.encoder, LIMIT), "/api/search/embedding",
                                           b"application/json", b'{"embedding": [', bound)
    assert status == 413 and f"embedding of {tiny.encoder.embed_dim} numbers" in detail
    assert pulled <= bound + 8192
    declared = client.post("/api/search/embedding", content=b" " * (bound + 1),
                           headers={"content-type": "application/json"})
    assert declared.status_code == 413
    broken = client.post("/api/search/embedding", content=b'{"embedding": [1, 2', headers={"content-type":
                                                                                             "application/json"})
    assert broken.status_code == 422 and broken.json()["detail"].startswith("invalid request: body")
    missing = client.post("/api/search/embedding", json={"embedding": [1.0]})
    assert missing.status_code == 422 and "model (body): Field required" in missing.json()["detail"]


def _huge_png(side: int) -> bytes:
    """A one-colour PNG of side x side pixels: a few kB on disk, side² x 3 bytes decoded."""
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 30)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def test_an_image_over_the_pixel_limit_is_refused_before_decoding(tiny, index):
    data = _huge_png(2000)
    assert len(data) < LIMIT
    client = TestClient(create_app(index, tiny.encoder, LIMIT, max_query_pixels=1_000_000))
    response = client.post("/api/search/image", files={"file": ("bomb.png", data, "image/png")})
    assert response.status_code == 413
    detail = response.json()["detail"]
    assert "bomb.png is 2000x2000 pixels (4.0 megapixels)" in detail and "--max-image-megapixels" in detail
    assert client.post("/api/search/image", files={"file": ("q.png", _png(tiny, 3), "image/png")}).status_code == 200
    # Only the header is read: with its pixel data cut off, the image is refused for its size, not
    # reported as corrupt (which decoding it would find).
    header_only = data[:200]
    with pytest.raises(ImageTooLarge):
        encoder_module.decode_image(header_only, tiny.encoder.preprocess, max_pixels=1_000_000)
    with pytest.raises(UnreadableImage):
        encoder_module.decode_image(header_only, tiny.encoder.preprocess)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF"])
def test_an_image_over_pils_own_limit_is_too_large_not_unreadable(tiny, index, monkeypatch, fmt):
    """PIL refuses images over twice Image.MAX_IMAGE_PIXELS itself (PNG while opening, WebP and TIFF in
    their decoders); a query over it gets 413, an index item is skipped as unreadable with PIL's reason.
    The server's own limit (here set above PIL's, which the command line does not allow) is not reached."""
    data = _encoded(Image.open(io.BytesIO(_png(tiny, 2))).resize((128, 128)), fmt)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64)  # PIL refuses 128x128, twice over
    client = TestClient(create_app(index, tiny.encoder, LIMIT, max_query_pixels=1_000_000))
    response = client.post("/api/search/image", files={"file": ("q.img", data, "application/octet-stream")})
    assert response.status_code == 413, response.text
    detail = response.json()["detail"]
    assert detail.startswith("q.img is over PIL's own limit (Image size (16384 pixels) exceeds limit of 8192 pixels")
    assert detail.endswith("Send a smaller image.")  # no advice to raise --max-image-megapixels: it would not help
    with pytest.raises(UnreadableImage, match="DecompressionBombError"):
        encoder_module.decode_image(data, tiny.encoder.preprocess)


def test_the_query_pixel_limit_cannot_exceed_pils(capsys):
    from conlip_plugin.retrieval import cli

    with pytest.raises(SystemExit):
        cli.main(["serve", "--index", "x", "--max-image-megapixels", "200"])
    assert "argument --max-image-megapixels: must be at most 179.0, where PIL itself refuses" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="x is not an index"):  # within it: parsing passes, the index stops it
        cli.main(["serve", "--index", "x", "--max-image-megapixels", "150"])


def test_a_strip_is_told_to_be_cropped(client, tiny):
    """An image refused for its shape is a readable PNG: the answer says to crop it, not to send a PNG."""
    strip = _encoded(Image.new("RGB", (1000, 2), (0, 0, 255)))
    response = client.post("/api/search/image", files={"file": ("strip.png", strip, "image/png")})
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert "strip.png is 1000x2 pixels, an aspect ratio over 200:1" in detail and "Crop it to at most 200:1" in detail
    assert "send a PNG" not in detail
    with pytest.raises(UnreadableImage):  # which the indexer skips, with its reason
        encoder_module.decode_image(strip, tiny.encoder.preprocess)


@pytest.mark.parametrize("stuck_in, other", [
    ("the index search", ("/api/info", {})),  # a search on the event loop would hold up every request
    ("decoding", ("/api/search", {"text": "a red square", "k": 3})),  # decoding under the model lock: searches
])
def test_an_upload_stuck_in_one_step_does_not_hold_up_other_requests(tiny, monkeypatch, stuck_in, other):
    """While an image search is held in one step, another request still answers; with that step on the
    event loop (or, for decoding, under the model lock) the other request would wait out the held step."""
    import httpx

    index = Index(tiny.path)
    owner, name = (index, "search") if stuck_in == "the index search" else (queries_module, "decode_image")
    step, entered, release, waits = getattr(owner, name), threading.Event(), threading.Event(), []

    def held_step(*args):
        entered.set()
        waits.append(release.wait(timeout=10))
        return step(*args)

    monkeypatch.setattr(owner, name, held_step)
    app = create_app(index, tiny.encoder, LIMIT)

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            image = asyncio.create_task(client.post("/api/search/image",
                                                    files={"file": ("q.png", _png(tiny, 5), "image/png")}))
            while not entered.is_set() and not image.done():
                await asyncio.sleep(0.05)
            answer = await client.get(other[0], params=other[1])
            answered_while_held = not release.is_set()
            release.set()
            return answer, answered_while_held, await image

    answer, answered_while_held, image = asyncio.run(scenario())
    assert answer.status_code == 200 and answered_while_held and waits == [True]
    assert image.status_code == 200 and image.json()["results"][0]["row"] == 5


def test_query_images_are_decoded_a_few_at_a_time(tiny, index, monkeypatch):
    """Decoding is outside the model lock but bounded: of four uploads at once, at most DECODE_SLOTS decode
    together (each call waits a moment for more to join it, so without the bound all four would)."""
    import httpx

    decode, guard = queries_module.decode_image, threading.Lock()
    inside = most = 0

    def watched_decode(*args):
        nonlocal inside, most
        with guard:
            inside += 1
            most = max(most, inside)
        deadline = 50
        while deadline and most < 4:
            threading.Event().wait(0.01)
            deadline -= 1
        try:
            return decode(*args)
        finally:
            with guard:
                inside -= 1

    monkeypatch.setattr(queries_module, "decode_image", watched_decode)
    app = create_app(index, tiny.encoder, LIMIT)

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await asyncio.gather(*(client.post("/api/search/image", files={"file": (f"{i}.png", _png(tiny, i),
                                                                                           "image/png")})
                                          for i in range(4)))

    answers = asyncio.run(scenario())
    assert [a.status_code for a in answers] == [200] * 4
    assert [a.json()["results"][0]["row"] for a in answers] == [0, 1, 2, 3]
    assert most == queries_module.DECODE_SLOTS


def test_the_model_runs_one_request_at_a_time(tiny, index, monkeypatch):
    """Two text searches at once never run the model together. Each call waits a moment for a second one to
    join it, so without the lock they would overlap for certain."""
    import httpx

    texts, guard, joined = tiny.encoder.texts, threading.Lock(), threading.Event()
    inside = most = 0

    def watched_texts(captions):
        nonlocal inside, most
        with guard:
            inside += 1
            most = max(most, inside)
            if inside == 2:
                joined.set()
        joined.wait(timeout=0.5)
        try:
            return texts(captions)
        finally:
            with guard:
                inside -= 1

    monkeypatch.setattr(tiny.encoder, "texts", watched_texts)
    app = create_app(index, tiny.encoder, LIMIT)

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await asyncio.gather(*(client.get("/api/search", params={"text": text, "k": 2})
                                          for text in ("a red square", "a blue circle")))

    answers = asyncio.run(scenario())
    assert [a.status_code for a in answers] == [200, 200]
    assert most == 1 and not joined.is_set()


def test_not_an_image(client):
    response = client.post("/api/search/image", files={"file": ("notes.txt", b"just words", "text/plain")})
    assert response.status_code == 415
    detail = response.json()["detail"]
    assert "notes.txt" in detail and "cannot identify image file" in detail


def test_upload_needs_a_file_and_a_good_k(client, tiny):
    missing = client.post("/api/search/image", data={"k": "3"})
    assert missing.status_code == 400 and "'file'" in missing.json()["detail"]
    bad_k = client.post("/api/search/image", files={"file": ("q.png", _png(tiny, 0), "image/png")}, data={"k": "0"})
    assert bad_k.status_code == 422 and "k must be" in bad_k.json()["detail"]
    bad_against = client.post("/api/search/image", files={"file": ("q.png", _png(tiny, 0), "image/png")},
                              data={"against": "pixels"})
    assert bad_against.status_code == 422 and "against must be" in bad_against.json()["detail"]
    two_files = client.post("/api/search/image", files=[("file", ("q.png", _png(tiny, 0), "image/png")),
                                                         ("model", ("m.txt", b"conlip-tiny", "text/plain"))])
    assert two_files.status_code == 400 and "Maximum number of files is 1" in two_files.json()["detail"]


def test_embedding_from_the_index_model(client, tiny, tmp_path):
    """The client's own embedding gives the text endpoint's answer, with the weights named by the
    index's path or by their sha256; a copy elsewhere must be named by its sha256 (the server hashes
    no path a request sends); a wrong length is refused."""
    text = "a blue circle on a white background"
    vector = tiny.encoder.texts([text])[0].tolist()
    by_text = client.get("/api/search", params={"text": text, "k": 4}).json()["results"]
    moved = tmp_path / "moved.pt"
    shutil.copy(tiny.checkpoint, moved)
    by_path = client.post("/api/search/embedding", json={"embedding": vector, "model": "conlip-tiny",
                                                         "pretrained": str(moved)})
    assert by_path.status_code == 409 and "fingerprint" in by_path.json()["detail"]
    moved_fingerprint = hashlib.sha256(moved.read_bytes()).hexdigest()
    for weights in ({"pretrained": str(tiny.checkpoint)}, {"fingerprint": moved_fingerprint}):
        response = client.post("/api/search/embedding", json={"embedding": vector, "model": "conlip-tiny",
                                                              **weights, "k": 4})
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert [r["row"] for r in results] == [r["row"] for r in by_text]
        assert [r["score"] for r in results] == pytest.approx([r["score"] for r in by_text], abs=1e-5)
    short = client.post("/api/search/embedding", json={"embedding": vector[:-1], "model": "conlip-tiny",
                                                       "pretrained": str(tiny.checkpoint)})
    assert short.status_code == 400
    assert f"{len(vector) - 1} dimensions" in short.json()["detail"]
    assert f"holds {len(vector)}" in short.json()["detail"]


def test_embedding_from_another_model(client, tiny, tmp_path):
    other = Encoder("conlip-tiny", str(conlip_checkpoint(tmp_path / "other.pt", seed=1)), "cpu")
    assert other.identity.fingerprint != tiny.encoder.identity.fingerprint
    vector = other.texts(["a red square"])[0].tolist()
    response = client.post("/api/search/embedding", json={"embedding": vector, "model": "conlip-tiny",
                                                          "pretrained": other.identity.pretrained})
    assert response.status_code == 409
    detail = response.json()["detail"]
    assert tiny.encoder.identity.describe() in detail and f"conlip-tiny ({other.identity.pretrained})" in detail
    no_weights = client.post("/api/search/embedding", json={"embedding": vector, "model": "conlip-tiny"})
    assert no_weights.status_code == 409 and "conlip-tiny (random init)" in no_weights.json()["detail"]
    by_hash = client.post("/api/search/embedding", json={"embedding": vector, "model": "conlip-tiny",
                                                         "fingerprint": other.identity.fingerprint})
    assert by_hash.status_code == 409 and other.identity.fingerprint[:12] in by_hash.json()["detail"]


def test_embedding_named_by_the_fingerprint_in_info(client, tiny):
    """A client on another machine proves its weights by their sha256, as /api/info reports it."""
    identity = client.get("/api/info").json()["identity"]
    vector = tiny.encoder.texts(["a red bar"])[0].tolist()
    response = client.post("/api/search/embedding", json={"embedding": vector, "model": identity["model"],
                                                          "fingerprint": identity["fingerprint"], "k": 2})
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["score"] == pytest.approx(
        client.get("/api/search", params={"text": "a red bar", "k": 1}).json()["results"][0]["score"], abs=1e-5)


def test_item_image(client, tiny):
    response = client.get("/api/items/4/image")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.content == _png(tiny, 4)
    assert Image.open(io.BytesIO(response.content)).size == (64, 64)
    for row in (30, -1):
        missing = client.get(f"/api/items/{row}/image")
        assert missing.status_code == 404 and "items 0 to 29" in missing.json()["detail"]


def test_item_image_is_served_from_its_file(client, tiny):
    """A file item is streamed, with an ETag, Last-Modified and byte ranges."""
    whole = _png(tiny, 4)
    response = client.get("/api/items/4/image")
    assert response.headers["etag"] and response.headers["last-modified"]
    assert response.headers["accept-ranges"] == "bytes"
    part = client.get("/api/items/4/image", headers={"Range": "bytes=8-23"})
    assert part.status_code == 206 and part.content == whole[8:24]
    assert part.headers["content-range"] == f"bytes 8-23/{len(whole)}"
    assert part.headers["content-type"] == "image/png"


def test_item_image_whose_file_is_gone(tiny, tmp_path):
    """Checked before streaming starts, so the client gets the 404 that says why, not a broken response."""
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for row in range(3):
        (gallery / f"{row}.png").write_bytes(_png(tiny, row))
    IndexWriter(tmp_path / "idx", tiny.encoder, str(gallery), workers=0, progress=False).run(
        gallery_items(str(gallery)))
    (gallery / "1.png").unlink()
    client = TestClient(create_app(Index(tmp_path / "idx"), tiny.encoder, LIMIT))
    assert client.get("/api/items/0/image").content == _png(tiny, 0)
    response = client.get("/api/items/1/image")
    assert response.status_code == 404
    detail = response.json()["detail"]
    assert f"the image of item 1 ({(gallery / '1.png').resolve()})" in detail and "the gallery has moved" in detail


def test_shard_item_image_type_is_sniffed(tiny, tmp_path):
    """A shard member's key has no extension: the type comes from the bytes."""
    shard = str(tiny.data["shard"])
    IndexWriter(tmp_path / "shard-index", tiny.encoder, shard, workers=0, progress=False).run(gallery_items(shard))
    client = TestClient(create_app(Index(tmp_path / "shard-index"), tiny.encoder, LIMIT))
    response = client.get("/api/items/2/image")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.content == _png(tiny, 2)


def test_page_and_static_files(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for element in ('id="query"', 'id="search"', 'id="upload"', 'id="results"', 'id="error"', 'id="info"'):
        assert element in page.text
    script = client.get("/static/app.js")
    assert script.status_code == 200 and "/api/search/image" in script.text
    style = client.get("/static/style.css")
    assert style.status_code == 200 and "#results" in style.text
    for text in (page.text, script.text, style.text):  # nothing from a CDN
        assert "http://" not in text and "https://" not in text and "//cdn" not in text


def test_encoder_of_another_model_is_refused(index, tmp_path):
    other = Encoder("conlip-tiny", str(conlip_checkpoint(tmp_path / "other.pt", seed=2)), "cpu")
    with pytest.raises(ValueError, match="serve it with the index's model") as err:
        create_app(index, other, LIMIT)
    assert index.identity.describe() in str(err.value) and other.identity.describe() in str(err.value)


def test_busy_port_is_named():
    taken = _listening_socket("127.0.0.1", 0)
    try:
        with pytest.raises(SystemExit, match="pass another --port"):
            _listening_socket("127.0.0.1", taken.getsockname()[1])
    finally:
        taken.close()
