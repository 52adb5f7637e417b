"""``conlip-retrieval-load``: a bounded load test of a running ``conlip-retrieval serve``, on loopback only.

    conlip-retrieval-load gallery --count 20000 --out /tmp/gallery      # random shapes, captioned, as a CSV
    conlip-retrieval-load run --url http://127.0.0.1:8000/ --clients 64 --requests 3000 --seconds 120

``run`` starts ``--clients`` threads that search one request after another, text searches and image
uploads taking turns, until ``--requests`` have been sent or ``--seconds`` have passed, whichever comes
first; it reports requests per second, p50 and p99 latency for each kind, errors and 503s (the server's
--max-requests bound). It refuses any host but a loopback address: it is for measuring one's own server,
not for loading anyone else's. The clients share the machine with the server, so on a small machine the
figures are the two together.
"""
import argparse
import csv
import io
import ipaddress
import json
import random
import socket
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional
from urllib.parse import urlsplit

from PIL import Image, ImageDraw

from conlip_plugin.arguments import positive_float, positive_int
from conlip_plugin.command_errors import fail

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40),
           "purple": (140, 50, 170), "orange": (240, 140, 20), "black": (20, 20, 20), "pink": (240, 120, 180)}
SHAPES = ("square", "circle", "bar", "triangle")
WORDS = ("small", "large", "left", "right", "top", "bottom", "centre")
TIMEOUT_S = 60.0  # one request; a slower answer counts as an error


def shape_image(rng: random.Random, size: int = 64) -> tuple:
    """A random shape of a random colour at a random place, and its caption."""
    colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
    img = Image.new("RGB", (size, size), tuple(rng.randrange(200, 256) for _ in range(3)))
    x, y, r = rng.randrange(8, size - 8), rng.randrange(8, size - 8), rng.randrange(4, size // 3)
    box = [x - r, y - r, x + r, y + r]
    draw = ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "triangle":
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=COLOURS[colour])
    elif shape == "bar":
        draw.rectangle([x - r, y - r // 3, x + r, y + r // 3], fill=COLOURS[colour])
    else:
        draw.rectangle(box, fill=COLOURS[colour])
    where = "left" if x < size / 3 else "right" if x > 2 * size / 3 else "centre"
    return img, f"a {'small' if r < size / 6 else 'large'} {colour} {shape} on the {where}"


def write_gallery(count: int, out: Path, seed: int) -> Path:
    """``count`` PNG files under ``out/images`` and ``out/gallery.csv`` (filepath, title) listing them."""
    rng = random.Random(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        img, caption = shape_image(rng)
        path = out / "images" / f"{i:07d}.png"
        img.save(path)
        rows.append({"filepath": str(path.resolve()), "title": caption})
    with open(out / "gallery.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["filepath", "title"])
        writer.writeheader()
        writer.writerows(rows)
    return out / "gallery.csv"


def loopback_base(url: str) -> str:
    """``url`` as a base ending in '/', refused unless its host is a loopback address."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        fail(f"--url {url!r} is not an http:// URL; pass the address serve printed, e.g. http://127.0.0.1:8000/.")
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(parts.hostname, parts.port or 80)}
    except socket.gaierror as err:
        fail(f"--url {url!r}: cannot resolve {parts.hostname} ({err}).")
    if not all(ipaddress.ip_address(address.split("%")[0]).is_loopback for address in addresses):
        fail(f"--url {url!r} is not on this machine's loopback ({', '.join(sorted(addresses))}); this load test "
             f"only measures a server on 127.0.0.1 or ::1.")
    return url if url.endswith("/") else url + "/"


@dataclass
class Outcome:
    kind: str
    status: int  # 0: no answer (connection error or timeout)
    seconds: float


def _png(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def load(base: str, clients: int, requests_total: int, seconds: float, seed: int) -> List[Outcome]:
    """Every request's outcome; at most ``requests_total`` requests, none started after ``seconds``."""
    import requests

    rng = random.Random(seed)
    queries = [shape_image(rng) for _ in range(64)]
    texts = [caption for _, caption in queries]
    images = [_png(img) for img, _ in queries]
    outcomes: List[Outcome] = []
    guard, sent = threading.Lock(), [0]
    stop_at = time.monotonic() + seconds

    def next_number() -> Optional[int]:
        with guard:
            if sent[0] >= requests_total or time.monotonic() >= stop_at:
                return None
            sent[0] += 1
            return sent[0]

    def client() -> None:
        session = requests.Session()
        while (number := next_number()) is not None:
            kind = "text" if number % 2 else "image"
            start = time.perf_counter()
            try:
                if kind == "text":
                    response = session.get(base + "api/search", params={"text": texts[number % 64], "k": 10},
                                           timeout=TIMEOUT_S)
                else:
                    response = session.post(base + "api/search/image", timeout=TIMEOUT_S,
                                            files={"file": ("q.png", images[number % 64], "image/png")})
                status = response.status_code
            except requests.RequestException:
                status = 0
            outcome = Outcome(kind, status, time.perf_counter() - start)
            with guard:
                outcomes.append(outcome)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def _percentile(values: List[float], q: int) -> Optional[float]:
    if not values:
        return None
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def summary(outcomes: List[Outcome], wall_s: float) -> Dict[str, object]:
    """req/s over the run, p50/p99 of the answered (200) requests per kind, errors and 503s."""
    report: Dict[str, object] = {"requests": len(outcomes), "seconds": round(wall_s, 2),
                                 "requests_per_s": round(len(outcomes) / wall_s, 1) if wall_s else None,
                                 "status_503": sum(o.status == 503 for o in outcomes),
                                 "errors": sum(o.status not in (200, 503) for o in outcomes)}
    for kind in ("text", "image"):
        ok = [o.seconds for o in outcomes if o.kind == kind and o.status == 200]
        report[kind] = {"ok": len(ok), "p50_s": _percentile(ok, 50), "p99_s": _percentile(ok, 99)}
    return report


def _seconds(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


def markdown(report: dict, clients: int) -> str:
    rows = [f"| {clients} | {report['requests']} | {report['seconds']} | {report['requests_per_s']} | "
            f"{_seconds(report['text']['p50_s'])} / {_seconds(report['text']['p99_s'])} | "
            f"{_seconds(report['image']['p50_s'])} / {_seconds(report['image']['p99_s'])} | "
            f"{report['errors']} | {report['status_503']} |"]
    return "\n".join(["| clients | requests | s | req/s | text p50 / p99 s | image p50 / p99 s | errors | 503s |",
                      "|---|---|---|---|---|---|---|---|", *rows])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="conlip-retrieval-load", description=__doc__.split("\n\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    gallery = verbs.add_parser("gallery", help="write a synthetic captioned gallery to index")
    gallery.add_argument("--count", type=positive_int, required=True)
    gallery.add_argument("--out", type=Path, required=True)
    gallery.add_argument("--seed", type=int, default=0)
    run = verbs.add_parser("run", help="load a running server on loopback, bounded in requests and seconds")
    run.add_argument("--url", required=True, help="the server's address, as serve printed it")
    run.add_argument("--clients", type=positive_int, default=64, help="concurrent clients (threads)")
    run.add_argument("--requests", type=positive_int, default=2000, help="at most this many requests in all")
    run.add_argument("--seconds", type=positive_float, default=60.0, help="start no request after this long")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    if args.verb == "gallery":
        print(f"wrote {write_gallery(args.count, args.out, args.seed)} ({args.count} images)")
        return
    base = loopback_base(args.url)
    start = time.monotonic()
    outcomes = load(base, args.clients, args.requests, args.seconds, args.seed)
    report = summary(outcomes, time.monotonic() - start)
    report["clients"] = args.clients
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report, args.clients))


if __name__ == "__main__":
    main()
