"""Host frames handed out and taken back: allocation, freeing and leaks.

A frame goes back to the pool only in hypervisor state; one that cannot get there (a failed
reclaim) is leaked, logged with its RMP entry as the kernel's __snp_leak_pages() does, and
never reused. KERNEL: arch/x86/virt/svm/sev.c __snp_leak_pages()
"""

from __future__ import annotations

import logging

import numpy as np

from snpemu.abi.addr import PAGE_SIZE
from snpemu.abi.rmp import Placement
from snpemu.errors import WrongState
from snpemu.rmp import checks
from snpemu.rmp.counters import Counters
from snpemu.rmp.dump import dump_entry
from snpemu.rmp.entry import ASSIGNED, IMMUTABLE
from snpemu.rmp.memory import FrameAllocator, FrameStore
from snpemu.rmp.reasons import RmpReason
from snpemu.rmp.table import RmpTable

log = logging.getLogger(__name__)


class Allocation:
    def __init__(
        self,
        table: RmpTable,
        frames: FrameStore,
        allocator: FrameAllocator,
        counters: Counters,
    ) -> None:
        self.table = table
        self.npages = table.npages
        self.frames = frames
        self.allocator = allocator
        self.counters = counters

    def allocate(self, count: int, placement: Placement) -> list[int]:
        return self.allocator.allocate(count, placement)

    def free(self, pfns: list[int]) -> None:
        """Every page back to the pool, or none: each must be inside memory, named once, in
        hypervisor state, allocated and not leaked."""
        checks.distinct_pfns(pfns, self.npages)
        for pfn in pfns:
            if self.table.effective(pfn)[0] & (ASSIGNED | IMMUTABLE):
                raise WrongState(
                    f"PFN 0x{pfn:x} is not in hypervisor state; reclaim and RMPUPDATE it to "
                    "shared first, or leak it",
                    reason=RmpReason.PAGE_NOT_HYPERVISOR,
                )
        self.allocator.release(pfns)
        for pfn in pfns:
            self.frames.replace(pfn, bytes(PAGE_SIZE))

    def leak(self, pfns: list[int], reason: str) -> int:
        # named once each, so the leak count is the pages leaked
        checks.distinct_pfns(pfns, self.npages)
        new = self.allocator.leak(pfns)
        self.counters.leaked_pages += new
        for pfn in pfns:
            log.error(
                "Leaking PFN 0x%x: %s",
                pfn,
                reason,
                extra={"event": "page_leaked", "rmp_dump": dump_entry(self.table, pfn)},
            )
        return new

    def leaked(self) -> list[int]:
        return [int(p) for p in np.flatnonzero(self.allocator.leaked)]
