#!/usr/bin/env python3
"""Generate the Python gRPC code for protos/ into services/snp/ (committed).

    python scripts/gen_protos.py          # regenerate
    python scripts/gen_protos.py --check  # exit 1 if the committed code is stale

The generated tree is a regular package (an __init__.py in each directory) named `snp`, apart
from the application package `snpemu`, so neither hides the other.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "services" / "snp"


def generate(dest: Path) -> None:
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={dest}",
        f"--grpc_python_out={dest}",
        f"--mypy_out={dest}",
        f"--mypy_grpc_out={dest}",
        *files,
    ]
    # protoc finds the mypy plugins on PATH; they live beside this interpreter.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for d in [dest / "snp", *(p for p in (dest / "snp").rglob("*") if p.is_dir())]:
        (d / "__init__.py").touch()
    (dest / "snp" / "py.typed").touch()


def same_tree(a: Path, b: Path) -> list[str]:
    diffs: list[str] = []
    files_a = {
        p.relative_to(a) for p in a.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    }
    files_b = {
        p.relative_to(b) for p in b.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    }
    diffs += [f"missing: {p}" for p in sorted(files_a - files_b)]
    diffs += [f"extra: {p}" for p in sorted(files_b - files_a)]
    diffs += [
        f"differs: {p}"
        for p in sorted(files_a & files_b)
        if not filecmp.cmp(a / p, b / p, shallow=False)
    ]
    return diffs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if services/snp is stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        if args.check:
            diffs = same_tree(Path(tmp) / "snp", OUT)
            for d in diffs:
                print(f"services/snp {d}", file=sys.stderr)
            if diffs:
                print("generated code is stale: run python scripts/gen_protos.py", file=sys.stderr)
            return 1 if diffs else 0
        shutil.rmtree(OUT, ignore_errors=True)
        shutil.copytree(Path(tmp) / "snp", OUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
