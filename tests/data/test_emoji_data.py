"""conlip_plugin.data.emoji (``conlip-emoji``) on miniature npm tarballs built here, with the real
packages' internal layout.

No network and no npm: the tarballs go in through --packages-dir with their own sha512 (the CLI's
pinned hashes are swapped for them through main's `integrity` parameter), and fetching is tested
with a stand-in `npm` on PATH. The layouts are read back by clip_benchmark's own loader; the
unseen split is recomputed here from its documented rule (sha256 of "SEED:UNIFIED").
"""
import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from conlip_plugin.data import emoji

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "emoji_data.py"

GOOGLE, TWITTER, EMOJIBASE = "emoji-datasource-google", "emoji-datasource-twitter", "emojibase-data"
TONES = {"1F3FB": "light skin tone", "1F3FD": "medium skin tone"}
# (unified, emoji.json name, emojibase hexcode or None, CLDR label, tags)
EMOJI = [
    ("1F44D", "THUMBS UP SIGN", "1F44D", "thumbs up", ["hand", "thumb", "up"]),
    ("2764-FE0F", "HEAVY BLACK HEART", "2764", "red heart", ["heart"]),  # FE0F only in emoji.json
    ("1F600", "GRINNING FACE EMOJI", "1f600", "grinning face", ["face", "grin"]),  # lower-case hexcode
    ("1F697", "MOTOR CAR", "1F697", "automobile", ["car"]),
    ("1F695", "TAXI", "1F695", "taxi", ["vehicle"]),  # name == label: merged into one caption
    ("1F680", "ROCKET", "1F680", "rocket", ["space"]),  # no Twitter image
    ("1F34E", "RED APPLE", "1F34E", "red apple", ["fruit"]),  # Google PNG missing from the tarball
    ("1F9ED", "COMPASS", None, "", []),  # no emojibase entry: name only
    ("1F1EF-1F1F5", "Japan Flag", "1F1EF-1F1F5", "flag: Japan", []),  # no tags
    ("1F4A9", "", None, "", []),  # no caption at all
] + [(f"1F40{i}", f"ANIMAL NUMBER {i}", f"1F40{i}", f"animal {i}", ["animal"]) for i in range(8)]
VARIANTS = {"1F44D": ["1F3FB", "1F3FD"]}
NO_TWITTER, NO_GOOGLE_FILE, NO_CAPTION = "1F680", "1F34E", "1F4A9"
FRACTION = 0.3


def image_name(unified: str) -> str:
    return unified.lower() + ".png"


def png(color: tuple[int, int, int]) -> bytes:
    """A coloured disc on a transparent background, as emoji PNGs are."""
    image = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    ImageDraw.Draw(image).ellipse((8, 8, 56, 56), fill=color + (255,))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def glyphs() -> list[tuple[str, str, str | None]]:
    """(base unified, unified, skin-tone key) of every image."""
    return [(u, u, None) for u, *_ in EMOJI] + [(b, f"{b}-{t}", t) for b, ts in VARIANTS.items() for t in ts]


def emoji_json() -> list[dict]:
    entries = []
    for order, (unified, name, *_) in enumerate(EMOJI):
        entry = {"name": name, "unified": unified, "image": image_name(unified), "short_names": [name.lower()],
                 "category": "Test", "subcategory": "test", "sort_order": order,
                 "has_img_google": True, "has_img_twitter": unified != NO_TWITTER}
        if unified in VARIANTS:
            entry["skin_variations"] = {t: {"unified": f"{unified}-{t}", "image": image_name(f"{unified}-{t}"),
                                            "has_img_google": True, "has_img_twitter": True}
                                        for t in VARIANTS[unified]}
        entries.append(entry)
    return entries


def emojibase_json() -> list[dict]:
    records = []
    for unified, _, hexcode, label, tags in EMOJI:
        if hexcode is None:
            continue
        record = {"label": label, "hexcode": hexcode, "tags": tags, "emoji": "?", "type": 1, "version": 1}
        if unified in VARIANTS:
            record["skins"] = [{"label": f"{label}: {TONES[t]}", "hexcode": f"{hexcode}-{t}", "tone": 1}
                               for t in VARIANTS[unified]]
        records.append(record)
    return records


def write_tgz(path: Path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def make_packages(folder: Path) -> dict[str, str]:
    """The three tarballs, named as `npm pack` names them; returns their sha512 integrity strings."""
    folder.mkdir(parents=True, exist_ok=True)
    common = {"LICENSE": b"The MIT License (MIT)\n\nCopyright (c) 2013 Test Author\n"}
    entries = json.dumps(emoji_json()).encode()
    for package, vendor, colour in ((GOOGLE, "google", (220, 0, 0)), (TWITTER, "twitter", (0, 0, 220))):
        files = {**common, "package.json": json.dumps({"name": package, "license": "MIT"}).encode(),
                 "README.md": f"* {vendor.title()} images are available under the Test License.\n".encode(),
                 "emoji.json": entries, f"img/{vendor}/sheets/64.png": png(colour)}
        for _, unified, _ in glyphs():
            if not (vendor == "google" and unified == NO_GOOGLE_FILE):
                files[f"img/{vendor}/64/{image_name(unified)}"] = png(colour)
        write_tgz(folder / f"{package}-16.0.0.tgz", files)
    write_tgz(folder / f"{EMOJIBASE}-17.0.0.tgz",
              {**common, "package.json": json.dumps({"name": EMOJIBASE, "license": "MIT"}).encode(),
               "CHANGELOG.md": b"- Update to CLDR 48.\n", "en/data.json": json.dumps(emojibase_json()).encode()})
    return {p: "sha512-" + base64.b64encode(hashlib.sha512((folder / f"{p}-{v}.tgz").read_bytes()).digest()).decode()
            for p, v in ((GOOGLE, "16.0.0"), (TWITTER, "16.0.0"), (EMOJIBASE, "17.0.0"))}


def held_out(seed: int) -> set[str]:
    """The documented rule, independently: sha256("SEED:UNIFIED") as a fraction of 2**64."""
    return {u for u, *_ in EMOJI
            if int.from_bytes(hashlib.sha256(f"{seed}:{u}".encode()).digest()[:8], "big") / 2 ** 64 < FRACTION}


def pick_seed() -> int:
    """A seed that holds out the emoji with skin variants and keeps the differently captioned ones in training."""
    kept = {"1F695", "1F1EF-1F1F5", "2764-FE0F", "1F9ED", NO_GOOGLE_FILE}
    return next(s for s in range(1000) if "1F44D" in held_out(s) and not held_out(s) & kept)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("emoji")
    integrity = make_packages(root / "packages")
    seed = pick_seed()
    out = root / "out"
    argv = ["--packages-dir", str(root / "packages"), "--out", str(out), "--seed", str(seed),
            "--unseen-fraction", str(FRACTION)]
    info = emoji.main(argv, integrity=integrity)
    return {"root": root, "out": out, "info": info, "seed": seed, "integrity": integrity, "argv": argv}


def karpathy(out: Path, name: str) -> dict[str, list[str]]:
    data = json.loads((out / name / "karpathy.json").read_text(encoding="utf-8"))
    return {image["filename"]: [s["raw"] for s in image["sentences"]] for image in data["images"]}


def file_unified(file_name: str) -> str:
    return file_name.split("_", 1)[1][:-4].upper()


def base_of(unified: str) -> str:
    return next(b for b, u, _ in glyphs() if u == unified)


def test_captions_per_image_and_skin_variants(built):
    sets = {name: karpathy(built["out"], name) for name in ("train", "test-unseen")}
    captions = {file_unified(f): c for s in sets.values() for f, c in s.items()}
    assert captions["1F44D"] == ["thumbs up sign", "thumbs up", "an emoji of a thumbs up, with tags: hand, thumb, up"]
    assert captions["1F44D-1F3FD"] == ["thumbs up sign: medium skin tone", "thumbs up: medium skin tone",
                                       "an emoji of a thumbs up: medium skin tone, with tags: hand, thumb, up"]
    assert captions["1F44D-1F3FB"][1] == "thumbs up: light skin tone"
    assert captions["2764-FE0F"][1] == "red heart"  # matched across the FE0F difference
    assert captions["1F600"][1] == "grinning face"  # and across letter case
    assert captions["1F697"][2] == "an emoji of an automobile, with tags: car"
    assert captions["1F695"] == ["taxi", "an emoji of a taxi, with tags: vehicle"]
    assert captions["1F9ED"] == ["compass"]
    assert captions["1F1EF-1F1F5"] == ["japan flag", "flag: Japan"]
    assert NO_CAPTION not in captions and NO_GOOGLE_FILE not in captions


def test_unseen_split_follows_the_documented_rule(built):
    out, hidden = built["out"], held_out(built["seed"])
    train = karpathy(out, "train")
    unseen = karpathy(out, "test-unseen")
    train_pairs = (out / "train" / "train.csv").read_text(encoding="utf-8").splitlines()[1:]
    assert {base_of(file_unified(f)) for f in train}.isdisjoint(hidden)
    assert not [row for row in train_pairs if base_of(file_unified(Path(row.split("\t")[0]).name)) in hidden]
    expected = {u for b, u, _ in glyphs() if b in hidden} - {NO_CAPTION, NO_GOOGLE_FILE}
    assert {file_unified(f) for f in unseen} == expected
    assert {"1F44D", "1F44D-1F3FB", "1F44D-1F3FD"} <= expected  # the skin variants went with their emoji
    assert all(f.startswith("google_") for f in list(train) + list(unseen))
    assert len(train_pairs) == sum(len(c) for c in train.values()) == built["info"]["splits"]["train"]["pairs"]
    sizes = json.loads((out / "train" / "sizes.json").read_text())
    assert sum(sizes.values()) == len(train_pairs)
    with tarfile.open(out / "train" / next(iter(sizes)), "r:") as tar:
        members = tar.getnames()
    assert len(members) == 2 * len(train_pairs)  # one .jpg and one .txt per pair


def test_cross_style_holds_the_other_vendors_drawings_of_training_emoji(built):
    out = built["out"]
    cross = karpathy(out, "test-cross-style")
    trained = {file_unified(f) for f in karpathy(out, "train")}
    assert cross and all(f.startswith("twitter_") for f in cross)
    assert {file_unified(f) for f in cross} == trained - {NO_TWITTER}  # not NO_GOOGLE_FILE: never trained on
    for name in cross:
        with Image.open(out / "test-cross-style" / name) as image:
            assert image.mode == "RGB" and image.size == (64, 64)
            red, _, blue = image.getpixel((32, 32))
            assert blue > 150 and red < 80  # Twitter's blue disc, not Google's red one
            assert min(image.getpixel((1, 1))) > 245  # transparency became white


def test_skipped_items_are_counted(built):
    info = built["info"]
    skipped = info["skipped"]
    assert skipped["image: no usable caption (emoji skipped for every vendor)"] == 1
    assert skipped["image: no twitter image (has_img_twitter false or not in its emoji.json)"] == 1
    assert skipped["image: google image listed in emoji.json but missing from the tarball"] == 1
    assert skipped["caption: no emojibase entry for the hexcode (no CLDR label, no tags sentence)"] == 2
    assert skipped["caption: no emojibase tags (no tags sentence)"] == 1
    assert skipped["caption: empty name in emoji.json"] == 1
    assert skipped["caption: same text as another caption of the image (merged)"] == 3  # taxi, rocket, red apple
    assert info["images_per_vendor"] == {"google": len(glyphs()) - 2, "twitter": len(glyphs()) - 2}
    twitter_unused = {u for b, u, _ in glyphs() if b in held_out(built["seed"])} | {NO_GOOGLE_FILE}
    assert info["unused"]["twitter images whose google drawing is not in training (unseen, left out by --smoke, "
                          "or no google image)"] == len(twitter_unused - {NO_CAPTION, NO_TWITTER})
    licenses = (built["out"] / "LICENSES.md").read_text()
    assert "Google images are available under the Test License" in licenses
    assert "Twitter images are available under the Test License" in licenses
    assert built["integrity"][EMOJIBASE] in licenses and "Update to CLDR 48" in licenses


def test_clip_benchmark_reads_the_test_layouts(built):
    from clip_benchmark.datasets.builder import build_dataset

    for name in ("test-cross-style", "test-unseen"):
        expected = karpathy(built["out"], name)
        ds = build_dataset(dataset_name="flickr30k", root=str(built["out"] / name), transform=None, split="test",
                           download=False, task="zeroshot_retrieval")
        assert len(ds) == len(expected) == built["info"]["splits"][name]["images"]
        assert dict(ds.data) == expected
        image, captions = ds[0]
        assert image.size == (64, 64) and captions == expected[ds.data[0][0]]


def test_rebuild_is_idempotent_and_follows_new_settings(built):
    out = built["out"]
    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    emoji.main(built["argv"], integrity=built["integrity"])
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == snapshot
    info = emoji.main(built["argv"] + ["--test-images", "3"], integrity=built["integrity"])
    for name in ("test-cross-style", "test-unseen"):
        assert info["splits"][name]["images"] == 3
        assert len(list((out / name).glob("*.jpg"))) == 3  # images of the larger build removed
    emoji.main(built["argv"], integrity=built["integrity"])
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == snapshot


def test_a_tampered_tarball_is_refused(built, tmp_path):
    packages = tmp_path / "packages"
    integrity = make_packages(packages)
    tarball = packages / f"{TWITTER}-16.0.0.tgz"
    tarball.write_bytes(tarball.read_bytes() + b"\0")
    with pytest.raises(SystemExit, match="does not match its pinned sha512"):
        emoji.main(["--packages-dir", str(packages), "--out", str(tmp_path / "out")], integrity=integrity)
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit, match="does not match its pinned sha512"):  # the public CLI's pinned hashes
        emoji.main(["--packages-dir", str(built["root"] / "packages"), "--out", str(tmp_path / "out")])


@pytest.mark.slow
def test_fetch_caches_verified_tarballs_and_needs_npm(built, tmp_path, monkeypatch):
    """A stand-in `npm pack` copies the test tarballs; the second run finds them cached."""
    bin_dir, log = tmp_path / "bin", tmp_path / "npm.log"
    bin_dir.mkdir()
    (bin_dir / "npm").write_text(
        f"#!{sys.executable}\nimport shutil, sys\n"
        f"assert sys.argv[1] == 'pack' and sys.argv[3] == '--pack-destination'\n"
        f"name, version = sys.argv[2].rsplit('@', 1)\n"
        f"open({str(log)!r}, 'a').write(sys.argv[2] + '\\n')\n"
        f"shutil.copy({str(built['root'] / 'packages')!r} + f'/{{name}}-{{version}}.tgz', sys.argv[4])\n")
    (bin_dir / "npm").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    cache = tmp_path / "cache"
    paths = emoji.obtain(cache, None, built["integrity"])
    assert sorted(p.name for p in paths.values()) == sorted(p.name for p in cache.glob("*.tgz"))
    emoji.obtain(cache, None, built["integrity"])
    assert log.read_text().split() == ["emoji-datasource-google@16.0.0", "emoji-datasource-twitter@16.0.0",
                                       "emojibase-data@17.0.0"]  # fetched once each
    with pytest.raises(SystemExit, match="npm delivered it; nothing was cached"):
        emoji.obtain(tmp_path / "other-cache", None, {**built["integrity"], GOOGLE: "sha512-AAAA"})
    assert not list((tmp_path / "other-cache").glob("*.tgz"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(SystemExit, match="apt-get install npm"):
        emoji.obtain(tmp_path / "third-cache", None, built["integrity"])


@pytest.mark.slow
def test_former_script_and_module_run_the_command(built, tmp_path, run):
    """scripts/emoji_data.py and `python -m conlip_plugin.data.emoji` are the same command as conlip-emoji."""
    assert "--unseen-fraction" in run([sys.executable, str(SCRIPT), "--help"], tmp_path).stdout
    out = tmp_path / "out"
    argv = ["--packages-dir", str(built["root"] / "packages"), "--out", str(out), "--test-images", "2"]
    proc = subprocess.run([sys.executable, "-m", "conlip_plugin.data.emoji", *argv], capture_output=True, text=True)
    assert proc.returncode == 1 and "does not match its pinned sha512" in proc.stderr  # the real pinned hashes
