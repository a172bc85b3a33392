"""Shared test helpers: repository paths, free ports, the real grpcurl, polling with a
deadline."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from snpemu.hostconfig import free_ports  # noqa: F401  (tests import it from here)

ROOT = Path(__file__).resolve().parent.parent


async def eventually(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Poll `condition` until it holds; fail if it still does not after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"condition still false after {timeout_s:g} s")
        await asyncio.sleep(0.01)


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
