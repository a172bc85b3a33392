"""Nested page faults: what kvm does when a guest access faults in the NPT or the RMP.

KERNEL: arch/x86/kvm/svm/svm.c npf_interception(); arch/x86/kvm/svm/sev.c
sev_handle_rmp_fault(); the error code bits are arch/x86/include/asm/kvm_host.h PFERR_*.
"""

from __future__ import annotations

import enum

from snpemu.abi.addr import PAGE_MASK, PAGE_SIZE, Gpa, spa_to_pfn
from snpemu.abi.npf import PFERR_GUEST_ENC, PFERR_GUEST_RMP, PFERR_GUEST_SIZEM
from snpemu.kvm import gmem_rmp
from snpemu.kvm.exits import ap
from snpemu.kvm.exits.context import ExitContext
from snpemu.kvm.faultin import faultin
from snpemu.kvm.host_access import HostAccess
from snpemu.kvm.ports import GPA_NONE
from snpemu.kvm.vm import MemoryModel, Vcpu, Vm


class NpfAction(enum.StrEnum):
    """What kvm did (NestedPageFaultResponse.action)."""

    NO_MEMSLOT = "no_memslot"
    MAP = "map"
    PSMASH = "psmash"
    CONVERT_PRIVATE = "convert_private"
    CONVERT_SHARED = "convert_shared"
    SPURIOUS = "spurious"


class NestedPageFaults:
    def __init__(self, ctx: ExitContext, host: HostAccess) -> None:
        self.ctx = ctx
        self.host = host

    async def fault(self, vm: Vm, vcpu: Vcpu, gpa: int, error_code: int) -> tuple[str, bool]:
        """The action taken, and whether the guest retries the access."""
        self.ctx.trace.emit("kvm_page_fault", vm, vcpu.vcpu_id, gpa=gpa, error_code=error_code)
        ap.leave_hold(vcpu)  # the vCPU was running
        page = Gpa(gpa & PAGE_MASK)
        spa = vm.memslots.translate(page)
        if spa is None:
            # KERNEL: kvm_mmu_page_fault() -> kvm_faultin_pfn(): a page of a memslot not yet
            # in the NPT is backed and mapped, and the guest retries the access
            await faultin(self.ctx, vm, page, PAGE_SIZE)
            if vm.memslots.translate(page) is None:
                return NpfAction.NO_MEMSLOT, False
            # a gmem VM's private page is prepared as kvm_gmem_get_pfn() hands it to the fault
            await gmem_rmp.prepare_fault(self.ctx, vm, page)
            return NpfAction.MAP, True
        if error_code & PFERR_GUEST_SIZEM:
            await self.host.psmash(spa)
            return NpfAction.PSMASH, True
        if error_code & PFERR_GUEST_RMP:
            entry = await self.ctx.rmp.read_entry(spa_to_pfn(spa))
            private = bool(error_code & PFERR_GUEST_ENC)
            if vm.memory_model == MemoryModel.GMEM:
                # UNVERIFIED(gmem-implicit): mainline hands an access whose C-bit disagrees
                # with the attributes to the VMM (KVM_EXIT_MEMORY_FAULT; QEMU converts with
                # kvm_convert_memory()); here kvm converts it as the VMM would, attributes
                # included, as for the v5 kind
                vm.attributes.set(page, page + PAGE_SIZE, private)
            if private and not entry.assigned:
                # KVM_EXIT_MEMORY_FAULT: the VMM makes the GPA private (guest-invalid); the
                # guest's retry then takes #VC, as the page is not validated.
                await self.host.rmpupdate(spa, private=True, vm=vm, gpa=page)
                return NpfAction.CONVERT_PRIVATE, True
            if not private and entry.assigned and entry.asid == vm.asid:
                await self.host.rmpupdate(spa, private=False, vm=vm, gpa=GPA_NONE)
                return NpfAction.CONVERT_SHARED, True
        return NpfAction.SPURIOUS, True
