"""Shared test helpers: repository paths, free ports, the real grpcurl."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from snpemu.hostconfig import free_ports  # noqa: F401  (tests import it from here)

ROOT = Path(__file__).resolve().parent.parent


def tool(name: str) -> str:
    """A command-line tool from this virtualenv (grpcurl, buf, ...) or PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: run `make install`")
    return found


OVMF = "/usr/share/OVMF/OVMF_CODE.fd"  # Debian's ovmf package


def sev_snp_measure(
    *args: str, ovmf: str = OVMF, vcpus: int = 2, vcpu_type: str = "EPYC-Milan"
) -> str:
    """The launch digest the independent `sev-snp-measure` CLI predicts, as hex."""
    return subprocess.run(
        [
            *(tool("sev-snp-measure"), "--mode", "snp", "--ovmf", str(ovmf)),
            *("--vcpus", str(vcpus), "--vcpu-type", vcpu_type, *args),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.strip()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> object:
    """A test's rpc markers are claims: each must be borne out by a call the test made."""
    from tests import rpc_record

    claims = rpc_record.claims_of(item.iter_markers("rpc"))
    dump = os.environ.get("SNPEMU_RPC_RECORD")
    if not claims and not dump:
        return (yield)
    unknown = {m for m, _ in claims} - rpc_record.all_methods()
    if unknown:
        pytest.fail(f"rpc markers name methods that do not exist: {sorted(unknown)}")
    with rpc_record.recording() as rec:
        try:
            result = yield
        finally:
            if dump:
                with open(dump, "a") as out:
                    line = {"test": item.nodeid, "seen": sorted(rec.outcomes())}
                    out.write(json.dumps(line) + "\n")
    missing = claims - rec.outcomes()
    if missing:
        seen = sorted({(c.method, str(c.code), c.responses) for c in rec.calls})
        pytest.fail(
            "rpc markers claim calls this test did not make: "
            + ", ".join(f"{m} {o}" for m, o in sorted(missing))
            + f"\ncalls seen (method, code, responses): {seen}",
            pytrace=False,
        )
    return result
