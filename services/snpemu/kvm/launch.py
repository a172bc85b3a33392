"""KVM_CREATE_VM(KVM_X86_SNP_VM) + KVM_SEV_INIT2, and the launch QEMU makes over KVM's ioctls
(target/i386/sev.c): the guest context, the firmware and its pages placed and measured.

A failed CreateVm leaves nothing: each resource's undo is pushed as it is taken (undo.py) and
run in reverse. A failed LaunchVm leaves nothing either up to SNP_ACTIVATE (as
snp_launch_start() decommissions and frees the context); after it the VM keeps its context,
refuses a second launch (LAUNCH_STARTED, as KVM refuses a second context) and every page the
launch took is recorded on the Vm as it is taken, for DestroyVm to give back.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import secrets
from typing import TYPE_CHECKING

from snpemu.abi import rmp_batch
from snpemu.abi.addr import Spa, pages, pfn_to_spa, spa_to_pfn
from snpemu.abi.page_type import PageType
from snpemu.abi.rmp import AccessOrigin, PageState, Placement
from snpemu.abi.vcpu_type import DEFAULT_VCPU_TYPE, VCPU_TYPES
from snpemu.errors import InvalidArgument, Unavailable, WrongState
from snpemu.kvm import images
from snpemu.kvm.config import VmConfig
from snpemu.kvm.pages import assigned_entries, firmware_page, release_firmware_pages
from snpemu.kvm.policy import (
    SVM_SEV_FEAT_SNP_ACTIVE,
    check_config,
    firmware_failure,
    policy_of,
)
from snpemu.kvm.ports import HostWrite, LaunchFinish
from snpemu.kvm.reasons import KvmReason
from snpemu.kvm.teardown import decommission
from snpemu.kvm.throttle import Throttle
from snpemu.kvm.undo import Undo
from snpemu.kvm.vm import Vcpu, Vm, VmState, new_vm_id
from snpemu.runtime.peers import PeerError
from snpemu.vmm import launch_plan, vmsa

if TYPE_CHECKING:
    from snpemu.kvm.machine import Kvm

log = logging.getLogger(__name__)


async def create_vm(kvm: Kvm, config: VmConfig) -> Vm:
    """An ASID, guest RAM in memslots mapped in the NPT, vCPUs with their identities."""
    kvm.need_snp()
    vmsa_features = check_config(config, kvm.supported_vmsa_features)
    # KERNEL: arch/x86/kvm/svm/sev.c __sev_guest_init(): SNP_ACTIVE ORed in for KVM_X86_SNP_VM
    sev_features = vmsa_features | SVM_SEV_FEAT_SNP_ACTIVE
    signature = vmsa.vcpu_signature(
        VCPU_TYPES[config.vcpu_type or DEFAULT_VCPU_TYPE], kvm.host_signature
    )
    # The images are read and checked here, not at LaunchVm (as QEMU reads them before its
    # first ioctl), so a launch cannot fail on them; the VM keeps what was read, not the bytes.
    loaded = await images.load(
        kvm.images, config, vcpu_signature=signature, sev_features=sev_features
    )
    config = dataclasses.replace(config, firmware=b"", kernel=b"", initrd=b"", images=loaded)
    if not kvm.free_asids:
        raise WrongState("no SNP ASID left (all in use)", reason=KvmReason.ASID_EXHAUSTED)
    t = config.throttle
    throttle = (
        Throttle(t.interval_ms, t.burst or 1, clock=kvm.clock)
        if t is not None and t.interval_ms
        else Throttle(*kvm.default_throttle, clock=kvm.clock)
    )
    rmp = kvm.rmp
    async with Undo() as undo:
        asid = kvm.free_asids.pop(0)
        undo.push("the ASID", functools.partial(_give_back_asid, kvm, asid))
        vm = Vm(new_vm_id(), asid, config, throttle, sev_features=sev_features)
        vm.cpuid_signature = signature
        ram = await rmp.allocate(pages(config.memory_bytes), Placement.ALIGNED_2M)
        undo.push("guest RAM", functools.partial(rmp.free, ram))
        runs = vm.memslots.add(0, ram)
        await rmp.update_npt(vm.vm_id, asid, map=runs)
        undo.push("the NPT mappings", functools.partial(rmp.update_npt, vm.vm_id, asid, unmap=runs))
        for i in range(config.vcpus):
            vm.vcpus[i] = Vcpu(i, secrets.token_bytes(32), runnable=(i == 0))
            ident = kvm.identity(vm, i)
            await rmp.register_identity(ident)
            undo.push(f"vCPU {i}'s identity", functools.partial(rmp.revoke_identity, ident))
        kvm.vms[vm.vm_id] = vm
        undo.commit()
    log.info(
        "created %s: ASID %d, %d MiB, %d vCPUs",
        vm.vm_id,
        asid,
        config.memory_bytes >> 20,
        config.vcpus,
        extra={"event": "vm_created"},
    )
    return vm


async def _give_back_asid(kvm: Kvm, asid: int) -> None:
    kvm.free_asids.insert(0, asid)


async def launch_vm(kvm: Kvm, vm: Vm) -> bytes:
    """What QEMU does for an SNP guest (target/i386/sev.c) over KVM's ioctls."""
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
    vm.state = VmState.LAUNCHING
    try:
        return await _launch(kvm, vm)
    except PeerError as e:
        vm.state = VmState.CREATED
        if e.fw_status is None:
            raise
        raise firmware_failure(e) from None
    except BaseException:
        vm.state = VmState.CREATED
        raise


async def _launch(kvm: Kvm, vm: Vm) -> bytes:
    cfg = vm.config
    rmp = kvm.rmp
    loaded = cfg.images
    assert loaded is not None  # INVARIANT: create_vm read them
    ovmf = loaded.ovmf
    # QEMU target/i386/sev.c sev_common_kvm_init(): launch_start comes before any guest
    # memory is filled, so a policy the firmware refuses costs nothing else.
    await launch_start(kvm, vm, policy_of(cfg))
    fw_pfns = await rmp.allocate(pages(len(ovmf.data)), Placement.ANY)
    # in the memslots first: if the mapping fails, or its answer is lost, DestroyVm still
    # unmaps whatever rmp mapped and frees the frames (teardown.py unmap_all)
    runs = vm.memslots.add(ovmf.gpa, fw_pfns)
    await rmp.update_npt(vm.vm_id, vm.asid, map=runs)
    plan = launch_plan.plan(
        ovmf,
        vcpus=len(vm.vcpus),
        vcpu_signature=vm.cpuid_signature,
        sev_features=vm.sev_features,
        kernel_hashes=loaded.kernel_hashes,
    )
    vmsa_count = sum(p.page_type == PageType.VMSA for p in plan)
    vm.vmsa_pages = [pfn_to_spa(p) for p in await rmp.allocate(vmsa_count, Placement.SNP_SAFE)]
    vmsas = iter(vm.vmsa_pages)
    spas: list[Spa] = []
    for page in plan:
        spa = next(vmsas) if page.page_type == PageType.VMSA else vm.memslots.translate(page.gpa)
        if spa is None:
            raise InvalidArgument(f"launch page at GPA {page.gpa:#x} is outside guest memory")
        spas.append(Spa(spa))
    await place_all(kvm, vm, plan, spas)
    measurement = await kvm.psp.launch_finish(
        Spa(vm.gctx),
        LaunchFinish(
            id_block=cfg.id_block,
            id_auth=cfg.id_auth,
            id_block_en=bool(cfg.id_block),
            auth_key_en=cfg.author_key_en,
            vcek_disabled=cfg.vcek_disabled,
            host_data=cfg.host_data,
        ),
    )
    (req,) = await rmp.allocate(1, Placement.ANY)
    vm.bounce_req = pfn_to_spa(req)
    vm.bounce_res = await firmware_page(rmp, kvm.psp, f"guest-request page of {vm.vm_id}")
    vm.measurement = measurement
    vm.state = VmState.RUNNING
    vm.config = dataclasses.replace(cfg, images=None)  # launched: the images are not needed
    log.info(
        "launched %s: measurement %s",
        vm.vm_id,
        vm.measurement.hex(),
        extra={"event": "vm_launched"},
    )
    return vm.measurement


async def launch_start(kvm: Kvm, vm: Vm, policy: int) -> None:
    """snp_launch_start(): a context page, SNP_GCTX_CREATE, SNP_LAUNCH_START, SNP_ACTIVATE;
    if the firmware refuses any, the context is decommissioned and its page freed (KERNEL:
    arch/x86/kvm/svm/sev.c snp_launch_start() e_free_context)."""
    owner = f"context of {vm.vm_id}"
    async with Undo() as undo:
        gctx = await firmware_page(kvm.rmp, kvm.psp, owner)
        undo.push(
            "the context page",
            functools.partial(release_firmware_pages, kvm.rmp, kvm.psp, [gctx], owner),
        )
        await kvm.psp.gctx_create(gctx)
        undo.push("the guest context", functools.partial(decommission, kvm, gctx))
        await kvm.psp.launch_start(gctx, policy)
        await kvm.psp.activate(gctx, vm.asid)
        undo.commit()
    vm.gctx = gctx


async def place_all(kvm: Kvm, vm: Vm, plan: list[launch_plan.LaunchPage], spas: list[Spa]) -> None:
    """Check every page is shared, write the contents, make them pre-guest, then
    SNP_LAUNCH_UPDATE each in launch order (the order the digest depends on)."""
    rmp = kvm.rmp
    taken = await assigned_entries(rmp, [spa_to_pfn(s) for s in spas])
    if taken:
        pfn, entry = next(iter(taken.items()))
        raise WrongState(
            f"page {pfn_to_spa(pfn):#x} is not shared (PAGE_STATE_{PageState(entry.state).name})",
            reason=KvmReason.PAGE_NOT_SHARED,
        )
    for page, spa in zip(plan, spas, strict=True):
        if page.data:
            await rmp.host_write(HostWrite(spa, page.data, AccessOrigin.USER, "vmm"))
    entries = rmp_batch.pack(
        spas, gpa=[page.gpa for page in plan], assigned=True, asid=vm.asid, immutable=True
    )
    codes = await rmp.rmpupdate_batch(entries)
    if any(codes):
        raise Unavailable(f"RMPUPDATE to pre-guest failed: codes {sorted(set(codes))}")
    for page, spa in zip(plan, spas, strict=True):
        await kvm.psp.launch_update(Spa(vm.gctx), spa, page.page_type)
