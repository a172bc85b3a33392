"""The VMM's side of an exit kvm hands it (KVM_RUN returned): what QEMU does with
KVM_EXIT_HYPERCALL, and the re-entry that completes the exit.

QEMU: target/i386/kvm/kvm.c kvm_handle_hypercall(), kvm_handle_hc_map_gpa_range();
accel/kvm/kvm-all.c kvm_convert_memory() (KVM_SET_MEMORY_ATTRIBUTES for the range).
"""

from __future__ import annotations

import asyncio
import errno
import logging

from snpemu.abi.addr import PAGE_SIZE
from snpemu.guest.ports import GhcbReply, MsrReply, VmHandle, Vmm, VmmExit
from snpemu.kvm.uapi import KVM_EXIT_HYPERCALL, KVM_HC_MAP_GPA_RANGE, KVM_MAP_GPA_RANGE_ENCRYPTED

log = logging.getLogger(__name__)
# every forwarded range is answered before the guest runs again; a kvm that kept forwarding
# would be a bug, not a guest's choice (a GHCB PSC has at most 253 entries, one exit each)
MAX_EXITS = 1024


async def hypercall_ret(vmm: Vmm, vm: VmHandle, exit: VmmExit) -> int:
    """kvm_run.hypercall.ret for the exit.

    UNVERIFIED(vmm-map-gpa-error): QEMU stops the vCPU when the conversion fails; this VMM
    answers EINVAL instead (what "KVM: TDX: Allow userspace to return errors to guest for
    MAPGPA" lets a VMM return), so the guest sees its PSC fail."""
    if exit.exit_reason != KVM_EXIT_HYPERCALL or exit.nr != KVM_HC_MAP_GPA_RANGE:
        return errno.EINVAL
    gpa, npages, attrs = exit.args[:3]
    try:
        await vmm.set_memory_attributes(
            vm, gpa, npages * PAGE_SIZE, private=bool(attrs & KVM_MAP_GPA_RANGE_ENCRYPTED)
        )
    except Exception as e:  # any failure: the exit is still completed, as a failed change
        log.warning(
            "KVM_HC_MAP_GPA_RANGE %#x+%d pages not done: %s",
            gpa,
            npages,
            e,
            extra={"event": "guest_map_gpa_failed"},
        )
        return errno.EINVAL
    return 0


async def complete(
    vmm: Vmm, vm: VmHandle, vcpu_id: int, reply: MsrReply | GhcbReply
) -> MsrReply | GhcbReply:
    """Each exit the reply hands the VMM handled and the vCPU run again, until kvm answers
    the guest. Shielded: a caller that goes away (a cancelled RPC) does not leave the vCPU out
    in the VMM, where it would take no exit again."""
    return await asyncio.shield(_complete(vmm, vm, vcpu_id, reply))


async def _complete(
    vmm: Vmm, vm: VmHandle, vcpu_id: int, reply: MsrReply | GhcbReply
) -> MsrReply | GhcbReply:
    for _ in range(MAX_EXITS):
        if reply.exit is None:
            return reply
        reply = await vmm.run_vcpu(vm, vcpu_id, await hypercall_ret(vmm, vm, reply.exit))
    raise RuntimeError(f"kvm handed the VMM {MAX_EXITS} exits for one guest exit")
