"""sev_vm_destroy(): a VM's context decommissioned, its pages back to the host (or leaked), its
identities revoked, its ASID freed after the flush.

A VM a firmware reset terminated has had its pages taken back already (release(), from
kvm/firmware_watch.py): its destroy only frees the ASID and forgets it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import weakref
from typing import TYPE_CHECKING

from snpemu.abi.addr import Pfn, Spa, spa_to_pfn
from snpemu.kvm.pages import BATCH_MAX, all_shared, reclaim, release_firmware_pages
from snpemu.kvm.undo import Undo
from snpemu.kvm.vm import Vm, VmState
from snpemu.runtime.peers import PeerError

if TYPE_CHECKING:
    from snpemu.kvm.machine import Kvm

log = logging.getLogger(__name__)


async def decommission(kvm: Kvm, gctx: Spa) -> None:
    """SNP_DECOMMISSION under the deactivate lock: it clears the firmware's WBINVD
    indicator, so it must not fall between sev_flush_asids()' WBINVD and DF_FLUSH.
    KERNEL: arch/x86/kvm/svm/sev.c snp_decommission_context(), which takes
    sev_deactivate_lock for writing around it."""
    async with kvm.deactivate_lock:
        await kvm.psp.decommission(gctx)


# VMs whose pages release() took back (by id; the entry goes with the VM object)
_released: weakref.WeakValueDictionary[str, Vm] = weakref.WeakValueDictionary()


def is_released(vm: Vm) -> bool:
    return _released.get(vm.vm_id) is vm


async def destroy_vm(kvm: Kvm, vm: Vm) -> int:
    """DECOMMISSION, reclaim, every page back to hypervisor state, frames freed, ASID freed
    after DF_FLUSH. Pages that fail are leaked (never reused); returns how many."""
    leaked = 0 if is_released(vm) else await release(kvm, vm)
    _released.pop(vm.vm_id, None)
    if vm.sev_active:
        kvm.free_asids.append(vm.asid)
    vm.state = VmState.DESTROYED
    del kvm.vms[vm.vm_id]
    log.info("destroyed %s: %d pages leaked", vm.vm_id, leaked, extra={"event": "vm_destroyed"})
    return leaked


async def unmap_all(kvm: Kvm, vm: Vm) -> None:
    """Every memslot out of the NPT. A run rmp never mapped (a launch whose mapping of it
    failed) is refused, and does not stop the others: each is then unmapped on its own."""
    if not vm.sev_active:
        return  # no ASID: nothing was mapped
    runs = vm.memslots.runs + vm.stale_runs
    try:
        await kvm.rmp.update_npt(vm.vm_id, vm.asid, unmap=runs)
    except PeerError:
        for run in runs:
            with contextlib.suppress(PeerError):
                await kvm.rmp.update_npt(vm.vm_id, vm.asid, unmap=[run])


async def release(kvm: Kvm, vm: Vm) -> int:
    """Everything of destroy_vm() but the ASID and the VM itself: its pages back to the host
    (or leaked), its identities revoked, the flush. Returns the pages leaked. No exit backs
    memory meanwhile or after (its frames would be taken after the list of those to free)."""
    async with vm.fault_lock:
        vm.backing_released = True
        return await _release(kvm, vm)


async def _release(kvm: Kvm, vm: Vm) -> int:
    rmp = kvm.rmp
    leaked: list[Pfn] = []
    if vm.gctx:
        try:
            await decommission(kvm, vm.gctx)
        except PeerError as e:
            log.warning("DECOMMISSION of %s failed: %s", vm.vm_id, e.message)
    firmware_pages = [p for p in (vm.gctx, vm.bounce_res) if p]
    for spa in firmware_pages:
        if not await reclaim(rmp, kvm.psp, spa):
            leaked.append(spa_to_pfn(spa))
    pfns = gmem_pfns(kvm, vm) + [spa_to_pfn(s) for s in vm.vmsa_pages]
    if vm.bounce_req:
        pfns.append(spa_to_pfn(vm.bounce_req))
    # decommissioned: its pre-guest pages can be reclaimed now
    failed = await all_shared(rmp, pfns, kvm.psp)
    leaked += failed
    failed_set = set(failed)
    free = [p for p in pfns if p not in failed_set]
    free += [spa_to_pfn(s) for s in firmware_pages if spa_to_pfn(s) not in leaked]
    await unmap_all(kvm, vm)
    for vcpu_id in vm.vcpus:
        await rmp.revoke_identity(kvm.identity(vm, vcpu_id))
    if leaked:
        await rmp.leak(leaked, reason=f"teardown of {vm.vm_id}")
    for i in range(0, len(free), BATCH_MAX):
        await rmp.free(free[i : i + BATCH_MAX])
    # wbinvd_on_all_cpus(), then SNP_DF_FLUSH, with no DECOMMISSION in between. KERNEL:
    # arch/x86/kvm/svm/sev.c sev_flush_asids(). UNVERIFIED(flush-every-destroy): KVM flushes
    # lazily, when sev_asid_new() finds no free ASID (__sev_recycle_asids()) and at module
    # unload (sev_hardware_unsetup()); kvm here flushes at every VM destroy.
    async with kvm.deactivate_lock:
        await rmp.wbinvd()
        await kvm.psp.snp_df_flush()
    forget_gmems(kvm, vm)
    # the frames are free: nothing may translate to them any more (GetMemoryMap, netd)
    vm.memslots.remove(vm.memslots.runs)
    for slot in vm.slots.values():
        slot.runs.clear()
    vm.stale_runs.clear()
    _released[vm.vm_id] = vm
    return len(leaked)


def gmem_pfns(kvm: Kvm, vm: Vm) -> list[Pfn]:
    """Every frame of the VM's guest_memfds, bound to a memslot or not."""
    return [p for fd in vm.gmem_fds if (g := kvm.gmems.by_fd.get(fd)) for p in g.pfns()]


def forget_gmems(kvm: Kvm, vm: Vm) -> None:
    for fd in vm.gmem_fds:
        kvm.gmems.remove(fd)
    vm.gmem_fds.clear()


async def discard(kvm: Kvm, vm: Vm) -> None:
    """A VM CreateVm could not finish, taken apart before anyone saw it: no context, no page
    private yet. Each step runs even if one before it failed (logged)."""
    async with Undo() as undo:
        undo.push("the ASID", lambda: _give_back_asid(kvm, vm))
        undo.push("the guest-request pages", lambda: _release_bounce(kvm, vm))
        frames = gmem_pfns(kvm, vm)
        undo.push("guest RAM", lambda: kvm.rmp.free(frames) if frames else _nothing())
        undo.push("the NPT mappings", lambda: unmap_all(kvm, vm))
        for vcpu_id in vm.vcpus:
            ident = kvm.identity(vm, vcpu_id)
            undo.push(
                f"vCPU {vcpu_id}'s identity", functools.partial(kvm.rmp.revoke_identity, ident)
            )
        await undo.rollback()
    forget_gmems(kvm, vm)


async def _release_bounce(kvm: Kvm, vm: Vm) -> None:
    """KERNEL: arch/x86/kvm/svm/sev.c snp_guest_req_cleanup()"""
    if vm.bounce_res:
        await release_firmware_pages(kvm.rmp, kvm.psp, [vm.bounce_res], vm.vm_id)
    if vm.bounce_req:
        await kvm.rmp.free([spa_to_pfn(vm.bounce_req)])


async def _give_back_asid(kvm: Kvm, vm: Vm) -> None:
    if vm.sev_active:
        kvm.free_asids.insert(0, vm.asid)


async def _nothing() -> None:
    pass
