"""The rmp model: memory, RMP, keys, nested paging, host maps and the violation policy.

Free of gRPC: the servicer adapts it. Host and guest operations are plain methods; the one
that may wait (a host write under `convert`, which kicks the guest's vCPUs through kvm) is a
coroutine. Counters live here; the metrics adapter reads them.
"""

from __future__ import annotations

import enum
import logging
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from snpemu.abi.addr import PAGE_SHIFT, PAGE_SIZE, PAGES_PER_2M
from snpemu.abi.rmp import Code, FwOp, PageState
from snpemu.errors import InvalidArgument, NotFound, PermissionDenied, Unavailable, WrongState
from snpemu.rmp.crypto import MemoryKeys
from snpemu.rmp.entry import (
    ASID_MASK,
    ASID_SHIFT,
    ASSIGNED,
    GPA_MASK,
    IMMUTABLE,
    MAX_ASID,
    PAGESIZE,
    PERM_READ,
    PERM_SHIFTS,
    PERM_WRITE,
    VALIDATED,
    VMSA,
    Entry,
)
from snpemu.rmp.memory import FrameAllocator, FrameStore, Placement
from snpemu.rmp.npt import NestedPageTable
from snpemu.rmp.table import ALIGN_MASK, VC_PAGE_NOT_VALIDATED, Fault, RmpTable, npf

log = logging.getLogger(__name__)

MAX_ACCESS = 1 << 20
CONVERT_RETRIES = 8


class Policy(enum.IntEnum):
    """Values match snp.rmp.v1.ViolationPolicy. docs/design.md#violation-policies."""

    SIGBUS = 1
    CONVERT = 2
    CONVERT_KILL = 3
    GMEM = 4

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")

    @classmethod
    def parse(cls, text: str) -> Policy:
        for p in cls:
            if p.label == text:
                return p
        raise InvalidArgument(
            f"unknown RMP violation policy {text!r}: one of {', '.join(p.label for p in cls)}"
        )


class Origin(enum.IntEnum):
    USER = 1
    KERNEL = 2


class Outcome(enum.IntEnum):
    """Values match snp.rmp.v1.ViolationOutcome."""

    NONE = 1
    SIGBUS = 2
    PANIC = 3
    CONVERTED = 4
    REFUSED = 5


class IommuMode(enum.IntEnum):
    OFF = 1
    PASSTHROUGH = 2
    TRANSLATED = 3


@dataclass(frozen=True)
class Identity:
    vm_id: str
    vcpu_id: int
    asid: int
    vmpl: int
    token: bytes


@dataclass
class HostMap:
    map_id: str
    pfn: int
    holder: str
    since: float


class Notifier(Protocol):
    async def kick(self, asid: int, pfn: int, reason: str, terminate: bool) -> bool:
        """Ask kvm to kick the ASID's vCPUs; True once kvm acknowledged."""


class _NoSubscriber:
    async def kick(self, asid: int, pfn: int, reason: str, terminate: bool) -> bool:
        return False


class HostPanic(Unavailable):
    default_reason = "HOST_PANIC"


@dataclass
class Counters:
    updates: Counter[tuple[str, int]] = field(default_factory=Counter)
    violations: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    leaked_pages: int = 0
    panics: int = 0
    leaked_maps: int = 0


def dump_entry(table: RmpTable, pfn: int) -> list[str]:
    """The lines the kernel logs about pfn's RMP entry (an RMP fault, a failed RMPUPDATE, a leak).

    KERNEL: arch/x86/virt/svm/sev.c dump_rmpentry(), reached through snp_dump_hva_rmpentry(),
    rmpupdate() and __snp_leak_pages(). The raw 16-byte entry prints as two u64, lo then hi.
    An assigned entry prints one line; an unassigned one prints a header line and then every
    non-zero raw entry of the 2M region it lies in. Each line is the pr_info() text without
    the "SEV-SNP: " pr_fmt prefix the kernel log adds in front of it.
    """
    lo, hi = int(table.lo[pfn]), int(table.hi[pfn])
    # The kernel tests e.assigned of get_rmpentry(pfn): the PFN's own entry, not the 2M one
    # (the 4K entries inside an assigned 2M page read ASSIGNED themselves, see rmp/table.py).
    if lo & ASSIGNED:
        return [f"PFN 0x{pfn:x}, RMP entry: [0x{lo:016x} - 0x{hi:016x}]"]
    # pfn_i = ALIGN_DOWN(pfn, PTRS_PER_PMD); pfn_end = pfn_i + PTRS_PER_PMD
    a = pfn & ALIGN_MASK
    end = a + PAGES_PER_2M
    lines = [
        f"PFN 0x{pfn:x} unassigned, dumping non-zero entries in 2M PFN region: "
        f"[0x{a:x} - 0x{end:x}]"
    ]
    nonzero = np.flatnonzero((table.lo[a:end] != 0) | (table.hi[a:end] != 0))
    for i in nonzero:
        e_lo, e_hi = int(table.lo[a + i]), int(table.hi[a + i])
        lines.append(f"PFN: 0x{a + i:x}, [0x{e_lo:016x} - 0x{e_hi:016x}]")
    return lines


class RmpMachine:
    def __init__(
        self,
        memory_bytes: int,
        *,
        iommu: IommuMode = IommuMode.TRANSLATED,
        policy: Policy = Policy.GMEM,
        hold_s: float = 0.0,
        map_leak_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if memory_bytes % (PAGE_SIZE * PAGES_PER_2M) or memory_bytes <= 0:
            raise InvalidArgument("memory size must be a positive multiple of 2 MiB")
        self.npages = memory_bytes >> PAGE_SHIFT
        self.memory_bytes = memory_bytes
        self.iommu = iommu
        self.policy = policy
        self.table = RmpTable(self.npages, hold_s=hold_s, clock=clock)
        self.frames = FrameStore(self.npages)
        self.allocator = FrameAllocator(self.npages)
        self.keys = MemoryKeys()
        self.npts: dict[int, NestedPageTable] = {}
        self.identities: dict[tuple[str, int], Identity] = {}
        self.maps: dict[str, HostMap] = {}
        self.map_leak_s = map_leak_s
        self.clock = clock
        self.counters = Counters()
        self.notifier: Notifier = _NoSubscriber()
        self.panicked: str | None = None
        self.on_panic: Callable[[str], Awaitable[None]] | None = None
        # Every core has executed WBINVD since the firmware last cleared this (see wbinvd()).
        self.wbinvd_indicator = True

    # --- platform -------------------------------------------------------------------------

    @property
    def snp_capable(self) -> bool:
        # SNP needs an IOMMU that is on and not passthrough, and an RMP covering all memory.
        # KERNEL: drivers/iommu/amd/init.c amd_iommu_snp_enable(); arch/x86/virt/svm/sev.c
        return self.iommu == IommuMode.TRANSLATED

    def check_alive(self) -> None:
        if self.panicked is not None:
            raise HostPanic(f"the virtual host panicked: {self.panicked}; restart rmp (a reboot)")

    # --- caches ---------------------------------------------------------------------------

    def wbinvd(self) -> None:
        """WBINVD on every core, as wbinvd_on_all_cpus() runs it: sets the WBINVD indicator.

        The model's memory has no caches to write back; what it keeps is the indicator the firmware
        checks. DEACTIVATE (SNP: SNP_DECOMMISSION) clears it and SNP_DF_FLUSH needs it set, which is
        why the kernel runs wbinvd_on_all_cpus() right before every DF_FLUSH. KERNEL:
        arch/x86/kvm/svm/sev.c sev_flush_asids() ("DEACTIVATE will clear the WBINVD indicator
        causing DF_FLUSH to fail"); drivers/crypto/ccp/sev-dev.c __sev_snp_init_locked()
        UNVERIFIED(wbinvd-one-indicator): one indicator for the whole host (on hardware each core
        executes WBINVD; a host op here stands for all of them, as wbinvd_on_all_cpus() does).
        """
        self.check_alive()
        self.wbinvd_indicator = True

    def fw_wbinvd_indicator(self, clear: bool) -> bool:
        """The firmware reads the WBINVD indicator, and clears it when asked (SNP_DECOMMISSION)."""
        self.check_alive()
        was = self.wbinvd_indicator
        if clear:
            self.wbinvd_indicator = False
        return was

    def _pfn(self, spa: int) -> int:
        pfn = spa >> PAGE_SHIFT
        if not 0 <= pfn < self.npages:
            raise InvalidArgument(
                f"SPA {spa:#x} is beyond host memory ({self.memory_bytes:#x} bytes)"
            )
        return pfn

    def entry(self, pfn: int) -> Entry:
        if not 0 <= pfn < self.npages:
            raise InvalidArgument(f"PFN {pfn:#x} is beyond host memory (max {self.npages - 1:#x})")
        return self.table.entry(pfn, leaked=bool(self.allocator.leaked[pfn]))

    # --- counters ----------------------------------------------------------------------------

    def count(self, instruction: str, codes: np.ndarray | list[int] | int) -> None:  # type: ignore[type-arg]
        if isinstance(codes, int):
            self.counters.updates[(instruction, codes)] += 1
            return
        # Codes are hardware EAX values 0..255: one bincount instead of a sort.
        tally = np.bincount(np.asarray(codes, dtype=np.uint8), minlength=256)
        for v in np.flatnonzero(tally):
            self.counters.updates[(instruction, int(v))] += int(tally[v])

    # --- host instructions ----------------------------------------------------------------------

    def rmpupdate(
        self, spa: int, *, gpa: int, assigned: bool, size_2m: bool, immutable: bool, asid: int
    ) -> Code:
        self.check_alive()
        if spa & (PAGE_SIZE - 1):
            code = Code.FAIL_INPUT
        else:
            code = self.table.rmpupdate(
                spa >> PAGE_SHIFT,
                gpa=gpa,
                assigned=assigned,
                size_2m=size_2m,
                immutable=immutable,
                asid=asid,
            )
        if code != Code.SUCCESS:
            log.info(
                "RMPUPDATE failed for PFN %x, pg_level: %d, ret: %d",
                spa >> PAGE_SHIFT,
                2 if size_2m else 1,
                code,
                extra={"event": "rmpupdate_failed", "spa": spa, "code": int(code)},
            )
        self.count("rmpupdate", int(code))
        return code

    def psmash(self, spa: int) -> Code:
        self.check_alive()
        code = Code.FAIL_INPUT if spa & (PAGE_SIZE - 1) else self.table.psmash(spa >> PAGE_SHIFT)
        self.count("psmash", int(code))
        return code

    # --- guest identity ---------------------------------------------------------------------

    def register(self, ident: Identity) -> None:
        if not 1 <= ident.asid <= MAX_ASID or not 0 <= ident.vmpl <= 3:
            raise InvalidArgument("identity needs an ASID in 1..1023 and a VMPL in 0..3")
        if len(ident.token) < 16:
            raise InvalidArgument("identity token must be at least 16 bytes")
        key = (ident.vm_id, ident.vcpu_id)
        if key in self.identities:
            raise WrongState(
                f"vCPU {ident.vcpu_id} of VM {ident.vm_id} already has an identity",
                reason="ALREADY_REGISTERED",
            )
        self.identities[key] = ident

    def revoke(self, vm_id: str, vcpu_id: int) -> None:
        if self.identities.pop((vm_id, vcpu_id), None) is None:
            raise NotFound(f"no identity for vCPU {vcpu_id} of VM {vm_id}")

    def guest(self, vm_id: str, vcpu_id: int, asid: int, token: bytes) -> Identity:
        """The registered identity a guest operation presents, or PermissionDenied."""
        self.check_alive()
        ident = self.identities.get((vm_id, vcpu_id))
        if ident is None or not secrets.compare_digest(ident.token, token) or ident.asid != asid:
            raise PermissionDenied(
                "guest-mode operations need a vCPU identity issued by kvm",
                reason="BAD_VCPU_IDENTITY",
            )
        return ident

    # --- nested paging -----------------------------------------------------------------------

    def npt(self, asid: int) -> NestedPageTable:
        return self.npts.setdefault(asid, NestedPageTable())

    def translate(self, ident: Identity, gpa: int) -> int | None:
        table = self.npts.get(ident.asid)
        return None if table is None else table.translate(gpa)

    # --- guest instructions -------------------------------------------------------------------

    def pvalidate(
        self, ident: Identity, gpa: int, *, size_2m: bool, validate: bool
    ) -> Code | Fault:
        pfn = self.translate(ident, gpa)
        if pfn is None:
            return npf(gpa, "GPA not mapped in the nested page table", write=True)
        result = self.table.pvalidate(
            pfn, gpa=gpa, asid=ident.asid, vmpl=ident.vmpl, size_2m=size_2m, validate=validate
        )
        self.count("pvalidate", int(result) if isinstance(result, Code) else -1)
        return result

    def pvalidate_batch(
        self,
        ident: Identity,
        gpas: np.ndarray,
        *,
        validate: bool,  # type: ignore[type-arg]
    ) -> tuple[np.ndarray, Fault | None]:  # type: ignore[type-arg]
        table = self.npts.get(ident.asid)
        pfns = (
            table.translate_many(gpas)
            if table is not None
            else np.full(len(gpas), -1, dtype=np.int64)
        )
        unmapped = pfns < 0
        stop = int(np.argmax(unmapped)) if unmapped.any() else len(gpas)
        codes, fault = self.table.pvalidate_batch(
            pfns[:stop], gpas[:stop], asid=ident.asid, vmpl=ident.vmpl, validate=validate
        )
        if fault is None and stop < len(gpas):
            fault = npf(int(gpas[stop]), "GPA not mapped in the nested page table", write=True)
        self.count("pvalidate", codes)
        if fault is not None:
            self.count("pvalidate", -1)
        return codes, fault

    def rmpadjust(
        self,
        ident: Identity,
        gpa: int,
        *,
        size_2m: bool,
        target_vmpl: int,
        perms: int,
        vmsa: bool,
    ) -> Code | Fault:
        pfn = self.translate(ident, gpa)
        if pfn is None:
            return npf(gpa, "GPA not mapped in the nested page table")
        result = self.table.rmpadjust(
            pfn,
            gpa=gpa,
            asid=ident.asid,
            vmpl=ident.vmpl,
            size_2m=size_2m,
            target_vmpl=target_vmpl,
            perms=perms,
            vmsa=vmsa,
        )
        self.count("rmpadjust", int(result) if isinstance(result, Code) else -1)
        return result

    # --- guest memory access ------------------------------------------------------------------

    def _guest_page(
        self, ident: Identity, gpa: int, *, private: bool, write: bool
    ) -> tuple[int, Fault | None]:
        pfn = self.translate(ident, gpa)
        if pfn is None:
            fault = Fault(False, (1 << 1 if write else 0) | (1 << 2), gpa, "GPA not mapped")
            return -1, fault
        lo, hi, _ = self.table.effective(pfn)
        page_gpa = gpa & ~(PAGE_SIZE - 1)
        if not private:
            if lo & ASSIGNED:
                # C=0 access to a guest-owned page is an RMP violation. SPEC: APM vol 2, 15.36.10
                return pfn, npf(gpa, "shared access to a private page", write=write, enc=False)
            return pfn, None
        if not lo & ASSIGNED:
            return pfn, npf(gpa, "private access to a shared page", write=write)
        if (lo & ASID_MASK) >> ASID_SHIFT != ident.asid or lo & IMMUTABLE:
            return pfn, npf(gpa, "page not owned by this guest", write=write)
        if (lo & GPA_MASK) != (page_gpa & GPA_MASK):
            return pfn, npf(gpa, "GPA does not match the RMP entry", write=write)
        if not lo & VALIDATED:
            return pfn, Fault(True, VC_PAGE_NOT_VALIDATED, gpa, "page not validated")
        if ident.vmpl > 0:
            need = PERM_WRITE if write else PERM_READ
            if not (hi >> PERM_SHIFTS[ident.vmpl - 1]) & need:
                return pfn, npf(gpa, "VMPL permission", write=write, vmpl=True)
        return pfn, None

    def _span(self, gpa: int, length: int) -> list[tuple[int, int, int]]:
        if not 0 < length <= MAX_ACCESS:
            raise InvalidArgument(f"access length must be in 1..{MAX_ACCESS}")
        pieces = []
        pos, end = gpa, gpa + length
        while pos < end:
            offset = pos & (PAGE_SIZE - 1)
            n = min(PAGE_SIZE - offset, end - pos)
            pieces.append((pos, offset, n))
            pos += n
        return pieces

    def guest_read(
        self, ident: Identity, gpa: int, length: int, *, private: bool
    ) -> tuple[bytes, Fault | None]:
        out = bytearray()
        for pos, offset, n in self._span(gpa, length):
            pfn, fault = self._guest_page(ident, pos, private=private, write=False)
            if fault is not None:
                return bytes(out), fault
            page = self.frames.read(pfn)
            if private:
                page = self.keys.decrypt(ident.asid, pfn << PAGE_SHIFT, page)
            out += page[offset : offset + n]
        return bytes(out), None

    def guest_write(self, ident: Identity, gpa: int, data: bytes, *, private: bool) -> Fault | None:
        done = 0
        for pos, offset, n in self._span(gpa, len(data)):
            pfn, fault = self._guest_page(ident, pos, private=private, write=True)
            if fault is not None:
                return fault
            chunk = data[done : done + n]
            done += n
            if private:
                spa = pfn << PAGE_SHIFT
                page = bytearray(self.keys.decrypt(ident.asid, spa, self.frames.read(pfn)))
                page[offset : offset + n] = chunk
                self.frames.replace(pfn, self.keys.encrypt(ident.asid, spa, bytes(page)))
            else:
                self.frames.write(pfn, offset, chunk)
        return None

    # --- host memory access --------------------------------------------------------------------

    def host_read(self, spa: int, length: int) -> bytes:
        """No RMP check on reads: a private page reads as ciphertext."""
        self.check_alive()
        if not 0 < length <= MAX_ACCESS:
            raise InvalidArgument(f"length must be in 1..{MAX_ACCESS}")
        self._pfn(spa)
        self._pfn(spa + length - 1)
        out = bytearray()
        pos, end = spa, spa + length
        while pos < end:
            offset = pos & (PAGE_SIZE - 1)
            n = min(PAGE_SIZE - offset, end - pos)
            out += self.frames.read(pos >> PAGE_SHIFT)[offset : offset + n]
            pos += n
        return bytes(out)

    async def host_write(
        self, spa: int, data: bytes, origin: Origin, writer: str
    ) -> tuple[Outcome, Entry | None, list[str]]:
        """A host write. A write to an assigned page is an RMP violation: the policy decides."""
        self.check_alive()
        if not data or (spa & (PAGE_SIZE - 1)) + len(data) > PAGE_SIZE:
            raise InvalidArgument("a host write covers 1..4096 bytes within one page")
        pfn = self._pfn(spa)
        lo = self.table.effective(pfn)[0]
        if not lo & ASSIGNED:
            self.frames.write(pfn, spa & (PAGE_SIZE - 1), data)
            return Outcome.NONE, None, []
        entry = self.entry(pfn)
        dump = dump_entry(self.table, pfn)
        outcome = await self._violation(pfn, lo, origin)
        if outcome == Outcome.CONVERTED:
            self.frames.write(pfn, spa & (PAGE_SIZE - 1), data)
        self.counters.violations[
            (origin.name.lower(), self.policy.label, outcome.name.lower())
        ] += 1
        log.warning(
            "RMP violation: %s write by %s to PFN 0x%x under %s: %s",
            origin.name.lower(),
            writer or "unknown",
            pfn,
            self.policy.label,
            outcome.name.lower(),
            extra={"event": "rmp_violation", "rmp_dump": dump, "asid": entry.asid},
        )
        if outcome == Outcome.PANIC:
            await self.panic(f"RMP violation by a kernel write to PFN 0x{pfn:x}", dump)
        return outcome, entry, dump

    async def _violation(self, pfn: int, lo: int, origin: Origin) -> Outcome:
        policy = self.policy
        if policy == Policy.SIGBUS:
            return Outcome.SIGBUS if origin == Origin.USER else Outcome.PANIC
        if policy == Policy.GMEM:
            # guest_memfd: private memory is never mapped into host userspace, so the user
            # access fails cleanly; a kernel RMP #PF is fatal.
            return Outcome.REFUSED if origin == Origin.USER else Outcome.PANIC
        asid = (lo & ASID_MASK) >> ASID_SHIFT
        if await self._convert_to_shared(pfn, lo):
            if policy == Policy.CONVERT_KILL and asid:
                await self.notifier.kick(asid, pfn, "guest memory converted by the host", True)
            return Outcome.CONVERTED
        return Outcome.SIGBUS if origin == Origin.USER else Outcome.PANIC

    async def _convert_to_shared(self, pfn: int, lo: int) -> bool:
        """RMPUPDATE the page to shared, kicking the guest's vCPUs where they are in the way."""
        if lo & IMMUTABLE:
            return False  # firmware-owned: only the firmware can release it
        asid = (lo & ASID_MASK) >> ASID_SHIFT
        a = pfn & ALIGN_MASK
        for _ in range(CONVERT_RETRIES):
            lo = self.table.effective(pfn)[0]
            if not lo & ASSIGNED:
                return True
            # A running vCPU's VMSA page cannot be converted: kick its vCPUs first.
            if lo & VMSA and asid and not await self._kick(asid, pfn, "convert a VMSA page"):
                return False
            if lo & PAGESIZE:
                code = self.table.psmash(a)
                self.count("psmash", int(code))
                if code == Code.FAIL_INUSE:
                    await self._kick(asid, pfn, "PSMASH in use")
                    continue
            code = self.table.rmpupdate(
                pfn, gpa=0, assigned=False, size_2m=False, immutable=False, asid=0
            )
            self.count("rmpupdate", int(code))
            if code == Code.SUCCESS:
                return True
            if code != Code.FAIL_INUSE:
                return False
            # Lost to a concurrent RMPADJUST/PVALIDATE: kicking the vCPUs ends the race.
            await self._kick(asid, pfn, "RMPUPDATE in use")
        return False

    async def _kick(self, asid: int, pfn: int, reason: str) -> bool:
        acked = await self.notifier.kick(asid, pfn, reason, False)
        if acked:
            self.table.release_locks(asid)
        return acked

    async def panic(self, reason: str, dump: list[str]) -> None:
        if self.panicked is not None:
            return
        self.panicked = reason
        self.counters.panics += 1
        log.critical(
            "Kernel panic - not syncing: %s",
            reason,
            extra={"event": "host_panic", "rmp_dump": dump},
        )
        if self.on_panic is not None:
            await self.on_panic(reason)

    # --- host maps (post_map_gfn / post_unmap_gfn) ----------------------------------------------

    def map_page(self, pfn: int, holder: str) -> HostMap:
        self.check_alive()
        if not 0 <= pfn < self.npages:
            raise InvalidArgument(f"PFN {pfn:#x} is beyond host memory")
        if self.table.effective(pfn)[0] & ASSIGNED:
            raise WrongState(
                f"PFN 0x{pfn:x} is private (assigned in the RMP); "
                "the host may map only shared pages",
                reason="PAGE_NOT_SHARED",
            )
        m = HostMap(uuid.uuid4().hex, pfn, holder, self.clock())
        self.maps[m.map_id] = m
        self.table.pinned[pfn] = self.table.pinned.get(pfn, 0) + 1
        return m

    def unmap_page(self, map_id: str) -> None:
        m = self.maps.pop(map_id, None)
        if m is None:
            raise NotFound(f"no host mapping {map_id!r}")
        left = self.table.pinned[m.pfn] - 1
        if left:
            self.table.pinned[m.pfn] = left
        else:
            del self.table.pinned[m.pfn]

    def stale_maps(self) -> list[HostMap]:
        """Maps held longer than the leak threshold: every map must have an unmap."""
        now = self.clock()
        return [m for m in self.maps.values() if now - m.since > self.map_leak_s]

    # --- allocation and leaks --------------------------------------------------------------------

    def allocate(self, count: int, placement: Placement) -> list[int]:
        self.check_alive()
        return self.allocator.allocate(count, placement)

    def free(self, pfns: list[int]) -> None:
        self.check_alive()
        for pfn in pfns:
            lo = self.table.effective(pfn)[0] if 0 <= pfn < self.npages else 0
            if lo & (ASSIGNED | IMMUTABLE):
                raise WrongState(
                    f"PFN 0x{pfn:x} is not in hypervisor state; reclaim and RMPUPDATE it to "
                    "shared first, or leak it",
                    reason="PAGE_NOT_HYPERVISOR",
                )
        self.allocator.release(pfns)
        for pfn in pfns:
            self.frames.replace(pfn, bytes(PAGE_SIZE))

    def leak(self, pfns: list[int], reason: str) -> int:
        for pfn in pfns:
            if not 0 <= pfn < self.npages:
                raise InvalidArgument(f"PFN {pfn:#x} is beyond host memory")
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

    # --- the firmware's own access (the AMD-SP writes memory and the RMP directly) ------------

    def fw_transition(self, spas: list[int], op: FwOp, asid: int = 0) -> list[bool]:
        self.check_alive()
        return [
            not spa & (PAGE_SIZE - 1) and self.table.fw_transition(spa >> PAGE_SHIFT, op, asid)
            for spa in spas
        ]

    def _fw_pages(
        self, spa: int, length: int, expect: tuple[PageState, ...] = ()
    ) -> list[tuple[int, int, int]]:
        self.check_alive()
        if not 0 < length <= MAX_ACCESS:
            raise InvalidArgument(f"length must be in 1..{MAX_ACCESS}")
        self._pfn(spa)
        self._pfn(spa + length - 1)
        out, pos, end = [], spa, spa + length
        while pos < end:
            offset = pos & (PAGE_SIZE - 1)
            n = min(PAGE_SIZE - offset, end - pos)
            out.append((pos >> PAGE_SHIFT, offset, n))
            pos += n
        if expect:
            for pfn, _, _ in out:
                self.check_state(pfn, expect)
        return out

    def check_state(self, pfn: int, expect: tuple[PageState, ...]) -> None:
        """WrongState(PAGE_STATE_MISMATCH) unless the page is in one of the states."""
        if not 0 <= pfn < self.npages:
            raise InvalidArgument(f"PFN {pfn:#x} is beyond host memory")
        state = self.table.entry(pfn).state
        if state not in expect:
            raise WrongState(
                f"PFN 0x{pfn:x} is {state.name}, not {' or '.join(s.name for s in expect)}",
                reason="PAGE_STATE_MISMATCH",
                metadata={"pfn": f"0x{pfn:x}", "state": state.name},
            )

    def fw_read(
        self,
        spa: int,
        length: int,
        asid: int = 0,
        expect: tuple[PageState, ...] = (),
        checks: tuple[tuple[int, tuple[PageState, ...]], ...] = (),
    ) -> bytes:
        """Read as the firmware: with asid, decrypt with that guest's key; with expect, only
        from pages in those states; checks: other pages' states, in the same step."""
        for other, states in checks:
            self.check_state(other >> PAGE_SHIFT, states)
        out = bytearray()
        for pfn, offset, n in self._fw_pages(spa, length, expect):
            page = self.frames.read(pfn)
            if asid:
                page = self.keys.decrypt(asid, pfn << PAGE_SHIFT, page)
            out += page[offset : offset + n]
        return bytes(out)

    def fw_write(
        self, spa: int, data: bytes, asid: int = 0, expect: tuple[PageState, ...] = ()
    ) -> None:
        """Write as the firmware: with asid, encrypt with that guest's key (e.g. LAUNCH_UPDATE)."""
        done = 0
        for pfn, offset, n in self._fw_pages(spa, len(data), expect):
            chunk = data[done : done + n]
            done += n
            if asid:
                base = pfn << PAGE_SHIFT
                page = bytearray(self.keys.decrypt(asid, base, self.frames.read(pfn)))
                page[offset : offset + n] = chunk
                self.frames.replace(pfn, self.keys.encrypt(asid, base, bytes(page)))
            else:
                self.frames.write(pfn, offset, chunk)
