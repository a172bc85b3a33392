"""What a previous kvm left behind when it died: its VMs' pages still assigned in the RMP, their
nested page tables and their guest contexts, under ASIDs this kvm knows nothing of.

A restarted kvm cannot tear those VMs down (it no longer has their memslots), so at bring-up it
reads the RMP for them: each guest context is decommissioned (the firmware forgets the guest and
its ASID binding), every such page is leaked, counted and never reused, instead of lost without
a trace, and their ASIDs are kept out of use, since rmp still holds the nested page tables of
those ASIDs. Frames of those VMs that were shared (hypervisor state) cannot be told apart from
any other allocated frame and stay allocated.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from snpemu.abi.addr import Pfn, pfn_to_spa
from snpemu.abi.rmp import PageState
from snpemu.kvm.pages import LIST_MAX
from snpemu.kvm.teardown import decommission
from snpemu.runtime.peers import PeerError

if TYPE_CHECKING:
    from snpemu.kvm.machine import Kvm

log = logging.getLogger(__name__)

SWEEP_MAX_PFNS = 1 << 26  # 256 GiB: past this the scan stops even if rmp answers

# the states only a VM's pages (or a firmware's) are in; the TMR is told apart by its PFNs
_LEFT = frozenset(
    {
        PageState.FIRMWARE,
        PageState.RECLAIM,
        PageState.CONTEXT,
        PageState.PRE_GUEST,
        PageState.GUEST_INVALID,
        PageState.GUEST_VALID,
        PageState.METADATA,
    }
)


async def sweep(kvm: Kvm) -> int:
    """Leak what a previous kvm's VMs left and keep their ASIDs out of use; returns the pages
    leaked. Run once at start, after the TMR is known, before any VM of this kvm exists."""
    if kvm.vms:
        return 0
    tmr = set(kvm.tmr_pfns)
    left: list[Pfn] = []
    contexts: list[Pfn] = []
    asids: set[int] = set()
    first = 0
    while first < SWEEP_MAX_PFNS:
        try:
            entries = await kvm.rmp.read_entries(Pfn(first), LIST_MAX)
        except PeerError:  # beyond the end of memory
            break
        for e in entries:
            if e.state not in _LEFT or e.pfn in tmr:
                continue
            left.append(e.pfn)
            if e.state == PageState.CONTEXT:
                contexts.append(e.pfn)
            if e.asid:
                asids.add(e.asid)
        first += LIST_MAX
    if not left:
        return 0
    for pfn in contexts:
        try:
            await decommission(kvm, pfn_to_spa(pfn))
        except PeerError as e:  # a context the firmware lost already (it was reset)
            log.info("DECOMMISSION of a left context at PFN %#x: %s", pfn, e.message)
    if contexts:  # as after a destroy: no DECOMMISSION between the WBINVD and the DF_FLUSH
        async with kvm.deactivate_lock:
            await kvm.rmp.wbinvd()
            await kvm.psp.snp_df_flush()
    await kvm.rmp.leak(left, reason="left by a kvm that died")
    kvm.free_asids = [a for a in kvm.free_asids if a not in asids]
    log.warning(
        "a previous kvm left %d pages of its VMs (ASIDs %s): leaked; those ASIDs stay unused",
        len(left),
        sorted(asids),
        extra={"event": "leftovers_leaked"},
    )
    return len(left)
