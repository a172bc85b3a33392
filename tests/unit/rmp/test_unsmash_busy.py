"""SNP_PAGE_UNSMASH (fw_transition "unsmash") and the per-entry hold of a guest instruction.

Entries are written bit by bit from the kernel's layout, expected values from the rules below.
KERNEL: arch/x86/virt/svm/sev.c struct rmpentry_raw (assigned bit 0, pagesize bit 1, immutable
bit 2, gpa bits 50:12, asid bits 60:51, validated bit 62); a page inside a 2M page takes its
attributes from the 2M-aligned entry (snp_lookup_rmpentry(), the level from that entry).
SPEC: SEV-SNP Firmware ABI, SNP_PAGE_UNSMASH: the 512 4K entries of a 2M-aligned region that
describe one 2M page (same attributes, contiguous GPAs from a 2M-aligned one) become one 2M
entry; anything else is refused and changes nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest
from snpemu.abi.rmp import FwOp, PageState
from snpemu.rmp.entry import Kind
from snpemu.rmp.table import RmpTable

A, PS, IMM, VAL = 1 << 0, 1 << 1, 1 << 2, 1 << 62
PAGES_2M = 512
ASID = 5
GPA_2M = 0x40000000
REGION = 512  # region 1 of 4
HI = 0x0F0F0F


def guest_valid(gpa: int, asid: int = ASID) -> int:
    return A | VAL | gpa | asid << 51


def counts_from_entries(t: RmpTable) -> list[int]:
    c = Counter(t.entry(p).state for p in range(t.npages))
    return [c.get(s, 0) for s in range(max(PageState) + 1)]


def smashed(kinds: list[int] | None = None, lo_fn: Callable[[int], int] = guest_valid) -> RmpTable:
    """512 4K entries of one guest-valid 2M page, as PSMASH leaves them, plus a neighbour."""
    t = RmpTable(4 * PAGES_2M)
    for i in range(PAGES_2M):
        t.lo[REGION + i] = np.uint64(lo_fn(GPA_2M + (i << 12)))
        t.hi[REGION + i] = np.uint64(HI)
    if kinds is not None:
        t.kind[REGION : REGION + PAGES_2M] = kinds
    # neighbours on both sides, so a region off by one shows in the counts
    t.lo[REGION - 1] = np.uint64(A | IMM)  # firmware
    t.kind[REGION - 1] = Kind.FIRMWARE
    t.lo[REGION + PAGES_2M] = np.uint64(A | IMM)
    t.kind[REGION + PAGES_2M] = Kind.CONTEXT
    t.counts[:] = counts_from_entries(t)
    return t


def test_unsmash_writes_one_2m_entry_and_bare_tails() -> None:
    t = smashed()
    counts = list(t.counts)
    assert t.fw_transition(REGION, FwOp.UNSMASH) is True
    assert int(t.lo[REGION]) == guest_valid(GPA_2M) | PS
    # the other 511 read ASSIGNED only, exactly
    assert [int(x) for x in t.lo[REGION + 1 : REGION + PAGES_2M]] == [A] * (PAGES_2M - 1)
    assert [int(x) for x in t.hi[REGION : REGION + PAGES_2M]] == [HI] * PAGES_2M
    assert int(t.lo[REGION - 1]) == A | IMM and int(t.lo[REGION + PAGES_2M]) == A | IMM
    # every page is still guest-valid: same counts, and each reads its own GPA back
    assert list(t.counts) == counts == counts_from_entries(t)
    e = t.entry(REGION + 300)
    assert (e.state, e.gpa, e.page_size_2m, e.asid) == (
        PageState.GUEST_VALID,
        GPA_2M + (300 << 12),
        True,
        ASID,
    )


def test_unsmash_counts_follow_the_head_entry() -> None:
    # firmware pages whose tail kinds differ from the head's: once one 2M page, every page is
    # in the head's state (the 2M-aligned entry governs), and the counts say so
    kinds = [Kind.CONTEXT] + [Kind.FIRMWARE] * (PAGES_2M - 1)
    # firmware pages (ASID 0, immutable) with contiguous GPAs from 0
    t = smashed(kinds, lo_fn=lambda gpa: A | IMM | (gpa - GPA_2M))
    before = Counter(t.entry(p).state for p in range(t.npages))
    assert before[PageState.CONTEXT] == 2 and before[PageState.FIRMWARE] == 512
    assert t.fw_transition(REGION, FwOp.UNSMASH) is True
    want = [0] * (max(PageState) + 1)
    want[PageState.HYPERVISOR] = t.npages - 514
    want[PageState.FIRMWARE] = 1  # the neighbour below
    want[PageState.CONTEXT] = 513  # the 2M page and the neighbour above
    assert list(t.counts) == want == counts_from_entries(t)


def _refuse(t: RmpTable, pfn: int = REGION) -> None:
    t.counts[:] = counts_from_entries(t)
    lo, hi, kind, counts = t.lo.copy(), t.hi.copy(), t.kind.copy(), list(t.counts)
    assert t.fw_transition(pfn, FwOp.UNSMASH) is False
    assert np.array_equal(t.lo, lo) and np.array_equal(t.hi, hi) and np.array_equal(t.kind, kind)
    assert list(t.counts) == counts


@pytest.mark.parametrize(
    ("what", "index", "lo"),
    [
        ("head not assigned", 0, 0),
        ("tail not assigned", 511, 0),
        ("tail GPA not contiguous", 1, guest_valid(GPA_2M + (2 << 12))),
        ("last GPA not contiguous", 511, guest_valid(GPA_2M)),
        ("tail of another ASID", 256, guest_valid(GPA_2M + (256 << 12), ASID + 1)),
        ("tail not validated", 3, A | GPA_2M + (3 << 12) | ASID << 51),
        ("tail immutable", 4, guest_valid(GPA_2M + (4 << 12)) | IMM),
    ],
)
def test_unsmash_refuses_entries_that_are_not_one_page(what: str, index: int, lo: int) -> None:
    t = smashed()
    t.lo[REGION + index] = np.uint64(lo)
    _refuse(t)


def test_unsmash_refuses_a_gpa_not_2m_aligned() -> None:
    t = smashed(lo_fn=lambda gpa: guest_valid(gpa + (1 << 12)))
    _refuse(t)


def test_unsmash_refuses_different_permissions() -> None:
    t = smashed()
    t.hi[REGION + 511] = np.uint64(HI ^ 1)
    _refuse(t)
    t = smashed()
    t.hi[REGION] = np.uint64(0)
    _refuse(t)


def test_unsmash_refuses_hypervisor_entries_with_contiguous_gpas() -> None:
    # shared pages (RMPUPDATE to shared with a GPA) are not assigned: no 2M page of them
    _refuse(smashed(lo_fn=lambda gpa: gpa))


def test_unsmash_refuses_a_run_that_starts_off_a_2m_boundary() -> None:
    # SPEC: SNP_PAGE_UNSMASH takes a 2M-aligned paddr: 512 fitting entries from frame 513 on
    # are not a 2M page
    t = RmpTable(4 * PAGES_2M)
    for i in range(PAGES_2M):
        t.lo[REGION + 1 + i] = np.uint64(guest_valid(GPA_2M + (i << 12)))
    _refuse(t, REGION + 1)


@pytest.mark.parametrize("op", ["context", "firmware", "reclaim", "finish", "vmsa", "hv_fixed"])
def test_no_other_op_unsmashes(op: str) -> None:
    # guest-valid pages: no firmware op takes them (docs/abi.md#page-states), whatever the layout
    t = smashed()
    t.counts[:] = counts_from_entries(t)
    lo = t.lo.copy()
    assert t.fw_transition(REGION, op, ASID) is False
    assert np.array_equal(t.lo, lo)


def test_unsmash_refuses_an_unaligned_frame_and_a_2m_page() -> None:
    _refuse(smashed(), REGION + 1)
    _refuse(smashed(), REGION + 511)
    t = smashed()
    assert t.fw_transition(REGION, FwOp.UNSMASH) is True
    _refuse(t)  # already one 2M entry
    _refuse(RmpTable(4 * PAGES_2M))  # hypervisor pages


# --- the hold of a guest instruction (busy) -------------------------------------------------


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def held(pfn: int, at: float, hold: float) -> tuple[RmpTable, Clock]:
    clock = Clock(at)
    t = RmpTable(4 * PAGES_2M, hold_s=hold, clock=clock)
    gpa = pfn << 12
    t.lo[pfn] = np.uint64(A | gpa | ASID << 51)  # guest-invalid
    r = t.pvalidate(pfn, gpa=gpa, asid=ASID, vmpl=0, size_2m=False, validate=True)
    assert r == 0
    return t, clock


def test_a_hold_ends_exactly_at_its_deadline() -> None:
    # 10.0 + 0.5 is exact in binary floating point: the deadline is 10.5 to the bit
    t, clock = held(7, 10.0, 0.5)
    clock.now = 10.499999
    assert t.busy(7) is True
    clock.now = 10.5
    assert t.busy(7) is False
    clock.now = 10.0  # a lock once expired is gone, even if the clock were read earlier again
    assert t.busy(7) is False


def test_a_frame_never_held_is_not_busy_while_another_is() -> None:
    t, _ = held(7, 10.0, 0.5)
    for pfn in (0, 6, 8, 512 + 7):
        assert t.busy(pfn) is False
    assert t.busy(7) is True
