"""The RMP table: one 16-byte entry per 4 KiB frame, and the RMP instructions that change it.

Storage is the hardware's own encoding, two u64 per frame in numpy arrays allocated with
calloc, so untouched entries cost no resident memory (16 B per page as on hardware, plus one
byte per page for the firmware page kinds the raw entry does not show).

A page inside a 2 MiB page takes its attributes from the 2M-aligned entry (its page size bit is
authoritative); the other 511 entries read ASSIGNED=1 only.
KERNEL: arch/x86/virt/svm/sev.c (level of a PFN from the 2M-aligned entry)

Instructions return hardware codes (entry.Code); they never raise for a guest's or host's bad
input, as the instructions don't. Guest instructions that would #NPF return a Fault instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from snpemu.abi.addr import PAGE_SIZE, PAGES_PER_2M
from snpemu.abi.npf import (
    PFERR_GUEST_ENC,
    PFERR_GUEST_FINAL,
    PFERR_GUEST_RMP,
    PFERR_GUEST_SIZEM,
    PFERR_GUEST_VMPL,
    PFERR_PRESENT,
    PFERR_USER,
    PFERR_WRITE,
)
from snpemu.abi.rmp import Code, FwOp, PageState
from snpemu.rmp.entry import (
    ASID_MASK,
    ASID_SHIFT,
    ASSIGNED,
    GPA_MASK,
    IMMUTABLE,
    MAX_ASID,
    PAGESIZE,
    PERM_MASK,
    PERM_SHIFTS,
    VALIDATED,
    VMSA,
    Entry,
    Kind,
    encode,
    page_state,
)

U64 = np.uint64
ALIGN_MASK = ~(PAGES_PER_2M - 1)


# #VC error code for a private access to a page that is not validated.
# UNVERIFIED(vc-not-validated): 0x404 as in the GHCB/APM #VC exit-code list ("page not validated").
VC_PAGE_NOT_VALIDATED = 0x404


@dataclass(frozen=True)
class Fault:
    """A guest access or instruction that faulted instead of completing."""

    vc: bool  # True: #VC in the guest; False: #NPF exit to the hypervisor
    error_code: int
    gpa: int
    cause: str


def npf(
    gpa: int,
    cause: str,
    *,
    write: bool = False,
    enc: bool = True,
    sizem: bool = False,
    vmpl: bool = False,
) -> Fault:
    code = PFERR_GUEST_RMP | PFERR_GUEST_FINAL | PFERR_PRESENT | PFERR_USER
    code |= (PFERR_WRITE if write else 0) | (PFERR_GUEST_ENC if enc else 0)
    code |= (PFERR_GUEST_SIZEM if sizem else 0) | (PFERR_GUEST_VMPL if vmpl else 0)
    return Fault(vc=False, error_code=code, gpa=gpa, cause=cause)


def _state_lut() -> npt.NDArray[np.int64]:
    """Page state for every combination of the bits that decide it, so that the vectorised
    state is one table lookup. Key: assigned | immutable << 1 | validated << 2 |
    (asid != 0) << 3 | kind << 4."""
    lut = np.zeros(1 << 7, dtype=np.int64)
    for key in range(1 << 7):
        assigned, immutable, validated = key & 1, key >> 1 & 1, key >> 2 & 1
        asid = 1 if key >> 3 & 1 else 0
        kind = key >> 4
        if kind > max(Kind):
            continue
        lo = encode(
            assigned=bool(assigned), immutable=bool(immutable), asid=asid, validated=bool(validated)
        )
        lut[key] = page_state(lo, kind)
    return lut


_LUT = _state_lut()


def _distinct(pfns: npt.NDArray[np.int64]) -> bool:
    # PSC batches are usually ascending runs: check that in O(n) before sorting.
    if len(pfns) < 2 or bool(np.all(pfns[1:] > pfns[:-1])):
        return True
    return len(np.unique(pfns)) == len(pfns)


def _states(lo: npt.NDArray[np.uint64], kind: npt.NDArray[np.uint8]) -> npt.NDArray[np.int64]:
    """Vectorised entry.page_state()."""
    # ASSIGNED is bit 0, IMMUTABLE bit 2 -> key bit 1, VALIDATED bit 62 -> key bit 2
    key = ((lo & U64(ASSIGNED)) | ((lo >> U64(1)) & U64(2)) | ((lo >> U64(60)) & U64(4))).astype(
        np.int64
    )
    key |= ((lo & U64(ASID_MASK)) != 0).astype(np.int64) << 3
    key |= kind.astype(np.int64) << 4
    states: npt.NDArray[np.int64] = _LUT[key]
    return states


class RmpTable:
    def __init__(
        self, npages: int, *, hold_s: float = 0.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if npages <= 0 or npages % PAGES_PER_2M:
            raise ValueError("memory must be a positive multiple of 2 MiB")
        self.npages = npages
        self.lo = np.zeros(npages, dtype=np.uint64)
        self.hi = np.zeros(npages, dtype=np.uint64)
        self.kind = np.zeros(npages, dtype=np.uint8)
        # Pages per state, kept up to date on every change (snp_rmp_pages{state}).
        self.counts = np.zeros(max(PageState) + 1, dtype=np.int64)
        self.counts[PageState.HYPERVISOR] = npages
        # Per-entry lock of a guest instruction in flight: pfn -> until (clock seconds).
        # hold_s = 0 makes instructions instantaneous; a positive hold models RMPADJUST /
        # PVALIDATE holding the entry so a concurrent RMPUPDATE/PSMASH sees FAIL_INUSE.
        self.hold_s = hold_s
        self.clock = clock
        self._busy: dict[int, float] = {}
        # Host map locks (post_map_gfn): pfn -> holders. Making a mapped page private fails.
        self.pinned: dict[int, int] = {}

    # --- reading ---------------------------------------------------------------------------

    def effective(self, pfn: int) -> tuple[int, int, int]:
        """(lo, hi, kind) that govern pfn: the 2M-aligned entry's when it is a 2M page."""
        a = pfn & ALIGN_MASK
        alo = int(self.lo[a])
        if alo & PAGESIZE and alo & ASSIGNED:
            offset = (pfn - a) * PAGE_SIZE
            lo = (alo & ~GPA_MASK) | (((alo & GPA_MASK) + offset) & GPA_MASK)
            return lo, int(self.hi[a]), int(self.kind[a])
        return int(self.lo[pfn]), int(self.hi[pfn]), int(self.kind[pfn])

    def entry(self, pfn: int, leaked: bool = False) -> Entry:
        lo, hi, kind = self.effective(pfn)
        own = Entry.decode(pfn, int(self.lo[pfn]), int(self.hi[pfn]), kind)
        decoded = Entry.decode(pfn, lo, hi, kind, leaked)
        # raw stays the frame's own 16 bytes, as the kernel's dump prints them
        return Entry(**{**decoded.__dict__, "raw": own.raw})

    def state_of(self, pfns: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        a = pfns & ALIGN_MASK
        alo = self.lo[a]
        huge = ((alo & U64(PAGESIZE)) != 0) & ((alo & U64(ASSIGNED)) != 0)
        lo = np.where(huge, alo, self.lo[pfns])
        kind = np.where(huge, self.kind[a], self.kind[pfns])
        return _states(lo, kind)

    # --- locks -----------------------------------------------------------------------------

    def busy(self, pfn: int) -> bool:
        if not self._busy:
            return False
        until = self._busy.get(pfn)
        if until is None:
            return False
        if until <= self.clock():
            del self._busy[pfn]
            return False
        return True

    def _hold(self, pfn: int) -> None:
        if self.hold_s > 0:
            self._busy[pfn] = self.clock() + self.hold_s

    def _any_busy(self, pfns: range) -> bool:
        return bool(self._busy) and any(self.busy(p) for p in pfns)

    # --- bookkeeping ------------------------------------------------------------------------

    def _recount(self, pfns: npt.NDArray[np.int64], before: npt.NDArray[np.int64]) -> None:
        self._count(before, self.state_of(pfns))

    def _count(self, before: npt.NDArray[np.int64], after: npt.NDArray[np.int64]) -> None:
        size = len(self.counts)
        self.counts += np.bincount(after, minlength=size) - np.bincount(before, minlength=size)

    @staticmethod
    def _kind_for(assigned: bool, immutable: bool, asid: int) -> int:
        # rmp_make_private(pfn, 0, level, 0, true) is how the host hands a page to firmware.
        # KERNEL: arch/x86/virt/svm/sev.c rmp_mark_pages_firmware()
        return Kind.FIRMWARE if assigned and immutable and asid == 0 else Kind.NONE

    # --- RMPUPDATE -------------------------------------------------------------------------

    def rmpupdate(
        self, pfn: int, *, gpa: int, assigned: bool, size_2m: bool, immutable: bool, asid: int
    ) -> Code:
        """RMPUPDATE (F2 0F 01 FE). KERNEL: arch/x86/virt/svm/sev.c rmpupdate()

        Check order: input, permission (immutable entries), in use, overlap. RMPUPDATE clears
        VALIDATED, VMSA and the VMPL permissions of the entries it writes.
        """
        if not 0 <= pfn < self.npages or not 0 <= asid <= MAX_ASID:
            return Code.FAIL_INPUT
        if gpa & (PAGE_SIZE - 1) or gpa & ~GPA_MASK:
            return Code.FAIL_INPUT
        if size_2m and (pfn % PAGES_PER_2M or (assigned and gpa % (PAGE_SIZE * PAGES_PER_2M))):
            return Code.FAIL_INPUT
        region = range(pfn, pfn + PAGES_PER_2M) if size_2m else range(pfn, pfn + 1)
        a = pfn & ALIGN_MASK
        alo = int(self.lo[a])
        huge = bool(alo & PAGESIZE and alo & ASSIGNED)
        # Immutable entries (firmware, context, pre-guest, HV-fixed) change only by firmware.
        if huge:
            if alo & IMMUTABLE:
                return Code.FAIL_PERMISSION
        elif size_2m:
            if np.any(self.lo[a : a + PAGES_PER_2M] & U64(IMMUTABLE)):
                return Code.FAIL_PERMISSION
        elif int(self.lo[pfn]) & IMMUTABLE:
            return Code.FAIL_PERMISSION
        if self._any_busy(region):
            return Code.FAIL_INUSE
        if assigned and self.pinned and any(p in self.pinned for p in region):
            return Code.FAIL_INUSE
        # 4K over a 2M page needs PSMASH first; 2M over assigned 4K entries needs them gone.
        if not size_2m and huge:
            return Code.FAIL_OVERLAP
        if size_2m and not huge and np.any(self.lo[a : a + PAGES_PER_2M] & U64(ASSIGNED)):
            return Code.FAIL_OVERLAP
        pfns = np.arange(region.start, region.stop, dtype=np.int64)
        before = self.state_of(pfns)
        new = encode(
            assigned=assigned, page_size_2m=size_2m, immutable=immutable, gpa=gpa, asid=asid
        )
        kind = self._kind_for(assigned, immutable, asid)
        if size_2m:
            self.lo[a + 1 : a + PAGES_PER_2M] = U64(ASSIGNED) if assigned else U64(0)
            self.hi[a : a + PAGES_PER_2M] = 0
            self.kind[a : a + PAGES_PER_2M] = kind
            self.lo[a] = U64(new)
        else:
            self.lo[pfn] = U64(new)
            self.hi[pfn] = 0
            self.kind[pfn] = kind
        self._recount(pfns, before)
        return Code.SUCCESS

    def rmpupdate_batch(
        self,
        pfns: npt.NDArray[np.int64],
        gpas: npt.NDArray[np.uint64],
        assigned: npt.NDArray[np.bool_],
        size_2m: npt.NDArray[np.bool_],
        immutable: npt.NDArray[np.bool_],
        asids: npt.NDArray[np.int64],
    ) -> npt.NDArray[np.uint8]:
        """RMPUPDATE for each entry in order, each applied atomically; codes per entry.

        All-4K batches without repeated PFNs (what KVM issues for a PSC) take a vectorised
        path with the same checks as rmpupdate(); anything else runs entry by entry.
        """
        n = len(pfns)
        if n == 0 or size_2m.any() or not _distinct(pfns):
            return np.array(
                [
                    self.rmpupdate(
                        int(pfns[i]),
                        gpa=int(gpas[i]),
                        assigned=bool(assigned[i]),
                        size_2m=bool(size_2m[i]),
                        immutable=bool(immutable[i]),
                        asid=int(asids[i]),
                    )
                    for i in range(n)
                ],
                dtype=np.uint8,
            )
        codes = np.zeros(n, dtype=np.uint8)
        bad = (pfns < 0) | (pfns >= self.npages) | (asids < 0) | (asids > MAX_ASID)
        bad |= ((gpas & U64(PAGE_SIZE - 1)) != 0) | ((gpas & ~U64(GPA_MASK)) != 0)
        codes[bad] = Code.FAIL_INPUT
        p = np.where(bad, 0, pfns)
        a = p & ALIGN_MASK
        alo = self.lo[a]
        lo_p = self.lo[p]
        huge = ((alo & U64(PAGESIZE)) != 0) & ((alo & U64(ASSIGNED)) != 0)
        eff_imm = np.where(huge, alo, lo_p) & U64(IMMUTABLE)
        codes[(codes == 0) & (eff_imm != 0)] = Code.FAIL_PERMISSION
        if self._busy or self.pinned:
            inuse = np.fromiter(
                (
                    self.busy(int(x)) or (bool(assigned[i]) and int(x) in self.pinned)
                    for i, x in enumerate(p)
                ),
                dtype=bool,
                count=n,
            )
            codes[(codes == 0) & inuse] = Code.FAIL_INUSE
        codes[(codes == 0) & huge] = Code.FAIL_OVERLAP
        ok = codes == 0
        target = p[ok]
        # INVARIANT: no entry that passed lies in a 2M page (those fail with FAIL_OVERLAP), so
        # its own entry is the effective one and its state comes from what was read above.
        before = _states(lo_p[ok], self.kind[target])
        new = (
            np.where(assigned[ok], U64(ASSIGNED), U64(0))
            | np.where(immutable[ok], U64(IMMUTABLE), U64(0))
            | (gpas[ok] & U64(GPA_MASK))
            | ((asids[ok].astype(np.uint64) << U64(ASID_SHIFT)) & U64(ASID_MASK))
        )
        kinds = np.where(
            assigned[ok] & immutable[ok] & (asids[ok] == 0), Kind.FIRMWARE, Kind.NONE
        ).astype(np.uint8)
        self.lo[target] = new
        self.hi[target] = 0
        self.kind[target] = kinds
        self._count(before, _states(new, kinds))
        return codes

    # --- PSMASH -----------------------------------------------------------------------------

    def psmash(self, pfn: int) -> Code:
        """PSMASH (F3 0F 01 FF): one 2M entry -> 512 4K entries with the same attributes.

        KERNEL: arch/x86/virt/svm/sev.c psmash(); KVM retries while FAIL_INUSE.
        """
        if not 0 <= pfn < self.npages or pfn % PAGES_PER_2M:
            return Code.FAIL_INPUT
        alo = int(self.lo[pfn])
        if not (alo & PAGESIZE and alo & ASSIGNED):
            return Code.FAIL_INPUT
        if self._any_busy(range(pfn, pfn + PAGES_PER_2M)):
            return Code.FAIL_INUSE
        base = alo & ~PAGESIZE & ~GPA_MASK
        gpa = alo & GPA_MASK
        offsets = np.arange(PAGES_PER_2M, dtype=np.uint64) * U64(PAGE_SIZE)
        self.lo[pfn : pfn + PAGES_PER_2M] = U64(base) | ((U64(gpa) + offsets) & U64(GPA_MASK))
        self.hi[pfn : pfn + PAGES_PER_2M] = self.hi[pfn]
        self.kind[pfn : pfn + PAGES_PER_2M] = self.kind[pfn]
        return Code.SUCCESS

    # --- guest instructions ----------------------------------------------------------------

    def _guest_check(
        self, pfn: int, gpa: int, asid: int, size_2m: bool, *, write: bool
    ) -> tuple[Code | Fault | None, int]:
        """Common RMP checks of PVALIDATE/RMPADJUST; returns (failure or None, entry pfn)."""
        if not 0 <= pfn < self.npages:
            return npf(gpa, "no such frame", write=write), pfn
        lo, _, _ = self.effective(pfn)
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
        self, pfn: int, *, gpa: int, asid: int, vmpl: int, size_2m: bool, validate: bool
    ) -> Code | Fault:
        """PVALIDATE (F2 0F 01 FF). KERNEL: arch/x86/include/asm/sev.h pvalidate()"""
        if vmpl != 0:
            # Only VMPL0 may validate. UNVERIFIED(pvalidate-vmpl): reported as FAIL_PERMISSION.
            return Code.FAIL_PERMISSION
        failure, entry_pfn = self._guest_check(pfn, gpa, asid, size_2m, write=True)
        if failure is not None:
            return failure
        lo = int(self.lo[entry_pfn])
        if bool(lo & VALIDATED) == validate:
            return Code.FAIL_NOUPDATE
        span = PAGES_PER_2M if size_2m else 1
        pfns = np.arange(entry_pfn, entry_pfn + span, dtype=np.int64)
        before = self.state_of(pfns)
        self.lo[entry_pfn] = U64((lo | VALIDATED) if validate else (lo & ~VALIDATED))
        self._recount(pfns, before)
        self._hold(entry_pfn)
        return Code.SUCCESS

    def rmpadjust(
        self,
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
        failure, entry_pfn = self._guest_check(pfn, gpa, asid, size_2m, write=False)
        if failure is not None:
            return failure
        lo, hi = int(self.lo[entry_pfn]), int(self.hi[entry_pfn])
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
        self.hi[entry_pfn] = U64(hi)
        self.lo[entry_pfn] = U64((lo | VMSA) if vmsa else (lo & ~VMSA))
        self._hold(entry_pfn)
        return Code.SUCCESS

    def pvalidate_batch(
        self,
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
        if n == 0 or self.hold_s > 0 or self._busy or not _distinct(pfns):
            codes: list[int] = []
            for i in range(n):
                r = self.pvalidate(
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
        inside = (pfns >= 0) & (pfns < self.npages)
        p = np.where(inside, pfns, 0)
        a = p & ALIGN_MASK
        alo = self.lo[a]
        huge = ((alo & U64(PAGESIZE)) != 0) & ((alo & U64(ASSIGNED)) != 0)
        lo = self.lo[p]
        wrong = ~inside | huge | ((lo & U64(ASSIGNED)) == 0) | ((lo & U64(IMMUTABLE)) != 0)
        wrong |= ((lo & U64(ASID_MASK)) >> U64(ASID_SHIFT)) != U64(asid)
        wrong |= (lo & U64(GPA_MASK)) != (gpas & U64(GPA_MASK))
        fault: Fault | None = None
        stop = n
        if wrong.any():
            stop = int(np.argmax(wrong))
            first = self.pvalidate(
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
        before = self.state_of(change)
        if validate:
            self.lo[change] |= U64(VALIDATED)
        else:
            self.lo[change] &= ~U64(VALIDATED)
        self._recount(change, before)
        return codes_arr, fault

    def release_locks(self, asid: int) -> None:
        """The ASID's vCPUs left guest mode (kicked): their in-flight instructions are done."""
        for pfn in [p for p in self._busy if (int(self.lo[p]) & ASID_MASK) >> ASID_SHIFT == asid]:
            del self._busy[pfn]

    # --- firmware-side transitions ----------------------------------------------------------
    # The AMD-SP writes the RMP directly; these are the changes its commands make. Each checks
    # the page's current state and returns False (nothing changed) when it is not the one the
    # command needs, which the firmware reports as INVALID_PAGE_STATE.

    def fw_transition(self, pfn: int, op: FwOp, asid: int = 0) -> bool:
        if not 0 <= pfn < self.npages:
            return False
        lo, _, _ = self.effective(pfn)
        state = self.entry(pfn).state
        own = pfn if not (lo & PAGESIZE) else pfn & ALIGN_MASK
        pfns = np.arange(own, own + (PAGES_PER_2M if lo & PAGESIZE else 1), dtype=np.int64)
        before = self.state_of(pfns)
        if op == FwOp.CONTEXT and state == PageState.FIRMWARE:
            self.kind[own] = Kind.CONTEXT
        elif op == FwOp.FIRMWARE and state in (PageState.CONTEXT, PageState.METADATA):
            self.kind[own] = Kind.FIRMWARE
        elif op == FwOp.RECLAIM and state in (
            PageState.FIRMWARE,
            PageState.CONTEXT,
            PageState.METADATA,
            PageState.PRE_GUEST,
        ):
            self.lo[own] = U64(encode(assigned=True, page_size_2m=bool(lo & PAGESIZE)))
            self.hi[own] = 0
            self.kind[own] = Kind.RECLAIM
        elif op == FwOp.FINISH and state == PageState.PRE_GUEST and self._asid(lo) == asid:
            # LAUNCH_FINISH: launched pages become guest-owned, mutable and validated.
            self.lo[own] = U64((int(self.lo[own]) & ~IMMUTABLE) | VALIDATED)
        elif op == FwOp.VMSA and state == PageState.PRE_GUEST and self._asid(lo) == asid:
            self.lo[own] = U64(int(self.lo[own]) | VMSA)
        elif op == FwOp.HV_FIXED and state in (PageState.HYPERVISOR, PageState.FIRMWARE):
            self.lo[own] = U64(IMMUTABLE)
            self.kind[own] = Kind.NONE
        elif op == FwOp.UNSMASH and pfn % PAGES_PER_2M == 0 and not lo & PAGESIZE:
            return self._unsmash(pfn)
        else:
            return False
        self._recount(pfns, before)
        return True

    @staticmethod
    def _asid(lo: int) -> int:
        return (lo & ASID_MASK) >> ASID_SHIFT

    def _unsmash(self, a: int) -> bool:
        """SNP_PAGE_UNSMASH: 512 4K entries describing one 2M page become one 2M entry."""
        lo = self.lo[a : a + PAGES_PER_2M]
        first = int(lo[0])
        if not first & ASSIGNED or (first & GPA_MASK) % (PAGE_SIZE * PAGES_PER_2M):
            return False
        expect = U64(first & ~GPA_MASK) | (
            (U64(first & GPA_MASK) + np.arange(PAGES_PER_2M, dtype=np.uint64) * U64(PAGE_SIZE))
            & U64(GPA_MASK)
        )
        if not np.array_equal(lo, expect) or np.any(self.hi[a : a + PAGES_PER_2M] != self.hi[a]):
            return False
        pfns = np.arange(a, a + PAGES_PER_2M, dtype=np.int64)
        before = self.state_of(pfns)
        self.lo[a + 1 : a + PAGES_PER_2M] = U64(ASSIGNED)
        self.lo[a] = U64(first | PAGESIZE)
        self._recount(pfns, before)
        return True
