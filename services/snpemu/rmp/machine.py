"""The rmp model: memory, RMP, keys, nested paging, host maps and the violation policy.

Free of gRPC: the servicer adapts it. `RmpMachine` is the facade the servicer, psp's in-process
port and the tests use; it holds the platform (memory size, IOMMU, the WBINVD indicator) and
composes the parts, each in its own module:

    table.py        the RMP entries and the instructions that change them
    identities.py   the vCPU identities kvm registers and guest operations present
    paging.py       the nested page tables, one per ASID
    guest_insns.py  PVALIDATE and RMPADJUST at a guest's GPA
    access.py       guest, host and firmware memory access (page pieces, en/decryption)
    violations.py   the policy for a host write to an assigned page; kicks; the panic
    host_maps.py    host maps of shared pages (post_map_gfn / post_unmap_gfn)
    allocation.py   frames allocated, freed and leaked
    counters.py     what the metrics adapter (metrics.py) reads
    reasons.py      the reasons rmp's errors carry

Host and guest operations are plain methods; the one that may wait (a host write under
`convert`, which kicks the guest's vCPUs through kvm) is a coroutine.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from snpemu.abi.addr import (
    PAGE_SHIFT,
    PAGE_SIZE,
    PAGES_PER_2M,
    page_aligned,
    page_offset,
    pages,
    spa_to_pfn,
)
from snpemu.abi.rmp import AccessOrigin, Code, FwOp, PageState, Placement
from snpemu.errors import InvalidArgument
from snpemu.rmp import checks
from snpemu.rmp.access import MemoryAccess
from snpemu.rmp.allocation import Allocation
from snpemu.rmp.counters import Counters
from snpemu.rmp.crypto import MemoryKeys
from snpemu.rmp.entry import ASSIGNED, Entry
from snpemu.rmp.fault import Fault
from snpemu.rmp.guest_insns import GuestInstructions
from snpemu.rmp.host_maps import HeldMap, HostMap, HostMaps
from snpemu.rmp.identities import Identities, Identity
from snpemu.rmp.memory import FrameAllocator, FrameStore
from snpemu.rmp.npt import NestedPageTable
from snpemu.rmp.paging import NestedPaging
from snpemu.rmp.reasons import RmpReason
from snpemu.rmp.table import RmpTable
from snpemu.rmp.violations import HostPanic, NoSubscriber, Notifier, Outcome, Policy, Violations

log = logging.getLogger(__name__)

# the most entries rmp lists in one call (ListRmpEntries)
MAX_LIST = 4096


class IommuMode(enum.IntEnum):
    OFF = 1
    PASSTHROUGH = 2
    TRANSLATED = 3


@dataclass(frozen=True)
class PlatformInfo:
    memory_bytes: int
    max_pfn: int
    rmp_covered_bytes: int
    iommu: IommuMode
    snp_capable: bool
    policy: Policy
    free_pages: int
    leaked_pages: int
    resident_pages: int


def _read_length(length: int) -> None:
    """One read's reply must fit one gRPC message whole."""
    checks.in_range(length, 0, checks.MAX_READ, "length")


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
        notifier: Notifier | None = None,
        on_panic: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        if memory_bytes % (PAGE_SIZE * PAGES_PER_2M) or memory_bytes <= 0:
            raise InvalidArgument("memory size must be a positive multiple of 2 MiB")
        self.npages = pages(memory_bytes)
        self.memory_bytes = memory_bytes
        self.iommu = iommu
        self.table = RmpTable(self.npages, hold_s=hold_s, clock=clock)
        self.frames = FrameStore(self.npages)
        self.allocator = FrameAllocator(self.npages)
        self.keys = MemoryKeys()
        self.identities = Identities()
        self.clock = clock
        self.counters = Counters()
        self.paging = NestedPaging(self.npages)
        self.guest_insns = GuestInstructions(self.table, self.paging, self.counters)
        self.violations = Violations(
            self.table, self.counters, policy, notifier or NoSubscriber(), on_panic
        )
        self.access = MemoryAccess(
            memory_bytes, self.table, self.frames, self.keys, self.paging, self.check_alive
        )
        self.host_maps = HostMaps(self.table, clock, map_leak_s)
        self.allocation = Allocation(self.table, self.frames, self.allocator, self.counters)
        # Every core has executed WBINVD since the firmware last cleared this (see wbinvd()).
        self.wbinvd_indicator = True

    # the platform

    @property
    def snp_capable(self) -> bool:
        # SNP needs an IOMMU that is on and not passthrough, and an RMP covering all memory.
        # KERNEL: drivers/iommu/amd/init.c amd_iommu_snp_enable(); arch/x86/virt/svm/sev.c
        return self.iommu == IommuMode.TRANSLATED

    @property
    def policy(self) -> Policy:
        return self.violations.policy

    def set_policy(self, policy: Policy) -> Policy:
        """Put the violation policy in force; returns the one it replaces."""
        self.check_alive()
        return self.violations.set_policy(policy)

    @property
    def panicked(self) -> str | None:
        return self.violations.panicked

    def check_alive(self) -> None:
        if self.violations.panicked is not None:
            raise HostPanic(
                f"the virtual host panicked: {self.violations.panicked}; restart rmp (a reboot)"
            )

    def platform_info(self) -> PlatformInfo:
        self.check_alive()
        return PlatformInfo(
            memory_bytes=self.memory_bytes,
            max_pfn=self.npages - 1,
            rmp_covered_bytes=self.memory_bytes,
            iommu=self.iommu,
            snp_capable=self.snp_capable,
            policy=self.policy,
            free_pages=self.allocator.free_count,
            leaked_pages=int(self.allocator.leaked.sum()),
            resident_pages=self.frames.resident_frames,
        )

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

    def install_key(self, asid: int, key: bytes) -> None:
        self.check_alive()
        self.keys.install(asid, key)

    def remove_key(self, asid: int) -> None:
        self.check_alive()
        self.keys.remove(asid)

    # the RMP table

    def entry(self, pfn: int) -> Entry:
        checks.pfn(pfn, self.npages)
        return self.table.entry(pfn, leaked=bool(self.allocator.leaked[pfn]))

    def list_entries(self, first: int, count: int, non_default_only: bool) -> list[Entry]:
        """count entries from PFN first (fewer at the end of memory); optionally only those
        that are not all zero."""
        self.check_alive()
        checks.in_range(count, 1, MAX_LIST, "count")
        checks.pfn(first, self.npages, "first_pfn")
        last = min(first + count, self.npages)
        if not non_default_only:
            return [self.entry(p) for p in range(first, last)]
        t, span = self.table, slice(first, last)
        nonzero = (t.lo[span] != 0) | (t.hi[span] != 0) | (t.kind[span] != 0)
        return [self.entry(first + int(i)) for i in np.flatnonzero(nonzero)]

    # host instructions

    def rmpupdate(
        self, spa: int, *, gpa: int, assigned: bool, size_2m: bool, immutable: bool, asid: int
    ) -> Code:
        self.check_alive()
        if not page_aligned(spa):
            code = Code.FAIL_INPUT
        else:
            code = self.table.rmpupdate(
                spa_to_pfn(spa),
                gpa=gpa,
                assigned=assigned,
                size_2m=size_2m,
                immutable=immutable,
                asid=asid,
            )
        if code != Code.SUCCESS:
            log.info(
                "RMPUPDATE failed for PFN %x, pg_level: %d, ret: %d",
                spa_to_pfn(spa),
                2 if size_2m else 1,
                code,
                extra={"event": "rmpupdate_failed", "spa": spa, "code": int(code)},
            )
        self.counters.count("rmpupdate", int(code))
        return code

    def rmpupdate_batch(
        self,
        spas: NDArray[np.uint64],
        gpas: NDArray[np.uint64],
        assigned: NDArray[np.bool_],
        size_2m: NDArray[np.bool_],
        immutable: NDArray[np.bool_],
        asids: NDArray[np.int64],
    ) -> NDArray[np.uint8]:
        """RMPUPDATE of each entry in order (RmpTable.rmpupdate_batch); a misaligned SPA fails
        with FAIL_INPUT."""
        self.check_alive()
        misaligned = (spas & np.uint64(PAGE_SIZE - 1)) != 0
        pfns = np.where(misaligned, -1, (spas >> np.uint64(PAGE_SHIFT)).astype(np.int64))
        codes = self.table.rmpupdate_batch(pfns, gpas, assigned, size_2m, immutable, asids)
        self.counters.count("rmpupdate", codes)
        return codes

    def psmash(self, spa: int) -> Code:
        self.check_alive()
        code = self.table.psmash(spa_to_pfn(spa)) if page_aligned(spa) else Code.FAIL_INPUT
        self.counters.count("psmash", int(code))
        return code

    # guest identities

    def register(self, ident: Identity) -> None:
        self.identities.register(ident)

    def revoke(self, vm_id: str, vcpu_id: int) -> None:
        self.identities.revoke(vm_id, vcpu_id)

    def guest(self, vm_id: str, vcpu_id: int, asid: int, token: bytes) -> Identity:
        """The registered identity a guest operation presents, or PermissionDenied."""
        self.check_alive()
        return self.identities.check(vm_id, vcpu_id, asid, token)

    # nested paging and guest instructions

    def npt(self, asid: int) -> NestedPageTable:
        return self.paging.npt(asid)

    def update_npt(
        self, asid: int, unmap: list[tuple[int, int]], map: list[tuple[int, int, int]]
    ) -> None:
        """Unmap (gpa, npages) ranges, then map (gpa, first_pfn, npages) ranges, in order."""
        self.check_alive()
        self.paging.update(asid, unmap, map)

    def translate(self, ident: Identity, gpa: int) -> int | None:
        return self.paging.translate(ident.asid, gpa)

    def guest_pfn(self, asid: int, gpa: int) -> int:
        """The PFN the ASID's nested page table maps gpa to, or InvalidArgument."""
        return self.paging.host_pfn(asid, gpa)

    def pvalidate(
        self, ident: Identity, gpa: int, *, size_2m: bool, validate: bool
    ) -> Code | Fault:
        return self.guest_insns.pvalidate(ident, gpa, size_2m=size_2m, validate=validate)

    def pvalidate_batch(
        self, ident: Identity, gpas: NDArray[np.uint64], *, validate: bool
    ) -> tuple[NDArray[np.uint8], Fault | None]:
        return self.guest_insns.pvalidate_batch(ident, gpas, validate=validate)

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
        return self.guest_insns.rmpadjust(
            ident, gpa, size_2m=size_2m, target_vmpl=target_vmpl, perms=perms, vmsa=vmsa
        )

    # memory access

    def guest_read(
        self, ident: Identity, gpa: int, length: int, *, private: bool
    ) -> tuple[bytes, Fault | None]:
        _read_length(length)
        return self.access.guest_read(ident, gpa, length, private=private)

    def guest_write(self, ident: Identity, gpa: int, data: bytes, *, private: bool) -> Fault | None:
        return self.access.guest_write(ident, gpa, data, private=private)

    def host_read(self, spa: int, length: int) -> bytes:
        _read_length(length)
        return self.access.host_read(spa, length)

    async def host_write(
        self, spa: int, data: bytes, origin: AccessOrigin, writer: str
    ) -> tuple[Outcome, Entry | None, list[str]]:
        """A host write. A write to an assigned page is an RMP violation: the policy decides."""
        self.check_alive()
        offset = page_offset(spa)
        if not data or offset + len(data) > PAGE_SIZE:
            raise InvalidArgument(
                "a host write covers 1..4096 bytes within one page", reason=RmpReason.OUT_OF_RANGE
            )
        pfn = self.access.pfn(spa)
        lo = self.table.effective(pfn)[0]
        if not lo & ASSIGNED:
            self.access.host_write_page(pfn, offset, data)
            return Outcome.NONE, None, []
        entry = self.entry(pfn)
        outcome, dump = await self.violations.violation(
            pfn,
            lo,
            origin,
            writer,
            entry.asid,
            lambda: self.access.host_write_page(pfn, offset, data),
        )
        return outcome, entry, dump

    def fw_read(
        self,
        spa: int,
        length: int,
        asid: int = 0,
        expect: tuple[PageState, ...] = (),
        checks: tuple[tuple[int, tuple[PageState, ...]], ...] = (),
    ) -> bytes:
        _read_length(length)
        return self.access.fw_read(spa, length, asid, expect, checks)

    def fw_write(
        self, spa: int, data: bytes, asid: int = 0, expect: tuple[PageState, ...] = ()
    ) -> None:
        self.access.fw_write(spa, data, asid, expect)

    # the firmware's page transitions (the AMD-SP writes the RMP directly)

    def fw_transition(self, spas: list[int], op: FwOp, asid: int = 0) -> list[bool]:
        self.check_alive()
        return [
            page_aligned(spa) and self.table.fw_transition(spa_to_pfn(spa), op, asid)
            for spa in spas
        ]

    # host maps

    @property
    def maps(self) -> dict[str, HostMap]:
        return self.host_maps.maps

    def map_page(self, pfn: int, holder: str) -> HostMap:
        self.check_alive()
        return self.host_maps.map_page(pfn, holder)

    def unmap_page(self, map_id: str) -> None:
        self.host_maps.unmap_page(map_id)

    def stale_maps(self) -> list[HostMap]:
        return self.host_maps.stale_maps()

    def held_maps(self) -> list[HeldMap]:
        return self.host_maps.held()

    # allocation and leaks

    def allocate(self, count: int, placement: Placement) -> list[int]:
        self.check_alive()
        return self.allocation.allocate(count, placement)

    def free(self, pfns: list[int]) -> None:
        self.check_alive()
        self.allocation.free(pfns)

    def leak(self, pfns: list[int], reason: str) -> int:
        return self.allocation.leak(pfns, reason)

    def leaked(self) -> list[int]:
        return self.allocation.leaked()
