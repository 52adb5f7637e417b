"""The search page in a real browser: ``conlip-retrieval serve`` as a subprocess, driven by Playwright
with Debian's Chromium (else Playwright's own, if ``playwright install chromium`` fetched it). Leaves a
screenshot in $CONLIP_TEST_ARTIFACTS (default: test-artifacts/)."""
import json
import os
import re
import shutil
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Optional

import pytest

from retrieval_live import live_server
from retrieval_models import build_tiny_index

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
K = 8


def _missing(reason: str) -> None:
    """Skip, saying what to install; CI sets CONLIP_REQUIRE_BROWSER=1 so that there it fails instead."""
    if os.environ.get("CONLIP_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason} (CONLIP_REQUIRE_BROWSER=1: this run must test the page)")
    pytest.skip(reason)


def _system_chromium() -> Optional[str]:
    return next((p for p in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser"))
                 if p and Path(p).is_file()), None)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright import sync_api
    except ImportError:
        _missing("Playwright is missing; install it with pip install 'conlip-plugin[test]'")
    with sync_api.sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=_system_chromium(), args=CHROMIUM_ARGS)
        except sync_api.Error as err:
            _missing(f"no Chromium to drive ({str(err).splitlines()[0]}); install one with apt-get install "
                     f"chromium, or python -m playwright install chromium")
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread):
    return build_tiny_index(tmp_path_factory.mktemp("retrieval-browser"))


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    """``conlip-retrieval serve --port 0`` until the module ends; yields the URL it printed."""
    with live_server(tiny.path, tmp_path_factory.mktemp("serve"), "--device", "cpu") as live:
        yield live.url


def _api_search(url: str, text: str) -> list:
    query = urllib.parse.urlencode({"text": text, "k": K})
    with urllib.request.urlopen(f"{url}api/search?{query}", timeout=30) as response:
        return json.load(response)["results"]


def _wait_for_results(page, count: int, status_words: str) -> None:
    """Until the page has rendered ``count`` results of the query named by ``status_words``. While a search
    is in flight the status already names its query ("searching for ...") and the grid still holds the
    previous query's results, so only the finished status ("N results for ...") says the grid is new."""
    page.wait_for_function("([n, words]) => document.querySelectorAll('#results .result').length === n"
                           " && document.getElementById('status').textContent.startsWith(`${n} results for `)"
                           " && document.getElementById('status').textContent.includes(words)",
                           arg=[count, status_words], timeout=30_000)
    page.wait_for_function("() => [...document.querySelectorAll('#results .result img')]"
                           ".every((img) => img.complete && img.naturalWidth > 0)", timeout=30_000)


def _cards(page) -> list:
    return page.eval_on_selector_all("#results .result", """cards => cards.map(card => ({
        row: Number(card.dataset.row), rank: card.querySelector('.rank').textContent,
        score: card.querySelector('.score').textContent, caption: card.querySelector('.caption').textContent,
        width: card.querySelector('img').naturalWidth}))""")


def test_search_page(browser, server, tiny):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    requested, crashes = [], []
    page.on("request", lambda request: requested.append(request.url))
    page.on("pageerror", lambda error: crashes.append(str(error)))
    try:
        page.goto(server)
        page.wait_for_function("() => document.getElementById('info').textContent.includes('30 images')")
        assert tiny.encoder.identity.describe() in page.text_content("#info")

        page.fill("#k", str(K))
        page.fill("#query", "a red square on a white background")
        page.click("#search")
        _wait_for_results(page, K, "red square")
        cards = _cards(page)
        scores = [float(card["score"]) for card in cards]
        assert scores == sorted(scores, reverse=True)
        assert all(re.fullmatch(r"-?\d+\.\d{3}", card["score"]) for card in cards)
        assert [card["rank"] for card in cards] == [f"#{n}" for n in range(1, K + 1)]
        assert all(card["width"] > 0 for card in cards)
        expected = _api_search(server, "a red square on a white background")
        assert [(c["row"], c["score"], c["caption"]) for c in cards] == \
            [(r["row"], f"{r['score']:.3f}", r["caption"]) for r in expected]

        artifacts = Path(os.environ.get("CONLIP_TEST_ARTIFACTS", ROOT / "test-artifacts"))
        artifacts.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(artifacts / "retrieval-page.png"), full_page=True)

        page.fill("#query", "a blue circle")
        page.press("#query", "Enter")
        _wait_for_results(page, K, "blue circle")
        assert [c["row"] for c in _cards(page)] == [r["row"] for r in _api_search(server, "a blue circle")]
        assert page.is_hidden("#error")

        # A query typed while another is in flight: the newer one is sent and shown, the older one's late
        # answer is not (the page's fetch of 'slow' queries is held back 1.5 s in the browser).
        page.evaluate("""() => { const fetchNow = window.fetch; window.fetch = async (url, options) => {
            if (String(url).includes('slow')) { await new Promise((done) => setTimeout(done, 1500)); }
            return fetchNow(url, options); }; }""")
        page.fill("#query", "a slow green triangle")
        page.press("#query", "Enter")
        assert page.get_attribute("#results", "aria-busy") == "true"
        page.fill("#query", "a yellow bar")
        page.press("#query", "Enter")
        _wait_for_results(page, K, "yellow bar")
        assert page.get_attribute("#results", "aria-busy") is None
        page.wait_for_timeout(2500)
        assert page.get_attribute("#results", "aria-busy") is None
        assert "yellow bar" in page.text_content("#status")
        assert [c["row"] for c in _cards(page)] == [r["row"] for r in _api_search(server, "a yellow bar")]
        assert page.is_hidden("#error")

        page.fill("#query", "   ")
        page.click("#search")
        page.wait_for_selector("#error", state="visible")
        assert "text is empty" in page.text_content("#error")

        page.set_input_files("#upload", str(tiny.data["root"] / "images" / "0012.png"))
        _wait_for_results(page, K, "0012.png")
        cards = _cards(page)
        assert cards[0]["row"] == 12 and float(cards[0]["score"]) == pytest.approx(1.0, abs=2e-3)
        assert page.is_hidden("#error")
        assert page.evaluate("document.getElementById('query-image').naturalWidth") == 64
        page.screenshot(path=str(artifacts / "retrieval-page-upload.png"), full_page=True)
    finally:
        page.close()
    assert not crashes, crashes
    outside = [url for url in requested if not url.startswith((server, f"blob:{server}"))]
    assert not outside, f"the page fetched from elsewhere than the server: {outside}"
