"""The RMP table: one 16-byte entry per 4 KiB frame, and the host's RMP instructions on it.

Storage is the hardware's own encoding, two u64 per frame in numpy arrays allocated with
calloc, so untouched entries cost no resident memory (16 B per page as on hardware, plus one
byte per page for the firmware page kinds the raw entry does not show).

A page inside a 2 MiB page takes its attributes from the 2M-aligned entry (its page size bit is
authoritative); the other 511 entries read ASSIGNED=1 only.
KERNEL: arch/x86/virt/svm/sev.c (level of a PFN from the 2M-aligned entry)

Instructions return hardware codes (entry.Code); they never raise for a guest's or host's bad
input, as the instructions don't. Guest instructions that would #NPF return a Fault instead.
RMPUPDATE and PSMASH are here; the guest's PVALIDATE/RMPADJUST (guest_insns_table.py) and the
firmware's transitions (fw_transitions.py) are functions of the table, reached through its
methods of the same names. Every write keeps `counts` in step through recount().
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from snpemu.abi.addr import PAGE_SIZE, PAGES_PER_2M
from snpemu.abi.rmp import Code, FwOp, PageState
from snpemu.rmp import fw_transitions, guest_insns_table
from snpemu.rmp.entry import (
    ASID_MASK,
    ASID_SHIFT,
    ASSIGNED,
    GPA_MASK,
    IMMUTABLE,
    MAX_ASID,
    PAGESIZE,
    Entry,
    Kind,
    encode,
)
from snpemu.rmp.entry_arrays import ALIGN_MASK, U64, distinct, states
from snpemu.rmp.fault import Fault


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
        return states(lo, kind)

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

    def hold(self, pfn: int) -> None:
        if self.hold_s > 0:
            self._busy[pfn] = self.clock() + self.hold_s

    def _any_busy(self, pfns: range) -> bool:
        return bool(self._busy) and any(self.busy(p) for p in pfns)

    def locks_held(self) -> bool:
        """Whether any entry lock is recorded (expired ones count until busy() sweeps them)."""
        return bool(self._busy)

    def release_locks(self, asid: int) -> None:
        """The ASID's vCPUs left guest mode (kicked): their in-flight instructions are done."""
        for pfn in [p for p in self._busy if (int(self.lo[p]) & ASID_MASK) >> ASID_SHIFT == asid]:
            del self._busy[pfn]

    # --- bookkeeping ------------------------------------------------------------------------

    def recount(self, pfns: npt.NDArray[np.int64], before: npt.NDArray[np.int64]) -> None:
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
        self.recount(pfns, before)
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
        if n == 0 or size_2m.any() or not distinct(pfns):
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
        before = states(lo_p[ok], self.kind[target])
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
        self._count(before, states(new, kinds))
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

    # --- guest instructions (guest_insns_table.py) ------------------------------------------

    def pvalidate(
        self, pfn: int, *, gpa: int, asid: int, vmpl: int, size_2m: bool, validate: bool
    ) -> Code | Fault:
        return guest_insns_table.pvalidate(
            self, pfn, gpa=gpa, asid=asid, vmpl=vmpl, size_2m=size_2m, validate=validate
        )

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
        return guest_insns_table.rmpadjust(
            self,
            pfn,
            gpa=gpa,
            asid=asid,
            vmpl=vmpl,
            size_2m=size_2m,
            target_vmpl=target_vmpl,
            perms=perms,
            vmsa=vmsa,
        )

    def pvalidate_batch(
        self,
        pfns: npt.NDArray[np.int64],
        gpas: npt.NDArray[np.uint64],
        *,
        asid: int,
        vmpl: int,
        validate: bool,
    ) -> tuple[npt.NDArray[np.uint8], Fault | None]:
        return guest_insns_table.pvalidate_batch(
            self, pfns, gpas, asid=asid, vmpl=vmpl, validate=validate
        )

    # --- firmware-side transitions (fw_transitions.py) ---------------------------------------

    def fw_transition(self, pfn: int, op: FwOp, asid: int = 0) -> bool:
        return fw_transitions.fw_transition(self, pfn, op, asid)
