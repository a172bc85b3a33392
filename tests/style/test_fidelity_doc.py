"""docs/fidelity.md lists every place the code marks UNVERIFIED, and nothing that is gone.

A marker is written `UNVERIFIED(<id>)` in a comment or docstring; the page has one row per id in
its "Marked in the code" table, naming the file(s) that carry the marker and the upstream function
or spec section the behaviour stands against.
"""

from __future__ import annotations

import re

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.style

DOC = ROOT / "docs" / "fidelity.md"
# the code snpemu ships and runs (generated protobuf modules are excluded: their comments come
# from protos/, which is scanned itself)
SCANNED = ("services/snpemu", "protos", "bench", "scripts", "deploy")
_MARKER = re.compile(r"UNVERIFIED(?P<tag>\((?P<id>[^)]*)\))?")
_ID = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
_ROW = re.compile(
    r"^\|\s*`(?P<id>[^`]+)`\s*\|(?P<where>[^|]*)\|(?P<what>[^|]*)\|(?P<upstream>[^|]*)\|$"
)
# an upstream citation: a kernel path, or a named specification
_UPSTREAM = re.compile(
    r"(arch|drivers|include|virt|Documentation)/\S+|SNP ABI|GHCB|APM|PPR|QEMU|OVMF|AMD [0-9]{5}"
)


def markers_in_code() -> dict[str, set[str]]:
    """{marker id: {repository-relative file, ...}}; a marker without an id is an error."""
    found: dict[str, set[str]] = {}
    bad: list[str] = []
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*")):
            if not path.is_file() or path.suffix not in {".py", ".proto", ".yml", ".yaml", ".sh"}:
                continue
            rel = path.relative_to(ROOT).as_posix()
            for n, line in enumerate(path.read_text().splitlines(), 1):
                for m in _MARKER.finditer(line):
                    ident = m["id"] or ""
                    if not _ID.match(ident):
                        bad.append(f"{rel}:{n}: {line.strip()}")
                    else:
                        found.setdefault(ident, set()).add(rel)
    assert not bad, "UNVERIFIED markers need an id, UNVERIFIED(kebab-case-id):\n" + "\n".join(bad)
    return found


def rows_in_doc(text: str) -> dict[str, tuple[str, str, str]]:
    section = text.split("## Marked in the code", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, tuple[str, str, str]] = {}
    for line in section.splitlines():
        m = _ROW.match(line.strip())
        if m and m["id"] != "id":
            assert m["id"] not in rows, f"docs/fidelity.md lists {m['id']} twice"
            rows[m["id"]] = (m["where"].strip(), m["what"].strip(), m["upstream"].strip())
    return rows


def mismatches(code: dict[str, set[str]], rows: dict[str, object]) -> tuple[list[str], list[str]]:
    """(marker ids without a row, row ids without a marker)."""
    return sorted(set(code) - set(rows)), sorted(set(rows) - set(code))


def test_every_marker_has_a_row_and_every_row_a_marker() -> None:
    missing, stale = mismatches(markers_in_code(), rows_in_doc(DOC.read_text()))
    assert missing == [], "markers in the code missing from docs/fidelity.md"
    assert stale == [], "rows in docs/fidelity.md with no marker in code"


def test_each_row_names_the_marked_files_and_an_upstream_source() -> None:
    code = markers_in_code()
    for ident, (where, what, upstream) in rows_in_doc(DOC.read_text()).items():
        for rel in code.get(ident, ()):
            assert rel in where, f"{ident}: the row should name {rel}"
        assert what, f"{ident}: say what snpemu does"
        assert _UPSTREAM.search(upstream), f"{ident}: cite the upstream function or spec section"


def test_the_check_reports_a_missing_row_and_a_stale_one() -> None:
    """On a page and markers made up here: a row outside its section is not read, a marker
    with no row and a row with no marker are both reported, and a marker needs an id."""
    doc = (
        "## Marked in the code\n\n| id | where | what | upstream |\n|---|---|---|---|\n"
        "| `a-b` | `x.py` | does | arch/x86/kvm/svm/sev.c f() |\n"
        "| `gone` | `y.py` | did | arch/x86/kvm/svm/sev.c g() |\n\n## Next\n| `c` | y | z | w |\n"
    )
    rows = rows_in_doc(doc)
    assert rows["a-b"] == ("`x.py`", "does", "arch/x86/kvm/svm/sev.c f()")
    assert set(rows) == {"a-b", "gone"}
    assert mismatches({"a-b": {"x.py"}, "new-one": {"z.py"}}, rows) == (["new-one"], ["gone"])
    assert mismatches({"a-b": {"x.py"}, "gone": {"y.py"}}, rows) == ([], [])
    assert _MARKER.search("# UNVERIFIED(a-b): x")["id"] == "a-b"  # type: ignore[index]
    assert _MARKER.search("# UNVERIFIED: x")["id"] is None  # type: ignore[index]
