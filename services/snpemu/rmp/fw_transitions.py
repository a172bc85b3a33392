"""The RMP changes the AMD-SP's commands make: the firmware writes the RMP directly.

Each checks the page's current state and returns False (nothing changed) when it is not the one
the command needs, which the firmware reports as INVALID_PAGE_STATE. Reached through
RmpTable.fw_transition().
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from snpemu.abi.addr import PAGE_SIZE, PAGES_PER_2M
from snpemu.abi.rmp import FwOp, PageState
from snpemu.rmp.entry import (
    ASID_MASK,
    ASID_SHIFT,
    ASSIGNED,
    GPA_MASK,
    IMMUTABLE,
    PAGESIZE,
    VALIDATED,
    VMSA,
    Kind,
    encode,
)
from snpemu.rmp.entry_arrays import ALIGN_MASK, U64

if TYPE_CHECKING:
    from snpemu.rmp.table import RmpTable


def fw_transition(table: RmpTable, pfn: int, op: FwOp, asid: int = 0) -> bool:
    if not 0 <= pfn < table.npages:
        return False
    lo, _, _ = table.effective(pfn)
    state = table.entry(pfn).state
    own = pfn if not (lo & PAGESIZE) else pfn & ALIGN_MASK
    pfns = np.arange(own, own + (PAGES_PER_2M if lo & PAGESIZE else 1), dtype=np.int64)
    before = table.state_of(pfns)
    if op == FwOp.CONTEXT and state == PageState.FIRMWARE:
        table.kind[own] = Kind.CONTEXT
    elif op == FwOp.FIRMWARE and state in (PageState.CONTEXT, PageState.METADATA):
        table.kind[own] = Kind.FIRMWARE
    elif op == FwOp.RECLAIM and state in (
        PageState.FIRMWARE,
        PageState.CONTEXT,
        PageState.METADATA,
        PageState.PRE_GUEST,
    ):
        table.lo[own] = U64(encode(assigned=True, page_size_2m=bool(lo & PAGESIZE)))
        table.hi[own] = 0
        table.kind[own] = Kind.RECLAIM
    elif op == FwOp.FINISH and state == PageState.PRE_GUEST and _asid(lo) == asid:
        # LAUNCH_FINISH: launched pages become guest-owned, mutable and validated.
        table.lo[own] = U64((int(table.lo[own]) & ~IMMUTABLE) | VALIDATED)
    elif op == FwOp.VMSA and state == PageState.PRE_GUEST and _asid(lo) == asid:
        table.lo[own] = U64(int(table.lo[own]) | VMSA)
    elif op == FwOp.HV_FIXED and state in (PageState.HYPERVISOR, PageState.FIRMWARE):
        table.lo[own] = U64(IMMUTABLE)
        table.kind[own] = Kind.NONE
    elif op == FwOp.UNSMASH and pfn % PAGES_PER_2M == 0 and not lo & PAGESIZE:
        return unsmash(table, pfn)
    else:
        return False
    table.recount(pfns, before)
    return True


def _asid(lo: int) -> int:
    return (lo & ASID_MASK) >> ASID_SHIFT


def unsmash(table: RmpTable, a: int) -> bool:
    """SNP_PAGE_UNSMASH: 512 4K entries describing one 2M page become one 2M entry."""
    lo = table.lo[a : a + PAGES_PER_2M]
    first = int(lo[0])
    if not first & ASSIGNED or (first & GPA_MASK) % (PAGE_SIZE * PAGES_PER_2M):
        return False
    expect = U64(first & ~GPA_MASK) | (
        (U64(first & GPA_MASK) + np.arange(PAGES_PER_2M, dtype=np.uint64) * U64(PAGE_SIZE))
        & U64(GPA_MASK)
    )
    if not np.array_equal(lo, expect) or np.any(table.hi[a : a + PAGES_PER_2M] != table.hi[a]):
        return False
    pfns = np.arange(a, a + PAGES_PER_2M, dtype=np.int64)
    before = table.state_of(pfns)
    table.lo[a + 1 : a + PAGES_PER_2M] = U64(ASSIGNED)
    table.lo[a] = U64(first | PAGESIZE)
    table.recount(pfns, before)
    return True
