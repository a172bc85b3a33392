"""The firmware-side page transitions (RmpTable.fw_transition) for every operation and every
starting page state: the new entry, or the refusal that changes nothing, and the per-state page
counts after each, against a model written here from the SNP ABI's page-state rules.

SPEC: SEV-SNP Firmware ABI, chapter "Page Management" (page states; which command takes a page
from which state), as docs/abi.md#page-states restates it:
    SNP_GCTX_CREATE        Firmware -> Context                       op "context"
    SNP_DECOMMISSION       Context (the guest context), Metadata -> Firmware   op "firmware"
    SNP_PAGE_RECLAIM       Firmware, Context, Metadata, Pre-Guest -> Reclaim   op "reclaim"
    SNP_LAUNCH_FINISH      Pre-Guest of the guest's ASID -> Guest-Valid        op "finish"
    SNP_LAUNCH_UPDATE VMSA Pre-Guest of the guest's ASID, VMSA bit set         op "vmsa"
    SNP_INIT_EX range list Hypervisor, Firmware -> Hypervisor-Fixed            op "hv_fixed"
Every other (op, state) pair is refused (INVALID_PAGE_STATE): the entry is left as it was.

The entries are written here bit by bit from the kernel's layout, not with the module's encoder.
KERNEL: arch/x86/virt/svm/sev.c struct rmpentry_raw (assigned bit 0, pagesize bit 1, immutable
bit 2, gpa bits 50:12, asid bits 60:51, vmsa bit 61, validated bit 62)
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from snpemu.abi.rmp import FwOp, PageState
from snpemu.rmp.entry import Kind
from snpemu.rmp.table import RmpTable

# KERNEL: arch/x86/virt/svm/sev.c struct rmpentry_raw
A, PS, IMM = 1 << 0, 1 << 1, 1 << 2
VMSA_BIT, VAL = 1 << 61, 1 << 62
PAGES_2M = 512  # 2 MiB / 4 KiB
ASID = 5
GPA_4K = 0x1234000
GPA_2M = 0x40000000
HI = 0x030201  # VMPL1..3 permission bytes, so a reset of hi shows

S = PageState


def as_op(name: str) -> FwOp:
    """The op named in MODEL; a name the firmware has no op for becomes a value outside FwOp
    (what a caller could send over gRPC before its servicer refuses it)."""
    return FwOp[name.upper()] if name.upper() in FwOp.__members__ else 99  # type: ignore[return-value]


# (lo without gpa/asid for the guest states, kind) per state; guest states get gpa and ASID
LAYOUT: dict[PageState, tuple[int, int]] = {
    S.HYPERVISOR: (0, Kind.NONE),
    S.HYPERVISOR_FIXED: (IMM, Kind.NONE),
    S.FIRMWARE: (A | IMM, Kind.FIRMWARE),
    S.RECLAIM: (A, Kind.RECLAIM),
    S.CONTEXT: (A | IMM, Kind.CONTEXT),
    S.METADATA: (A | IMM, Kind.METADATA),
    S.PRE_GUEST: (A | IMM, Kind.NONE),
    S.GUEST_INVALID: (A, Kind.NONE),
    S.GUEST_VALID: (A | VAL, Kind.NONE),
}
GUEST = (S.PRE_GUEST, S.GUEST_INVALID, S.GUEST_VALID)

# op -> {state it accepts: (state after, lo after as a function of lo before, kind after or None
# for unchanged, hi after as a function of hi before)}
KEEP = None
MODEL = {
    "context": {S.FIRMWARE: (S.CONTEXT, lambda lo: lo, Kind.CONTEXT, lambda hi: hi)},
    "firmware": {
        S.CONTEXT: (S.FIRMWARE, lambda lo: lo, Kind.FIRMWARE, lambda hi: hi),
        S.METADATA: (S.FIRMWARE, lambda lo: lo, Kind.FIRMWARE, lambda hi: hi),
    },
    # reclaimed: assigned, ASID 0, not immutable, nothing else but the page size; hi cleared
    "reclaim": {
        st: (S.RECLAIM, lambda lo: A | (lo & PS), Kind.RECLAIM, lambda hi: 0)
        for st in (S.FIRMWARE, S.CONTEXT, S.METADATA, S.PRE_GUEST)
    },
    "finish": {S.PRE_GUEST: (S.GUEST_VALID, lambda lo: (lo & ~IMM) | VAL, KEEP, lambda hi: hi)},
    "vmsa": {S.PRE_GUEST: (S.PRE_GUEST, lambda lo: lo | VMSA_BIT, KEEP, lambda hi: hi)},
    "hv_fixed": {
        S.HYPERVISOR: (S.HYPERVISOR_FIXED, lambda lo: IMM, Kind.NONE, lambda hi: hi),
        S.FIRMWARE: (S.HYPERVISOR_FIXED, lambda lo: IMM, Kind.NONE, lambda hi: hi),
    },
}
OPS = sorted(MODEL)
# ops that need the guest's ASID
ASID_OPS = ("finish", "vmsa")

# background: one page in each state, so that every count is non-zero and a wrong index shows
BACKGROUND = {1 + i: st for i, st in enumerate(S)}
TARGET_4K = 600
REGION_2M = 1024  # region 2 of 4, 2M-aligned


def lo_of(state: PageState, *, gpa: int, size_2m: bool = False) -> int:
    lo, _ = LAYOUT[state]
    if state in GUEST:
        lo |= gpa | ASID << 51
    return lo | (PS if size_2m else 0)


def put4k(t: RmpTable, pfn: int, state: PageState, gpa: int = GPA_4K) -> None:
    t.lo[pfn] = np.uint64(lo_of(state, gpa=gpa))
    t.hi[pfn] = np.uint64(HI if LAYOUT[state][0] & A else 0)
    t.kind[pfn] = LAYOUT[state][1]


def put2m(t: RmpTable, a: int, state: PageState) -> None:
    # the 2M-aligned entry holds the attributes, the other 511 read ASSIGNED only
    # KERNEL: arch/x86/virt/svm/sev.c (level of a PFN from the 2M-aligned entry)
    t.lo[a] = np.uint64(lo_of(state, gpa=GPA_2M, size_2m=True))
    t.lo[a + 1 : a + PAGES_2M] = np.uint64(A)
    t.hi[a] = np.uint64(HI)
    t.kind[a : a + PAGES_2M] = LAYOUT[state][1]


def counts_of(model: dict[int, PageState], npages: int) -> list[int]:
    c = Counter(model.values())
    c[S.HYPERVISOR] += npages - len(model)
    return [c.get(s, 0) for s in range(max(S) + 1)]


def setup(state: PageState, size_2m: bool) -> tuple[RmpTable, dict[int, PageState], int, int]:
    """A table with the background pages and the target in `state`; the model of every
    non-hypervisor page; the pfn to name; the entry that holds the attributes."""
    t = RmpTable(4 * PAGES_2M)
    model: dict[int, PageState] = {}
    for pfn, st in BACKGROUND.items():
        put4k(t, pfn, st, gpa=pfn << 12)
        model[pfn] = st
    if size_2m:
        put2m(t, REGION_2M, state)
        model.update({p: state for p in range(REGION_2M, REGION_2M + PAGES_2M)})
        pfn, own = REGION_2M + 7, REGION_2M
    else:
        put4k(t, TARGET_4K, state)
        model[TARGET_4K] = state
        pfn = own = TARGET_4K
    # the table's counts as they would stand had these states been reached instruction by
    # instruction (entries were written directly above)
    t.counts[:] = counts_of(model, t.npages)
    return t, model, pfn, own


def snapshot(t: RmpTable) -> tuple[bytes, bytes, bytes]:
    return t.lo.tobytes(), t.hi.tobytes(), t.kind.tobytes()


CASES_4K = [(op, st) for op in OPS for st in S]
# a 2M page can be in any assigned state (hypervisor pages have no 2M entry to speak of);
# hv_fixed takes 4K pages only (SNP_INIT_EX's list is of 4K ranges)
CASES_2M = [(op, st) for op in OPS if op != "hv_fixed" for st in S if LAYOUT[st][0] & A]


def check(op: str, state: PageState, size_2m: bool, asid: int) -> None:
    t, model, pfn, own = setup(state, size_2m)
    lo0, hi0, kind0 = int(t.lo[own]), int(t.hi[own]), int(t.kind[own])
    before = snapshot(t)
    accepted = MODEL[op].get(state) if (op not in ASID_OPS or asid == ASID) else None
    ok = t.fw_transition(pfn, as_op(op), asid)
    span = range(own, own + (PAGES_2M if size_2m else 1))
    if accepted is None:
        assert ok is False
        assert snapshot(t) == before
        assert list(t.counts) == counts_of(model, t.npages)
        return
    assert ok is True
    new_state, lo_fn, kind_after, hi_fn = accepted
    assert int(t.lo[own]) == lo_fn(lo0)
    assert int(t.hi[own]) == hi_fn(hi0)
    assert int(t.kind[own]) == (kind0 if kind_after is None else kind_after)
    # nothing else written: the tail of a 2M page and every other frame
    lo1, hi1, kind1 = snapshot(t)
    mask = np.ones(t.npages, dtype=bool)
    mask[own] = False
    for now, then, dtype in zip(
        (lo1, hi1, kind1), before, (np.uint64, np.uint64, np.uint8), strict=True
    ):
        assert np.array_equal(np.frombuffer(now, dtype)[mask], np.frombuffer(then, dtype)[mask])
    model.update({p: new_state for p in span})
    assert list(t.counts) == counts_of(model, t.npages)
    # and read back, page by page
    probes = sorted({span.start, span.start + len(span) // 2, span.stop - 1})
    assert {p: t.entry(p).state for p in probes} == {p: new_state for p in probes}


@pytest.mark.parametrize(("op", "state"), CASES_4K, ids=[f"{o}-{s.name}" for o, s in CASES_4K])
def test_every_op_from_every_4k_state(op: str, state: PageState) -> None:
    check(op, state, size_2m=False, asid=ASID if op in ASID_OPS else 0)


@pytest.mark.parametrize(("op", "state"), CASES_2M, ids=[f"{o}-{s.name}" for o, s in CASES_2M])
def test_every_op_from_every_2m_state(op: str, state: PageState) -> None:
    check(op, state, size_2m=True, asid=ASID if op in ASID_OPS else 0)


@pytest.mark.parametrize("op", ASID_OPS)
@pytest.mark.parametrize("asid", [0, ASID + 1])
def test_launch_ops_refuse_another_guests_page(op: str, asid: int) -> None:
    # SPEC: SNP_LAUNCH_UPDATE / SNP_LAUNCH_FINISH act on the pages of the guest whose context
    # they are given: a Pre-Guest page of another ASID is not this guest's
    check(op, S.PRE_GUEST, size_2m=False, asid=asid)
    check(op, S.PRE_GUEST, size_2m=True, asid=asid)


@pytest.mark.parametrize("op", [*OPS, "unsmash", "no-such-op"])
@pytest.mark.parametrize("pfn", [-1, 4 * PAGES_2M, 4 * PAGES_2M + 1])
def test_a_frame_outside_memory_is_refused(op: str, pfn: int) -> None:
    t, model, _, _ = setup(S.FIRMWARE, size_2m=False)
    before = snapshot(t)
    assert t.fw_transition(pfn, as_op(op), ASID) is False
    assert snapshot(t) == before
    assert list(t.counts) == counts_of(model, t.npages)


def test_an_unknown_op_changes_nothing() -> None:
    for state in S:
        t, _, pfn, _ = setup(state, size_2m=False)
        before = snapshot(t)
        assert t.fw_transition(pfn, as_op("reclaim2"), ASID) is False
        assert snapshot(t) == before


@pytest.mark.parametrize("pfn", [0, 4 * PAGES_2M - 1])
@pytest.mark.parametrize("op", OPS)
def test_the_first_and_last_frames(op: str, pfn: int) -> None:
    # frame 0 and the last frame are memory like any other: each op takes a Firmware / Pre-Guest
    # / Hypervisor page there as it does elsewhere
    for state in (S.FIRMWARE, S.PRE_GUEST, S.HYPERVISOR, S.CONTEXT):
        t = RmpTable(4 * PAGES_2M)
        put4k(t, pfn, state)
        model = {pfn: state}
        t.counts[:] = counts_of(model, t.npages)
        asid = ASID if op in ASID_OPS else 0
        accepted = MODEL[op].get(state)
        assert t.fw_transition(pfn, as_op(op), asid) is (accepted is not None)
        if accepted is not None:
            model[pfn] = accepted[0]
        assert list(t.counts) == counts_of(model, t.npages)
        assert t.entry(pfn).state == model[pfn]


@pytest.mark.parametrize("op", ASID_OPS)
def test_without_an_asid_no_guest_page_is_taken(op: str) -> None:
    # the ASID argument defaults to 0, which no guest has (SNP_ACTIVATE takes ASIDs from 1)
    t, _, pfn, _ = setup(S.PRE_GUEST, size_2m=False)
    t.lo[pfn] = np.uint64(lo_of(S.PRE_GUEST, gpa=GPA_4K) & ~(0x3FF << 51) | 1 << 51)  # ASID 1
    before = snapshot(t)
    assert t.fw_transition(pfn, as_op(op)) is False
    assert snapshot(t) == before
