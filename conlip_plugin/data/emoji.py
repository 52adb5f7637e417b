"""Real image-caption pairs from emoji: Google (Noto) and Twitter (Twemoji) drawings with their names.

Three pinned npm packages are fetched with ``npm pack`` and verified against the sha512 integrity
hashes below: ``emoji-datasource-google`` and ``emoji-datasource-twitter`` (64-px PNGs and
``emoji.json``) and ``emojibase-data`` (CLDR labels and tags in ``en/data.json``). Images and JSON
are read straight from the tarballs. Every emoji and every skin-tone variant becomes one image per
vendor (composited onto white, RGB, native 64 px, stored as JPEG like every image of the output:
open_clip's shards and clip_benchmark's Flickr reader both expect ``.jpg``, and one codec for
training and test keeps compression out of the comparison), with up to three captions:

    the emoji.json name in lower case       "thumbs up sign: medium skin tone"
    the CLDR label (emojibase)              "thumbs up: medium skin tone"
    a sentence from the emojibase tags      "an emoji of a thumbs up: medium skin tone, with tags: +1, good, ..."

(a variant's name gets its skin tones appended as CLDR writes them, so that no name caption
stands for six different images). Skin tones, genders and flags stay in: they are hard negatives.

Splits, fixed by ``--seed``: an emoji is held out ("unseen") when the first 8 bytes of the sha256
of "SEED:UNIFIED", read as a fraction of 2**64, fall below ``--unseen-fraction`` (UNIFIED: the
emoji's non-skin-tone code sequence in emoji.json, so all its skin variants go together); held-out
emoji appear in no training pair. Test samples are likewise the images of smallest hash.

    OUT/train/              Google images of all other emoji, one pair per caption: webdataset
                            shards + sizes.json, train.csv (tab separated), images/, karpathy.json
    OUT/test-cross-style/   Twitter images of training emoji (the other vendor's drawings),
                            at most --test-images of them, in clip_benchmark's flickr30k layout
    OUT/test-unseen/        Google images of the held-out emoji (at most --test-images), same layout
    OUT/LICENSES.md         licenses and attribution, as the packages state them
    OUT/build.json          counts, skips with reasons, versions, integrity hashes, seed, fraction

The layouts and shards are written by conlip_plugin.data.karpathy and .shards (as ``conlip-prepare``
writes them) from one Karpathy-format JSON per set. Rebuilding into an existing OUT rewrites only
what changed.

This is the ``conlip-emoji`` command; ``python -m conlip_plugin.data.emoji`` and
``python scripts/emoji_data.py`` in a checkout run the same.

Usage:
    conlip-emoji --out data/emoji                     # full build (needs npm, Debian: apt-get install npm)
    conlip-emoji --smoke --out /tmp/emoji-smoke       # at most 300 training emoji, 100 test images per set
    conlip-emoji --packages-dir tarballs/ --out data/emoji   # offline: the three NAME-VERSION.tgz
    python -m open_clip_train.main --train-data 'data/emoji/train/{00000..00007}.tar' --dataset-type webdataset ...
    clip_benchmark eval --dataset flickr30k --dataset_root data/emoji/test-unseen --task zeroshot_retrieval ...
"""

import argparse
import base64
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

from PIL import Image
from tqdm import tqdm

from conlip_plugin.atomic_files import move_into_place, write_atomic
from conlip_plugin.command_errors import fail
from conlip_plugin.data.files import normalize_caption, stable_hash
from conlip_plugin.data.karpathy import eval_layout
from conlip_plugin.data.shards import report_shards, shard_names, train_shards

CACHE_ENV = "CONLIP_EMOJI_CACHE"
DEFAULT_CACHE = "~/.cache/conlip-plugin/emoji"
TRAIN_VENDOR, CROSS_VENDOR = "google", "twitter"
TONES = {"1F3FB": "light skin tone", "1F3FC": "medium-light skin tone", "1F3FD": "medium skin tone",
         "1F3FE": "medium-dark skin tone", "1F3FF": "dark skin tone"}  # CLDR's names of the modifiers
VARIATION_SELECTOR = "FE0F"  # emoji.json keeps it in `unified`, emojibase mostly drops it
JPEG_OPTIONS = {"quality": 95, "subsampling": 0}  # 4:4:4: no chroma bleeding at emoji's sharp colour edges
OUR_IMAGE = re.compile(rf"^({TRAIN_VENDOR}|{CROSS_VENDOR})_[0-9a-f-]+\.jpg$")  # files a rebuild may replace
SHARD_SIZE = 1000
SMOKE_TRAIN_EMOJI, SMOKE_TEST_IMAGES = 300, 100


@dataclass(frozen=True)
class Package:
    """A pinned npm package, and where in it the license of its images or annotations is stated."""

    name: str
    version: str
    integrity: str  # `npm view NAME@VERSION dist.integrity`
    role: str  # what the build takes from it
    subject: str  # what the quoted line speaks about
    license_file: str  # member whose first line matching license_line is quoted in LICENSES.md
    license_line: str
    attribution: str

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def tarball(self) -> str:
        return f"{self.name}-{self.version}.tgz"  # the name `npm pack` gives it


GOOGLE = Package(
    "emoji-datasource-google", "16.0.0",
    "sha512-ZRexfzs7MVoLnmzZmNsO4TKhnAJp5D++Vm6PpUpH/jEQQlemp3l88CjZ+DoZ2faM9R4QxZkOPJCoT8DlPhfQ3A==",
    "images and names", "images", "package/README.md", r"(?i)google.*licen[cs]e",
    "Emoji images from Noto Emoji by Google (https://github.com/googlefonts/noto-emoji), licensed under the "
    "Apache License 2.0 (https://www.apache.org/licenses/LICENSE-2.0), taken from emoji-datasource-google by "
    "Cal Henderson (https://github.com/iamcal/emoji-data, MIT).")
TWITTER = Package(
    "emoji-datasource-twitter", "16.0.0",
    "sha512-7F+uCuHH+7Qnrc15P5tnbvKkg9E6tlzi4MnT2uW1RlN4pLYTza6cP/dstIfSDMtpjFLWuZewWg8jBbuL2eyELQ==",
    "images and names", "images", "package/README.md", r"(?i)twitter.*licen[cs]e",
    "Twemoji graphics by Twitter, Inc and other contributors (https://github.com/jdecked/twemoji), licensed "
    "under CC-BY 4.0 (https://creativecommons.org/licenses/by/4.0/), taken from emoji-datasource-twitter by "
    "Cal Henderson (https://github.com/iamcal/emoji-data, MIT).")
EMOJIBASE = Package(
    "emojibase-data", "17.0.0",
    "sha512-Yvgb5AWoHViHV/gq1qr5ZAarcBip+B27/ZLRsUJkbgAEaLlZ/fof9g882LTpmEpyhBNEC0m2SEmItljHsTygjA==",
    "CLDR labels and tags", "source of its labels and tags", "package/CHANGELOG.md", r"CLDR",
    "Emoji labels and tags from emojibase-data by Miles Johnson (https://github.com/milesj/emojibase, MIT), "
    "built from the Unicode CLDR annotations. The package states no license of its own for that text; "
    "Unicode distributes CLDR under the Unicode License v3 (https://www.unicode.org/license.txt).")
PACKAGES = (GOOGLE, TWITTER, EMOJIBASE)
VENDOR_PACKAGES = {TRAIN_VENDOR: GOOGLE, CROSS_VENDOR: TWITTER}
PINNED_INTEGRITY = {p.name: p.integrity for p in PACKAGES}
META_MEMBERS = ("package/package.json", "package/LICENSE", "package/README.md")


@dataclass(frozen=True)
class Glyph:
    """One image id: an emoji (base) or one of its skin-tone variants, with its captions."""

    emoji: str  # the base emoji's `unified`: the unit of the unseen split
    unified: str
    image: str  # file name under img/<vendor>/64/
    captions: tuple[str, ...]

    def file_name(self, vendor: str) -> str:
        return f"{vendor}_{Path(self.image).stem.lower()}.jpg"


def unit_hash(*parts: object) -> float:
    """The parts' stable hash as a number in [0, 1): its first 8 bytes as a fraction of 2**64."""
    return int.from_bytes(stable_hash(*parts)[:8], "big") / 2 ** 64


# ---------------------------------------------------------------- fetching and verifying

def sri_sha512(path: Path) -> str:
    """The file's Subresource Integrity string, as npm records `dist.integrity`."""
    digest = hashlib.sha512()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "sha512-" + base64.b64encode(digest.digest()).decode()


def verify(path: Path, expected: str, advice: str) -> None:
    """Refuse a tarball whose sha512 is not the pinned one: the data would not be what was reviewed."""
    actual = sri_sha512(path)
    if actual != expected:
        fail(f"{path} does not match its pinned sha512 (expected {expected}, got {actual}): it is corrupt or "
             f"not the reviewed release. {advice}")


def npm_pack(package: Package, cache: Path, expected: str) -> Path:
    """`npm pack` into a scratch folder, verify, then move into the cache: it holds only verified tarballs."""
    npm = shutil.which("npm")
    if npm is None:
        fail("npm is not installed; it fetches the emoji packages (Debian/Ubuntu: `sudo apt-get install npm`). "
             "Or fetch the tarballs elsewhere with `npm pack NAME@VERSION` and pass their folder as --packages-dir.")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=cache) as scratch:
        proc = subprocess.run([npm, "pack", package.spec, "--pack-destination", scratch],
                              capture_output=True, text=True)
        fetched = Path(scratch) / package.tarball
        if proc.returncode != 0 or not fetched.is_file():
            fail(f"`npm pack {package.spec}` failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
        verify(fetched, expected, "npm delivered it; nothing was cached.")
        move_into_place(fetched, cache / package.tarball)
    return cache / package.tarball


def obtain(cache: Path, packages_dir: Path | None, integrity: Mapping[str, str]) -> dict[str, Path]:
    """The three verified tarballs: from --packages-dir (never fetched) or the cache (fetched when missing)."""
    paths = {}
    for package in PACKAGES:
        path = (packages_dir or cache) / package.tarball
        if path.is_file():
            verify(path, integrity[package.name], "Delete it" + (" and get it again with "
                   f"`npm pack {package.spec}`." if packages_dir else "; the next run fetches it anew."))
        elif packages_dir is not None:
            fail(f"{path} is missing; get it with `npm pack {package.spec}` (or leave out --packages-dir).")
        else:
            print(f"fetching {package.spec} with npm", file=sys.stderr)
            path = npm_pack(package, cache, integrity[package.name])
        paths[package.name] = path
    return paths


def read_members(path: Path, wanted: Iterable[str], image_dir: str | None = None) -> dict[str, bytes]:
    """The named members (and all files under image_dir) in one streaming pass over the .tgz."""
    wanted = set(wanted)
    found = {}
    with tarfile.open(path, "r:gz") as tar:
        for member in tqdm(tar, desc=f"reading {path.name}", unit="file", leave=False):
            if member.isfile() and (member.name in wanted or (image_dir and member.name.startswith(image_dir))):
                found[member.name] = tar.extractfile(member).read()
    return found


def json_member(members: dict[str, bytes], name: str, path: Path) -> object:
    """A JSON file of a package, failing clearly when the tarball is laid out otherwise."""
    if name not in members:
        fail(f"{path} has no {name}; it is not the expected package layout.")
    return json.loads(members[name])


# ---------------------------------------------------------------- captions

def hexcode_key(code: str) -> str:
    """emoji.json and emojibase write sequences differently (case, FE0F); this is what they share."""
    return "-".join(p for p in code.upper().split("-") if p != VARIATION_SELECTOR)


def emojibase_index(records: list[dict]) -> dict[str, tuple[dict, dict]]:
    """hexcode key -> (record, its base record); skins carry no tags, their base does."""
    index = {}
    for base in records:
        for record in [base, *base.get("skins", [])]:
            index[hexcode_key(record["hexcode"])] = (record, base)
    return index


def with_tones(name: str, tone_key: str | None) -> str:
    """Append a variant's skin tones as CLDR labels do ('..: light skin tone', or ', ..' after a colon)."""
    if tone_key is None:
        return name
    tones = ", ".join(dict.fromkeys(TONES[t] for t in tone_key.upper().split("-")))
    return f"{name}{', ' if ':' in name else ': '}{tones}"


def glyph_captions(name: str, tone_key: str | None, unified: str, index: Mapping[str, tuple[dict, dict]],
                   skipped: Counter) -> tuple[str, ...]:
    """Name, CLDR label and tags sentence, each missing one counted under its reason."""
    captions = []
    name_text = normalize_caption(name)
    name_caption = with_tones(name_text.lower(), tone_key) if name_text else ""
    if name_caption:
        captions.append(name_caption)
    else:
        skipped["caption: empty name in emoji.json"] += 1
    record, base = index.get(hexcode_key(unified), (None, None))
    if record is None:
        skipped["caption: no emojibase entry for the hexcode (no CLDR label, no tags sentence)"] += 1
    elif not normalize_caption(record.get("label")):
        skipped["caption: empty CLDR label (no label, no tags sentence)"] += 1
    else:
        label = normalize_caption(record["label"])
        captions.append(label)
        tags = [normalize_caption(t) for t in record.get("tags") or base.get("tags") or [] if normalize_caption(t)]
        if tags:
            article = "an" if label[0].lower() in "aeiou" else "a"
            captions.append(f"an emoji of {article} {label}, with tags: {', '.join(tags)}")
        else:
            skipped["caption: no emojibase tags (no tags sentence)"] += 1
    unique = tuple(dict.fromkeys(captions))
    skipped["caption: same text as another caption of the image (merged)"] += len(captions) - len(unique)
    return unique


def emoji_glyphs(entries: list[dict], index: Mapping[str, tuple[dict, dict]],
                 skipped: Counter) -> dict[str, list[Glyph]]:
    """base unified -> its glyphs (the emoji, then its skin variants), in CLDR order; uncaptioned ones counted."""
    result = {}
    for entry in sorted(entries, key=lambda e: e["sort_order"]):
        variants = [(entry["unified"], entry["image"], None)] + \
                   [(v["unified"], v["image"], key) for key, v in (entry.get("skin_variations") or {}).items()]
        glyphs = []
        for unified, image, tone_key in variants:
            captions = glyph_captions(entry.get("name"), tone_key, unified, index, skipped)
            if captions:
                glyphs.append(Glyph(entry["unified"], unified, image, captions))
            else:
                skipped["image: no usable caption (emoji skipped for every vendor)"] += 1
        if glyphs:
            result[entry["unified"]] = glyphs
    return result


def vendor_images(vendor: str, entries: list[dict], members: Mapping[str, bytes],
                  glyphs: Iterable[Glyph], skipped: Counter) -> dict[str, bytes]:
    """unified -> PNG bytes of the glyphs this vendor draws; the others counted by reason."""
    flags = {}
    for entry in entries:
        flags[entry["unified"]] = entry.get(f"has_img_{vendor}", False)
        for variant in (entry.get("skin_variations") or {}).values():
            flags[variant["unified"]] = variant.get(f"has_img_{vendor}", False)
    images = {}
    for glyph in glyphs:
        member = f"package/img/{vendor}/64/{glyph.image}"
        if not flags.get(glyph.unified, False):
            skipped[f"image: no {vendor} image (has_img_{vendor} false or not in its emoji.json)"] += 1
        elif member not in members:
            skipped[f"image: {vendor} image listed in emoji.json but missing from the tarball"] += 1
        else:
            images[glyph.unified] = members[member]
    return images


# ---------------------------------------------------------------- splits

def is_unseen(emoji: str, seed: int, fraction: float) -> bool:
    """The documented split rule: held out when unit_hash(SEED, UNIFIED) falls below the fraction."""
    return unit_hash(seed, emoji) < fraction


def first_by_hash(items: list, key: Callable[[object], str], seed: int, salt: str, limit: int | None) -> list:
    """A deterministic sample: the `limit` items of smallest hash (all when limit is None)."""
    return sorted(items, key=lambda item: unit_hash(seed, salt, key(item)))[:limit]


# ---------------------------------------------------------------- writing

def render(png: bytes) -> bytes:
    """The emoji on white (its transparent background would otherwise turn black in RGB), as JPEG."""
    with Image.open(io.BytesIO(png)) as image:
        rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    buffer = io.BytesIO()
    Image.alpha_composite(white, rgba).convert("RGB").save(buffer, "JPEG", **JPEG_OPTIONS)
    return buffer.getvalue()


def write_images(folder: Path, vendor: str, glyphs: list[Glyph], pngs: Mapping[str, bytes], desc: str) -> None:
    """Render into folder and remove images an earlier build with other settings left there."""
    folder.mkdir(parents=True, exist_ok=True)
    keep = {g.file_name(vendor) for g in glyphs}
    for stale in folder.iterdir():
        if OUR_IMAGE.match(stale.name) and stale.name not in keep:
            stale.unlink()
    for glyph in tqdm(glyphs, desc=desc, unit="image"):
        write_atomic(folder / glyph.file_name(vendor), render(pngs[glyph.unified]), if_changed=True)


def karpathy_json(path: Path, vendor: str, glyphs: list[Glyph], split: str) -> Path:
    """The set in the format the Karpathy and shard writers read (Karpathy's dataset_*.json)."""
    images = [{"filename": g.file_name(vendor), "split": split, "sentences": [{"raw": c} for c in g.captions]}
              for g in glyphs]
    text = json.dumps({"images": images}, indent=1, ensure_ascii=False)
    write_atomic(path, text.encode("utf-8"), if_changed=True)
    return path


def remove_stale_shards(folder: Path, names: list[str]) -> None:
    """Shards beyond this build's count would be picked up by a glob over the folder."""
    for shard in folder.glob("*.tar"):
        if shard.stem.isdigit() and shard.name not in names:
            shard.unlink()


def split_counts(glyphs: list[Glyph]) -> dict[str, int]:
    """Sizes of a set, and how many captions fit several of its images (retrieval counts only one as right)."""
    captions = Counter(c for g in glyphs for c in g.captions)
    return {"emoji": len({g.emoji for g in glyphs}), "images": len(glyphs), "captions": sum(captions.values()),
            "captions_naming_several_images": sum(1 for n in captions.values() if n > 1)}


def quoted_line(members: Mapping[str, bytes], package: Package) -> str:
    """The package's own statement of the license, verbatim, or a note that it states none there."""
    text = members.get(package.license_file, b"").decode("utf-8", "replace")
    lines = [line.strip() for line in text.splitlines() if re.search(package.license_line, line)]
    return f"> {lines[0]}\n\n(from `{package.license_file}`)" if lines else \
        f"(no line matching `{package.license_line}` in `{package.license_file}`)"


def licenses_markdown(members: Mapping[str, Mapping[str, bytes]], integrity: Mapping[str, str]) -> str:
    """LICENSES.md: per package, its declared license, LICENSE file, image/annotation license and attribution."""
    parts = ["# Licenses of the emoji data\n",
             "Built by `conlip-emoji` (conlip_plugin.data.emoji) from the npm packages below (tarballs verified "
             "against the sha512 shown). Changes made to the images: composited onto a white background, converted to RGB "
             "and re-encoded as JPEG (quality 95); nothing else. Captions are the emoji.json names (lower-cased, "
             "skin tones appended) and the emojibase CLDR labels and tags, arranged into a sentence.\n"]
    for package in PACKAGES:
        files = members[package.name]
        declared = json.loads(files.get("package/package.json", b"{}")).get("license", "not declared")
        license_text = files.get("package/LICENSE", b"(no LICENSE file in the package)").decode("utf-8", "replace")
        parts.append(f"## {package.name} {package.version} ({package.role})\n\n"
                     f"- integrity: `{integrity[package.name]}`\n"
                     f"- license in package.json: {declared}\n\n"
                     f"What the package says about the {package.subject}:\n\n"
                     f"{quoted_line(files, package)}\n\n"
                     f"Attribution: {package.attribution}\n\n"
                     f"LICENSE file of the package:\n\n```\n{license_text.strip()}\n```\n")
    return "\n".join(parts)


# ---------------------------------------------------------------- the build

def build(out: Path, tarballs: Mapping[str, Path], integrity: Mapping[str, str], seed: int = 0,
          unseen_fraction: float = 0.1, test_images: int = 1000, smoke: bool = False) -> dict:
    """Read the verified tarballs and write the three sets, LICENSES.md and build.json; returns build.json."""
    skipped: Counter = Counter()
    members = {p.name: read_members(tarballs[p.name], META_MEMBERS + ("package/emoji.json", p.license_file),
                                    f"package/img/{vendor}/64/")
               for vendor, p in VENDOR_PACKAGES.items()}
    members[EMOJIBASE.name] = read_members(tarballs[EMOJIBASE.name],
                                           META_MEMBERS + ("package/en/data.json", EMOJIBASE.license_file))
    entries = {vendor: json_member(members[p.name], "package/emoji.json", tarballs[p.name])
               for vendor, p in VENDOR_PACKAGES.items()}
    records = json_member(members[EMOJIBASE.name], "package/en/data.json", tarballs[EMOJIBASE.name])
    index = emojibase_index(records)
    by_emoji = emoji_glyphs(entries[TRAIN_VENDOR], index, skipped)
    all_glyphs = [g for glyphs in by_emoji.values() for g in glyphs]
    pngs = {vendor: vendor_images(vendor, entries[vendor], members[VENDOR_PACKAGES[vendor].name], all_glyphs,
                                  skipped) for vendor in VENDOR_PACKAGES}

    unseen = [e for e in by_emoji if is_unseen(e, seed, unseen_fraction)]
    seen = [e for e in by_emoji if not is_unseen(e, seed, unseen_fraction)]
    train_emoji = set(first_by_hash(seen, str, seed, "train", SMOKE_TRAIN_EMOJI if smoke else None))
    limit = min(test_images, SMOKE_TEST_IMAGES) if smoke else test_images

    def drawn(vendor: str, emoji: Iterable[str]) -> list[Glyph]:
        return [g for e in emoji for g in by_emoji[e] if g.unified in pngs[vendor]]

    def sample(glyphs: list[Glyph], salt: str) -> list[Glyph]:
        chosen = {g.unified for g in first_by_hash(glyphs, lambda g: g.unified, seed, salt, limit)}
        return [g for g in glyphs if g.unified in chosen]  # back in CLDR order

    train = drawn(TRAIN_VENDOR, [e for e in seen if e in train_emoji])
    cross_pool = [g for g in train if g.unified in pngs[CROSS_VENDOR]]  # drawings seen in training, other style
    unseen_pool = drawn(TRAIN_VENDOR, unseen)
    sets = {"train": train, "test-cross-style": sample(cross_pool, "cross-style"),
            "test-unseen": sample(unseen_pool, "unseen")}
    for name, glyphs in sets.items():
        if not glyphs:
            fail(f"the {name} set is empty (unseen fraction {unseen_fraction}, {len(by_emoji)} emoji with "
                 f"captions); choose an --unseen-fraction that leaves emoji on both sides.")
    unused = {f"{TRAIN_VENDOR} images of emoji left out by --smoke": len(drawn(TRAIN_VENDOR, set(seen) - train_emoji)),
              f"{TRAIN_VENDOR} images of unseen emoji beyond the test-image limit":
                  len(unseen_pool) - len(sets["test-unseen"]),
              f"{CROSS_VENDOR} images beyond the test-image limit": len(cross_pool) - len(sets["test-cross-style"]),
              f"{CROSS_VENDOR} images whose {TRAIN_VENDOR} drawing is not in training (unseen, left out by "
              f"--smoke, or no {TRAIN_VENDOR} image)": len(pngs[CROSS_VENDOR]) - len(cross_pool)}

    out.mkdir(parents=True, exist_ok=True)
    train_dir = out / "train"
    write_images(train_dir / "images", TRAIN_VENDOR, sets["train"], pngs[TRAIN_VENDOR], "train images")
    pairs = sum(len(g.captions) for g in sets["train"])
    remove_stale_shards(train_dir, shard_names(-(-pairs // SHARD_SIZE)))
    shards = train_shards(karpathy_json(train_dir / "karpathy.json", TRAIN_VENDOR, sets["train"], "train"),
                                  train_dir / "images", train_dir, ["train"], SHARD_SIZE, write_csv=True, seed=seed)
    report_shards(shards, train_dir)
    for name, vendor in (("test-cross-style", CROSS_VENDOR), ("test-unseen", TRAIN_VENDOR)):
        folder = out / name
        write_images(folder, vendor, sets[name], pngs[vendor], f"{name} images")
        eval_layout("flickr30k", karpathy_json(folder / "karpathy.json", vendor, sets[name], "test"),
                    folder, folder, expect_images=len(sets[name]))

    glyph_count = Counter("variant" if g.unified != g.emoji else "emoji" for g in all_glyphs)
    info = {
        "packages": {p.name: {"version": p.version, "integrity": integrity[p.name],
                              "tarball_bytes": tarballs[p.name].stat().st_size} for p in PACKAGES},
        "seed": seed, "unseen_fraction": unseen_fraction, "test_images": limit, "smoke": smoke,
        "emoji_json_entries": len(entries[TRAIN_VENDOR]), "emojibase_entries": len(records),
        "emoji_with_captions": glyph_count["emoji"], "skin_variants_with_captions": glyph_count["variant"],
        "images_per_vendor": {vendor: len(images) for vendor, images in pngs.items()},
        "captions": sum(len(g.captions) for g in all_glyphs),
        "unseen_emoji": len(unseen),
        "skipped": dict(sorted(skipped.items())),
        "unused": unused,
        "splits": {name: split_counts(glyphs) for name, glyphs in sets.items()},
    }
    info["splits"]["train"].update(pairs=shards.samples, shards=len(shards.sizes))
    write_atomic(out / "LICENSES.md", licenses_markdown(members, integrity).encode("utf-8"))
    write_atomic(out / "build.json", json.dumps(info, indent=1).encode("utf-8"))
    return info


def report(info: dict, out: Path) -> None:
    """The summary: what went where, and everything skipped or unused with its reason."""
    print(f"\n{info['emoji_json_entries']} emoji in emoji.json; with captions: {info['emoji_with_captions']} emoji, "
          f"{info['skin_variants_with_captions']} skin variants, {info['captions']} captions; images per vendor: "
          + ", ".join(f"{v} {n}" for v, n in info["images_per_vendor"].items()))
    for name, counts in info["splits"].items():
        print(f"{name}: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in counts.items()))
    for title in ("skipped", "unused"):
        print(f"{title}: " + ("none" if not any(info[title].values()) else ""))
        for reason, count in info[title].items():
            if count:
                print(f"  {count:6d}  {reason}")
    print(f"written to {out} (build.json, LICENSES.md)")


def build_parser() -> argparse.ArgumentParser:
    """The command's options, with this module's description as its help."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--cache", type=Path, help=f"tarball cache (default: ${CACHE_ENV} or {DEFAULT_CACHE})")
    parser.add_argument("--packages-dir", type=Path,
                        help="folder with the three NAME-VERSION.tgz (from `npm pack`); nothing is fetched, "
                             "the pinned sha512 are still checked")
    parser.add_argument("--seed", type=int, default=0, help="seed of the unseen split, the samples and the pair order")
    parser.add_argument("--unseen-fraction", type=float, default=0.1, help="share of emoji held out (default 0.1)")
    parser.add_argument("--test-images", type=int, default=1000, help="most images per test set (default 1000)")
    parser.add_argument("--smoke", action="store_true",
                        help=f"small build for CI: at most {SMOKE_TRAIN_EMOJI} training emoji and "
                             f"{SMOKE_TEST_IMAGES} images per test set")
    return parser


def main(argv: list[str] | None = None, integrity: Mapping[str, str] = PINNED_INTEGRITY) -> dict:
    """The `conlip-emoji` command; `integrity` replaces the pinned hashes only for tests that build their own
    tarballs. Returns build.json's content."""
    args = build_parser().parse_args(argv)
    if not 0 < args.unseen_fraction < 1:
        fail("--unseen-fraction must lie strictly between 0 and 1.")
    if args.test_images < 1:
        fail("--test-images must be at least 1.")
    cache = (args.cache or Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)).expanduser()
    tarballs = obtain(cache, args.packages_dir, integrity)
    info = build(args.out, tarballs, integrity, args.seed, args.unseen_fraction, args.test_images, args.smoke)
    report(info, args.out)
    return info


if __name__ == "__main__":
    main()
