"""conlip-retrieval-load's own parts: it loads loopback servers only, and its figures are computed right."""
import pytest

from conlip_plugin.benchmarks.retrieval_load import Outcome, loopback_base, main, summary


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://localhost:8000/", "http://[::1]:9/"])
def test_loopback_addresses_are_taken(url):
    assert loopback_base(url).endswith("/")


@pytest.mark.parametrize("url, words", [
    ("http://10.1.2.3:8000/", "not on this machine's loopback"),
    ("http://192.168.0.1/", "not on this machine's loopback"),
    ("https://127.0.0.1/", "is not an http:// URL"),
    ("127.0.0.1:8000", "is not an http:// URL"),
])
def test_other_hosts_are_refused(url, words):
    with pytest.raises(SystemExit, match=words):
        loopback_base(url)
    with pytest.raises(SystemExit, match=words):  # before any request is sent
        main(["run", "--url", url, "--requests", "1"])


def test_summary_counts_and_percentiles():
    outcomes = [Outcome("text", 200, s / 100) for s in range(1, 101)] + [Outcome("image", 200, 1.0),
                                                                       Outcome("image", 503, 0.001),
                                                                       Outcome("text", 0, 60.0)]
    report = summary(outcomes, wall_s=2.0)
    assert report["requests"] == 103 and report["requests_per_s"] == 51.5
    assert report["status_503"] == 1 and report["errors"] == 1
    assert report["text"] == {"ok": 100, "p50_s": pytest.approx(0.505), "p99_s": pytest.approx(0.9901)}
    assert report["image"] == {"ok": 1, "p50_s": 1.0, "p99_s": 1.0}
