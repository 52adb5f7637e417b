"""What the README promises stays true: CI's test command, and a way in to every console command."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT.joinpath("README.md").read_text()


def test_readme_gives_the_test_command_ci_runs():
    """.ci/run runs the README's test command; the README must keep showing that command."""
    assert "bash scripts/run-tests" in ROOT.joinpath(".ci/run").read_text()
    assert re.search(r"^bash scripts/run-tests\b", README, flags=re.M)


def test_readme_names_every_console_command():
    """A console script the package installs and the README does not name is one nobody finds."""
    section = ROOT.joinpath("pyproject.toml").read_text().split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    scripts = re.findall(r"^([\w-]+)\s*=", section, flags=re.M)
    assert "conlip-train" in scripts
    named = set(re.findall(r"`(conlip-[a-z-]+)`", README))
    assert set(scripts) <= named, f"not in the README: {sorted(set(scripts) - named)}"
