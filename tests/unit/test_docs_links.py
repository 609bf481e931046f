"""The code cites the project's own docs/, never a document outside the repository, and every pointer into
docs/ (`docs/pci.md#aperture-weights`) names an existing file and heading."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
SCANNED = [ROOT / "src", ROOT / "tests", ROOT / "bench", ROOT / "README.md", DOCS]
TEXT_SUFFIXES = {".py", ".md", ".sh", ".txt", ".toml", ".cfg", ".ini", ".json", ".c", ".h", ".S", ""}
SKIPPED_DIRS = {"__pycache__", ".pytest_cache", ".hypothesis", ".ruff_cache"}

# Spelled in pieces so that this file does not match itself.
FORBIDDEN = ("ch-vfio" + "-spec", "shared" + "/")

# docs/<file>.md, optionally with #anchor, and further `, #anchor` pointers into the same file.
POINTER = re.compile(r"docs/([\w.-]+\.md)((?:#[\w-]+)?(?:,\s*#[\w-]+)*)")
# Markdown links inside docs/: [text](file.md#anchor) or [text](#anchor).
DOCS_LINK = re.compile(r"\]\(([\w.-]+\.md)?(#[\w-]+)?\)")


def _files() -> list[Path]:
    out: list[Path] = []
    for base in SCANNED:
        if base.is_file():
            out.append(base)
            continue
        for path in sorted(base.rglob("*")):
            parts = set(path.relative_to(ROOT).parts)
            if parts & SKIPPED_DIRS or any(p.endswith(".egg-info") for p in parts):
                continue
            if path.is_file() and path.suffix in TEXT_SUFFIXES:
                out.append(path)
    return out


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link counts as its text
    text = text.lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """Every heading anchor of a Markdown document (repeated headings get -1, -2, ... as on GitHub)."""
    found: set[str] = set()
    counts: dict[str, int] = {}
    fenced = False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if fenced or not m:
            continue
        base = slug(m.group(1))
        n = counts.get(base, 0)
        counts[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def test_slug_follows_github() -> None:
    assert slug("Aperture weights") == "aperture-weights"
    assert slug("32-bit exhaustion") == "32-bit-exhaustion"
    assert slug("Port 0xCF8") == "port-0xcf8"
    assert slug("Enabling and disabling MSI or MSI-X") == "enabling-and-disabling-msi-or-msi-x"
    assert slug("Routing (and `irqfd`) order!") == "routing-and-irqfd-order"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}


def test_no_reference_outside_the_repository() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in _files()
        for n, line in enumerate(_text(path).splitlines(), 1)
        if any(word in line for word in FORBIDDEN)
    ]
    assert not offenders, "cite docs/ instead:\n" + "\n".join(offenders)


def _pointers() -> list[tuple[str, str, str | None]]:
    """(where, docs file, anchor or None) of every pointer into docs/ in the scanned files."""
    found: list[tuple[str, str, str | None]] = []
    for path in _files():
        text = _text(path)
        where = str(path.relative_to(ROOT))
        for m in POINTER.finditer(text):
            tags = re.findall(r"#([\w-]+)", m.group(2))
            line = text.count("\n", 0, m.start()) + 1
            found.extend((f"{where}:{line}", m.group(1), tag) for tag in tags or [None])
        if path.parent == DOCS and path.suffix == ".md":
            for m in DOCS_LINK.finditer(text):
                target = m.group(1) or path.name
                tag = m.group(2)[1:] if m.group(2) else None
                line = text.count("\n", 0, m.start()) + 1
                found.append((f"{where}:{line}", target, tag))
    return found


def test_the_code_points_into_docs() -> None:
    assert len(_pointers()) > 20


@pytest.mark.parametrize("where,target,anchor", _pointers())
def test_docs_pointer_resolves(where: str, target: str, anchor: str | None) -> None:
    doc = DOCS / target
    assert doc.is_file(), f"{where}: docs/{target} does not exist"
    if anchor is not None:
        known = anchors(_text(doc))
        assert anchor in known, f"{where}: docs/{target} has no heading #{anchor} (has: {sorted(known)})"
