"""PVALIDATE and RMPADJUST on the RMP entry of a frame: the checks and the writes.

guest_insns.py takes a guest's GPA through the nested page table to the frame; these are the
instructions' RMP side once the frame is known, reached through RmpTable's methods of the same
names. They return hardware codes, or a Fault where the instruction would #NPF.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from snpemu.abi.addr import PAGE_SIZE, PAGES_PER_2M
from snpemu.abi.rmp import Code
from snpemu.rmp.entry import (
    ASID_MASK,
    ASID_SHIFT,
    ASSIGNED,
    GPA_MASK,
    IMMUTABLE,
    PAGESIZE,
    PERM_MASK,
    PERM_SHIFTS,
    VALIDATED,
    VMSA,
)
from snpemu.rmp.entry_arrays import ALIGN_MASK, U64, distinct
from snpemu.rmp.fault import Fault, npf

if TYPE_CHECKING:
    from snpemu.rmp.table import RmpTable


def guest_check(
    table: RmpTable, pfn: int, gpa: int, asid: int, size_2m: bool, *, write: bool
) -> tuple[Code | Fault | None, int]:
    """Common RMP checks of PVALIDATE/RMPADJUST; returns (failure or None, entry pfn)."""
    if not 0 <= pfn < table.npages:
        return npf(gpa, "no such frame", write=write), pfn
    lo, _, _ = table.effective(pfn)
    if not lo & ASSIGNED or (lo & ASID_MASK) >> ASID_SHIFT != asid:
        return npf(gpa, "page not assigned to this guest", write=write), pfn
    if lo & IMMUTABLE:
        return npf(gpa, "page is immutable", write=write), pfn
    huge = bool(lo & PAGESIZE)
    if size_2m:
        if gpa % (PAGE_SIZE * PAGES_PER_2M) or pfn % PAGES_PER_2M:
            return Code.FAIL_INPUT, pfn
        if not huge:
            return Code.FAIL_SIZEMISMATCH, pfn
    elif huge:
        # 4K operation on a 2M entry: #NPF with SIZEM, so KVM PSMASHes and the guest retries.
        # KERNEL: arch/x86/kvm/svm/sev.c sev_handle_rmp_fault()
        return npf(gpa, "4K operation on a 2M RMP entry", write=write, sizem=True), pfn
    if (lo & GPA_MASK) != (gpa & GPA_MASK):
        return npf(gpa, "GPA does not match the RMP entry", write=write), pfn
    # The per-entry lock only makes host instructions (RMPUPDATE, PSMASH) fail: a guest's
    # own instructions run one after another on its vCPUs.
    return None, pfn & ALIGN_MASK if huge else pfn


def pvalidate(
    table: RmpTable, pfn: int, *, gpa: int, asid: int, vmpl: int, size_2m: bool, validate: bool
) -> Code | Fault:
    """PVALIDATE (F2 0F 01 FF). KERNEL: arch/x86/include/asm/sev.h pvalidate()"""
    if vmpl != 0:
        # Only VMPL0 may validate. UNVERIFIED(pvalidate-vmpl): reported as FAIL_PERMISSION.
        return Code.FAIL_PERMISSION
    failure, entry_pfn = guest_check(table, pfn, gpa, asid, size_2m, write=True)
    if failure is not None:
        return failure
    lo = int(table.lo[entry_pfn])
    if bool(lo & VALIDATED) == validate:
        return Code.FAIL_NOUPDATE
    span = PAGES_PER_2M if size_2m else 1
    pfns = np.arange(entry_pfn, entry_pfn + span, dtype=np.int64)
    before = table.state_of(pfns)
    table.lo[entry_pfn] = U64((lo | VALIDATED) if validate else (lo & ~VALIDATED))
    table.recount(pfns, before)
    table.hold(entry_pfn)
    return Code.SUCCESS


def rmpadjust(
    table: RmpTable,
    pfn: int,
    *,
    gpa: int,
    asid: int,
    vmpl: int,
    size_2m: bool,
    target_vmpl: int,
    perms: int,
    vmsa: bool,
) -> Code | Fault:
    """RMPADJUST (F3 0F 01 FE): set a higher VMPL's permissions and the VMSA bit.

    KERNEL: arch/x86/include/asm/sev.h rmpadjust(), RMPADJUST_VMSA_PAGE_BIT
    """
    if not vmpl < target_vmpl <= 3 or perms & ~PERM_MASK:
        return Code.FAIL_PERMISSION
    failure, entry_pfn = guest_check(table, pfn, gpa, asid, size_2m, write=False)
    if failure is not None:
        return failure
    lo, hi = int(table.lo[entry_pfn]), int(table.hi[entry_pfn])
    if not lo & VALIDATED:
        # UNVERIFIED(rmpadjust-unvalidated): RMPADJUST of a page the guest has not
        # validated fails.
        return Code.FAIL_PERMISSION
    if vmpl > 0:
        own = (hi >> PERM_SHIFTS[vmpl - 1]) & PERM_MASK
        if perms & ~own or vmsa:
            return Code.FAIL_PERMISSION
    shift = PERM_SHIFTS[target_vmpl - 1]
    hi = (hi & ~(PERM_MASK << shift)) | (perms << shift)
    table.hi[entry_pfn] = U64(hi)
    table.lo[entry_pfn] = U64((lo | VMSA) if vmsa else (lo & ~VMSA))
    table.hold(entry_pfn)
    return Code.SUCCESS


def pvalidate_batch(
    table: RmpTable,
    pfns: npt.NDArray[np.int64],
    gpas: npt.NDArray[np.uint64],
    *,
    asid: int,
    vmpl: int,
    validate: bool,
) -> tuple[npt.NDArray[np.uint8], Fault | None]:
    """4K PVALIDATE of each page in order, as pvalidate_pages() loops; stops at a fault.

    Returns the codes of the entries executed (shorter than the input after a fault) and
    the fault. Distinct PFNs take a vectorised path with pvalidate()'s checks.
    KERNEL: arch/x86/coco/sev/core.c pvalidate_pages()
    """
    n = len(pfns)
    if vmpl != 0:
        return np.full(min(n, 1), Code.FAIL_PERMISSION, dtype=np.uint8), None
    if n == 0 or table.hold_s > 0 or table.locks_held() or not distinct(pfns):
        codes: list[int] = []
        for i in range(n):
            r = pvalidate(
                table,
                int(pfns[i]),
                gpa=int(gpas[i]),
                asid=asid,
                vmpl=vmpl,
                size_2m=False,
                validate=validate,
            )
            if isinstance(r, Fault):
                return np.asarray(codes, dtype=np.uint8), r
            codes.append(r)
        return np.asarray(codes, dtype=np.uint8), None
    inside = (pfns >= 0) & (pfns < table.npages)
    p = np.where(inside, pfns, 0)
    a = p & ALIGN_MASK
    alo = table.lo[a]
    huge = ((alo & U64(PAGESIZE)) != 0) & ((alo & U64(ASSIGNED)) != 0)
    lo = table.lo[p]
    wrong = ~inside | huge | ((lo & U64(ASSIGNED)) == 0) | ((lo & U64(IMMUTABLE)) != 0)
    wrong |= ((lo & U64(ASID_MASK)) >> U64(ASID_SHIFT)) != U64(asid)
    wrong |= (lo & U64(GPA_MASK)) != (gpas & U64(GPA_MASK))
    fault: Fault | None = None
    stop = n
    if wrong.any():
        stop = int(np.argmax(wrong))
        first = pvalidate(
            table,
            int(pfns[stop]),
            gpa=int(gpas[stop]),
            asid=asid,
            vmpl=vmpl,
            size_2m=False,
            validate=validate,
        )
        # INVARIANT: the scalar path agrees that this entry faults.
        assert isinstance(first, Fault), first
        fault = first
    target = p[:stop]
    current = (lo[:stop] & U64(VALIDATED)) != 0
    codes_arr = np.where(current == validate, Code.FAIL_NOUPDATE, Code.SUCCESS).astype(np.uint8)
    change = target[codes_arr == Code.SUCCESS]
    before = table.state_of(change)
    if validate:
        table.lo[change] |= U64(VALIDATED)
    else:
        table.lo[change] &= ~U64(VALIDATED)
    table.recount(change, before)
    return codes_arr, fault
