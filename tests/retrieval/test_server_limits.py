"""``conlip-retrieval serve`` under abuse, on a real server: slow clients are cut off, requests beyond the
bound get a 503, a client that leaves mid-body leaves no traceback, and the access log is off by default
and goes to its file when asked for."""
import json
import socket
import time

import pytest
import requests

from retrieval_live import live_server
from retrieval_models import build_tiny_index

pytest.importorskip("fastapi", reason="the server needs pip install 'conlip-plugin[retrieval]'")

READ_TIMEOUT = 1.5
WAIT = 8.0  # how long a test waits for what the server should have done after READ_TIMEOUT


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread):
    return build_tiny_index(tmp_path_factory.mktemp("limits"))


@pytest.fixture(scope="module")
def strict(tiny, tmp_path_factory):
    """A server with a short read timeout, a bound of two requests at once, and an access log file."""
    folder = tmp_path_factory.mktemp("strict-server")
    with live_server(tiny.path, folder, "--read-timeout", str(READ_TIMEOUT), "--max-requests", "2",
                     "--access-log", str(folder / "access.log")) as live:
        live.access_log = folder / "access.log"
        yield live


@pytest.fixture(scope="module")
def default(tiny, tmp_path_factory):
    with live_server(tiny.path, tmp_path_factory.mktemp("default-server")) as live:
        yield live


def _connect(server) -> socket.socket:
    sock = socket.create_connection((server.host, server.port), timeout=WAIT)
    return sock


def _reply(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (or WAIT passes: then the test fails)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _partial_post(server, path: str, length: int, sent: bytes) -> socket.socket:
    """A POST whose headers are whole and whose body (``length`` bytes declared) has only ``sent`` so far."""
    sock = _connect(server)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {server.host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {length}\r\n\r\n".encode() + sent)
    return sock


@pytest.mark.slow
def test_slow_headers_are_cut_off(strict):
    """Headers trickled a byte at a time never finish: the server closes the connection past the read
    timeout, though bytes keep coming (which would restart uvicorn's keep-alive timer)."""
    sock = _connect(strict)
    sock.sendall(b"GET /api/info HTTP/1.1\r\nHost: x\r\n")
    start, closed = time.monotonic(), False
    while time.monotonic() - start < WAIT:
        try:
            sock.sendall(b"X")
            sock.settimeout(0.3)
            closed = sock.recv(1) == b""
        except socket.timeout:
            continue
        except (BrokenPipeError, ConnectionResetError):
            closed = True
        if closed:
            break
    sock.close()
    assert closed


@pytest.mark.slow
def test_a_slow_body_gets_408(strict):
    sock = _partial_post(strict, "/api/search/embedding", 1000, b'{"embedding": [')
    reply = _reply(sock)
    sock.close()
    assert reply.startswith(b"HTTP/1.1 408 "), reply[:200]
    assert b"did not arrive within 1.5 s" in reply and b"--read-timeout" in reply


@pytest.mark.slow
def test_requests_beyond_the_bound_get_503(strict):
    """Two requests held at work (their bodies unfinished) fill the bound of two; a third is refused at
    once with a 503 that says why, and once they are done a request is served again."""
    held = [_partial_post(strict, "/api/search/embedding", 1000, b"{") for _ in range(2)]
    try:
        refused = None
        for _ in range(20):  # until both held requests have reached the app
            answer = requests.get(strict.url + "api/info", timeout=WAIT)
            if answer.status_code == 503:
                refused = answer
                break
            time.sleep(0.05)
        assert refused is not None
        assert refused.headers["retry-after"] == "1"
        assert "answering 2 requests, its bound" in refused.json()["detail"] and "--max-requests" in refused.text
    finally:
        for sock in held:
            sock.close()
    for _ in range(40):
        if requests.get(strict.url + "api/info", timeout=WAIT).status_code == 200:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the bound did not free up after the held requests ended")


@pytest.mark.slow
def test_a_client_that_leaves_mid_body_leaves_no_traceback(strict):
    for path in ("/api/search/image", "/api/search/embedding", "/knn-service"):
        sock = _partial_post(strict, path, 100_000, b"--xyz\r\n" if path.endswith("image") else b'{"text": "a')
        time.sleep(0.2)  # the request reaches the app and waits on its body
        sock.close()
    time.sleep(0.5)
    assert requests.get(strict.url + "api/info", timeout=WAIT).status_code == 200
    log = strict.output()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]


@pytest.mark.slow
def test_access_log_goes_to_its_file(strict):
    requests.get(strict.url + "api/info", params={"probe": "access-log"}, timeout=WAIT)
    line = '"GET /api/info?probe=access-log HTTP/1.1" 200'
    for _ in range(50):  # written by the log's own thread
        if line in strict.access_log.read_text():
            break
        time.sleep(0.1)
    assert line in strict.access_log.read_text()
    assert "probe=access-log" not in strict.output()


@pytest.mark.slow
def test_no_access_log_by_default(default):
    assert requests.get(default.url + "api/info", params={"probe": "quiet"}, timeout=WAIT).status_code == 200
    answer = requests.post(default.url + "knn-service", data=json.dumps({"text": "a red square"}), timeout=WAIT)
    assert answer.status_code == 200
    time.sleep(0.5)
    log = default.output()
    assert "serving" in log and "probe=quiet" not in log and "POST /knn-service" not in log
