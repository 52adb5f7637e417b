"""The README and docs/ point at things that exist: links, anchors, and the repository paths they name.

Pages are moved and modules renamed; a reader following a dead link or a stale path is lost, so
every relative link must reach a file (and a heading, when it names one), and every
``conlip_plugin/``, ``tests/`` or ``scripts/`` path written in the text must be in the tree.
"""
import itertools
import re
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```[ \t]*$", re.M | re.S)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
REPO_PATH = re.compile(r"^(?:conlip_plugin|tests|scripts)/")
HISTORY = "## Before → after"  # docs/layout.md: its table's first column names paths that are gone


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _prose(text: str) -> str:
    """The page without its fenced code blocks (a ``# comment`` there is no heading)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set:
    seen: Dict[str, int] = {}
    out = set()
    for match in re.finditer(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", _prose(page.read_text()), flags=re.M):
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def relative_links(page: Path) -> Iterator[str]:
    for target in LINK.findall(_prose(page.read_text())):
        if not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: are not ours to check
            yield target


def expand_braces(path: str) -> List[str]:
    """``a/{b,c}.py`` -> ``a/b.py``, ``a/c.py`` (nested and repeated groups too)."""
    match = re.search(r"\{([^{}]*)\}", path)
    if not match:
        return [path]
    head, tail = path[:match.start()], path[match.end():]
    return list(itertools.chain.from_iterable(expand_braces(head + part + tail) for part in match.group(1).split(",")))


def _without_history(page: Path, text: str) -> str:
    """docs/layout.md's before -> after table: drop its first column, the paths before the move."""
    if page.name != "layout.md" or HISTORY not in text:
        return text
    before, after = text.split(HISTORY, 1)
    rows = [re.sub(r"^\|[^|]*\|", "|", line) if line.startswith("|") else line for line in after.split("\n")]
    return before + HISTORY + "\n".join(rows)


def repo_paths(page: Path) -> Iterator[str]:
    """Paths into the repository named in the page: in code spans and in code blocks."""
    text = _without_history(page, page.read_text())
    chunks = CODE_SPAN.findall(_prose(text)) + FENCE.findall(text)
    for chunk in chunks:
        for token in chunk.split():
            token = token.strip("'\"(),;:")
            if REPO_PATH.match(token) and "..." not in token:
                yield token


def _exists(path: str) -> bool:
    """Every expansion of the path is in the tree (a glob: matches at least one entry)."""
    def one(p: str) -> bool:
        if any(c in p for c in "*?["):
            return next(iter(ROOT.glob(p.rstrip("/"))), None) is not None
        return (ROOT / p).exists()
    return all(one(p) for p in expand_braces(path))


def _cases() -> List[Tuple[Path, str]]:
    return [(page, link) for page in PAGES for link in relative_links(page)]


def test_there_are_pages_and_links_to_check():
    assert (ROOT / "docs").is_dir() and len(PAGES) > 2
    assert _cases(), "no relative links found: the link pattern no longer matches the pages"


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_every_relative_link_points_to_an_existing_file(page):
    broken = []
    for link in relative_links(page):
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        if not path.exists():
            broken.append(f"{link} (no file {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path})")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{link} (no heading #{anchor} in {path.relative_to(ROOT)})")
    assert not broken, f"{_page_id(page)} links to what does not exist: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_every_repository_path_named_exists(page):
    missing = sorted({path for path in repo_paths(page) if not _exists(path)})
    assert not missing, f"{_page_id(page)} names paths that are not in the tree: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_no_page_points_outside_the_repository(page):
    """Users get the repository only: nothing may refer them to the folder beside it."""
    assert "../shared" not in page.read_text()


def test_the_path_check_sees_paths_and_expands_braces(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("See `conlip_plugin/{config,model}.py` and `tests/reliability/kill_bench.py --kills 3`.\n"
                    "```bash\npython scripts/run-tests -q\n```\n")
    assert list(repo_paths(page)) == ["conlip_plugin/{config,model}.py", "tests/reliability/kill_bench.py",
                                      "scripts/run-tests"]
    assert expand_braces("a/{b,c}/{d,e}.py") == ["a/b/d.py", "a/b/e.py", "a/c/d.py", "a/c/e.py"]
    assert _exists("conlip_plugin/{config,model}.py") and not _exists("conlip_plugin/{config,nowhere}.py")
    assert slug("The mechanism, measured (paper Table 2)") == "the-mechanism-measured-paper-table-2"
    assert slug("Dense retrieval (`conlip-retrieval`)") == "dense-retrieval-conlip-retrieval"


def test_layout_lists_every_module_of_the_package():
    """docs/layout.md is the map of the package: a module missing from it is one a newcomer cannot place."""
    page = ROOT / "docs" / "layout.md"
    text = _without_history(page, page.read_text()).split(HISTORY, 1)[0]
    listed = {p for chunk in CODE_SPAN.findall(text) for token in chunk.split() for p in expand_braces(token)}
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "conlip_plugin").rglob("*.py")
               if "__pycache__" not in p.parts and p.parent.name != "patches"}
    modules -= {m for m in modules if m.endswith("/__init__.py") and m != "conlip_plugin/__init__.py"}
    assert not modules - listed, f"docs/layout.md does not list: {sorted(modules - listed)}"
