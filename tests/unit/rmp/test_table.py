"""The RMP table against the page states, transitions and codes of docs/abi.md#page-states."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import event, example, given, settings
from hypothesis import strategies as st
from snpemu.abi.addr import PAGES_PER_2M
from snpemu.abi.npf import PFERR_GUEST_RMP, PFERR_GUEST_SIZEM
from snpemu.abi.rmp import Code, PageState
from snpemu.rmp.fault import Fault
from snpemu.rmp.table import RmpTable

from tests.conftest import examples

MB2 = 2 << 20
ASID = 5


def table(regions: int = 4, **kw: object) -> RmpTable:
    return RmpTable(regions * PAGES_PER_2M, **kw)  # type: ignore[arg-type]


def private(
    t: RmpTable,
    pfn: int,
    gpa: int,
    *,
    asid: int = ASID,
    size_2m: bool = False,
    immutable: bool = False,
) -> Code:
    return t.rmpupdate(pfn, gpa=gpa, assigned=True, size_2m=size_2m, immutable=immutable, asid=asid)


def shared(t: RmpTable, pfn: int, size_2m: bool = False) -> Code:
    return t.rmpupdate(pfn, gpa=0, assigned=False, size_2m=size_2m, immutable=False, asid=0)


def test_raw_encoding_matches_the_kernel_layout() -> None:
    t = table()
    assert private(t, 3, 0x7000, asid=0x155) == Code.SUCCESS
    e = t.entry(3)
    lo, hi = struct.unpack("<QQ", e.raw)
    assert lo == 1 | (0x7000 >> 12) << 12 | 0x155 << 51
    assert hi == 0
    assert (e.assigned, e.asid, e.gpa, e.validated, e.immutable) == (
        True,
        0x155,
        0x7000,
        False,
        False,
    )
    assert e.state == PageState.GUEST_INVALID


def test_states_of_the_reference_table() -> None:
    t = table()
    assert t.entry(0).state == PageState.HYPERVISOR
    private(t, 1, 0, asid=0, immutable=True)  # rmp_mark_pages_firmware
    assert t.entry(1).state == PageState.FIRMWARE
    private(t, 2, 0x2000, immutable=True)  # before SNP_LAUNCH_UPDATE
    assert t.entry(2).state == PageState.PRE_GUEST
    private(t, 3, 0x3000)
    assert t.entry(3).state == PageState.GUEST_INVALID
    assert (
        t.pvalidate(3, gpa=0x3000, asid=ASID, vmpl=0, size_2m=False, validate=True) == Code.SUCCESS
    )
    assert t.entry(3).state == PageState.GUEST_VALID
    private(t, 4, 0, asid=0)  # A=1, I=0, ASID=0
    assert t.entry(4).state == PageState.RECLAIM
    counts = t.counts
    assert counts[PageState.HYPERVISOR] == t.npages - 4
    for s in (PageState.FIRMWARE, PageState.PRE_GUEST, PageState.GUEST_VALID, PageState.RECLAIM):
        assert counts[s] == 1


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"pfn": 10**9}, Code.FAIL_INPUT),
        ({"gpa": 0x1001}, Code.FAIL_INPUT),
        ({"asid": 1024}, Code.FAIL_INPUT),
        ({"pfn": 1, "size_2m": True}, Code.FAIL_INPUT),  # 2M needs a 2M-aligned SPA
        ({"gpa": 0x1000, "size_2m": True}, Code.FAIL_INPUT),  # and GPA
    ],
)
def test_rmpupdate_input_errors_change_nothing(kwargs: dict[str, object], code: Code) -> None:
    t = table()
    args = {"pfn": 0, "gpa": 0, "size_2m": False, "asid": ASID} | kwargs
    before = (t.lo.copy(), t.counts.copy())
    assert private(t, **args) == code  # type: ignore[arg-type]
    assert np.array_equal(t.lo, before[0]) and np.array_equal(t.counts, before[1])


def test_immutable_pages_refuse_rmpupdate() -> None:
    t = table()
    private(t, 7, 0x7000, immutable=True)
    assert shared(t, 7) == Code.FAIL_PERMISSION
    assert t.entry(7).state == PageState.PRE_GUEST
    # a 2M update over a region holding an immutable 4K page is refused too
    assert shared(t, 0, size_2m=True) == Code.FAIL_PERMISSION


def test_2m_pages_overlap_and_psmash() -> None:
    t = table()
    assert private(t, PAGES_PER_2M, 0x200000, size_2m=True) == Code.SUCCESS
    assert t.counts[PageState.GUEST_INVALID] == PAGES_PER_2M
    inner = PAGES_PER_2M + 7
    e = t.entry(inner)
    assert (e.assigned, e.page_size_2m, e.gpa) == (True, True, 0x200000 + 7 * 4096)
    # a 4K RMPUPDATE inside a 2M page needs PSMASH first
    assert shared(t, inner) == Code.FAIL_OVERLAP
    assert t.psmash(inner) == Code.FAIL_INPUT  # not 2M aligned
    assert t.psmash(0) == Code.FAIL_INPUT  # not a 2M entry
    assert t.psmash(PAGES_PER_2M) == Code.SUCCESS
    e = t.entry(inner)
    assert (e.page_size_2m, e.gpa, e.asid) == (False, 0x200000 + 7 * 4096, ASID)
    assert shared(t, inner) == Code.SUCCESS
    assert t.counts[PageState.GUEST_INVALID] == PAGES_PER_2M - 1
    # 2M assignment over assigned 4K entries overlaps
    assert private(t, PAGES_PER_2M, 0x200000, size_2m=True) == Code.FAIL_OVERLAP


def test_pvalidate_rules() -> None:
    t = table()
    private(t, 9, 0x9000)
    # wrong ASID, wrong GPA, unassigned: #NPF with the RMP bit
    for pfn, gpa, asid in ((9, 0x9000, ASID + 1), (9, 0xA000, ASID), (10, 0xA000, ASID)):
        r = t.pvalidate(pfn, gpa=gpa, asid=asid, vmpl=0, size_2m=False, validate=True)
        assert isinstance(r, Fault) and not r.vc and r.error_code & PFERR_GUEST_RMP
    assert (
        t.pvalidate(9, gpa=0x9000, asid=ASID, vmpl=1, size_2m=False, validate=True)
        == Code.FAIL_PERMISSION
    )
    assert (
        t.pvalidate(9, gpa=0x9000, asid=ASID, vmpl=0, size_2m=False, validate=False)
        == Code.FAIL_NOUPDATE
    )
    assert (
        t.pvalidate(9, gpa=0x9000, asid=ASID, vmpl=0, size_2m=False, validate=True) == Code.SUCCESS
    )
    assert (
        t.pvalidate(9, gpa=0x9000, asid=ASID, vmpl=0, size_2m=False, validate=True)
        == Code.FAIL_NOUPDATE
    )
    # 2M PVALIDATE of a 4K entry: FAIL_SIZEMISMATCH; 4K of a 2M entry: #NPF with SIZEM
    private(t, 0, 0, size_2m=False)
    assert (
        t.pvalidate(0, gpa=0, asid=ASID, vmpl=0, size_2m=True, validate=True)
        == Code.FAIL_SIZEMISMATCH
    )
    private(t, 2 * PAGES_PER_2M, 0x400000, size_2m=True)
    r = t.pvalidate(
        2 * PAGES_PER_2M + 1, gpa=0x401000, asid=ASID, vmpl=0, size_2m=False, validate=True
    )
    assert isinstance(r, Fault) and r.error_code & PFERR_GUEST_SIZEM
    assert (
        t.pvalidate(2 * PAGES_PER_2M, gpa=0x400000, asid=ASID, vmpl=0, size_2m=True, validate=True)
        == Code.SUCCESS
    )
    assert t.counts[PageState.GUEST_VALID] == PAGES_PER_2M + 1
    # RMPUPDATE clears VALIDATED
    assert private(t, 9, 0x9000) == Code.SUCCESS
    assert not t.entry(9).validated


def test_rmpadjust_rules() -> None:
    t = table()
    private(t, 4, 0x4000)
    args = {"gpa": 0x4000, "asid": ASID, "size_2m": False}
    assert (
        t.rmpadjust(4, vmpl=0, target_vmpl=1, perms=3, vmsa=False, **args) == Code.FAIL_PERMISSION
    )  # type: ignore[arg-type]
    t.pvalidate(4, vmpl=0, validate=True, **args)  # type: ignore[arg-type]
    assert (
        t.rmpadjust(4, vmpl=0, target_vmpl=0, perms=3, vmsa=False, **args) == Code.FAIL_PERMISSION
    )  # type: ignore[arg-type]
    assert t.rmpadjust(4, vmpl=0, target_vmpl=1, perms=3, vmsa=True, **args) == Code.SUCCESS  # type: ignore[arg-type]
    e = t.entry(4)
    assert e.vmsa and e.vmpl_perms == (3, 0, 0)
    # VMPL1 may pass on only what it has, and never the VMSA bit
    assert t.rmpadjust(4, vmpl=1, target_vmpl=2, perms=1, vmsa=False, **args) == Code.SUCCESS  # type: ignore[arg-type]
    assert (
        t.rmpadjust(4, vmpl=1, target_vmpl=2, perms=4, vmsa=False, **args) == Code.FAIL_PERMISSION
    )  # type: ignore[arg-type]
    assert t.entry(4).vmpl_perms == (3, 1, 0)


def test_locks_make_rmpupdate_and_psmash_fail_inuse() -> None:
    now = [0.0]
    t = table(hold_s=1.0, clock=lambda: now[0])
    private(t, PAGES_PER_2M, 0x200000, size_2m=True)
    t.pvalidate(PAGES_PER_2M, gpa=0x200000, asid=ASID, vmpl=0, size_2m=True, validate=True)
    assert t.psmash(PAGES_PER_2M) == Code.FAIL_INUSE
    assert shared(t, PAGES_PER_2M, size_2m=True) == Code.FAIL_INUSE
    now[0] = 2.0
    assert t.psmash(PAGES_PER_2M) == Code.SUCCESS
    t.rmpadjust(
        PAGES_PER_2M + 3,
        gpa=0x203000,
        asid=ASID,
        vmpl=0,
        size_2m=False,
        target_vmpl=1,
        perms=1,
        vmsa=False,
    )
    assert shared(t, PAGES_PER_2M + 3) == Code.FAIL_INUSE
    t.release_locks(ASID)  # the vCPUs were kicked out of guest mode
    assert shared(t, PAGES_PER_2M + 3) == Code.SUCCESS


def test_pinned_pages_cannot_become_private() -> None:
    t = table()
    t.pinned[6] = 1
    assert private(t, 6, 0x6000) == Code.FAIL_INUSE
    assert shared(t, 6) == Code.SUCCESS  # making it shared is fine
    del t.pinned[6]
    assert private(t, 6, 0x6000) == Code.SUCCESS


# --- properties: a random sequence of operations against a plain reference model ---------------

# #NPF error code bits. KERNEL: arch/x86/include/asm/kvm_host.h PFERR_GUEST_RMP_BIT 31,
# PFERR_GUEST_SIZEM_BIT 35
RMP_FAULT, SIZEM_FAULT = 1 << 31, 1 << 35

OPS = st.lists(
    st.tuples(
        st.sampled_from(["private", "shared", "firmware", "psmash", "validate", "rescind"]),
        # a few PFNs drawn often, so that operations meet the same pages (and 2M regions)
        st.one_of(
            st.sampled_from([0, 1, PAGES_PER_2M, PAGES_PER_2M + 1]),
            st.sampled_from([0, 1, PAGES_PER_2M, PAGES_PER_2M + 1]),
            st.integers(0, 4 * PAGES_PER_2M - 1),
        ),
        st.sampled_from([False, False, True]),
    ),
    min_size=8,
    max_size=40,
)


class Reference:
    """The rules written plainly, one dict per 4K page."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.e = [dict(a=False, i=False, asid=0, gpa=0, v=False, huge=False) for _ in range(n)]

    def head(self, pfn: int) -> dict:  # type: ignore[type-arg]
        h = self.e[pfn - pfn % PAGES_PER_2M]
        return h if h["huge"] and h["a"] else self.e[pfn]

    def update(self, pfn: int, assigned: bool, size_2m: bool, immutable: bool, asid: int) -> Code:
        gpa = pfn * 4096
        if size_2m and pfn % PAGES_PER_2M:
            return Code.FAIL_INPUT
        a = pfn - pfn % PAGES_PER_2M
        region = range(a, a + PAGES_PER_2M)
        huge = self.e[a]["huge"] and self.e[a]["a"]
        if huge and self.e[a]["i"]:
            return Code.FAIL_PERMISSION
        if not huge and (any(self.e[p]["i"] for p in region) if size_2m else self.e[pfn]["i"]):
            return Code.FAIL_PERMISSION
        if not size_2m and huge:
            return Code.FAIL_OVERLAP
        if size_2m and not huge and any(self.e[p]["a"] for p in region):
            return Code.FAIL_OVERLAP
        if size_2m:
            for p in region:
                self.e[p] = dict(a=assigned, i=False, asid=0, gpa=0, v=False, huge=False)
            self.e[a] = dict(
                a=assigned, i=immutable, asid=asid, gpa=gpa if assigned else 0, v=False, huge=True
            )
        else:
            self.e[pfn] = dict(
                a=assigned, i=immutable, asid=asid, gpa=gpa if assigned else 0, v=False, huge=False
            )
        return Code.SUCCESS

    def pvalidate(self, pfn: int, gpa: int, size_2m: bool, validate: bool) -> Code | str:
        """PVALIDATE at VMPL0 by ASID, predicted and applied here (not read from the table).

        SPEC: AMD64 APM vol. 3, PVALIDATE: the RMP entry of the page (the 2M entry covering
        it, if there is one) must be assigned to the guest's ASID, not immutable, for this
        GPA, else #NPF (RMP violation); a 2M PVALIDATE of a page mapped by 4K entries is
        FAIL_SIZEMISMATCH (EAX 6); a 4K PVALIDATE inside a 2M entry is #NPF with the SIZEM
        bit, which KVM answers by PSMASHing (KERNEL: arch/x86/kvm/svm/sev.c
        sev_handle_rmp_fault()); a Validated bit already equal to the request sets CF
        (KERNEL: arch/x86/include/asm/sev.h PVALIDATE_FAIL_NOUPDATE) and changes nothing;
        otherwise SUCCESS and the entry's Validated bit becomes the request."""
        h = self.head(pfn)
        if not h["a"] or h["asid"] != ASID or h["i"]:
            return "npf"
        if size_2m and not h["huge"]:
            return Code.FAIL_SIZEMISMATCH
        if not size_2m and h["huge"]:
            return "npf-sizem"
        if h["gpa"] != gpa:
            return "npf"
        if h["v"] == validate:
            return Code.FAIL_NOUPDATE
        h["v"] = validate
        return Code.SUCCESS

    def state(self, pfn: int) -> PageState:
        h = self.head(pfn)
        if not h["a"]:
            return PageState.HYPERVISOR_FIXED if h["i"] else PageState.HYPERVISOR
        if h["asid"] == 0:
            return PageState.FIRMWARE if h["i"] else PageState.RECLAIM
        if h["i"]:
            return PageState.PRE_GUEST
        return PageState.GUEST_VALID if h["v"] else PageState.GUEST_INVALID


@settings(max_examples=examples(150), deadline=None)
@given(OPS)
# each PVALIDATE outcome at least once: SUCCESS, NOUPDATE, SUCCESS (rescind) on a 4K page;
# 2M PVALIDATE of 4K entries (SIZEMISMATCH); 4K PVALIDATE inside a 2M entry (#NPF SIZEM)
@example(
    [("private", 1, False), ("validate", 1, False), ("validate", 1, False), ("rescind", 1, False)]
)
@example([("private", 0, False), ("validate", 0, True)])
@example([("private", 0, True), ("validate", 3, False), ("validate", 0, True)])
def test_random_sequences_match_the_reference(ops: list[tuple[str, int, bool]]) -> None:
    t = table()
    ref = Reference(t.npages)
    for op, pfn, size_2m in ops:
        if size_2m:
            pfn -= pfn % PAGES_PER_2M
        gpa = pfn * 4096
        if op in ("private", "shared", "firmware"):
            assigned = op != "shared"
            asid = ASID if op == "private" else 0
            immutable = op == "firmware"
            got = t.rmpupdate(
                pfn,
                gpa=gpa if assigned else 0,
                assigned=assigned,
                size_2m=size_2m,
                immutable=immutable,
                asid=asid,
            )
            assert got == ref.update(pfn, assigned, size_2m, immutable, asid)
        elif op == "psmash":
            a = pfn - pfn % PAGES_PER_2M
            got = t.psmash(a)
            h = ref.e[a]
            if h["huge"] and h["a"]:
                assert got == Code.SUCCESS
                for i in range(PAGES_PER_2M):
                    ref.e[a + i] = dict(h, gpa=h["gpa"] + i * 4096, huge=False)
            else:
                assert got == Code.FAIL_INPUT
        else:
            validate = op == "validate"
            r = t.pvalidate(pfn, gpa=gpa, asid=ASID, vmpl=0, size_2m=size_2m, validate=validate)
            want = ref.pvalidate(pfn, gpa, size_2m, validate)
            event(f"pvalidate {want if isinstance(want, str) else want.name}")
            if isinstance(want, str):
                assert isinstance(r, Fault) and not r.vc, (op, pfn, r)
                assert r.error_code & RMP_FAULT == RMP_FAULT
                assert bool(r.error_code & SIZEM_FAULT) == (want == "npf-sizem"), r
            else:
                assert r == want, (op, pfn, size_2m, r, want)
    states = t.state_of(np.arange(t.npages))
    expected = np.array([ref.state(p) for p in range(t.npages)])
    assert np.array_equal(states, expected)
    assert np.array_equal(t.counts[1:10], np.bincount(expected, minlength=10)[1:10])


@settings(max_examples=examples(100), deadline=None)
@given(
    st.lists(st.integers(0, 2 * PAGES_PER_2M - 1), min_size=1, max_size=60),
    st.lists(st.sampled_from(["private", "shared", "firmware"]), min_size=60, max_size=60),
    st.lists(st.integers(0, 2 * PAGES_PER_2M - 1), max_size=10),
)
def test_vectorised_batch_equals_one_by_one(
    pfns: list[int], ops: list[str], setup: list[int]
) -> None:
    a, b = table(), table()
    for pfn in setup:  # some pre-existing 2M and immutable pages
        for t in (a, b):
            t.rmpupdate(
                pfn - pfn % PAGES_PER_2M,
                gpa=0,
                assigned=True,
                size_2m=True,
                immutable=pfn % 2 == 0,
                asid=ASID,
            )
    pfns = list(dict.fromkeys(pfns))  # the vectorised path takes distinct PFNs
    n = len(pfns)
    assigned = np.array([o != "shared" for o in ops[:n]])
    immutable = np.array([o == "firmware" for o in ops[:n]])
    asids = np.array([ASID if o == "private" else 0 for o in ops[:n]], dtype=np.int64)
    gpas = np.array(
        [p * 4096 if x else 0 for p, x in zip(pfns, assigned, strict=True)], dtype=np.uint64
    )
    codes = a.rmpupdate_batch(
        np.array(pfns, dtype=np.int64), gpas, assigned, np.zeros(n, bool), immutable, asids
    )
    one = [
        b.rmpupdate(p, gpa=int(g), assigned=bool(x), size_2m=False, immutable=bool(i), asid=int(s))
        for p, g, x, i, s in zip(pfns, gpas, assigned, immutable, asids, strict=True)
    ]
    assert codes.tolist() == one
    assert np.array_equal(a.lo, b.lo) and np.array_equal(a.kind, b.kind)
    assert np.array_equal(a.counts, b.counts)
