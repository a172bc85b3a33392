"""What the repository cites lives in the repository.

No tracked file may cite a document the repository does not contain: the design notes and the
ABI reference that were kept outside it (`DESIGN.md`, "DESIGN 3", `snp-abi.md`, "reference 4.2")
or a path outside the checkout (`../shared`). Their content is docs/design.md and docs/abi.md,
each fact with its upstream source. And every `docs/<page>.md#<anchor>` the code, the tests,
the protos or the README cite, and every `](page.md#anchor)` link between the docs, must name a
heading that exists on that page.
"""

from __future__ import annotations

import re
import subprocess
from functools import cache
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.style

SELF = Path(__file__).resolve().relative_to(ROOT).as_posix()
FORBIDDEN = {
    "DESIGN.md": re.compile(r"DESIGN\.md"),
    "DESIGN <n>": re.compile(r"\bDESIGN \d"),
    "snp-abi": re.compile(r"snp-abi", re.IGNORECASE),
    "reference <n.n>": re.compile(r"\breference (section )?\d+(\.\d+)?\b", re.IGNORECASE),
    "../shared": re.compile(r"\.\./shared\b|/work/shared\b"),
}
# docs/abi.md#report in code, tests, protos and the README
_CITED = re.compile(r"\bdocs/(?P<page>[A-Za-z0-9_-]+\.md)#(?P<anchor>[A-Za-z0-9_-]+)")
# (abi.md#report) or (#report) as a Markdown link target inside docs/
_LINK = re.compile(r"\]\((?P<page>[A-Za-z0-9_-]+\.md)?#(?P<anchor>[A-Za-z0-9_-]+)\)")
_HEADING = re.compile(r"^#{1,6}\s+(?P<title>.+?)\s*#*\s*$")


def tracked_texts() -> dict[str, str]:
    """{repository-relative path: text} of every tracked text file."""
    names = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    texts: dict[str, str] = {}
    for raw in names:
        rel = raw.decode()
        path = ROOT / rel
        if not rel or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue  # binary (the live view's picture, ...)
        try:
            texts[rel] = data.decode()
        except UnicodeDecodeError:
            continue
    return texts


def slug(title: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, inline markup and punctuation
    other than - and _ dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|\*|\[|\]\([^)]*\)", "", title.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@cache
def anchors(page: str) -> frozenset[str]:
    """The anchors of docs/<page>; a repeated heading gets -1, -2, ... as on GitHub."""
    path = ROOT / "docs" / page
    if not path.is_file():
        return frozenset()
    seen: dict[str, int] = {}
    out: set[str] = set()
    fenced = False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        m = None if fenced else _HEADING.match(line)
        if m:
            base = slug(m["title"])
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return frozenset(out)


def forbidden_citations(texts: dict[str, str]) -> list[str]:
    bad = []
    for rel, text in sorted(texts.items()):
        if rel == SELF:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            for what, pattern in FORBIDDEN.items():
                if pattern.search(line):
                    bad.append(f"{rel}:{n}: cites {what}: {line.strip()}")
    return bad


def dangling_anchors(texts: dict[str, str]) -> list[str]:
    bad = []
    for rel, text in sorted(texts.items()):
        if rel == SELF:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            found = [(m["page"], m["anchor"]) for m in _CITED.finditer(line)]
            if rel.startswith("docs/") and rel.endswith(".md"):
                here = rel.removeprefix("docs/")
                found += [(m["page"] or here, m["anchor"]) for m in _LINK.finditer(line)]
            for page, anchor in found:
                if anchor not in anchors(page):
                    bad.append(f"{rel}:{n}: docs/{page}#{anchor} is not a heading of docs/{page}")
    return bad


def test_no_file_cites_a_document_outside_the_repository() -> None:
    bad = forbidden_citations(tracked_texts())
    assert not bad, (
        "cite docs/design.md, docs/abi.md or the upstream source instead:\n" + "\n".join(bad)
    )


def test_every_cited_docs_anchor_is_a_heading() -> None:
    bad = dangling_anchors(tracked_texts())
    assert not bad, "\n".join(bad)


def test_the_design_and_abi_pages_exist_and_cite_upstream() -> None:
    texts = tracked_texts()
    assert {"docs/design.md", "docs/abi.md"} <= set(texts), "git add docs/design.md docs/abi.md"
    abi = texts["docs/abi.md"]
    # the kernel, the specifications and the third-party tools the facts were checked against
    for source in ("include/linux/psp-sev.h", "arch/x86/include/asm/sev.h", "56860", "56421"):
        assert source in abi, f"docs/abi.md names no source {source!r}"


def test_the_checks_catch_what_they_look_for() -> None:
    """Both checks flag a made-up offender (so neither passes by finding nothing to read)."""
    samples = {  # split so that this file does not cite them itself
        "DESIGN.md": "# see " + "DESIGN" + ".md section 2",
        "DESIGN <n>": "# " + "DESIGN" + " 3: host-only RPCs",
        "snp-abi": "(snp" + "-abi.md 3.1-3.3)",
        "reference <n.n>": "# layout: " + "reference" + " 5.4",
        "../shared": "open('../" + "shared/reference')",
    }
    for what, line in samples.items():
        assert forbidden_citations({"x.py": line}) == [f"x.py:1: cites {what}: {line}"], what
    assert forbidden_citations({"x.py": "# KERNEL: arch/x86/kvm/svm/sev.c"}) == []
    assert dangling_anchors({"x.py": "docs/abi.md#no-such-heading"}) == [
        "x.py:1: docs/abi.md#no-such-heading is not a heading of docs/abi.md"
    ]
    assert dangling_anchors({"x.py": "docs/abi.md#report docs/design.md#the-lab"}) == []
    assert slug("Host credential") == "host-credential"
    assert slug("`PAGE_INFO` (0x70 bytes)") == "page_info-0x70-bytes"
