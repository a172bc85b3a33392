"""Shared test helpers: repository paths, free ports, the real grpcurl, hypothesis profiles,
polling with a deadline."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from snpemu.hostconfig import free_ports  # noqa: F401  (tests import it from here)

ROOT = Path(__file__).resolve().parent.parent

# Hypothesis profiles, picked with HYPOTHESIS_PROFILE: "ci" (the default) draws the same
# examples on every run (derandomized, no example database); "long" draws 20 times as many,
# at random, for a run on demand. A test that asks for its own number of examples says
# examples(n): n under ci, scaled like the default under any other profile.
CI_EXAMPLES = 100
settings.register_profile(
    "ci", max_examples=CI_EXAMPLES, derandomize=True, database=None, deadline=None, print_blob=True
)
# derandomize stated in both: a profile inherits the settings loaded when it is registered,
# and under a CI environment variable that is hypothesis's own "ci" profile (derandomized)
settings.register_profile(
    "long",
    max_examples=20 * CI_EXAMPLES,
    derandomize=False,
    database=None,
    deadline=None,
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or "ci")


def examples(n: int) -> int:
    """max_examples for a test that wants n under the ci profile, scaled to the loaded one."""
    return max(1, n * settings.default.max_examples // CI_EXAMPLES)


async def eventually(
    condition: Callable[[], object], what: str = "condition", timeout_s: float = 30.0
) -> None:
    """Poll `condition` until it holds; fail if it still does not after `timeout_s` (a bound on
    the wait, never a duration the test asserts)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"never happened within {timeout_s:g} s: {what}")
        await asyncio.sleep(0.005)


class FakeClock:
    """A monotonic clock (seconds) that moves only when the test says so; binary-fraction steps
    keep its sums exact."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


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


# The recording of an rpc-marked test (and its claims), from the start of its setup to the end
# of its teardown: the channels its function-scoped fixtures open (the `stack` of
# tests/service/conftest.py and the like) are the test's own, so the recording has to be on when
# those fixtures run, not only while the test function does. A channel a wider-scoped fixture
# opened for an earlier test is not recorded (see tests/README.md).
_RECORDING = pytest.StashKey[tuple[contextlib.ExitStack, Any]]()


def _wants_recording(item: pytest.Item) -> bool:
    from tests import rpc_record

    if os.environ.get("SNPEMU_RPC_RECORD"):
        return True
    try:
        return bool(rpc_record.claims_of(item.iter_markers("rpc")))
    except ValueError:
        return False  # a malformed marker: the call phase reports it


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> object:
    """Start recording before the test's fixtures are set up."""
    from tests import rpc_record

    if _wants_recording(item):
        stack = contextlib.ExitStack()
        item.stash[_RECORDING] = (stack, stack.enter_context(rpc_record.recording()))
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> object:
    """Stop recording once the test's fixtures are torn down."""
    try:
        return (yield)
    finally:
        entry = item.stash.get(_RECORDING, None)
        if entry is not None:
            del item.stash[_RECORDING]
            entry[0].close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> object:
    """A test's rpc markers are claims: each must be borne out by a call the test made (in its
    body or in a function-scoped fixture)."""
    from tests import rpc_record

    claims = rpc_record.claims_of(item.iter_markers("rpc"))
    dump = os.environ.get("SNPEMU_RPC_RECORD")
    if not claims and not dump:
        return (yield)
    unknown = {m for m, _ in claims} - rpc_record.all_methods()
    if unknown:
        pytest.fail(f"rpc markers name methods that do not exist: {sorted(unknown)}")
    entry = item.stash.get(_RECORDING, None)
    with contextlib.ExitStack() as own:
        # started at setup (pytest_runtest_setup); on its own if that hook did not run
        rec = entry[1] if entry is not None else own.enter_context(rpc_record.recording())
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
