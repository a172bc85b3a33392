"""The RMP-policy lab: every scenario under every violation policy, each on a fresh host.

python -m snpemu.lab                      # all of it; table on stdout, files in ./lab
python -m snpemu.lab --scenario buggy-dma --policy sigbus --policy gmem
python -m snpemu.lab --out lab --doc docs/lab-results.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from snpemu.lab.report import results_page, table, write_outputs
from snpemu.lab.run import run_matrix
from snpemu.lab.scenarios import POLICIES, SCENARIOS


def _page(data: dict[str, Any], out: Path, doc: Path) -> None:
    doc.parent.mkdir(parents=True, exist_ok=True)
    chart = os.path.relpath(out / "results.png", doc.parent)
    doc.write_text(results_page(data["runs"], chart, data["generated"], data.get("machine", "")))
    print(f"wrote {doc}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="snpemu lab", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scenario", action="append", choices=[s.name for s in SCENARIOS], help="repeatable"
    )
    parser.add_argument("--policy", action="append", choices=POLICIES, help="repeatable")
    parser.add_argument("--out", type=Path, default=Path("lab"), help="results.json, results.png")
    parser.add_argument("--doc", type=Path, help="also write the results page (Markdown) here")
    parser.add_argument(
        "--keep", type=Path, help="keep each run's state and logs here (default: a temp dir)"
    )
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="run nothing: rewrite the chart and --doc from OUT/results.json",
    )
    args = parser.parse_args(argv)
    if args.render_only:
        data = json.loads((args.out / "results.json").read_text())
        write_outputs(data["runs"], args.out, data)
        if args.doc:
            _page(data, args.out, args.doc)
        return 0
    if args.keep:
        results = asyncio.run(run_matrix(args.keep, args.scenario, args.policy))
    else:
        with tempfile.TemporaryDirectory(prefix="snpemu-lab-") as work:
            results = asyncio.run(run_matrix(Path(work), args.scenario, args.policy))
    rows = [r.as_json() for r in results]
    print()
    print(table(rows))
    write_outputs(rows, args.out)
    print(f"\nwrote {args.out / 'results.json'} and {args.out / 'results.png'}")
    if args.doc:
        _page(json.loads((args.out / "results.json").read_text()), args.out, args.doc)
    bad = sum(r.silent_corruptions + r.silently_lost for r in results)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
