"""Mutation testing of snpemu's cores with mutmut, on demand (`make mutate`; never in `make test`).

Each core is mutated in its own staging directory, .mutation/<core>/, laid out as mutmut expects
(src/snpemu, src/snp, tests/, pyproject.toml with a [tool.mutmut] section): mutmut names a mutant
after the file's path less a leading "src.", and the tests import `snpemu.…`. The staging copy is
made fresh from this checkout on every run, so each score is of the code and tests as they are.
The test command is the fast in-process suite (tests/unit): mutmut runs, for each mutant, only
the tests that called the mutated function.

    python scripts/mutate.py                  # every core, one mutant at a time
    python scripts/mutate.py abi kvm -j 2     # two cores, two test processes
    python scripts/mutate.py psp --only 'snpemu.psp.report.*'   # a subset, while writing tests
    python scripts/mutate.py rmp --only '…ǁrmpupdate_batch__mutmut_*' --tests tests/unit/rmp

It prints, per core, the killed / total mutants and the wall time, writes the survivors' diffs to
.mutation/<core>/survivors.txt, and exits 1 when a core scores under --min (85 %).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".mutation"
MUTMUT = Path(sys.executable).parent / "mutmut"
TESTS = ["tests/unit"]
# tests of the test tooling, not of a core, that cannot run in the staging layout: the rpc-marker
# tests start an inner pytest with services/ on its path, which the staging copy names src/
IGNORE = ["tests/unit/test_rpc_record.py"]


@dataclass(frozen=True)
class Core:
    paths: tuple[str, ...]  # under services/
    # mutmut mutant-name patterns, for a module of which only some functions are the core
    # (a method is module.xǁClassǁmethod, a function module.x_function)
    only: tuple[str, ...] = ()


CORES = {
    "abi": Core(("snpemu/abi/",)),
    "rmp": Core(
        (
            "snpemu/rmp/table.py",
            "snpemu/rmp/entry.py",
            "snpemu/rmp/entry_arrays.py",
            "snpemu/rmp/fault.py",
            "snpemu/rmp/guest_insns_table.py",
            "snpemu/rmp/fw_transitions.py",
        )
    ),
    # the report (psp/report.py) and the guest-message handling (psp/guest_request.py): the
    # SNP_GUEST_REQUEST command and the MSG_REPORT_REQ / MSG_KEY_REQ replies it seals
    "psp": Core(("snpemu/psp/report.py", "snpemu/psp/guest_request.py")),
    "kvm": Core(("snpemu/kvm/exits/psc.py",)),
}

PROFILE = """from hypothesis import settings

settings.register_profile("mutation", deadline=None)
settings.load_profile("mutation")
"""

# exit codes as mutmut records them (mutmut/stats.py status_by_exit_code)
KILLED = {1, 3, 24, -24, 152, 255, 36, 37, -9, -11}  # failed, timed out, type check, crashed


def stage(name: str, core: Core, tests: list[str]) -> Path:
    """A fresh copy of every file git knows here (tracked, or new and not ignored), with
    services/ as src/; mutmut copies it all into its mutants/ (the tests read files such as
    .env and docs/)."""
    d = WORK / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
        text=True,
    ).stdout.split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if not src.is_file():  # deleted in the work tree
            continue
        dst = d / ("src" + rel.removeprefix("services") if rel.startswith("services/") else rel)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
    # loaded into every pytest run (-p): on 2 busy cores a test may take longer than hypothesis's
    # default 200 ms deadline, which would count as a kill
    (d / "mutation_profile.py").write_text(PROFILE)
    top = sorted(p.name + ("/" if p.is_dir() else "") for p in d.iterdir())
    config = {
        "source_paths": [f"src/{p}" for p in core.paths],
        "also_copy": [p for p in top if p not in ("tests/", "pyproject.toml")],
        "pytest_add_cli_args_test_selection": tests,
        # the same examples on every run, so a score can be reproduced
        "pytest_add_cli_args": [
            *("-p", "no:cacheprovider", "-p", "mutation_profile", "--hypothesis-seed=0"),
            *(f"--ignore={path}" for path in IGNORE),
            *("-o", "tmp_path_retention_count=1000000", "-o", "tmp_path_retention_policy=all"),
        ],
        "use_git_change_detection": False,
    }
    text = (ROOT / "pyproject.toml").read_text()
    text += "\n[tool.mutmut]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in config.items())
    (d / "pyproject.toml").write_text(text)
    return d


def results(d: Path, core: Core, patterns: tuple[str, ...]) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for p in core.paths:
        glob = f"{p}*.py.meta" if p.endswith("/") else f"{p}.meta"
        for meta in sorted((d / "mutants" / "src").glob(glob)):
            codes = json.loads(meta.read_text())["exit_code_by_key"]
            for key, code in codes.items():
                if not patterns or any(fnmatch.fnmatch(key, pat) for pat in patterns):
                    out[key] = code
    return out


def run(
    name: str, core: Core, jobs: int, only: tuple[str, ...], tests: list[str]
) -> tuple[float, float]:
    d = stage(name, core, tests)
    patterns = only or core.only
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # pytest's temporary directories in the staging directory, none ever removed: the parent's
    # (a session-scoped chip identity, say) must outlive every test process forked from it, and
    # no other pytest run on the machine may rotate them away (a missing file would fail a test
    # and count as a killed mutant)
    (d / "tmp").mkdir()
    env["PYTEST_DEBUG_TEMPROOT"] = str(d / "tmp")
    start = time.monotonic()
    cmd = [str(MUTMUT), "run", "--max-children", str(jobs), *patterns]
    with open(d / "mutmut.log", "w") as log:
        rc = subprocess.run(cmd, cwd=d, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    took = time.monotonic() - start
    if rc != 0:
        sys.exit(f"mutate: mutmut failed for {name} (exit {rc}); see {d / 'mutmut.log'}")
    codes = results(d, core, patterns)
    killed = sum(1 for c in codes.values() if c in KILLED)
    unchecked = [k for k, c in codes.items() if c is None]
    if unchecked:
        sys.exit(f"mutate: {len(unchecked)} {name} mutants were not run, e.g. {unchecked[0]}")
    survivors = sorted(k for k, c in codes.items() if c not in KILLED)
    with open(d / "survivors.txt", "w") as f:
        for key in survivors:
            shown = subprocess.run(
                [str(MUTMUT), "show", key], cwd=d, env=env, capture_output=True, text=True
            ).stdout
            f.write(f"{shown}\n")
    score = 100.0 * killed / len(codes) if codes else 100.0
    print(
        f"{name}: {killed}/{len(codes)} killed ({score:.1f} %), {len(survivors)} survived, "
        f"{took:.0f} s; survivors in {d.relative_to(ROOT) / 'survivors.txt'}",
        flush=True,
    )
    return score, took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("cores", nargs="*", metavar="CORE", help=f"of {', '.join(CORES)} (default all)")
    ap.add_argument("-j", "--jobs", type=int, default=1, help="test processes (default 1)")
    ap.add_argument("--only", action="append", default=[], help="mutant-name pattern (repeatable)")
    ap.add_argument(
        "--tests",
        action="append",
        default=[],
        help=f"test path to run the mutants against (repeatable; default {' '.join(TESTS)}); "
        "a subset gives a lower bound, quicker",
    )
    ap.add_argument("--min", type=float, default=85.0, help="lowest acceptable score, percent")
    args = ap.parse_args()
    if unknown := set(args.cores) - set(CORES):
        ap.error(f"no core {', '.join(sorted(unknown))}; the cores are {', '.join(CORES)}")
    if not MUTMUT.exists():
        sys.exit("mutate: mutmut is not installed: pip install -e '.[mutation]' (make mutate does)")
    low = []
    for name in args.cores or list(CORES):
        score, _ = run(name, CORES[name], args.jobs, tuple(args.only), args.tests or TESTS)
        if score < args.min:
            low.append(name)
    if low:
        sys.exit(f"mutate: under {args.min:.0f} %: {', '.join(low)}")


if __name__ == "__main__":
    main()
