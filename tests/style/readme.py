"""Read what the README says is not built yet."""

from __future__ import annotations

import re

from tests.conftest import ROOT

_LINE = re.compile(r"^- `(?P<service>snp\.[a-z]+\.v1\.[A-Za-z]+)` \(\d+\): (?P<methods>.+)$")


def not_built_from_readme() -> dict[str, list[str]]:
    """{service full name: [method, ...]} from the README's "Not built yet" list."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Not built yet", 1)[1].split("\n## ", 1)[0]
    found: dict[str, list[str]] = {}
    for line in section.splitlines():
        m = _LINE.match(line.strip())
        if m:
            found[m["service"]] = [x.strip() for x in m["methods"].split(",")]
    return found
