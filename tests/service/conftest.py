"""The service-level fixture ladder: each rung is an async fixture on the rung below, all of
function scope (one test, one host, torn down in reverse when the test ends):

    stack          rmp, psp, kvm and netd serving on port 0 in this process  -> Stack
    launched_vm    stack + a VM created and launched (64 MiB, one vCPU)       -> Guest
    ghcb_vm        launched_vm + its vCPU's GHCB registered at GHCB_GPA       -> Guest
    running_guest  stack + the guest agent booted to BOOT_STATE_RUNNING       -> Agent

A test asks for the highest rung it needs, or builds its own with host_stack(tmp_path, ...) when
it needs other options (a violation policy, a clock, psp's environment) or more than one stack.
The module-scoped rung for hypothesis, one stack and one guest shared by every example, is
tests/service/live.py's Live. tests/README.md describes them all.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.service.host_stack import GHCB_GPA, Agent, Guest, Stack, agent, host_stack


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    """The host stack with host_stack's defaults (512 MiB, the gmem policy), its state under
    the test's tmp_path."""
    async with host_stack(tmp_path) as s:
        yield s


@pytest.fixture
async def launched_vm(stack: Stack) -> Guest:
    """A VM on `stack` through CreateVm and LaunchVm (tiny firmware, 64 MiB, one vCPU): the
    launch measured, its vCPU identity issued, no GHCB yet. Its teardown is the stack's."""
    return await stack.launch()


@pytest.fixture
async def ghcb_vm(launched_vm: Guest) -> Guest:
    """launched_vm whose vCPU registered its GHCB at GHCB_GPA (GHCB_MSR_REG_GPA_REQ answered
    with the same GPA), ready for VMGEXITs and guest requests."""
    await launched_vm.register_ghcb(GHCB_GPA)
    return launched_vm


@pytest.fixture
async def running_guest(stack: Stack) -> AsyncIterator[Agent]:
    """The guest agent ("guest-t", 64 MiB) on `stack`, booted: it creates, launches and boots
    its own VM (registering its GHCB in its kernel), so this rung stands on `stack`, not on
    ghcb_vm. Yields its stub and its runtime."""
    async with agent(stack) as (stub, runtime):
        yield stub, runtime
