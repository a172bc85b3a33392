"""How the firmware reaches memory and the RMP: only through rmp, as the AMD-SP does by DMA.

`RmpPort` is what the firmware model needs; `GrpcRmp` (psp/rmp_client.py) talks to the rmp
service; tests may use `LocalRmp` (psp/local_rmp.py) over an in-process RmpMachine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from snpemu.abi.rmp import FwOp, PageState


@dataclass(frozen=True)
class Page:
    state: PageState
    asid: int
    gpa: int
    size_2m: bool
    vmsa: bool


@dataclass(frozen=True)
class Platform:
    memory_bytes: int
    rmp_covered_bytes: int
    snp_capable: bool


class RmpPort(Protocol):
    async def platform(self) -> Platform: ...
    async def page(self, spa: int) -> Page: ...
    async def transition(self, spas: list[int], op: FwOp, asid: int = 0) -> list[bool]: ...
    async def read(
        self,
        spa: int,
        length: int,
        asid: int = 0,
        expect: tuple[PageState, ...] = (),
        checks: tuple[tuple[int, tuple[PageState, ...]], ...] = (),
    ) -> bytes: ...
    async def write(
        self, spa: int, data: bytes, asid: int = 0, expect: tuple[PageState, ...] = ()
    ) -> None: ...
    async def install_key(self, asid: int, key: bytes) -> None: ...
    async def remove_key(self, asid: int) -> None: ...
    async def wbinvd_indicator(self, *, clear: bool = False) -> bool:
        """Has every core executed WBINVD since the indicator was last cleared; clear it after."""
        ...
