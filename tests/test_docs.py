"""The repository's documentation is its own: nothing points at files outside it, and every
``docs/algorithms.md §N`` citation names a section that exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
ALGORITHMS = ROOT / "docs" / "algorithms.md"
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".json", ".cfg", ".ini"}
# spelled in pieces so this file does not match the searches it enforces
FORBIDDEN = ("ALGORITHMS" + ".md", "DESIGN" + ".md", "../" + "shared")
CITE = "docs/algorithms.md"
SECTION = re.compile(r"§(\d+(?:\.\d+)*)(?:\s*-\s*(\d+(?:\.\d+)*))?")
HEADING = re.compile(r"^#{2,6}\s+(\d+(?:\.\d+)*)\.?\s", re.MULTILINE)


def _text_files(*roots: Path) -> list[Path]:
    out = []
    for root in roots:
        paths = [root] if root.is_file() else sorted(root.rglob("*"))
        for p in paths:
            parts = p.relative_to(ROOT).parts
            if any(s.endswith(".egg-info") or s == "__pycache__" for s in parts):
                continue
            if p.is_file() and p.suffix in TEXT_SUFFIXES:
                out.append(p)
    return out


def _sections() -> set[str]:
    return set(HEADING.findall(ALGORITHMS.read_text(encoding="utf-8")))


def _cited(line: str) -> list[str]:
    """Section numbers cited on ``line`` after its first ``docs/algorithms.md`` (both ends of
    a range like ``§5.2-5.3``)."""
    tail = line[line.index(CITE) + len(CITE):] if CITE in line else line
    return [n for m in SECTION.finditer(tail) for n in m.groups() if n]


def test_algorithms_page_has_numbered_sections():
    secs = _sections()
    assert {"1.2", "1.7", "2.1", "4.1", "5.5", "13", "13.2", "13.6"} <= secs


@pytest.mark.parametrize("path", _text_files(ROOT / "src", ROOT / "docs", ROOT / "configs",
                                             ROOT / "README.md"),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_no_citation_of_files_outside_the_repository(path):
    text = path.read_text(encoding="utf-8", errors="replace")
    found = [f"line {i}: {s}" for i, line in enumerate(text.splitlines(), 1)
             for s in FORBIDDEN if s in line]
    assert not found, f"{path.relative_to(ROOT)} cites files outside the repository: {found}"


def test_every_citation_names_an_existing_section():
    secs = _sections()
    bad = []
    for path in _text_files(ROOT / "src", ROOT / "docs", ROOT / "configs", ROOT / "tests",
                            ROOT / "README.md"):
        own = path == ALGORITHMS
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not own and CITE not in line:
                continue
            bad += [f"{path.relative_to(ROOT)}:{i}: §{n}" for n in _cited(line) if n not in secs]
    assert not bad, "citations of sections missing from docs/algorithms.md:\n" + "\n".join(bad)


def test_citations_in_src_keep_section_and_page_on_one_line():
    """A § without the page name on its line is a citation wrapped where the check above
    cannot see it."""
    bad = [f"{p.relative_to(ROOT)}:{i}" for p in _text_files(ROOT / "src")
           for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
           if "§" in line and f"{CITE} §" not in line]
    assert not bad, f"write 'docs/algorithms.md §N' on one line: {bad}"
