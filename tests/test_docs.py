"""The project stands alone in a clone: the README's install and test commands are what .ci/run runs,
every relative link in the Markdown resolves, and nothing points at a file outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [
    "README.md",
    "CONTRIBUTING.md",
    "results/README.md",
    "benchmarks/README.md",
    *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md")),
]
SCANNED = {".py", ".md", ".txt", ".json", ".yaml", ".cpp", ".sh", ""}
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def fenced_lines(text: str) -> list[str]:
    """The lines inside ``` blocks."""
    return [line for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S) for line in block.splitlines()]


def test_ci_runs_the_readme_install_and_test_commands_exactly():
    readme = fenced_lines((REPO / "README.md").read_text())
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    install = [line for line in readme if '-e ".[dev]"' in line]
    assert len(install) == 1 and install[0] in ci
    after = readme[readme.index(install[0]) + 1]
    assert after == "pytest -q" and ci[-1] == after  # the last thing CI does is the README's test command


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_resolves(page):
    targets = {t for t in LINK.findall((REPO / page).read_text()) if not re.match(r"[a-z]+:", t)}
    resolved = {t: (REPO / page).parent.joinpath(t).resolve() for t in targets}
    missing = [t for t, p in resolved.items() if not p.exists()]
    assert not missing, f"{page} links to files that are not in the repository: {sorted(missing)}"


def test_nothing_points_outside_the_repository():
    roots = ["fastdae", "tests", "benchmarks", "examples", "results", "docs", "csrc", ".ci"]
    files = [p for r in roots for p in (REPO / r).rglob("*") if p.is_file() and p.suffix in SCANNED]
    files += [REPO / f for f in ("README.md", "CONTRIBUTING.md", "pyproject.toml", "setup.py", "Makefile")]
    pattern = re.compile(r"\b(PAPER|DESIGN|STYLE)\.md\b|\.\./shared/")
    hits = [str(p.relative_to(REPO)) for p in files if p.name != "test_docs.py" and pattern.search(p.read_text())]
    assert not hits, f"references to files outside the repository in {hits}"
