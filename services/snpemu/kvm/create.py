"""KVM_CREATE_VM: a VM alone (what the ioctl makes), or one built for a config the way QEMU
builds it next: KVM_SEV_INIT2, guest RAM in a guest_memfd bound to memslot 0 below 4 GiB and
memslot 2 above (vmm/memory_layout.py), the vCPUs.

Each step is the RPC's own (snp_cmds.py, memory_ioctls.py); a config VM that fails part way is
discarded whole (teardown.py discard()), so a failed CreateVm leaves nothing.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

from snpemu.abi.vcpu_type import DEFAULT_VCPU_TYPE, VCPU_TYPES
from snpemu.errors import InvalidArgument, WrongState
from snpemu.kvm import images, memory_ioctls, snp_cmds
from snpemu.kvm.config import VmConfig
from snpemu.kvm.policy import SVM_SEV_FEAT_SNP_ACTIVE, check_config
from snpemu.kvm.reasons import KvmReason
from snpemu.kvm.teardown import discard
from snpemu.kvm.throttle import Throttle
from snpemu.kvm.uapi import KVM_MEM_GUEST_MEMFD, KVM_X86_SNP_VM, Errno, refuse
from snpemu.kvm.vm import MemoryModel, Vm, new_vm_id
from snpemu.vmm import memory_layout, vmsa

if TYPE_CHECKING:
    from snpemu.kvm.machine import Kvm

log = logging.getLogger(__name__)


def new_vm(
    kvm: Kvm, vm_type: int, config: VmConfig | None = None, model: MemoryModel = MemoryModel.V5
) -> Vm:
    """KVM_CREATE_VM(type). KERNEL: arch/x86/kvm/x86.c kvm_arch_init_vm() (-EINVAL for a type
    the host does not support)"""
    kvm.need_snp()
    if vm_type != KVM_X86_SNP_VM:
        raise refuse(
            InvalidArgument,
            Errno.EINVAL,
            f"VM type {vm_type}: this host makes SNP VMs only (KVM_X86_SNP_VM = {KVM_X86_SNP_VM})",
        )
    cfg = config or VmConfig(memory_bytes=0, vcpus=0)
    t = cfg.throttle
    throttle = (
        Throttle(t.interval_ms, t.burst or 1, clock=kvm.clock)
        if t is not None and t.interval_ms
        else Throttle(*kvm.default_throttle, clock=kvm.clock)
    )
    vm = Vm(new_vm_id(), 0, cfg, throttle, memory_model=model)
    # CPUID(1).EAX of its vCPUs: the config's model, else the default one (QEMU would set it
    # with KVM_SET_CPUID2, which kvm does not take)
    vm.cpuid_signature = vmsa.vcpu_signature(
        VCPU_TYPES[cfg.vcpu_type or DEFAULT_VCPU_TYPE], kvm.host_signature
    )
    return vm


async def create_vm(
    kvm: Kvm, config: VmConfig, owner: str, model: MemoryModel = MemoryModel.V5
) -> Vm:
    """A VM for `config`: INIT2, RAM, vCPUs, its images read for LaunchVm."""
    kvm.need_snp()
    vmsa_features = check_config(config, kvm.supported_vmsa_features)
    vm = new_vm(kvm, KVM_X86_SNP_VM, config, model)
    # The images are read and checked here, not at LaunchVm (as QEMU reads them before its
    # first ioctl), so a launch cannot fail on them; the VM keeps what was read, not the bytes.
    loaded = await images.load(
        kvm.images,
        config,
        vcpu_signature=vm.cpuid_signature,
        sev_features=vmsa_features | SVM_SEV_FEAT_SNP_ACTIVE,
    )
    vm.config = dataclasses.replace(config, firmware=b"", kernel=b"", initrd=b"", images=loaded)
    vm.e820 = tuple(memory_layout.e820(config.memory_bytes))
    if not kvm.free_asids:
        raise WrongState("no SNP ASID left (all in use)", reason=KvmReason.ASID_EXHAUSTED)
    try:
        await snp_cmds.init2(kvm, vm, vmsa_features, 0, 0)
        ram = await memory_ioctls.create_guest_memfd(kvm, vm, config.memory_bytes, 0, owner)
        for region in memory_layout.ram_regions(config.memory_bytes):
            await memory_ioctls.set_memory_region(
                kvm,
                vm,
                slot=region.slot,
                flags=KVM_MEM_GUEST_MEMFD,
                gpa=region.gpa,
                size=region.size,
                userspace_addr=region.hva,
                gmem_fd=ram.fd,
                gmem_offset=region.offset,
                caller=owner,
                is_host=True,
            )
            await memory_ioctls.private_by_default(kvm, vm, region.gpa, region.size)
        for i in range(config.vcpus):
            # QEMU points the APs at the firmware's SEV-ES reset block
            # (target/i386/sev.c sev_es_set_reset_vector())
            await snp_cmds.create_vcpu(
                kvm, vm, i, loaded.ovmf.reset_eip if i else 0, config.vcpu_type
            )
    except BaseException:
        await discard(kvm, vm)
        raise
    kvm.vms[vm.vm_id] = vm
    log.info(
        "created %s: ASID %d, %d MiB, %d vCPUs",
        vm.vm_id,
        vm.asid,
        config.memory_bytes >> 20,
        config.vcpus,
        extra={"event": "vm_created"},
    )
    return vm
