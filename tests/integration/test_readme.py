"""What the README promises about the tree stays true of it."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_readme_lists_every_patch():
    """The README's table of changes to open_clip names each file in patches/, and no other."""
    section = ROOT.joinpath("README.md").read_text().split("## Changes to open_clip (`patches/`)", 1)[1]
    listed = set(re.findall(r"^\| `(\w+\.py)` \|", section, flags=re.M))
    assert listed == {p.name for p in (ROOT / "patches").glob("*.py")}
