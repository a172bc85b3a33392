"""The firmware's RMP port over an in-process RmpMachine, for unit tests of the firmware model
(the same page-state errors GrpcRmp raises)."""

from __future__ import annotations

from snpemu.abi.addr import spa_to_pfn
from snpemu.abi.rmp import FwOp, PageState
from snpemu.errors import InvalidArgument, SnpemuError, WrongState
from snpemu.psp.rmp_port import Page, Platform
from snpemu.psp.status import SevStatus, fail
from snpemu.rmp.machine import RmpMachine
from snpemu.rmp.reasons import RmpReason


def _beyond(e: InvalidArgument) -> SnpemuError:
    """An access beyond memory is the firmware's INVALID_ADDRESS, as GrpcRmp reports it."""
    return fail(SevStatus.INVALID_ADDRESS, e.message) if e.reason == RmpReason.BEYOND_MEMORY else e


class LocalRmp:
    """The same port over an in-process RmpMachine (unit tests of the firmware model)."""

    def __init__(self, machine: RmpMachine) -> None:
        self.m = machine

    async def platform(self) -> Platform:
        return Platform(self.m.memory_bytes, self.m.memory_bytes, self.m.snp_capable)

    async def page(self, spa: int) -> Page:
        try:
            e = self.m.entry(spa_to_pfn(spa))
        except InvalidArgument as err:
            raise fail(SevStatus.INVALID_ADDRESS, err.message) from None
        return Page(e.state, e.asid, e.gpa, e.page_size_2m, e.vmsa)

    async def transition(self, spas: list[int], op: FwOp, asid: int = 0) -> list[bool]:
        return self.m.fw_transition(spas, op, asid)

    async def read(
        self,
        spa: int,
        length: int,
        asid: int = 0,
        expect: tuple[PageState, ...] = (),
        checks: tuple[tuple[int, tuple[PageState, ...]], ...] = (),
    ) -> bytes:
        try:
            return self.m.fw_read(spa, length, asid, expect, checks)
        except WrongState as e:
            raise fail(SevStatus.INVALID_PAGE_STATE, e.message) from None
        except InvalidArgument as e:
            raise _beyond(e) from None

    async def write(
        self, spa: int, data: bytes, asid: int = 0, expect: tuple[PageState, ...] = ()
    ) -> None:
        try:
            self.m.fw_write(spa, data, asid, expect)
        except WrongState as e:
            raise fail(SevStatus.INVALID_PAGE_STATE, e.message) from None
        except InvalidArgument as e:
            raise _beyond(e) from None

    async def install_key(self, asid: int, key: bytes) -> None:
        self.m.keys.install(asid, key)

    async def remove_key(self, asid: int) -> None:
        self.m.keys.remove(asid)

    async def wbinvd_indicator(self, *, clear: bool = False) -> bool:
        return self.m.fw_wbinvd_indicator(clear)
