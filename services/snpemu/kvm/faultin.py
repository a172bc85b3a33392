"""Guest memory backed when it is first used: the frames of a guest_memfd chunk taken, the
memslot's translation and the NPT extended to them.

KVM builds the NPT on faults (kvm_mmu_page_fault() -> kvm_faultin_pfn(), which for a
guest_memfd slot asks kvm_gmem_get_pfn(), whose file takes a folio the first time), and what
KVM itself touches (a PSC's pages, SNP_LAUNCH_UPDATE's through kvm_gmem_populate(), the pages
it writes for the guest) comes in the same way. `faultin()` is that path for a GPA range:
whatever of it lies in a memslot is backed and mapped when it returns; the rest is left alone
(the caller's "no memslot" answer).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from snpemu.abi.addr import PAGE_SIZE, PAGES_PER_2M, Pfn, page_bytes
from snpemu.abi.rmp import Placement
from snpemu.kvm.gmem import GuestMemfd, GuestMemfds
from snpemu.kvm.ports import RmpPort
from snpemu.kvm.vm import Run, UserMemslot, Vm


class Host(Protocol):
    """What backing memory needs of kvm: its guest_memfds and rmp."""

    @property
    def gmems(self) -> GuestMemfds: ...

    @property
    def rmp(self) -> RmpPort: ...


def _chunks(slot: UserMemslot, gpa: int, end: int) -> range:
    """The guest_memfd chunks the slot's part of [gpa, end) lies in."""
    lo, hi = max(gpa, slot.gpa), min(end, slot.gpa + slot.size)
    first = (slot.gmem_offset + lo - slot.gpa) // PAGE_SIZE
    last = (slot.gmem_offset + hi - slot.gpa - 1) // PAGE_SIZE
    return range(first // PAGES_PER_2M, last // PAGES_PER_2M + 1)


async def faultin(kvm: Host, vm: Vm, gpa: int, size: int) -> None:
    """Back and map every page of [gpa, gpa+size) that a memslot holds."""
    await faultin_ranges(kvm, vm, [(gpa, gpa + size)])


async def faultin_ranges(kvm: Host, vm: Vm, ranges: Sequence[tuple[int, int]]) -> None:
    """faultin() of each [start, end): one allocation and one NPT update for them all."""
    async with vm.fault_lock:
        if vm.backing_released:
            return  # torn down (kvm/teardown.py release()): nothing is backed again
        wanted: dict[tuple[int, int, int], tuple[UserMemslot, GuestMemfd, int]] = {}
        for gpa, end in ranges:
            for slot in vm.slots.values():
                if gpa < slot.gpa + slot.size and slot.gpa < end:
                    g = kvm.gmems.by_fd[slot.gmem_fd]
                    for c in _chunks(slot, gpa, end):
                        wanted[(slot.slot, g.fd, c)] = (slot, g, c)
        if not wanted:
            return
        await _take_frames(kvm, list({(g.fd, c): (g, c) for _, g, c in wanted.values()}.values()))
        pieces = [(slot, p) for slot, g, c in wanted.values() if (p := _unmapped(vm, slot, g, c))]
        added: list[Run] = []
        for (slot, _), runs in zip(
            pieces, vm.memslots.add_many([p for _, p in pieces]), strict=True
        ):
            slot.runs.extend(runs)
            added += runs
        if not added or not vm.sev_active:
            return  # no ASID, no NPT yet: KVM_SEV_INIT2 maps what is there
        try:
            await kvm.rmp.update_npt(vm.vm_id, vm.asid, map=added)
        except BaseException:
            # not in the translation, so the next use maps them again; DestroyVm unmaps them
            # in case rmp mapped them before its answer was lost
            _unmap_runs(vm, added)
            vm.stale_runs += added
            raise


async def _take_frames(kvm: Host, chunks: list[tuple[GuestMemfd, int]]) -> None:
    """The frames of every chunk not yet backed: whole chunks 2M-aligned in one allocation,
    a short last chunk on its own."""
    missing = [(g, c) for g, c in chunks if c not in g.chunks]
    whole = [(g, c) for g, c in missing if g.chunk_pages(c) == PAGES_PER_2M]
    short = [(g, c) for g, c in missing if g.chunk_pages(c) < PAGES_PER_2M]
    if whole:
        pfns = await kvm.rmp.allocate(len(whole) * PAGES_PER_2M, Placement.ALIGNED_2M)
        for i, (g, c) in enumerate(whole):
            g.chunks[c] = pfns[i * PAGES_PER_2M : (i + 1) * PAGES_PER_2M]
    for g, c in short:
        g.chunks[c] = await kvm.rmp.allocate(g.chunk_pages(c), Placement.ANY)


def _unmapped(vm: Vm, slot: UserMemslot, g: GuestMemfd, chunk: int) -> tuple[int, list[Pfn]] | None:
    """The chunk's pages the slot binds, from which GPA, unless they are mapped already."""
    first_page, count = g.bindings[slot.slot]
    lo = max(chunk * PAGES_PER_2M, first_page)
    hi = min(chunk * PAGES_PER_2M + g.chunk_pages(chunk), first_page + count)
    start = slot.gpa + page_bytes(lo - first_page)
    if lo >= hi or vm.memslots.translate(start) is not None:
        return None  # INVARIANT: a chunk's pages in a slot are mapped all together or not at all
    base = chunk * PAGES_PER_2M
    return start, g.chunks[chunk][lo - base : hi - base]


def _unmap_runs(vm: Vm, runs: list[Run]) -> None:
    vm.memslots.remove(runs)
    gone = set(runs)
    for slot in vm.slots.values():
        slot.runs[:] = [r for r in slot.runs if r not in gone]
