"""Nested page faults: what kvm does when a guest access faults in the NPT or the RMP.

KERNEL: arch/x86/kvm/svm/svm.c npf_interception(); arch/x86/kvm/svm/sev.c
sev_handle_rmp_fault(); the error code bits are arch/x86/include/asm/kvm_host.h PFERR_*.
"""

from __future__ import annotations

import enum

from snpemu.abi.addr import PAGE_MASK, PAGE_SIZE, PMD_SIZE, Gpa, Spa, spa_to_pfn
from snpemu.abi.npf import PFERR_GUEST_ENC, PFERR_GUEST_RMP, PFERR_GUEST_SIZEM
from snpemu.abi.rmp import Code
from snpemu.kvm.exits import ap
from snpemu.kvm.exits.context import ExitContext
from snpemu.kvm.faultin import faultin
from snpemu.kvm.host_access import HostAccess
from snpemu.kvm.ports import GPA_NONE
from snpemu.kvm.vm import Vcpu, Vm

PSMASH_TRIES = 8  # KVM retries PSMASH while another CPU holds the entry (FAIL_INUSE)


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
            return NpfAction.MAP, True
        if error_code & PFERR_GUEST_SIZEM:
            head = Spa(spa & ~(PMD_SIZE - 1))
            for _ in range(PSMASH_TRIES):
                if await self.ctx.rmp.psmash(head) != Code.FAIL_INUSE:
                    break
            return NpfAction.PSMASH, True
        if error_code & PFERR_GUEST_RMP:
            entry = await self.ctx.rmp.read_entry(spa_to_pfn(spa))
            private = bool(error_code & PFERR_GUEST_ENC)
            if private and not entry.assigned:
                # KVM_EXIT_MEMORY_FAULT: the VMM makes the GPA private (guest-invalid); the
                # guest's retry then takes #VC, as the page is not validated.
                await self.host.rmpupdate(spa, private=True, vm=vm, gpa=page)
                return NpfAction.CONVERT_PRIVATE, True
            if not private and entry.assigned and entry.asid == vm.asid:
                await self.host.rmpupdate(spa, private=False, vm=vm, gpa=GPA_NONE)
                return NpfAction.CONVERT_SHARED, True
        return NpfAction.SPURIOUS, True
