"""Who is exiting, and how a VM stops: the vCPU identity check, termination, rmp's kicks."""

from __future__ import annotations

import hmac
import logging

from snpemu.errors import PermissionDenied, WrongState
from snpemu.kvm.exits.context import ExitContext
from snpemu.kvm.exits.reasons import ExitReason
from snpemu.kvm.identity import VcpuIdentity
from snpemu.kvm.reasons import KvmReason
from snpemu.kvm.vm import Vcpu, Vm, VmState

log = logging.getLogger(__name__)

# Reason recorded when kvm terminates a guest on rmp's request (convert-kill). Not a GHCB code:
# set 0xF is outside the GHCB spec's sets (0 general, 1 Linux).
TERM_SET_HOST, TERM_HOST_CONVERTED = 0xF, 1


def running_vcpu(ctx: ExitContext, ident: VcpuIdentity) -> tuple[Vm, Vcpu]:
    """The VM and vCPU an exit comes from: the identity kvm issued, of a running VM."""
    vm = ctx.vm(ident.vm_id)
    vcpu = vm.vcpus.get(ident.vcpu_id)
    if vcpu is None or not hmac.compare_digest(vcpu.token, ident.token) or ident.asid != vm.asid:
        raise PermissionDenied(
            "exits need the vCPU identity kvm issued", reason=ExitReason.BAD_VCPU_IDENTITY
        )
    check_running(vm)
    if vcpu.pending is not None:
        raise WrongState(
            f"vCPU {vcpu.vcpu_id} of {vm.vm_id} is out in the VMM (an exit RunVcpu has not "
            "completed): it runs no guest code until then",
            reason=ExitReason.VCPU_IN_VMM,
        )
    return vm, vcpu


def check_running(vm: Vm) -> None:
    if vm.state == VmState.TERMINATED:
        raise WrongState(f"{vm.vm_id} has terminated", reason=ExitReason.VM_TERMINATED)
    if vm.state != VmState.RUNNING:
        raise WrongState(
            f"{vm.vm_id} is {vm.state.name}: launch it first", reason=KvmReason.VM_STATE
        )


def terminate(vm: Vm, reason_set: int, code: int) -> None:
    vm.state = VmState.TERMINATED
    vm.term_reason = (reason_set, code)
    log.warning(
        "%s terminated: reason set %d code %d",
        vm.vm_id,
        reason_set,
        code,
        extra={"event": "vm_terminated"},
    )


def kick(ctx: ExitContext, asid: int, terminate_vm: bool, reason: str) -> bool:
    """rmp's MMU notification for an ASID: every vCPU of its VM kicked, the VM terminated if
    rmp asks (a private page converted under it); False if no VM has the ASID."""
    for vm in ctx.vms.values():
        if not vm.sev_active or vm.asid != asid:  # before KVM_SEV_INIT2 a VM has no ASID
            continue
        for vcpu in vm.vcpus.values():
            vcpu.kicks += 1
        if terminate_vm and vm.state == VmState.RUNNING:
            terminate(vm, TERM_SET_HOST, TERM_HOST_CONVERTED)
        log.info("kicked the vCPUs of %s: %s", vm.vm_id, reason, extra={"event": "kick"})
        return True
    return False
