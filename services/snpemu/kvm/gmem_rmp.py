"""A gmem VM's RMP: pages made private when guest_memfd prepares them for the guest and shared
when it invalidates them, not when the guest asks (its PSC only changes memory attributes,
kvm/exits/map_gpa.py).

KERNEL: arch/x86/kvm/svm/sev.c sev_gmem_prepare() (a page not yet assigned becomes private:
rmp_make_private(pfn, gpa, level, asid, false), so not validated), sev_gmem_invalidate() (every
assigned page becomes shared, a 2M entry PSMASHed first unless the range covers it whole);
virt/kvm/guest_memfd.c kvm_gmem_prepare_folio(), kvm_gmem_invalidate_begin().

UNVERIFIED(one-backing): mainline prepares a page on the guest's first private fault after
its conversion, and invalidates it when the VMM punches it out of the guest_memfd (QEMU does
so on every conversion to shared: kvm_convert_memory() -> ram_block_discard_guest_memfd_range());
the guest's shared accesses then reach another frame, the memslot's userspace memory. Here one
frame backs a GPA either way, so SetMemoryAttributes on a running VM does both at once on the
pages already backed (`convert`), and a page first backed by a guest fault is prepared if its
attribute is private (`prepare_fault`). Pages are prepared 4K at a time (mainline takes a 2M
entry when the whole 2M folio is unassigned): with one frame per GPA, a 2M private entry would
take the shared pages beside it too.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

from snpemu.abi import rmp_batch
from snpemu.abi.addr import PAGE_SIZE, PMD_SIZE, Pfn, Spa, page_bytes, pfn_to_spa
from snpemu.abi.rmp import Code
from snpemu.kvm.host_access import HostAccess
from snpemu.kvm.pages import BATCH_MAX
from snpemu.kvm.ports import RmpPort
from snpemu.kvm.vm import MemoryModel, Vm, VmState

if TYPE_CHECKING:
    from snpemu.kvm.machine import Counters


class Kvm(Protocol):
    """What preparing and invalidating pages needs of kvm."""

    @property
    def rmp(self) -> RmpPort: ...

    @property
    def counters(self) -> Counters: ...


log = logging.getLogger(__name__)

READ_MAX = 4096  # RmpPort.read_entries() takes at most this many PFNs


def _backed(vm: Vm, start: int, end: int) -> list[tuple[int, int, int]]:
    """(gpa, first pfn, pages) of each backed piece of [start, end)."""
    out = []
    for r in vm.memslots.runs:
        lo, hi = max(start, r.gpa), min(end, r.gpa + page_bytes(r.npages))
        if lo < hi:
            out.append((lo, r.first_pfn + (lo - r.gpa) // PAGE_SIZE, (hi - lo) // PAGE_SIZE))
    return out


async def _assigned(kvm: Kvm, pfn: int, n: int) -> dict[int, tuple[int, bool]]:
    """pfn -> (asid, 2M entry) of the assigned pages of n PFNs from pfn."""
    out: dict[int, tuple[int, bool]] = {}
    for first in range(pfn, pfn + n, READ_MAX):
        count = min(READ_MAX, pfn + n - first)
        for e in await kvm.rmp.read_entries(Pfn(first), count):
            if e.assigned:
                out[e.pfn] = (e.asid, e.size_2m)
    return out


async def convert(kvm: Kvm, vm: Vm, start: int, end: int, private: bool) -> None:
    """SetMemoryAttributes' RMP side for a running gmem VM (the module's doc); the caller
    holds vm.fault_lock."""
    if vm.memory_model != MemoryModel.GMEM or vm.state != VmState.RUNNING:
        return  # before the guest runs nothing has faulted, so nothing was prepared
    if private:
        await _prepare(kvm, vm, start, end)
    else:
        await _invalidate(kvm, vm, start, end)


async def prepare_fault(kvm: Kvm, vm: Vm, gpa: int) -> None:
    """The private pages of the 2M range a guest fault just backed, prepared (the folio
    kvm_gmem_get_pfn() hands the fault; kvm/gmem.py takes frames 2 MiB at a time)."""
    if vm.memory_model != MemoryModel.GMEM:
        return
    lo = gpa - gpa % PMD_SIZE
    async with vm.fault_lock:
        for s, e in vm.attributes.ranges():
            if s < lo + PMD_SIZE and lo < e:
                await _prepare(kvm, vm, max(s, lo), min(e, lo + PMD_SIZE))


async def _prepare(kvm: Kvm, vm: Vm, start: int, end: int) -> None:
    """KERNEL: sev_gmem_prepare(): an assigned page is left as it is (`already assigned`)."""
    spa: list[int] = []
    gpa: list[int] = []
    for g, pfn, n in _backed(vm, start, end):
        taken = await _assigned(kvm, pfn, n)
        for i in range(n):
            if pfn + i not in taken:
                spa.append(pfn_to_spa(pfn + i))
                gpa.append(g + page_bytes(i))
    if spa:
        entries = rmp_batch.pack(spa, gpa=gpa, assigned=True, asid=vm.asid)
        await _apply(kvm, vm, entries, spa, "private")


async def _invalidate(kvm: Kvm, vm: Vm, start: int, end: int) -> None:
    """KERNEL: sev_gmem_invalidate(): only assigned pages change; a 2M entry is PSMASHed
    first (here always: the batch takes 4K entries), its failure reported and the update
    tried anyway, as the kernel's WARN_ONCE does."""
    spa: list[int] = []
    for _, pfn, n in _backed(vm, start, end):
        taken = await _assigned(kvm, pfn, n)
        heads = {p - p % 512 for p, (_, huge) in taken.items() if huge}
        for head in sorted(heads):
            code = await HostAccess(kvm.rmp).psmash(Spa(pfn_to_spa(head)))
            if code != Code.SUCCESS:
                log.warning(
                    "PSMASH of PFN %#x for %s failed: %s",
                    head,
                    vm.vm_id,
                    code.name,
                    extra={"event": "gmem_invalidate_psmash_failed", "vm": vm.vm_id},
                )
        if heads:
            taken = await _assigned(kvm, pfn, n)
        spa += [pfn_to_spa(p) for p in sorted(taken)]
    if spa:
        await _apply(kvm, vm, rmp_batch.pack(spa), spa, "shared")


async def _apply(kvm: Kvm, vm: Vm, entries: bytes, spa: list[int], op: str) -> None:
    size = len(entries) // len(spa)
    codes = b""
    for i in range(0, len(spa), BATCH_MAX):  # rmp takes at most BATCH_MAX entries a batch
        codes += await kvm.rmp.session_rmpupdate_batch(entries[i * size : (i + BATCH_MAX) * size])
    failed = [s for s, c in zip(spa, codes, strict=True) if c]
    kvm.counters.psc_pages[(op, "4k")] += len(spa) - len(failed)
    if failed:
        # KERNEL: both paths report a failed RMPUPDATE and go on (pr_err / WARN_ONCE); the
        # page stays as it was, and the guest's access to it then faults
        log.warning(
            "%s: %d of %d pages not made %s (first SPA %#x)",
            vm.vm_id,
            len(failed),
            len(spa),
            op,
            failed[0],
            extra={"event": "gmem_rmpupdate_failed", "vm": vm.vm_id},
        )
