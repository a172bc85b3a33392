"""The SEV commands of KVM_MEMORY_ENCRYPT_OP an SNP VMM issues, and KVM_CREATE_VCPU: each
checks the VM's launch state and its input as arch/x86/kvm/svm/sev.c does, in its order,
before anything changes.

The VM's launch state is sev.c's: `sev_active` (KVM_SEV_INIT2 made it an SNP guest), `gctx`
(sev->snp_context, from SNP_LAUNCH_START), and RUNNING once SNP_LAUNCH_FINISH succeeded.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import TYPE_CHECKING

from snpemu.abi.addr import PAGE_SIZE as PAGE
from snpemu.abi.addr import Gpa, Spa, pfn_to_spa, spa_to_pfn
from snpemu.abi.msr_protocol import GHCB_VERSION_MAX
from snpemu.abi.page_type import PageType
from snpemu.abi.rmp import VMSA_GPA, AccessOrigin, Code, Placement
from snpemu.abi.vcpu_type import DEFAULT_VCPU_TYPE, VCPU_TYPES
from snpemu.errors import InvalidArgument, SnpemuError, WrongState
from snpemu.kvm import context
from snpemu.kvm.faultin import faultin
from snpemu.kvm.pages import assigned_entries, firmware_page, reclaim
from snpemu.kvm.policy import (
    MAX_VCPUS,
    SVM_SEV_FEAT_SNP_ACTIVE,
    check_policy,
    firmware_failure,
)
from snpemu.kvm.ports import HostWrite, LaunchFinish, RmpState
from snpemu.kvm.reasons import KvmReason
from snpemu.kvm.uapi import (
    GHCB_VERSION_DEFAULT,
    KVM_MAX_VCPU_IDS,
    KVM_SEV_SNP_FINISH_DATA_SIZE,
    KVM_SEV_SNP_ID_AUTH_SIZE,
    KVM_SEV_SNP_ID_BLOCK_SIZE,
    Errno,
    refuse,
    with_errno,
)
from snpemu.kvm.undo import Undo
from snpemu.kvm.vm import Vcpu, Vm, VmState
from snpemu.runtime.peers import PeerError
from snpemu.vmm import vmsa

if TYPE_CHECKING:
    from snpemu.kvm.machine import Kvm

log = logging.getLogger(__name__)
# KERNEL: arch/x86/include/uapi/asm/kvm.h KVM_SEV_SNP_PAGE_TYPE_*: what userspace may launch
# (VMSA pages are KVM's own, in LAUNCH_FINISH)
USER_PAGE_TYPES = frozenset(
    {PageType.NORMAL, PageType.ZERO, PageType.UNMEASURED, PageType.SECRETS, PageType.CPUID}
)


def _state(message: str, errno: Errno = Errno.EINVAL) -> SnpemuError:
    return refuse(WrongState, errno, message, reason=KvmReason.VM_STATE)


def _einval(message: str) -> SnpemuError:
    return refuse(InvalidArgument, Errno.EINVAL, message)


def fw_error(e: PeerError, errno: Errno = Errno.EIO) -> SnpemuError:
    """A firmware command's failure: -EIO with the status in kvm_sev_cmd.error (KERNEL:
    include/linux/psp-sev.h, sev_issue_cmd())."""
    if e.fw_status is None:
        raise e
    return with_errno(firmware_failure(e), errno)


def _snp_guest(vm: Vm, command: str) -> None:
    # KERNEL: sev.c snp_launch_start()/snp_launch_finish(): !sev_snp_guest() -> -ENOTTY
    if not vm.sev_active:
        raise _state(f"{command}: {vm.vm_id} is not an SNP guest yet (KVM_SEV_INIT2)", Errno.ENOTTY)


async def init2(kvm: Kvm, vm: Vm, vmsa_features: int, flags: int, ghcb_version: int) -> None:
    """KERNEL: arch/x86/kvm/svm/sev.c sev_mem_enc_ioctl(), sev_guest_init2(), __sev_guest_init()"""
    kvm.need_snp()
    if vm.sev_active:
        # sev_mem_enc_ioctl(): a command below KVM_SEV_SNP_LAUNCH_START on an SNP guest
        raise _state(f"{vm.vm_id} is an SNP guest already: KVM_SEV_INIT2 again", Errno.EPERM)
    if vm.vcpus:
        raise _state(f"{vm.vm_id} has vCPUs: KVM_SEV_INIT2 comes before KVM_CREATE_VCPU")
    if flags:
        raise _einval(f"flags {flags:#x} must be 0")
    supported = kvm.supported_vmsa_features
    if vmsa_features & ~supported:
        raise refuse(
            InvalidArgument,
            Errno.EINVAL,
            f"vmsa_features {vmsa_features:#x}: bits {vmsa_features & ~supported:#x} are not "
            f"in this host's ({supported:#x}; KVM sets SNP_ACTIVE itself)",
            reason=KvmReason.VMSA_FEATURES_UNSUPPORTED,
        )
    # KERNEL: __sev_guest_init(): above GHCB_VERSION_MAX; and (kvm-x86 tree) below 2 for SNP
    if ghcb_version > GHCB_VERSION_MAX or ghcb_version == 1:
        raise _einval(f"ghcb_version {ghcb_version}: an SNP guest speaks GHCB version 2")
    if not kvm.free_asids:
        # KERNEL: sev.c sev_asid_new(): -EBUSY when none is free
        raise refuse(
            WrongState,
            Errno.EBUSY,
            "no SNP ASID left (all in use)",
            reason=KvmReason.ASID_EXHAUSTED,
        )
    asid = kvm.free_asids.pop(0)
    async with Undo() as undo:
        undo.push("the ASID", lambda: _give_back(kvm, asid))
        runs = list(vm.memslots.runs)
        if runs:
            # unmapped again on failure, in case rmp mapped them before its answer was lost
            undo.push("the NPT", lambda: kvm.rmp.update_npt(vm.vm_id, asid, unmap=runs))
            await kvm.rmp.update_npt(vm.vm_id, asid, map=runs)
        # KERNEL: __sev_guest_init() -> snp_guest_req_init(), after the ASID and the firmware's
        # init: the guest-request bounce pages, a hypervisor page and a firmware page
        (req,) = await kvm.rmp.allocate(1, Placement.ANY)
        undo.push("the request page", lambda: kvm.rmp.free([req]))
        res = await firmware_page(kvm.rmp, kvm.psp, f"guest-request page of {vm.vm_id}")
        undo.commit()
    vm.bounce_req, vm.bounce_res = pfn_to_spa(req), res
    vm.asid = asid
    vm.sev_features = vmsa_features | SVM_SEV_FEAT_SNP_ACTIVE
    vm.ghcb_version = ghcb_version or GHCB_VERSION_DEFAULT
    vm.sev_active = True


async def _give_back(kvm: Kvm, asid: int) -> None:
    kvm.free_asids.insert(0, asid)


async def create_vcpu(kvm: Kvm, vm: Vm, vcpu_id: int, reset_eip: int, vcpu_type: int = 0) -> Vcpu:
    """KERNEL: virt/kvm/kvm_main.c kvm_vm_ioctl_create_vcpu()"""
    if vcpu_type and vcpu_type not in VCPU_TYPES:
        raise _einval(f"unknown vcpu_type {vcpu_type}")
    signature = vmsa.vcpu_signature(VCPU_TYPES[vcpu_type or DEFAULT_VCPU_TYPE], kvm.host_signature)
    if vm.vcpus and signature != vm.cpuid_signature:
        raise _einval(f"vcpu_type {vcpu_type}: {vm.vm_id}'s vCPUs are another model")
    if vcpu_id >= KVM_MAX_VCPU_IDS:
        raise _einval(f"vcpu_id {vcpu_id} is not below KVM_MAX_VCPU_IDS ({KVM_MAX_VCPU_IDS})")
    if len(vm.vcpus) >= MAX_VCPUS:
        raise _einval(f"{vm.vm_id} has {MAX_VCPUS} vCPUs, this host's most")
    if vcpu_id in vm.vcpus:
        raise refuse(WrongState, Errno.EEXIST, f"vCPU {vcpu_id} exists", reason=KvmReason.VM_STATE)
    # UNVERIFIED(vcpu-before-init2): KVM makes the vCPU and then refuses KVM_SEV_INIT2;
    # without an ASID there is no identity to give it, so it is refused here, one step sooner.
    if not vm.sev_active:
        raise _state(f"{vm.vm_id}: KVM_CREATE_VCPU comes after KVM_SEV_INIT2")
    # UNVERIFIED(vcpu-after-finish): the kernel's copies do not settle it; a vCPU made after
    # the launch would have no measured VMSA, so it is refused.
    if vm.state == VmState.RUNNING:
        raise _state(f"{vm.vm_id} is launched: its vCPUs were measured with it")
    vcpu = Vcpu(vcpu_id, secrets.token_bytes(32), runnable=(vcpu_id == 0), reset_eip=reset_eip)
    vm.vcpus[vcpu_id] = vcpu
    vm.cpuid_signature = signature
    try:
        await kvm.rmp.register_identity(kvm.identity(vm, vcpu_id))
    except BaseException:
        del vm.vcpus[vcpu_id]
        raise
    return vcpu


async def launch_start(kvm: Kvm, vm: Vm, policy: int, gosvw: bytes, flags: int) -> None:
    """KERNEL: arch/x86/kvm/svm/sev.c snp_launch_start()"""
    _snp_guest(vm, "KVM_SEV_SNP_LAUNCH_START")
    if vm.gctx:
        raise _state(
            f"{vm.vm_id} has a guest context: one SNP_LAUNCH_START a VM",
        )
    if flags:
        raise _einval(f"flags {flags:#x} must be 0")
    if len(gosvw) not in (0, 16):
        raise _einval(f"gosvw is 16 bytes, not {len(gosvw)}")
    try:
        check_policy(policy)
    except SnpemuError as e:
        raise with_errno(e, Errno.EINVAL) from None
    try:
        await context.launch_start(kvm, vm, policy, gosvw or bytes(16))
    except context.ContextFailed as e:
        # KERNEL: snp_context_create() failing is -ENOTTY
        raise fw_error(e.cause, Errno.ENOTTY) from None
    except PeerError as e:
        raise fw_error(e) from None
    vm.state = VmState.LAUNCHING


LAUNCH_UPDATE_PAGES_MAX = 4096  # 16 MiB: a firmware image or kernel in one or a few calls


async def launch_update(
    kvm: Kvm,
    vm: Vm,
    *,
    gfn_start: int,
    uaddr: int,
    length: int,
    page_type: int,
    flags: int,
    source: bytes,
) -> int:
    """Pages done (every page from gfn_start, or fewer: the memslot ended or a later page
    failed). KERNEL: arch/x86/kvm/svm/sev.c snp_launch_update(), sev_gmem_post_populate();
    virt/kvm/guest_memfd.c kvm_gmem_populate()"""
    if not vm.sev_active or not vm.gctx:
        raise _state(f"{vm.vm_id} has no launch under way (KVM_SEV_SNP_LAUNCH_START)")
    if length % PAGE or length == 0:
        raise _einval(f"len {length:#x} must be a non-zero multiple of 4096")
    if flags:
        raise _einval(f"flags {flags:#x} must be 0")
    if page_type not in USER_PAGE_TYPES:
        raise _einval(f"type {page_type} is not a KVM_SEV_SNP_PAGE_TYPE_* userspace may launch")
    zero = page_type == PageType.ZERO
    if not zero and (uaddr == 0 or uaddr % PAGE):
        raise _einval(f"uaddr {uaddr:#x} must be a non-zero page-aligned address")
    if not zero and len(source) != length:
        # UNVERIFIED(launch-source-short): the source travels with the request, so a short one
        # is refused before any page; KVM would copy_from_user() page by page and fail at the
        # first missing one (-EFAULT, made -EIO by snp_launch_update(), or progress up to it)
        if len(source) < length:
            raise refuse(
                InvalidArgument,
                Errno.EFAULT,
                f"source has {len(source)} bytes, fewer than len {length} (the pages at uaddr "
                "past it are not there)",
            )
        raise _einval(f"source has {len(source)} bytes, more than len {length}")
    gpa = gfn_start * PAGE
    slot = next((s for s in vm.slots.values() if s.holds(gpa)), None)
    if slot is None:
        raise _einval(f"gfn {gfn_start:#x} is in no guest_memfd memslot")
    # kvm_gmem_populate(): the range is cut at the end of its memslot, and the loop stops
    # early on a pending signal with the pages done so far (the VMM calls again for the
    # rest); here it stops after LAUNCH_UPDATE_PAGES_MAX, so one call cannot hold kvm long
    npages = min(length // PAGE, (slot.gpa + slot.size - gpa) // PAGE, LAUNCH_UPDATE_PAGES_MAX)
    private = vm.attributes.private_prefix(gpa, gpa + npages * PAGE) // PAGE
    if private:
        # kvm_gmem_populate() takes each page's folio from the guest_memfd (new if it had none)
        await faultin(kvm, vm, gpa, min(npages, private) * PAGE)
    spas = [vm.memslots.translate(gpa + i * PAGE) for i in range(npages)]
    assigned = await assigned_entries(kvm.rmp, [spa_to_pfn(Spa(s)) for s in spas if s is not None])
    cause: SnpemuError | None = None
    ready = len(spas)  # the pages before the first one that cannot be populated
    for i, spa in enumerate(spas):
        if i >= private:
            # __kvm_gmem_populate(): a gfn without KVM_MEMORY_ATTRIBUTE_PRIVATE
            cause = _einval(f"GPA {gpa + i * PAGE:#x} is not private (SetMemoryAttributes)")
        elif spa is None:
            raise AssertionError("a private page faultin() left unbacked")  # INVARIANT
        elif spa_to_pfn(Spa(spa)) in assigned:
            # sev_gmem_post_populate(): an RMP entry already assigned
            cause = refuse(WrongState, Errno.EEXIST, f"GPA {gpa + i * PAGE:#x} is private already")
        if cause is not None:
            ready = i
            break
    todo = [Spa(s) for s in spas[:ready] if s is not None]
    if not zero:
        # the contents first: the kernel copies each page just before its RMPUPDATE, but a
        # page left shared by a failure holds only what the VMM wrote to it either way
        await _write_pages(kvm, todo, source)
    done = 0
    for i, spa in enumerate(todo):
        try:
            await _populate(kvm, vm, spa, gpa + i * PAGE, page_type, None)
        except PeerError as e:
            if e.fw_status is None:
                raise
            cause = fw_error(e)
            break
        done += 1
    if cause is not None and done == 0:
        # snp_launch_update(): every failure of the first page is -EIO
        if cause.metadata.get("errno") != Errno.EIO:
            cause.metadata["cause"] = cause.metadata.get("errno", "")
        raise with_errno(cause, Errno.EIO)
    return done


WRITES_IN_FLIGHT = 64  # host writes (a page each) sent before their answers come back


async def _write_pages(kvm: Kvm, spas: list[Spa], source: bytes) -> None:
    """source[i * 4K:] to spas[i]: the writes are independent, so they overlap."""
    for first in range(0, len(spas), WRITES_IN_FLIGHT):
        chunk = spas[first : first + WRITES_IN_FLIGHT]
        await asyncio.gather(
            *(
                kvm.rmp.host_write(
                    HostWrite(
                        spa,
                        source[(first + i) * PAGE : (first + i + 1) * PAGE],
                        AccessOrigin.USER,
                        "vmm",
                    )
                )
                for i, spa in enumerate(chunk)
            )
        )


async def _populate(
    kvm: Kvm, vm: Vm, spa: Spa, gpa: int, page_type: int, data: HostWrite | None
) -> None:
    """One page: its contents copied in, RMPUPDATE to pre-guest, SNP_LAUNCH_UPDATE; a page the
    firmware refused is reclaimed (KERNEL: sev_gmem_post_populate())."""
    if data is not None:
        await kvm.rmp.host_write(data)
    code = await kvm.rmp.rmpupdate(
        spa, RmpState(assigned=True, gpa=Gpa(gpa), asid=vm.asid, immutable=True)
    )
    if code != Code.SUCCESS:
        raise refuse(WrongState, Errno.EFAULT, f"RMPUPDATE of {spa:#x} to pre-guest: code {code}")
    try:
        await kvm.psp.launch_update(Spa(vm.gctx), spa, page_type)
    except PeerError:
        # UNVERIFIED(launch-update-reclaim): the firmware here refuses to reclaim a page of a
        # guest still launching, so the page stays pre-guest until DestroyVm reclaims it
        await reclaim(kvm.rmp, kvm.psp, spa)
        raise


async def launch_finish(kvm: Kvm, vm: Vm, f: LaunchFinish, flags: int = 0) -> bytes:
    """KERNEL: arch/x86/kvm/svm/sev.c snp_launch_finish(), snp_launch_update_vmsa()"""
    _snp_guest(vm, "KVM_SEV_SNP_LAUNCH_FINISH")
    if not vm.gctx:
        raise _state(f"{vm.vm_id} has no launch under way (KVM_SEV_SNP_LAUNCH_START)")
    # UNVERIFIED(finish-twice): KVM keeps no "finished" flag; the firmware would refuse a
    # second SNP_LAUNCH_FINISH, after KVM re-synced VMSAs that are the guest's now
    if vm.state == VmState.RUNNING:
        raise _state(f"{vm.vm_id} is launched already")
    if flags:
        raise _einval(f"flags {flags:#x} must be 0")
    # KVM copies the ID block and auth after measuring the VMSAs (psp_copy_user_blob()); they
    # are checked first here, so a bad request changes nothing
    if f.id_block_en:
        for name, blob, size in (
            ("id_block", f.id_block, KVM_SEV_SNP_ID_BLOCK_SIZE),
            ("id_auth", f.id_auth, KVM_SEV_SNP_ID_AUTH_SIZE),
        ):
            if not blob:
                raise _einval(f"id_block_en: {name} is required (its uaddr is 0)")
            if len(blob) != size:
                raise refuse(
                    InvalidArgument, Errno.EFAULT, f"{name} is {size} bytes, not {len(blob)}"
                )
    if f.host_data and len(f.host_data) != KVM_SEV_SNP_FINISH_DATA_SIZE:
        raise _einval(f"host_data is {KVM_SEV_SNP_FINISH_DATA_SIZE} bytes, not {len(f.host_data)}")
    await _measure_vmsas(kvm, vm)
    try:
        measurement = await kvm.psp.launch_finish(
            Spa(vm.gctx),
            LaunchFinish(
                id_block=f.id_block if f.id_block_en else b"",
                id_auth=f.id_auth if f.id_block_en else b"",
                id_block_en=f.id_block_en,
                auth_key_en=f.auth_key_en and f.id_block_en,
                vcek_disabled=f.vcek_disabled,
                host_data=f.host_data,
            ),
        )
    except PeerError as e:
        raise fw_error(e) from None
    vm.measurement = measurement
    vm.state = VmState.RUNNING
    log.info(
        "launched %s: measurement %s",
        vm.vm_id,
        measurement.hex(),
        extra={"event": "vm_launched"},
    )
    return measurement


async def _measure_vmsas(kvm: Kvm, vm: Vm) -> None:
    """Each vCPU's VMSA, in creation order, made private at INITIAL_VMSA_GPA and measured; one
    measured by a finish that failed later is not measured again. KERNEL: sev.c
    snp_launch_update_vmsa(), sev_es_sync_vmsa()"""
    for vcpu in vm.vcpus.values():
        if vcpu.vmsa:
            continue
        page = vmsa.build(vcpu.reset_eip or vmsa.BSP_EIP, vm.cpuid_signature, vm.sev_features)
        (pfn,) = await kvm.rmp.allocate(1, Placement.SNP_SAFE)
        spa = pfn_to_spa(pfn)
        vm.vmsa_pages.append(spa)  # DestroyVm gives it back, whatever happens next
        try:
            await _populate(kvm, vm, spa, VMSA_GPA, PageType.VMSA, HostWrite(spa, page))
        except PeerError as e:
            raise fw_error(e) from None
        vcpu.vmsa = spa
