"""Application processors: AP creation, the AP jump table and the AP reset hold.

KERNEL: arch/x86/kvm/svm/sev.c sev_snp_ap_creation(), sev_handle_vmgexit()
(SVM_VMGEXIT_AP_JUMP_TABLE, SVM_VMGEXIT_AP_HLT_LOOP), sev_vcpu_deliver_sipi_vector();
arch/x86/kvm/x86.c kvm_emulate_ap_reset_hold(). The MSR protocol's hold request
(GHCB_MSR_AP_RESET_HOLD_REQ) is in msr.py and uses reset_hold() here.
"""

from __future__ import annotations

from snpemu.abi import ghcb as g
from snpemu.abi.addr import PMD_SIZE, page_aligned
from snpemu.kvm.exits.outcome import ExitResult, ExitState, Outcome, malformed
from snpemu.kvm.machine import CBIT
from snpemu.kvm.uapi import MAXPHYADDR
from snpemu.kvm.vm import Vcpu, Vm

# KERNEL: arch/x86/include/asm/svm.h SVM_VMGEXIT_AP_CREATE_ON_INIT, _AP_CREATE, _AP_DESTROY
AP_CREATE_ON_INIT, AP_CREATE, AP_DESTROY = 0, 1, 2

# --- page_address_valid() for the AP's VMSA ----------------------------------------------------

# UNVERIFIED(maxphyaddr-48): KVM takes MAXPHYADDR from the guest's CPUID 0x80000008 EAX[7:0]
# (arch/x86/kvm/cpuid.c cpuid_maxphyaddr()); kvm/exits/cpuid.py cpuid() reports no such leaf,
# so snpemu takes the host's 48 bits (kvm/uapi.py MAXPHYADDR).


def page_address_valid(gpa: int) -> bool:
    """Page aligned with no reserved GPA bit set (bits MAXPHYADDR..63, the C-bit excepted).

    KERNEL: arch/x86/kvm/cpuid.h page_address_valid(), kvm_vcpu_is_legal_gpa();
    arch/x86/kvm/svm/sev.c sev_vcpu_after_set_cpuid() clears the C-bit from the reserved bits."""
    reserved = ((1 << 64) - (1 << MAXPHYADDR)) & ~(1 << CBIT)
    return page_aligned(gpa) and not gpa & reserved


# --- the AP reset hold -------------------------------------------------------------------------

AP_RESET_HOLD_NONE, AP_RESET_HOLD_NAE_EVENT, AP_RESET_HOLD_MSR_PROTO = 0, 1, 2  # KERNEL: sev.c


def reset_hold(vcpu: Vcpu, kind: int) -> int:
    """AP_HLT_LOOP or GHCB_MSR_AP_RESET_HOLD_REQ: the result the exit returns with.

    KVM halts the vCPU (arch/x86/kvm/x86.c kvm_emulate_ap_reset_hold(): mp_state
    AP_RESET_HOLD) with the result preset to 0, and sets it to 1 when a wake-up is delivered
    (sev.c sev_vcpu_deliver_sipi_vector()). An exit here cannot block, so a held vCPU's reply
    0 means "still held" and the guest asks again, as Linux's sev_es_ap_hlt_loop() loops: the
    first request after a wake-up reads 1 and ends the hold."""
    if vcpu.reset_hold and vcpu.hold_woken:
        leave_hold(vcpu)
        return 1
    vcpu.reset_hold = kind
    return 0


def wake(vcpu: Vcpu) -> None:
    """A wake-up for a vCPU in reset hold; a vCPU not held gets nothing (the switch on
    ap_reset_hold_type in sev_vcpu_deliver_sipi_vector())."""
    if vcpu.reset_hold:
        vcpu.hold_woken = True


def leave_hold(vcpu: Vcpu) -> None:
    """Any other exit means the vCPU ran: sev_es_unmap_ghcb() clears ap_reset_hold_type on
    every entry to the guest."""
    vcpu.reset_hold, vcpu.hold_woken = AP_RESET_HOLD_NONE, False


# --- the events --------------------------------------------------------------------------------


async def ap_hlt_loop(vm: Vm, vcpu: Vcpu, ghcb: g.Ghcb, state: ExitState) -> Outcome:
    # KERNEL: sev.c sev_handle_vmgexit() SVM_VMGEXIT_AP_HLT_LOOP: SW_EXIT_INFO_2 preset to
    # 0, set to 1 by the wake-up (sev_vcpu_deliver_sipi_vector())
    return ExitResult(0, reset_hold(vcpu, AP_RESET_HOLD_NAE_EVENT)), {}, None


async def ap_jump_table(vm: Vm, vcpu: Vcpu, ghcb: g.Ghcb, state: ExitState) -> Outcome:
    info1 = ghcb.get("sw_exit_info_1")
    if info1 == 0:
        vm.ap_jump_table = ghcb.get("sw_exit_info_2")
        return ExitResult(), {}, None
    if info1 == 1:
        return ExitResult(0, vm.ap_jump_table), {}, None
    return malformed(g.ERR_INVALID_INPUT)


async def ap_creation(vm: Vm, vcpu: Vcpu, ghcb: g.Ghcb, state: ExitState) -> Outcome:
    """KERNEL: sev.c sev_snp_ap_creation(), then, for any request but CREATE_ON_INIT, the
    target's reset (KVM_REQ_UPDATE_PROTECTED_GUEST_STATE: sev_snp_init_protected_guest_state).
    RAX was checked valid already for every request but DESTROY (nae.validate())."""
    info1, vmsa_gpa = ghcb.get("sw_exit_info_1"), ghcb.get("sw_exit_info_2")
    op, apic_id = info1 & 0xFFFFFFFF, info1 >> 32 & 0xFFFFFFFF
    target = vm.vcpus.get(apic_id)
    if target is None:
        return malformed(g.ERR_INVALID_INPUT)  # the APIC ID first
    if op in (AP_CREATE_ON_INIT, AP_CREATE):
        if ghcb.get("rax") != vm.sev_features:
            return malformed(g.ERR_INVALID_INPUT)  # SEV_FEATURES must match the VM's
        # Only page_address_valid(): the VMSA needs no memslot to be accepted
        if not page_address_valid(vmsa_gpa):
            return malformed(g.ERR_INVALID_INPUT)
        # A 2M-aligned VMSA can take a spurious RMP #PF (erratum): KVM refuses it.
        if vmsa_gpa % PMD_SIZE == 0:
            return malformed(g.ERR_INVALID_INPUT)
        target.vmsa_gpa = vmsa_gpa
    elif op == AP_DESTROY:
        target.vmsa_gpa = None
    else:
        return malformed(g.ERR_INVALID_INPUT)
    if op != AP_CREATE_ON_INIT:
        # the reset: runnable with the new VMSA if a memslot holds it, else offline
        gpa = target.vmsa_gpa
        target.runnable = gpa is not None and vm.in_memslot(gpa)
        if target.runnable:
            # UNVERIFIED(ap-hold-wake): KVM's reset starts the AP afresh at its new VMSA, so
            # nothing reads the hold's result; snpemu has no AP context to restart and instead
            # answers a held AP's next hold request 1, as sev_vcpu_deliver_sipi_vector() does a
            # SIPI.
            wake(target)
    return ExitResult(), {}, None
