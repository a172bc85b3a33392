"""LaunchVm: the launch QEMU makes for a VM's config (target/i386/sev.c), over the same calls
a VMM makes with the RPCs, in QEMU's order: SNP_LAUNCH_START, the firmware's guest_memfd and
memslot, then for each run of launch pages KVM_SET_MEMORY_ATTRIBUTES(PRIVATE) and
KVM_SEV_SNP_LAUNCH_UPDATE until it has done them all, then KVM_SEV_SNP_LAUNCH_FINISH (which
measures the VMSAs). QEMU: target/i386/sev.c sev_snp_launch_start(), sev_snp_launch_update(),
sev_snp_launch_finish().

A launch that fails before SNP_ACTIVATE leaves nothing (snp_launch_start() frees the context);
after it the VM keeps its context and refuses a second LaunchVm (LAUNCH_STARTED), and what the
launch took is the VM's, for DestroyVm to give back.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from snpemu.abi.addr import PAGE_SIZE
from snpemu.abi.page_type import PageType
from snpemu.errors import InvalidArgument, WrongState
from snpemu.kvm import memory_ioctls, snp_cmds
from snpemu.kvm.policy import policy_of
from snpemu.kvm.ports import LaunchFinish
from snpemu.kvm.reasons import KvmReason
from snpemu.kvm.uapi import KVM_MEM_GUEST_MEMFD, KVM_MEMORY_ATTRIBUTE_PRIVATE
from snpemu.kvm.vm import Vm, VmState
from snpemu.vmm import launch_plan
from snpemu.vmm.memory_layout import FIRMWARE_SLOT, firmware_hva

if TYPE_CHECKING:
    from snpemu.kvm.machine import Kvm


def hva(vm: Vm, gpa: int) -> int:
    """Where the VMM has the page of gpa: its memslot's userspace_addr on."""
    slot = next((s for s in vm.slots.values() if s.holds(gpa)), None)
    if slot is None:  # kvm/images.py check_launch() refuses such a firmware first
        raise InvalidArgument(
            f"the firmware places a page at GPA {gpa:#x}, in no memslot",
            reason=KvmReason.FIRMWARE_INVALID,
        )
    return slot.userspace_addr + (gpa - slot.gpa)


async def launch_vm(kvm: Kvm, vm: Vm) -> bytes:
    if vm.state != VmState.CREATED:
        raise WrongState(f"{vm.vm_id} is {vm.state.name}, not CREATED", reason=KvmReason.VM_STATE)
    if vm.gctx:
        # KERNEL: arch/x86/kvm/svm/sev.c snp_launch_start(): "Don't allow userspace to
        # allocate memory for more than 1 SNP context" (-EINVAL). A launch that failed after
        # LAUNCH_START keeps its context and pages until the VM is destroyed.
        raise WrongState(
            f"{vm.vm_id} has a guest context from a launch that failed: destroy it",
            reason=KvmReason.LAUNCH_STARTED,
        )
    if vm.config.images is None:
        raise WrongState(
            f"{vm.vm_id} was made without a config: launch it with SnpLaunchStart, "
            "SnpLaunchUpdate and SnpLaunchFinish",
            reason=KvmReason.VM_STATE,
        )
    try:
        return await _launch(kvm, vm)
    except BaseException:
        # as before the launch, but for the context it may keep (LAUNCH_STARTED)
        vm.state = VmState.CREATED
        raise


async def _launch(kvm: Kvm, vm: Vm) -> bytes:
    cfg = vm.config
    loaded = cfg.images
    assert loaded is not None  # INVARIANT: launch_vm() checked
    ovmf = loaded.ovmf
    # QEMU target/i386/sev.c sev_common_kvm_init(): launch_start comes before any guest
    # memory is filled, so a policy the firmware refuses costs nothing else.
    await snp_cmds.launch_start(kvm, vm, policy_of(cfg), bytes(16), 0)
    size = -(-len(ovmf.data) // PAGE_SIZE) * PAGE_SIZE
    fw = await memory_ioctls.create_guest_memfd(kvm, vm, size, 0, vm.owner)
    await memory_ioctls.set_memory_region(
        kvm,
        vm,
        slot=FIRMWARE_SLOT,
        flags=KVM_MEM_GUEST_MEMFD,
        gpa=ovmf.gpa,
        size=size,
        userspace_addr=firmware_hva(cfg.memory_bytes),
        gmem_fd=fw.fd,
        gmem_offset=0,
        caller=vm.owner,
        is_host=True,
    )
    await memory_ioctls.private_by_default(kvm, vm, ovmf.gpa, size)
    plan = launch_plan.plan(
        ovmf,
        vcpus=len(vm.vcpus),
        vcpu_signature=vm.cpuid_signature,
        sev_features=vm.sev_features,
        kernel_hashes=loaded.kernel_hashes,
    )
    for u in launch_plan.updates(plan):
        await launch_region(kvm, vm, u)
    measurement = await snp_cmds.launch_finish(
        kvm,
        vm,
        LaunchFinish(
            id_block=cfg.id_block,
            id_auth=cfg.id_auth,
            id_block_en=bool(cfg.id_block),
            auth_key_en=cfg.author_key_en,
            vcek_disabled=cfg.vcek_disabled,
            host_data=cfg.host_data,
        ),
    )
    vm.config = dataclasses.replace(cfg, images=None)  # launched: the images are not needed
    return measurement


async def launch_region(kvm: Kvm, vm: Vm, u: launch_plan.Update) -> None:
    """QEMU target/i386/sev.c sev_snp_launch_update(): the range made private, then
    KVM_SEV_SNP_LAUNCH_UPDATE again while KVM reports pages left."""
    length = u.npages * PAGE_SIZE
    await memory_ioctls.set_memory_attributes(
        kvm, vm, u.gpa, length, KVM_MEMORY_ATTRIBUTE_PRIVATE, 0
    )
    gfn, uaddr, source = u.gpa // PAGE_SIZE, hva(vm, u.gpa), u.source
    zero = u.page_type == PageType.ZERO
    while True:
        done = await snp_cmds.launch_update(
            kvm,
            vm,
            gfn_start=gfn,
            uaddr=0 if zero else uaddr,
            length=length,
            page_type=u.page_type,
            flags=0,
            source=source,
        )
        gfn, length = gfn + done, length - done * PAGE_SIZE
        if not zero:
            uaddr, source = uaddr + done * PAGE_SIZE, source[done * PAGE_SIZE :]
        if not length:
            return
        if not done:
            # QEMU: the range did not advance
            raise WrongState(f"KVM_SEV_SNP_LAUNCH_UPDATE at gfn {gfn:#x} made no progress")
