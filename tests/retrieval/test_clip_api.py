"""clip-retrieval's back-end API on ``conlip-retrieval serve``: its own ClipClient against a real server,
and the contract's details (result shapes, refused and ignored options, bounds) through TestClient."""
import base64
import json

import pytest
import requests

from clip_retrieval_client import clip_client
from retrieval_live import live_server
from retrieval_models import build_tiny_index

pytest.importorskip("fastapi", reason="the server needs pip install 'conlip-plugin[retrieval]'")
from fastapi.testclient import TestClient  # noqa: E402

from conlip_plugin.retrieval.clip_retrieval_api import MAX_RESULT_IDS  # noqa: E402
from conlip_plugin.retrieval.server import create_app  # noqa: E402
from conlip_plugin.retrieval.store import Index  # noqa: E402

LIMIT = 50_000


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread):
    return build_tiny_index(tmp_path_factory.mktemp("clip-api"))


@pytest.fixture(scope="module")
def client(tiny) -> TestClient:
    return TestClient(create_app(Index(tiny.path), tiny.encoder, LIMIT))


def _png(tiny, row: int) -> bytes:
    return (tiny.data["root"] / "images" / f"{row:04d}.png").read_bytes()


def _ours(client, text: str, k: int, against: str = "images") -> list:
    return client.get("/api/search", params={"text": text, "k": k, "against": against}).json()["results"]


def _knn(client, **fields):
    return client.post("/knn-service", content=json.dumps({"indice_name": "index", **fields}))


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    with live_server(tiny.path, tmp_path_factory.mktemp("clip-api-server")) as live:
        yield live


@pytest.mark.slow
def test_clip_retrieval_client_against_serve(server, client, tiny, tmp_path):
    """clip-retrieval's ClipClient, with its defaults (deduplicate, the safety model, the violence detector
    and an aesthetic score all on), gets text, image and embedding answers equal to our own API's."""
    module = clip_client()
    knn = server.url + "knn-service"
    images = module.ClipClient(url=knn, indice_name="index", num_images=5)
    by_text = images.query(text="a red square")
    expected = _ours(client, "a red square", 5)
    assert [r["id"] for r in by_text] == [r["row"] for r in expected]
    assert [r["similarity"] for r in by_text] == pytest.approx([r["score"] for r in expected], abs=1e-5)
    first = by_text[0]
    assert first["url"] == f"{server.url}api/items/{first['id']}/image"
    assert first["caption"] == expected[0]["caption"] and first["image_path"] == expected[0]["path"]
    assert requests.get(first["url"], timeout=10).content == _png(tiny, first["id"])

    query_file = tmp_path / "query.png"
    query_file.write_bytes(_png(tiny, 7))
    by_image = images.query(image=str(query_file))
    assert by_image[0]["id"] == 7 and by_image[0]["similarity"] == pytest.approx(1.0, abs=2e-3)

    vector = tiny.encoder.texts(["a blue circle"])[0].tolist()
    by_embedding = images.query(embedding_input=vector)
    assert [r["id"] for r in by_embedding] == [r["row"] for r in _ours(client, "a blue circle", 5)]

    captions = module.ClipClient(url=knn, indice_name="index", num_images=3, modality=module.Modality.TEXT)
    by_caption = captions.query(text="a green triangle")
    assert [r["id"] for r in by_caption] == [r["row"] for r in _ours(client, "a green triangle", 3, "captions")]


@pytest.mark.slow
def test_indices_list_and_metadata_over_http(server, client):
    """The front end's two other calls, as it makes them: a JSON body with no Content-Type."""
    assert requests.get(server.url + "indices-list", timeout=10).json() == ["index"]
    answer = requests.post(server.url + "metadata", data=json.dumps({"ids": [4, 0], "indice_name": "index"}),
                           timeout=10).json()
    assert [entry["id"] for entry in answer] == [4, 0]
    assert answer[0]["metadata"]["url"] == server.url + "api/items/4/image"
    assert answer[0]["metadata"]["image_path"].endswith("0004.png") and answer[0]["metadata"]["caption"]


def test_result_ids_beyond_num_images_come_without_metadata(client):
    """As clip-retrieval's front end asks (num_result_ids past num_images): the first num_images carry their
    metadata, the rest id and similarity only, which /metadata then gives for any of them."""
    answer = _knn(client, text="a red square", num_images=3, num_result_ids=10)
    assert answer.status_code == 200, answer.text
    results = answer.json()
    assert len(results) == 10 and all("caption" in r and "url" in r for r in results[:3])
    assert all(set(r) == {"id", "similarity"} for r in results[3:])
    assert [r["id"] for r in results] == [r["row"] for r in _ours(client, "a red square", 10)]
    more = client.post("/metadata", content=json.dumps({"ids": [r["id"] for r in results[3:]]})).json()
    assert [m["id"] for m in more] == [r["id"] for r in results[3:]]
    assert all(m["metadata"]["caption"] for m in more)


def test_options_that_cannot_be_honoured(client, tiny):
    """image_url and use_mclip are refused naming the option; the filters clip-retrieval's client turns on by
    default are answered, and named as ignored in a header."""
    refused = {"image_url": _knn(client, image_url="http://example.com/cat.jpg"),
               "use_mclip": _knn(client, text="a cat", use_mclip=True)}
    for option, response in refused.items():
        assert response.status_code == 400 and response.json()["detail"].startswith(f"{option}: "), response.text
    filtered = _knn(client, text="a red square", deduplicate=True, use_safety_model=True, use_violence_detector=True,
                    aesthetic_score=9, aesthetic_weight=0.5, num_images=2)
    assert filtered.status_code == 200 and len(filtered.json()) == 2
    assert filtered.headers["x-conlip-ignored"] == ("deduplicate, use_safety_model, use_violence_detector, "
                                                    "aesthetic_score, aesthetic_weight")
    plain = _knn(client, text="a red square", aesthetic_score="", num_images=2)
    assert plain.status_code == 200 and "x-conlip-ignored" not in plain.headers


@pytest.mark.parametrize("fields, status, words", [
    ({}, 400, "exactly one of text, image (base64) and embedding_input; got none"),
    ({"text": "a", "image": "AAAA"}, 400, "got text and image"),
    ({"text": "   "}, 400, "text is blank"),
    ({"image": "not base64!"}, 400, "image is not base64"),
    ({"image": base64.b64encode(b"just words").decode()}, 415, "not an image this server can read"),
    ({"embedding_input": [1.0, 2.0]}, 400, "the embedding has 2 dimensions"),
    ({"text": "a", "modality": "video"}, 422, "modality (body)"),
    ({"text": "a", "num_images": 0}, 422, "num_images (body)"),
    ({"text": "a", "num_result_ids": MAX_RESULT_IDS + 1}, 422, "num_result_ids (body)"),
    ({"text": "a", "indice_name": "laion5B"}, 404, "no index named 'laion5B'; this server holds 'index'"),
])
def test_knn_bad_requests(client, fields, status, words):
    response = client.post("/knn-service", content=json.dumps(fields))
    assert response.status_code == status, response.text
    assert words in response.json()["detail"]


def test_knn_image_over_the_upload_limit(client):
    big = base64.b64encode(b"\0" * (LIMIT + 1)).decode()
    response = _knn(client, image=big)
    assert response.status_code == 413 and "--max-upload-mb" in response.json()["detail"]
    far_over = client.post("/knn-service", content=b" " * (2 * LIMIT + 200_000))
    assert far_over.status_code == 413 and "base64-encoded" in far_over.json()["detail"]


def test_metadata_of_unknown_ids(client):
    missing = client.post("/metadata", content=json.dumps({"ids": [3, 30]}))
    assert missing.status_code == 404 and "no item 30; this index holds items 0 to 29" in missing.json()["detail"]
    assert client.post("/metadata", content=json.dumps({"ids": [-1]})).status_code == 404
    assert client.post("/metadata", content=json.dumps({"ids": []})).json() == []
    wrong = client.post("/metadata", content=json.dumps({"ids": [1], "indice_name": "other"}))
    assert wrong.status_code == 404 and "GET /indices-list" in wrong.json()["detail"]
    not_ids = client.post("/metadata", content=json.dumps({"ids": ["a"]}))
    assert not_ids.status_code == 422 and "ids.0 (body)" in not_ids.json()["detail"]


def test_index_name(tiny):
    named = TestClient(create_app(Index(tiny.path), tiny.encoder, LIMIT, index_name="shapes"))
    assert named.get("/indices-list").json() == ["shapes"]
    assert named.post("/knn-service", content=json.dumps({"text": "a", "indice_name": "shapes"})).status_code == 200
