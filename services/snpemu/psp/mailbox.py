"""The firmware's state and what every command shares: the serial mailbox and the state checks.

One command at a time (the PSP mailbox is serial). A failing command raises FirmwareError and
changes nothing: every check runs before the first change. Memory and the RMP are reached only
through the RmpPort. SPEC: SNP ABI (56860); KERNEL: drivers/crypto/ccp/sev-dev.c,
arch/x86/kvm/svm/sev.c for how the host drives each command.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import ParamSpec, TypeVar

from snpemu.abi.addr import PAGE_SIZE, Spa, page_aligned
from snpemu.abi.platform_status import PlatformState
from snpemu.abi.rmp import PageState
from snpemu.psp.guest import GuestContext, GuestState
from snpemu.psp.identity import ChipIdentity
from snpemu.psp.rmp_port import Page, RmpPort
from snpemu.psp.status import COMMAND_ERROR, FirmwareError, SevStatus, fail
from snpemu.psp.topology import Topology

P = ParamSpec("P")
T = TypeVar("T")

API_MAJOR, API_MINOR, BUILD = 1, 55, 21


@dataclass
class Stats:
    commands: Counter[tuple[str, str]] = field(default_factory=Counter)
    durations: dict[str, list[float]] = field(default_factory=dict)


def command(name: str) -> Callable[[Callable[P, Awaitable[T]]], Callable[P, Awaitable[T]]]:
    """Serialise a firmware command and count it by status (snp_psp_commands_total)."""

    def wrap(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        @functools.wraps(fn)
        async def run(*args: P.args, **kwargs: P.kwargs) -> T:
            fw: Mailbox = args[0]  # type: ignore[assignment]
            status = SevStatus.SUCCESS.name
            start = time.perf_counter()
            async with fw.lock:
                try:
                    return await fn(*args, **kwargs)
                except FirmwareError as e:
                    status = e.status.name
                    raise
                except Exception:
                    status = COMMAND_ERROR
                    raise
                finally:
                    fw.stats.commands[(name, status)] += 1
                    if fw.on_command is not None:
                        fw.on_command(name, status, time.perf_counter() - start)

        return run

    return wrap


def aligned(spa: int, what: str = "address") -> Spa:
    if not page_aligned(spa):
        raise fail(SevStatus.INVALID_ADDRESS, f"{what} {spa:#x} is not page aligned")
    return Spa(spa)


class Mailbox:
    """The state the platform, launch and guest-request commands share."""

    def __init__(
        self, identity: ChipIdentity, rmp: RmpPort, topology: Topology | None = None
    ) -> None:
        self.id = identity
        self.rmp = rmp
        self.topology = topology or Topology()
        self.lock = asyncio.Lock()
        self.stats = Stats()
        self.on_command: Callable[[str, str, float], None] | None = None
        self.snp_initialized = False
        self.legacy_initialized = False
        self.tmr = 0
        self.tmr_len = 0
        self.current_tcb = identity.product.tcb
        self.reported_tcb = identity.product.tcb
        self.committed_tcb = identity.product.tcb
        self.committed_version = (BUILD, API_MINOR, API_MAJOR)
        self.mask_chip_id = False
        self.mask_chip_key = False
        self.certs_blob = b""
        self.guests: dict[int, GuestContext] = {}
        self.asids: dict[int, int] = {}  # ASID -> gctx_paddr
        self.unflushed: set[int] = set()  # ASIDs decommissioned, awaiting SNP_DF_FLUSH
        self._memory_bytes: int | None = None  # asked of rmp once, when an address is checked

    @property
    def platform_state(self) -> PlatformState:
        if not self.snp_initialized:
            return PlatformState.UNINIT
        return PlatformState.WORKING if self.guests else PlatformState.INIT

    def _need_snp(self) -> None:
        if not self.snp_initialized:
            raise fail(SevStatus.INVALID_PLATFORM_STATE, "SNP is not initialised (SNP_INIT first)")

    def _guest(self, gctx_paddr: int, *states: GuestState) -> GuestContext:
        self._need_snp()
        ctx = self.guests.get(gctx_paddr)
        if ctx is None:
            raise fail(SevStatus.INVALID_GUEST, f"no guest context at {gctx_paddr:#x}")
        if states and ctx.state not in states:
            want = " or ".join(s.name for s in states)
            raise fail(
                SevStatus.INVALID_GUEST_STATE, f"guest is {ctx.state.name}, command needs {want}"
            )
        return ctx

    async def _address(self, spa: int, what: str = "address", size: int = PAGE_SIZE) -> Spa:
        """spa, page aligned and with [spa, spa + size) inside system memory, else
        INVALID_ADDRESS: checked before the command reaches memory or the RMP, so an address
        beyond memory fails as the firmware fails it, not as a failed DMA.
        SPEC: SNP ABI, status codes (INVALID_ADDRESS 0x09); UNVERIFIED(address-beyond-memory):
        which commands check the bound first is not from the spec."""
        aligned(spa, what)
        if self._memory_bytes is None:
            self._memory_bytes = (await self.rmp.platform()).memory_bytes
        if spa + size > self._memory_bytes:
            raise fail(
                SevStatus.INVALID_ADDRESS,
                f"{what} {spa:#x}+{size:#x} is beyond memory ({self._memory_bytes:#x} bytes)",
            )
        return Spa(spa)

    async def _expect(self, spa: int, *states: PageState, what: str = "page") -> Page:
        page = await self.rmp.page(spa)
        if page.state not in states:
            want = " or ".join(s.name for s in states)
            raise fail(
                SevStatus.INVALID_PAGE_STATE, f"{what} {spa:#x} is {page.state.name}, not {want}"
            )
        return page
