"""The vectorised RMPUPDATE batch (RmpTable.rmpupdate_batch, all 4K, distinct frames) against
codes and entries written here from the instruction's rules, entry by entry.

SPEC: AMD64 APM vol. 3, RMPUPDATE (docs/abi.md#rmp-instructions): FAIL_INPUT 1 for a frame
outside the RMP, an unaligned GPA or one past bit 50, an ASID past the 10-bit field; then
FAIL_PERMISSION 2 when the governing entry is immutable; FAIL_INUSE 3 when the entry is held
(or, snpemu's host lock, mapped by the host and being made private); FAIL_OVERLAP 4 for a 4K
update inside a 2M page. A written entry holds exactly the new fields: VALIDATED, VMSA and the
VMPL permissions cleared. KERNEL: arch/x86/virt/svm/sev.c rmpupdate(), struct rmpentry_raw
(assigned bit 0, pagesize bit 1, immutable bit 2, gpa bits 50:12, asid bits 60:51, vmsa 61,
validated 62); arch/x86/include/asm/sev.h RMPUPDATE_FAIL_OVERLAP
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from snpemu.abi.rmp import PageState
from snpemu.rmp.entry import Kind
from snpemu.rmp.table import RmpTable

A, PS, IMM, VMSA_BIT, VAL = 1 << 0, 1 << 1, 1 << 2, 1 << 61, 1 << 62
PAGES_2M = 512
NPAGES = 4 * PAGES_2M
ASID = 5
SUCCESS, FAIL_INPUT, FAIL_PERMISSION, FAIL_INUSE, FAIL_OVERLAP = 0, 1, 2, 3, 4
S = PageState


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def state_of_lo(lo: int, kind: int) -> PageState:
    # docs/abi.md#page-states, written out here
    if not lo & A:
        return S.HYPERVISOR_FIXED if lo & IMM else S.HYPERVISOR
    if not (lo >> 51) & 0x3FF:
        if kind == Kind.CONTEXT:
            return S.CONTEXT
        return S.FIRMWARE if lo & IMM and kind != Kind.RECLAIM else S.RECLAIM
    if lo & IMM:
        return S.PRE_GUEST
    return S.GUEST_VALID if lo & VAL else S.GUEST_INVALID


def counts(t: RmpTable, frames: dict[int, tuple[int, int]]) -> list[int]:
    c = Counter(state_of_lo(lo, kind) for lo, kind in frames.values())
    c[S.HYPERVISOR] += t.npages - len(frames)
    return [c.get(s, 0) for s in range(max(S) + 1)]


def scene() -> tuple[RmpTable, Clock, dict[int, tuple[int, int]]]:
    """Frames in known states, written bit by bit; the model: pfn -> (lo, kind)."""
    clock = Clock()
    t = RmpTable(NPAGES, hold_s=1.0, clock=clock)
    frames: dict[int, tuple[int, int]] = {}

    def put(pfn: int, lo: int, kind: int = Kind.NONE, hi: int = 0) -> None:
        t.lo[pfn], t.hi[pfn], t.kind[pfn] = np.uint64(lo), np.uint64(hi), kind
        frames[pfn] = (lo, kind)

    put(10, A | VAL | VMSA_BIT | 0x10 << 12 | ASID << 51, hi=0x0F0F0F)  # guest-valid VMSA page
    put(11, A | IMM, Kind.FIRMWARE)  # firmware: immutable
    put(12, A | IMM | 0x12 << 12 | ASID << 51)  # pre-guest: immutable
    put(13, IMM)  # hypervisor-fixed: immutable
    put(14, A | 0x14 << 12 | ASID << 51)  # guest-invalid, to be held
    put(15, A | 0x15 << 12 | ASID << 51)  # guest-invalid
    # a mutable 2M guest page at 512 and an immutable (pre-guest) one at 1024
    put(512, A | PS | 0x200000 | ASID << 51)
    for p in range(513, 1024):
        put(p, A)
    put(1024, A | PS | IMM | 0x400000 | ASID << 51)
    for p in range(1025, 1536):
        put(p, A)
    t.counts[:] = counts(t, frames)
    # hold frame 14 (a PVALIDATE in flight), pin frame 16 (the host maps it)
    assert t.pvalidate(14, gpa=0x14 << 12, asid=ASID, vmpl=0, size_2m=False, validate=True) == 0
    frames[14] = (frames[14][0] | VAL, Kind.NONE)
    t.counts[:] = counts(t, frames)
    t.pinned[16] = 1
    return t, clock, frames


def batch(t: RmpTable, rows: list[tuple[int, int, bool, bool, int]]) -> list[int]:
    pfns = np.array([r[0] for r in rows], dtype=np.int64)
    gpas = np.array([r[1] for r in rows], dtype=np.uint64)
    assigned = np.array([r[2] for r in rows], dtype=bool)
    immutable = np.array([r[3] for r in rows], dtype=bool)
    asids = np.array([r[4] for r in rows], dtype=np.int64)
    out = t.rmpupdate_batch(pfns, gpas, assigned, np.zeros(len(rows), bool), immutable, asids)
    assert out.dtype == np.uint8
    return [int(c) for c in out]


def new_lo(gpa: int, assigned: bool, immutable: bool, asid: int) -> int:
    return (A if assigned else 0) | (IMM if immutable else 0) | gpa | asid << 51


def test_each_check_in_order_and_each_written_entry() -> None:
    t, _, frames = scene()
    hi_before, lo_before, kind_before = t.hi.copy(), t.lo.copy(), t.kind.copy()
    rows = [
        # (pfn, gpa, assigned, immutable, asid), expected code
        ((-1, 0x1000, True, False, ASID), FAIL_INPUT),
        ((NPAGES, 0x1000, True, False, ASID), FAIL_INPUT),
        ((20, 0x1001, True, False, ASID), FAIL_INPUT),  # GPA not page-aligned
        ((21, 1 << 51, True, False, ASID), FAIL_INPUT),  # GPA past bit 50
        ((22, 0x1000, True, False, -1), FAIL_INPUT),
        ((23, 0x1000, True, False, 1024), FAIL_INPUT),  # ASID past 10 bits
        ((11, 0, False, False, 0), FAIL_PERMISSION),  # firmware page
        ((12, 0, False, False, 0), FAIL_PERMISSION),  # pre-guest page
        ((13, 0, False, False, 0), FAIL_PERMISSION),  # hypervisor-fixed page
        ((1024 + 5, 0, False, False, 0), FAIL_PERMISSION),  # inside the immutable 2M page
        ((14, 0, False, False, 0), FAIL_INUSE),  # held
        ((16, 0x16000, True, False, ASID), FAIL_INUSE),  # pinned, made private
        ((512, 0, False, False, 0), FAIL_OVERLAP),  # the 2M head
        ((512 + 300, 0, False, False, 0), FAIL_OVERLAP),  # inside the 2M page
        # successes
        ((10, 0, False, False, 0), SUCCESS),  # guest-valid VMSA page back to hypervisor
        ((15, 0x7FFFFFFFFF000, True, False, 1023), SUCCESS),  # top GPA, top ASID
        ((17, 0x17000, True, True, 0), SUCCESS),  # to firmware
        ((18, 0x18000, True, True, ASID), SUCCESS),  # pre-guest
        ((19, 0, False, True, 0), SUCCESS),  # hypervisor-fixed
        ((24, 0, True, False, 0), SUCCESS),  # assigned, ASID 0, mutable: reclaim
        ((NPAGES - 1, 0x5000, True, False, ASID), SUCCESS),  # the last frame
        ((0, 0x9000, True, False, 2), SUCCESS),  # frame 0
        ((1600, 0, False, False, 0), SUCCESS),  # a hypervisor page to hypervisor
    ]
    got = batch(t, [r for r, _ in rows])
    assert got == [c for _, c in rows]
    written = {r[0]: r for r, c in rows if c == SUCCESS}
    for pfn, (_, gpa, assigned, immutable, asid) in written.items():
        lo = new_lo(gpa, assigned, immutable, asid)
        kind = Kind.FIRMWARE if assigned and immutable and asid == 0 else Kind.NONE
        assert (int(t.lo[pfn]), int(t.hi[pfn]), int(t.kind[pfn])) == (lo, 0, kind), pfn
        frames[pfn] = (lo, kind)
    # every other frame as it was
    others = np.setdiff1d(np.arange(NPAGES), list(written))
    assert np.array_equal(t.lo[others], lo_before[others])
    assert np.array_equal(t.hi[others], hi_before[others])
    assert np.array_equal(t.kind[others], kind_before[others])
    assert list(t.counts) == counts(t, frames)
    assert t.entry(17).state == S.FIRMWARE and t.entry(24).state == S.RECLAIM
    assert t.entry(18).state == S.PRE_GUEST and t.entry(19).state == S.HYPERVISOR_FIXED


def test_a_pinned_frame_may_be_made_shared_and_a_hold_ends() -> None:
    t, clock, frames = scene()
    # pinned: only making it private fails; held: fails until the hold ends
    assert batch(t, [(16, 0, False, False, 0), (14, 0, False, False, 0)]) == [0, FAIL_INUSE]
    clock.now += 1.0
    assert batch(t, [(14, 0, False, False, 0)]) == [SUCCESS]
    frames[14] = (0, Kind.NONE)
    frames[16] = (0, Kind.NONE)
    assert list(t.counts) == counts(t, frames)


def test_without_holds_or_pins() -> None:
    # no frame held and none pinned: the lock checks are skipped, the codes the same
    t = RmpTable(NPAGES)
    t.lo[11], t.kind[11] = np.uint64(A | IMM), Kind.FIRMWARE
    t.counts[:] = counts(t, {11: (A | IMM, Kind.FIRMWARE)})
    got = batch(t, [(11, 0, False, False, 0), (12, 0x12000, True, False, ASID), (-5, 0, 0, 0, 0)])
    assert got == [FAIL_PERMISSION, SUCCESS, FAIL_INPUT]
    assert int(t.lo[12]) == new_lo(0x12000, True, False, ASID)
    assert int(t.lo[0]) == 0  # the placeholder index of a bad frame is not written
    model = {11: (A | IMM, int(Kind.FIRMWARE)), 12: (new_lo(0x12000, True, False, ASID), 0)}
    assert list(t.counts) == counts(t, model)


def test_a_batch_with_a_2m_entry_or_a_repeated_frame() -> None:
    # such batches run entry by entry, in order: each entry's every field reaches RMPUPDATE
    t = RmpTable(NPAGES)
    rows = [
        # (pfn, gpa, assigned, size_2m, immutable, asid), code
        ((512, 0x200000, True, True, False, ASID), SUCCESS),  # a 2M private page
        ((3, 0x3000, True, False, False, ASID), SUCCESS),
        ((3, 0x9000, True, False, True, ASID + 1), SUCCESS),  # again: pre-guest of ASID 6
        ((7, 0x7000, True, False, True, 0), SUCCESS),  # firmware
        ((5, 0x200000, True, True, False, ASID), FAIL_INPUT),  # 2M at an unaligned frame
        ((513, 0, False, False, False, 0), FAIL_OVERLAP),  # 4K inside the new 2M page
        ((1024, 0x201000, True, True, False, ASID), FAIL_INPUT),  # 2M with an unaligned GPA
    ]
    cols = list(zip(*(r for r, _ in rows), strict=True))
    out = t.rmpupdate_batch(
        np.array(cols[0], dtype=np.int64),
        np.array(cols[1], dtype=np.uint64),
        np.array(cols[2], dtype=bool),
        np.array(cols[3], dtype=bool),
        np.array(cols[4], dtype=bool),
        np.array(cols[5], dtype=np.int64),
    )
    assert out.dtype == np.uint8
    assert out.tolist() == [c for _, c in rows]
    assert int(t.lo[512]) == A | PS | 0x200000 | ASID << 51
    assert [int(x) for x in t.lo[513:1024]] == [A] * 511
    assert int(t.lo[3]) == A | IMM | 0x9000 | (ASID + 1) << 51
    assert (int(t.lo[7]), int(t.kind[7])) == (A | IMM | 0x7000, Kind.FIRMWARE)
    assert int(t.lo[5]) == 0 and int(t.lo[1024]) == 0
    want = [0] * (max(S) + 1)
    want[S.GUEST_INVALID] = 512
    want[S.PRE_GUEST] = 1
    want[S.FIRMWARE] = 1
    want[S.HYPERVISOR] = NPAGES - 514
    assert list(t.counts) == want


def test_an_empty_batch() -> None:
    t = RmpTable(NPAGES)
    e = np.zeros(0, dtype=np.int64)
    out = t.rmpupdate_batch(
        e, e.astype(np.uint64), e.astype(bool), e.astype(bool), e.astype(bool), e
    )
    assert out.dtype == np.uint8 and out.shape == (0,)


def test_a_batch_with_a_2m_entry_and_distinct_frames() -> None:
    t = RmpTable(NPAGES)
    out = t.rmpupdate_batch(
        np.array([1024, 9], dtype=np.int64),
        np.array([0x400000, 0x9000], dtype=np.uint64),
        np.array([True, True]),
        np.array([True, False]),
        np.array([False, False]),
        np.array([ASID, ASID], dtype=np.int64),
    )
    assert out.tolist() == [SUCCESS, SUCCESS]
    assert int(t.lo[1024]) == A | PS | 0x400000 | ASID << 51
    assert [int(x) for x in t.lo[1025:1536]] == [A] * 511
    assert t.counts[S.GUEST_INVALID] == 513


def test_only_a_2m_entry_that_is_assigned_makes_a_2m_page() -> None:
    # a 4K guest page at a 2M-aligned frame, and an unassigned entry with the page-size bit,
    # leave their neighbours 4K pages (the level comes from an assigned 2M-aligned entry)
    t = RmpTable(NPAGES)
    t.lo[0] = np.uint64(A | 0x0 | ASID << 51)
    t.lo[512] = np.uint64(PS)
    t.counts[:] = counts(t, {0: (A | ASID << 51, 0), 512: (PS, 0)})
    assert batch(t, [(5, 0x5000, True, False, ASID), (520, 0x8000, True, False, ASID)]) == [0, 0]
    assert int(t.lo[5]) == A | 0x5000 | ASID << 51 and int(t.lo[520]) == A | 0x8000 | ASID << 51


def test_a_pinned_frame_with_no_hold_anywhere() -> None:
    t = RmpTable(NPAGES)
    t.pinned[16] = 1
    assert batch(t, [(16, 0x16000, True, False, ASID), (17, 0x17000, True, False, ASID)]) == [
        FAIL_INUSE,
        SUCCESS,
    ]
    assert int(t.lo[16]) == 0


def test_a_4k_batch_that_repeats_a_frame_counts_each_update() -> None:
    # private then shared again: the frame ends where it began, and so do the counts
    t = RmpTable(NPAGES)
    assert batch(t, [(3, 0x3000, True, False, ASID), (3, 0, False, False, 0)]) == [0, 0]
    assert int(t.lo[3]) == 0
    assert list(t.counts) == counts(t, {})
