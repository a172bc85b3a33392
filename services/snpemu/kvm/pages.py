"""kvm's host pages through the RMP: firmware pages given and taken back, pages made shared
again, and the reading of which pages are not. Shared by bring-up, launch and teardown."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

from snpemu.abi import rmp_batch
from snpemu.abi.addr import PAGES_PER_2M, Pfn, Spa, pfn_to_spa, spa_to_pfn
from snpemu.abi.rmp import Code, PageState, Placement
from snpemu.errors import Unavailable
from snpemu.kvm.ports import PspPort, RmpEntry, RmpPort, RmpState
from snpemu.kvm.undo import Undo
from snpemu.psp.status import SevStatus
from snpemu.runtime.peers import PeerError

FIRMWARE = RmpState(assigned=True, immutable=True)
LIST_MAX = 4096  # ListRmpEntries answers at most this many entries a call
BATCH_MAX = 65536  # pages per FreePages / RmpUpdateBatch call


async def to_firmware(rmp: RmpPort, pfns: Iterable[Pfn]) -> None:
    """RMPUPDATE to firmware state (assigned, immutable, ASID 0): what
    KERNEL: drivers/crypto/ccp/sev-dev.c rmp_mark_pages_firmware() does."""
    for pfn in pfns:
        code = await rmp.rmpupdate(pfn_to_spa(pfn), FIRMWARE)
        if code:
            raise Unavailable(f"RMPUPDATE of PFN {pfn:#x} to firmware failed: {int(code)}")


async def firmware_page(rmp: RmpPort, psp: PspPort, owner: str) -> Spa:
    """One page for the firmware (KERNEL: snp_alloc_firmware_page()); a failure hands the
    frame back before it is raised."""
    (pfn,) = await rmp.allocate(1, Placement.SNP_SAFE)
    spa = pfn_to_spa(pfn)
    async with Undo() as undo:
        undo.push("a firmware page", lambda: release_firmware_pages(rmp, psp, [spa], owner))
        await to_firmware(rmp, [pfn])
        undo.commit()
    return spa


async def release_firmware_pages(
    rmp: RmpPort, psp: PspPort, spas: Sequence[Spa], owner: str
) -> None:
    """Reclaim each page and free it; one that will not come back is leaked (never reused).
    KERNEL: drivers/crypto/ccp/sev-dev.c snp_free_firmware_page(), snp_leak_pages()."""
    free: list[Pfn] = []
    leaked: list[Pfn] = []
    for spa in spas:
        (free if await reclaim(rmp, psp, spa) else leaked).append(spa_to_pfn(spa))
    if leaked:
        await rmp.leak(leaked, reason=owner)
    if free:
        await rmp.free(free)


async def reclaim(rmp: RmpPort, psp: PspPort, spa: Spa) -> bool:
    """SNP_PAGE_RECLAIM (a page already in reclaim or hypervisor state is fine), then the page
    back to shared; False if it would not come back."""
    try:
        await psp.page_reclaim(spa)
    except PeerError as e:
        if SevStatus.from_reason(e.reason) is not SevStatus.INVALID_PAGE_STATE:
            return False
    return not await all_shared(rmp, [spa_to_pfn(spa)])


async def assigned_entries(rmp: RmpPort, pfns: Iterable[Pfn]) -> dict[Pfn, RmpEntry]:
    """The entries among pfns not in hypervisor state."""
    out: dict[Pfn, RmpEntry] = {}
    wanted = set(pfns)
    for first, count in ranges(sorted(wanted)):
        for off in range(0, count, LIST_MAX):
            entries = await rmp.read_entries(Pfn(first + off), min(LIST_MAX, count - off))
            for e in entries:
                if e.state != PageState.HYPERVISOR and e.pfn in wanted:
                    out[e.pfn] = e
    return out


async def all_shared(rmp: RmpPort, pfns: Iterable[Pfn], psp: PspPort | None = None) -> list[Pfn]:
    """RMPUPDATE every assigned page among pfns back to shared (PSMASH 2M entries first);
    returns the pages that would not go back. With `psp`, pre-guest pages (a launch that
    never finished) are reclaimed first: an immutable entry refuses RMPUPDATE
    (FAIL_PERMISSION), and only SNP_PAGE_RECLAIM, once the guest is decommissioned, makes it
    mutable. KERNEL: arch/x86/kvm/svm/sev.c sev_gmem_post_populate()'s error path takes the
    page whose SNP_LAUNCH_UPDATE failed back with snp_page_reclaim() the same way.
    UNVERIFIED(pre-guest-teardown): the kernel RMPUPDATEs the pages before it directly."""
    entries = await assigned_entries(rmp, pfns)
    if psp is not None:
        for p, e in sorted(entries.items()):
            if e.state == PageState.PRE_GUEST:
                # refused, or psp gone: its RMPUPDATE below fails, and it is leaked (counted)
                with contextlib.suppress(PeerError, Unavailable):
                    await psp.page_reclaim(pfn_to_spa(p), size_2m=e.size_2m)
    assigned = sorted(entries)
    heads = {Pfn(p - p % PAGES_PER_2M) for p, e in entries.items() if e.size_2m}
    for head in sorted(heads):
        for _ in range(8):
            if await rmp.psmash(pfn_to_spa(head)) != Code.FAIL_INUSE:  # KVM retries while in use
                break
    failed: list[Pfn] = []
    for i in range(0, len(assigned), BATCH_MAX):
        chunk = assigned[i : i + BATCH_MAX]
        codes = await rmp.rmpupdate_batch(rmp_batch.pack([pfn_to_spa(p) for p in chunk]))
        failed += [p for p, c in zip(chunk, codes, strict=True) if c]
    return failed


def ranges(pfns: list[Pfn]) -> list[tuple[Pfn, int]]:
    """Sorted PFNs as (first, count) runs of consecutive frames."""
    out: list[tuple[Pfn, int]] = []
    for p in pfns:
        if out and out[-1][0] + out[-1][1] == p:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((p, 1))
    return out
