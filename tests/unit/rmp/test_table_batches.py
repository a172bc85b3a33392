"""The RMP table's batched PVALIDATE, SNP_PAGE_UNSMASH and its page-state lookup table, with the
expected codes, faults and entries worked out here by hand.

KERNEL: arch/x86/coco/sev/core.c pvalidate_pages(): 4K PVALIDATEs one after another, stopping at
the first that faults; PVALIDATE of a page already in the requested state is FAIL_NOUPDATE (CF=1,
KERNEL: arch/x86/include/asm/sev.h PVALIDATE_FAIL_NOUPDATE 255).
SPEC: SEV-SNP Firmware ABI (AMD 56860) "SNP_PAGE_UNSMASH": 512 4K entries of one 2M-aligned page
with consecutive GPAs from a 2M-aligned GPA and the same attributes become one 2M entry.
SPEC: the same document's "Page States" (as in tests/unit/rmp/test_entry_codec.py).
"""

from __future__ import annotations

import numpy as np
from snpemu.abi.rmp import Code, FwOp, PageState
from snpemu.rmp.entry_arrays import state_lut
from snpemu.rmp.fault import Fault
from snpemu.rmp.table import RmpTable

ASID = 5
NOUPDATE, PERMISSION = 255, 2
HV, HV_FIXED, FW, RECLAIM, CONTEXT, PRE, INVALID, VALID, META = 1, 2, 3, 4, 5, 6, 7, 8, 9


def test_the_state_lookup_table() -> None:
    """Key: assigned | immutable << 1 | validated << 2 | (asid != 0) << 3 | kind << 4 (kinds
    0 none, 1 firmware, 2 context, 3 metadata, 4 reclaim; 5..7 unused, 0)."""
    want = []
    for key in range(128):
        assigned, immutable, validated, guest = (key >> i & 1 for i in range(4))
        kind = key >> 4
        if kind > 4:
            state = 0
        elif not assigned:
            state = HV_FIXED if immutable else HV
        elif guest:
            state = PRE if immutable else (VALID if validated else INVALID)
        elif kind == 2:
            state = CONTEXT
        elif kind == 3:
            state = META
        elif kind == 4 or not immutable:
            state = RECLAIM
        else:
            state = FW
        want.append(state)
    assert state_lut().tolist() == want


def guest_table() -> RmpTable:
    t = RmpTable(1024)
    for pfn in range(10, 16):
        assert (
            t.rmpupdate(
                pfn, gpa=pfn << 12, assigned=True, size_2m=False, immutable=False, asid=ASID
            )
            == 0
        )
    return t


def arrays(pfns: list[int], gpas: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    gpas = [p << 12 for p in pfns] if gpas is None else gpas
    return np.array(pfns, dtype=np.int64), np.array(gpas, dtype=np.uint64)


def states(t: RmpTable, pfns: range) -> list[int]:
    return [int(t.entry(p).state) for p in pfns]


def test_batch_validates_and_invalidates_in_order() -> None:
    t = guest_table()
    codes, fault = t.pvalidate_batch(*arrays([10, 11, 12]), asid=ASID, vmpl=0, validate=True)
    assert codes.tolist() == [0, 0, 0] and fault is None
    assert states(t, range(10, 14)) == [VALID, VALID, VALID, INVALID]
    assert (t.counts[PageState.GUEST_VALID], t.counts[PageState.GUEST_INVALID]) == (3, 3)
    # again: no change; then 11 and 13 invalidated / validated
    codes, _ = t.pvalidate_batch(*arrays([12, 13]), asid=ASID, vmpl=0, validate=True)
    assert codes.tolist() == [NOUPDATE, 0]
    codes, _ = t.pvalidate_batch(*arrays([11, 14]), asid=ASID, vmpl=0, validate=False)
    assert codes.tolist() == [0, NOUPDATE]
    assert states(t, range(10, 16)) == [VALID, INVALID, VALID, VALID, INVALID, INVALID]
    assert (t.counts[PageState.GUEST_VALID], t.counts[PageState.GUEST_INVALID]) == (3, 3)


def test_batch_from_a_vmpl_other_than_0_is_one_fail_permission() -> None:
    t = guest_table()
    codes, fault = t.pvalidate_batch(*arrays([10, 11]), asid=ASID, vmpl=1, validate=True)
    assert codes.tolist() == [PERMISSION] and fault is None
    codes, fault = t.pvalidate_batch(*arrays([]), asid=ASID, vmpl=2, validate=True)
    assert codes.tolist() == [] and fault is None
    assert states(t, range(10, 12)) == [INVALID, INVALID]


def check_stops_at(pfns: list[int], gpas: list[int], at: int, cause: str, asid: int = ASID) -> None:
    t = guest_table()
    codes, fault = t.pvalidate_batch(*arrays(pfns, gpas), asid=asid, vmpl=0, validate=True)
    assert codes.tolist() == [0] * at
    assert isinstance(fault, Fault) and fault.cause == cause and fault.gpa == gpas[at]
    changed = [p for p in pfns[:at]]
    for p in range(10, 16):
        assert t.entry(p).state == (VALID if p in changed else INVALID), p


def test_batch_stops_at_the_first_fault() -> None:
    check_stops_at(
        [10, 11, 12], [0xA000, 0xB000 + 0x1000, 0xC000], 1, "GPA does not match the RMP entry"
    )
    check_stops_at(
        [10, 11, 5, 12], [0xA000, 0xB000, 0x5000, 0xC000], 2, "page not assigned to this guest"
    )
    check_stops_at([10, 2000], [0xA000, 0x7D0000], 1, "no such frame")
    check_stops_at([10, -1], [0xA000, 0], 1, "no such frame")
    check_stops_at([12, 10], [0xC000, 0xA000], 0, "page not assigned to this guest", asid=ASID + 1)


def test_batch_faults_on_immutable_and_2m_entries() -> None:
    t = guest_table()
    t.rmpupdate(20, gpa=0x14000, assigned=True, size_2m=False, immutable=True, asid=ASID)
    codes, fault = t.pvalidate_batch(*arrays([10, 20]), asid=ASID, vmpl=0, validate=True)
    assert codes.tolist() == [0] and isinstance(fault, Fault) and fault.cause == "page is immutable"
    t.rmpupdate(512, gpa=2 << 20, assigned=True, size_2m=True, immutable=False, asid=ASID)
    codes, fault = t.pvalidate_batch(
        *arrays([11, 513], [0xB000, (2 << 20) + 0x1000]), asid=ASID, vmpl=0, validate=True
    )
    assert codes.tolist() == [0] and isinstance(fault, Fault)
    assert fault.cause == "4K operation on a 2M RMP entry" and fault.gpa == (2 << 20) + 0x1000


def test_a_batch_naming_a_page_twice_runs_one_by_one() -> None:
    t = guest_table()
    codes, fault = t.pvalidate_batch(*arrays([10, 11, 10]), asid=ASID, vmpl=0, validate=True)
    assert codes.tolist() == [0, 0, NOUPDATE] and fault is None
    codes, fault = t.pvalidate_batch(*arrays([12, 12, 99]), asid=ASID, vmpl=0, validate=True)
    assert codes.tolist() == [0, NOUPDATE] and isinstance(fault, Fault)


def smashed(gpa: int = 2 << 20) -> RmpTable:
    t = RmpTable(2048)
    assert t.rmpupdate(512, gpa=gpa, assigned=True, size_2m=True, immutable=False, asid=ASID) == 0
    assert t.psmash(512) == Code.SUCCESS
    return t


def test_unsmash_joins_512_consecutive_entries() -> None:
    t = smashed()
    assert t.fw_transition(512, FwOp.UNSMASH) is True
    e = t.entry(512)
    assert (e.page_size_2m, e.assigned, e.gpa, e.asid) == (True, True, 2 << 20, ASID)
    assert int(t.lo[513]) == 1 and int(t.lo[1023]) == 1  # ASSIGNED only, as a 2M page's tail
    assert t.entry(700).gpa == (2 << 20) + 188 * 4096 and t.entry(700).page_size_2m
    assert t.counts[PageState.GUEST_INVALID] == 512
    assert t.fw_transition(512, FwOp.UNSMASH) is False  # already one 2M entry


def test_unsmash_refuses_entries_that_do_not_make_one_2m_page() -> None:
    assert smashed().fw_transition(513, FwOp.UNSMASH) is False  # not 2M-aligned
    assert RmpTable(1024).fw_transition(512, FwOp.UNSMASH) is False  # not assigned
    t = smashed()
    t.lo[600] ^= np.uint64(1 << 12)  # one GPA out of sequence
    assert t.fw_transition(512, FwOp.UNSMASH) is False
    t = smashed()
    t.hi[1023] = np.uint64(1)  # one entry with other permissions
    assert t.fw_transition(512, FwOp.UNSMASH) is False
    # a 2M-aligned frame run whose first GPA is not 2M-aligned
    t = RmpTable(2048)
    for i in range(512):
        t.rmpupdate(
            512 + i, gpa=0x1000 * (i + 1), assigned=True, size_2m=False, immutable=False, asid=ASID
        )
    assert t.fw_transition(512, FwOp.UNSMASH) is False
    assert not t.entry(512).page_size_2m


def test_batch_codes_are_one_byte_each() -> None:
    """rmp answers the codes as bytes, one per page (rmp.proto PvalidateBatchResponse.codes)."""
    t = guest_table()
    for vmpl, pfns in ((0, [10, 11]), (1, [10]), (0, [12, 12]), (0, [13, 99])):
        codes, _ = t.pvalidate_batch(*arrays(pfns), asid=ASID, vmpl=vmpl, validate=True)
        assert codes.dtype == np.uint8, (vmpl, pfns)


def test_a_batch_with_holds_holds_each_entry() -> None:
    """With a hold time each PVALIDATE holds its entry (a concurrent RMPUPDATE is FAIL_INUSE)."""
    now = [100.0]
    t = RmpTable(1024, hold_s=0.5, clock=lambda: now[0])
    for pfn in (10, 11):
        t.rmpupdate(pfn, gpa=pfn << 12, assigned=True, size_2m=False, immutable=False, asid=ASID)
    codes, fault = t.pvalidate_batch(*arrays([10, 11]), asid=ASID, vmpl=0, validate=True)
    assert codes.tolist() == [0, 0] and fault is None
    assert t.busy(10) and t.busy(11)
    now[0] += 0.5
    assert not t.busy(10)


def test_batch_edges_of_the_table() -> None:
    t = RmpTable(1024)
    for pfn in (0, 1023):
        t.rmpupdate(pfn, gpa=pfn << 12, assigned=True, size_2m=False, immutable=False, asid=ASID)
    codes, fault = t.pvalidate_batch(*arrays([0, 1023]), asid=ASID, vmpl=0, validate=True)
    assert codes.tolist() == [0, 0] and fault is None
    codes, fault = t.pvalidate_batch(*arrays([1024]), asid=ASID, vmpl=0, validate=True)
    assert codes.tolist() == [] and isinstance(fault, Fault) and fault.cause == "no such frame"


def test_a_batch_naming_the_head_of_a_2m_page_faults_with_sizem() -> None:
    t = RmpTable(4096)
    t.rmpupdate(512, gpa=2 << 20, assigned=True, size_2m=True, immutable=False, asid=ASID)
    codes, fault = t.pvalidate_batch(*arrays([512], [2 << 20]), asid=ASID, vmpl=0, validate=True)
    assert codes.tolist() == [] and isinstance(fault, Fault)
    assert fault.cause == "4K operation on a 2M RMP entry"
    assert not t.entry(512).validated


def test_rmpadjust_targets_vmpl_1_to_3_and_replaces_the_mask() -> None:
    """KERNEL: arch/x86/include/asm/sev.h rmpadjust(): RMPADJUST sets the permission mask of a
    VMPL above the caller's (VMPLs 0..3); each call replaces that VMPL's whole mask."""
    t = guest_table()
    args = {"gpa": 0xA000, "asid": ASID, "size_2m": False}
    t.pvalidate(10, vmpl=0, validate=True, **args)  # type: ignore[arg-type]
    assert t.rmpadjust(10, vmpl=0, target_vmpl=3, perms=0xF, vmsa=False, **args) == 0  # type: ignore[arg-type]
    assert t.rmpadjust(10, vmpl=0, target_vmpl=4, perms=1, vmsa=False, **args) == PERMISSION  # type: ignore[arg-type]
    assert t.rmpadjust(10, vmpl=0, target_vmpl=2, perms=0xF, vmsa=False, **args) == 0  # type: ignore[arg-type]
    assert t.rmpadjust(10, vmpl=0, target_vmpl=2, perms=0x1, vmsa=False, **args) == 0  # type: ignore[arg-type]
    assert t.entry(10).vmpl_perms == (0, 1, 0xF)
    # VMPL2 holds READ only: it may give VMPL3 READ, not WRITE (bit 1 of its own mask)
    assert t.rmpadjust(10, vmpl=2, target_vmpl=3, perms=1, vmsa=False, **args) == 0  # type: ignore[arg-type]
    assert t.rmpadjust(10, vmpl=2, target_vmpl=3, perms=2, vmsa=False, **args) == PERMISSION  # type: ignore[arg-type]
    assert t.entry(10).vmpl_perms == (0, 1, 1)


def test_rmpadjust_faults_are_not_writes() -> None:
    """RMPADJUST reads the entry: its #NPF has no write bit (KERNEL: PFERR_WRITE_MASK, bit 1)."""
    t = guest_table()
    r = t.rmpadjust(
        10, gpa=0xB000, asid=ASID, size_2m=False, vmpl=0, target_vmpl=1, perms=1, vmsa=False
    )
    assert isinstance(r, Fault) and not r.error_code & 2 and r.error_code & 1 << 31
    p = t.pvalidate(10, gpa=0xB000, asid=ASID, vmpl=0, size_2m=False, validate=True)
    assert isinstance(p, Fault) and p.error_code & 2  # PVALIDATE's is a write
