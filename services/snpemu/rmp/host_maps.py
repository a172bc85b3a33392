"""Host maps of shared pages, as the SNP host series v5 post_map_gfn() / post_unmap_gfn().

A mapped page is pinned in the RMP table: making it private fails with FAIL_INUSE until the
map goes, so the guest cannot take the page back mid-access. Every map must have its unmap; a
map held longer than the leak threshold is reported stale.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass

from snpemu.errors import InvalidArgument, NotFound, WrongState
from snpemu.rmp.checks import quote
from snpemu.rmp.entry import ASSIGNED
from snpemu.rmp.reasons import RmpReason
from snpemu.rmp.table import RmpTable


@dataclass
class HostMap:
    map_id: str
    pfn: int
    holder: str
    since: float


@dataclass(frozen=True)
class HeldMap:
    """A map as listed: how long it has been held and whether that is too long."""

    map: HostMap
    held_seconds: float
    stale: bool


class HostMaps:
    def __init__(self, table: RmpTable, clock: Callable[[], float], leak_s: float) -> None:
        self.table = table
        self.clock = clock
        self.leak_s = leak_s
        self.maps: dict[str, HostMap] = {}

    def map_page(self, pfn: int, holder: str) -> HostMap:
        if not 0 <= pfn < self.table.npages:
            raise InvalidArgument(
                f"PFN {pfn:#x} is beyond host memory", reason=RmpReason.BEYOND_MEMORY
            )
        if self.table.effective(pfn)[0] & ASSIGNED:
            raise WrongState(
                f"PFN 0x{pfn:x} is private (assigned in the RMP); "
                "the host may map only shared pages",
                reason=RmpReason.PAGE_NOT_SHARED,
            )
        m = HostMap(uuid.uuid4().hex, pfn, holder, self.clock())
        self.maps[m.map_id] = m
        self.table.pinned[pfn] = self.table.pinned.get(pfn, 0) + 1
        return m

    def unmap_page(self, map_id: str) -> None:
        m = self.maps.pop(map_id, None)
        if m is None:
            raise NotFound(f"no host mapping {quote(map_id)}")
        left = self.table.pinned[m.pfn] - 1
        if left:
            self.table.pinned[m.pfn] = left
        else:
            del self.table.pinned[m.pfn]

    def stale_maps(self) -> list[HostMap]:
        """Maps held longer than the leak threshold: every map must have an unmap."""
        now = self.clock()
        return [m for m in self.maps.values() if now - m.since > self.leak_s]

    def held(self) -> list[HeldMap]:
        now = self.clock()
        stale = {m.map_id for m in self.stale_maps()}
        return [HeldMap(m, now - m.since, m.map_id in stale) for m in self.maps.values()]
