"""The VMM's launch of an SNP guest, as QEMU makes it over KVM's ioctls, one RPC each.

QEMU: target/i386/sev.c and accel/kvm/kvm-all.c, in their order: KVM_CREATE_VM(KVM_X86_SNP_VM),
KVM_SEV_INIT2 (sev_common_kvm_init()), KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL), guest RAM as a
guest_memfd bound to a memslot (private from the start), the vCPUs, KVM_SEV_SNP_LAUNCH_START
(sev_snp_launch_start()), the firmware's guest_memfd and memslot, then for each run of launch
pages KVM_SET_MEMORY_ATTRIBUTES(PRIVATE) and KVM_SEV_SNP_LAUNCH_UPDATE until KVM has done them
all (sev_snp_launch_update()), and KVM_SEV_SNP_LAUNCH_FINISH, which measures the vCPUs' VMSAs
(sev_snp_launch_finish()).
"""

from __future__ import annotations

from dataclasses import dataclass

from snpemu.abi.addr import PAGE_SIZE
from snpemu.abi.page_type import PageType
from snpemu.guest.ports import LaunchFinish, LaunchUpdate, MemoryRegion, VmHandle, Vmm
from snpemu.kvm.identity import VcpuIdentity
from snpemu.kvm.uapi import (
    KVM_CAP_EXIT_HYPERCALL,
    KVM_EXIT_HYPERCALL_VALID_MASK,
    KVM_MEM_GUEST_MEMFD,
)
from snpemu.vmm import launch_plan, memory_layout
from snpemu.vmm.ovmf import Ovmf


@dataclass(frozen=True)
class Machine:
    """What QEMU's command line makes of the guest."""

    memory_bytes: int
    vcpus: int
    vcpu_type: int
    policy: int
    firmware: bytes
    kernel_hashes: bytes | None = None
    host_data: bytes = b""


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


async def launch(vmm: Vmm, vm: VmHandle, m: Machine) -> tuple[bytes, list[VcpuIdentity]]:
    """The VM CreateVm made alone, built and launched: its measurement and its vCPUs."""
    ovmf = Ovmf.parse(m.firmware)
    await vmm.snp_init2(vm, vmsa_features=0, ghcb_version=0)
    # QEMU: kvm_enable_hypercall(BIT_ULL(KVM_HC_MAP_GPA_RANGE)) for an SNP guest: the guest's
    # page-state changes come to this VMM (guest/vmm_exits.py)
    await vmm.enable_cap(vm, KVM_CAP_EXIT_HYPERCALL, (KVM_EXIT_HYPERCALL_VALID_MASK,))
    ram = await vmm.create_guest_memfd(vm, m.memory_bytes)
    # QEMU: one RAMBlock, as "ram-below-4g" and "ram-above-4g" (hw/i386/pc.c pc_memory_init())
    regions = memory_layout.ram_regions(m.memory_bytes)
    for r in regions:
        await vmm.set_memory_region(
            vm, MemoryRegion(r.slot, KVM_MEM_GUEST_MEMFD, r.gpa, r.size, r.hva, ram, r.offset)
        )
        # QEMU: accel/kvm/kvm-all.c kvm_set_phys_mem(): a guest_memfd region starts private
        await vmm.set_memory_attributes(vm, r.gpa, r.size, private=True)
    # QEMU points the APs at the firmware's SEV-ES reset block (sev_es_set_reset_vector())
    vcpus = [
        await vmm.create_vcpu(vm, i, ovmf.reset_eip if i else 0, m.vcpu_type)
        for i in range(m.vcpus)
    ]
    await vmm.snp_launch_start(vm, m.policy)
    size = _round_up(len(ovmf.data), PAGE_SIZE)
    fw = await vmm.create_guest_memfd(vm, size)
    fw_hva = memory_layout.firmware_hva(m.memory_bytes)
    await vmm.set_memory_region(
        vm,
        MemoryRegion(memory_layout.FIRMWARE_SLOT, KVM_MEM_GUEST_MEMFD, ovmf.gpa, size, fw_hva, fw),
    )
    await vmm.set_memory_attributes(vm, ovmf.gpa, size, private=True)

    def hva(gpa: int) -> int:
        if ovmf.gpa <= gpa < ovmf.gpa + size:
            return fw_hva + gpa - ovmf.gpa
        r = next((r for r in regions if r.gpa <= gpa < r.gpa + r.size), None)
        if r is None:  # QEMU refuses such an image the same way, before the VM runs
            raise ValueError(f"the firmware places a page at GPA {gpa:#x}, in no memslot")
        return r.hva + gpa - r.gpa

    plan = launch_plan.plan(
        ovmf,
        vcpus=m.vcpus,
        # the VMSAs are kvm's to build at LAUNCH_FINISH: these two do not reach it
        vcpu_signature=0,
        sev_features=0,
        kernel_hashes=m.kernel_hashes,
    )
    for u in launch_plan.updates(plan):
        await vmm.set_memory_attributes(vm, u.gpa, u.npages * PAGE_SIZE, private=True)
        zero = u.page_type == PageType.ZERO
        update = LaunchUpdate(
            gfn_start=u.gpa // PAGE_SIZE,
            uaddr=0 if zero else hva(u.gpa),
            len=u.npages * PAGE_SIZE,
            type=int(u.page_type),
            source=u.source,
        )
        while update.len:
            left = update.len
            update = await vmm.snp_launch_update(vm, update)
            if update.len >= left:  # QEMU: a range that did not advance is -EIO
                raise RuntimeError(f"KVM_SEV_SNP_LAUNCH_UPDATE at {u.gpa:#x} made no progress")
    measurement = await vmm.snp_launch_finish(vm, LaunchFinish(host_data=m.host_data))
    return measurement, vcpus
