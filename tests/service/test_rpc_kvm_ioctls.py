"""kvm's ioctl-level RPCs through gRPC: a guest launched step by step as QEMU launches it over
KVM, measured as LaunchVm and sev-snp-measure measure it, and each refusal with the errno the
kernel returns for it (the expected errnos are the kernel's, cited at each case)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from snp.common.v1 import handles_pb2
from snp.kvm.v1 import kvm_pb2 as pb
from snpemu.runtime.status import error_info
from snpemu.vmm.ovmf import Ovmf, SectionType

from tests.conftest import OVMF, sev_snp_measure
from tests.service.host_stack import HOST, Stack, host_stack

KVM = pb.DESCRIPTOR.services_by_name["KvmService"]
PAGE = 4096
# KERNEL: arch/x86/include/uapi/asm/kvm.h KVM_X86_SNP_VM, KVM_SEV_SNP_PAGE_TYPE_*
KVM_X86_SNP_VM, KVM_X86_DEFAULT_VM, KVM_X86_SEV_VM = 4, 0, 2
NORMAL, ZERO, SECRETS, CPUID = 1, 3, 5, 6
# KERNEL: include/uapi/linux/kvm.h
KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, KVM_MEM_GUEST_MEMFD = 1, 2, 4
KVM_MEMORY_ATTRIBUTE_PRIVATE = 1 << 3
# QEMU's default guest policy for sev-snp-guest: SMT | RSVD_MBO (bit 17)
POLICY = 0x30000
HVA = 0x7F00_0000_0000  # where this test's "VMM" has guest memory (any user address will do)


async def refused(call: Awaitable[object], code: grpc.StatusCode, errno: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    detail = error_info(info.value)
    assert detail is not None and detail.metadata.get("errno") == errno, (
        info.value.details(),
        detail,
    )
    return str(info.value.details())


class Vmm:
    """What QEMU does, one RPC per ioctl, with this stack's kvm."""

    def __init__(self, s: Stack) -> None:
        self.kvm = s.kvm
        self.vm = handles_pb2.VmHandle()

    async def create(self) -> None:
        r = await self.kvm.CreateVm(pb.CreateVmRequest(vm_type=KVM_X86_SNP_VM), metadata=HOST)
        self.vm = r.vm

    async def init2(self) -> None:
        await self.kvm.SnpInit2(pb.SnpInit2Request(vm=self.vm), metadata=HOST)

    async def memory(self, slot: int, gpa: int, size: int, hva: int) -> int:
        fd = (
            await self.kvm.CreateGuestMemfd(
                pb.CreateGuestMemfdRequest(vm=self.vm, size=size), metadata=HOST
            )
        ).fd
        await self.kvm.SetMemoryRegion(
            pb.SetMemoryRegionRequest(
                vm=self.vm,
                slot=slot,
                flags=KVM_MEM_GUEST_MEMFD,
                guest_phys_addr=gpa,
                memory_size=size,
                userspace_addr=hva,
                guest_memfd=fd,
            ),
            metadata=HOST,
        )
        return int(fd)

    async def update(self, gpa: int, page_type: int, source: bytes, npages: int) -> None:
        """sev_snp_launch_update(): private first, then LAUNCH_UPDATE until len is 0."""
        await self.kvm.SetMemoryAttributes(
            pb.SetMemoryAttributesRequest(
                vm=self.vm,
                address=gpa,
                size=npages * PAGE,
                attributes=KVM_MEMORY_ATTRIBUTE_PRIVATE,
            ),
            metadata=HOST,
        )
        req = pb.SnpLaunchUpdateRequest(
            vm=self.vm,
            gfn_start=gpa // PAGE,
            uaddr=0 if page_type == ZERO else HVA + gpa,
            len=npages * PAGE,
            type=page_type,
            source=source,
        )
        while req.len:
            r = await self.kvm.SnpLaunchUpdate(req, metadata=HOST)
            assert r.len < req.len
            done = (req.len - r.len) // PAGE
            req.gfn_start, req.uaddr, req.len = r.gfn_start, r.uaddr, r.len
            req.source = req.source[done * PAGE :]


async def launch_step_by_step(s: Stack, firmware: bytes, memory: int, vcpus: int) -> bytes:
    """The order of QEMU target/i386/sev.c: INIT2, RAM, vCPUs, LAUNCH_START, the firmware's
    memory, its pages and the metadata sections' (snp_populate_metadata_pages()), FINISH."""
    ovmf = Ovmf.parse(firmware)
    vmm = Vmm(s)
    await vmm.create()
    await vmm.init2()
    await vmm.memory(0, 0, memory, HVA)
    for i in range(vcpus):
        await s.kvm.CreateVcpu(
            pb.CreateVcpuRequest(
                vm=vmm.vm,
                vcpu_id=i,
                reset_eip=ovmf.reset_eip if i else 0,
                vcpu_type=pb.VCPU_TYPE_EPYC_MILAN,
            ),
            metadata=HOST,
        )
    await s.kvm.SnpLaunchStart(pb.SnpLaunchStartRequest(vm=vmm.vm, policy=POLICY), metadata=HOST)
    await vmm.memory(1, ovmf.gpa, len(firmware), HVA + ovmf.gpa)
    await vmm.update(ovmf.gpa, NORMAL, firmware, len(firmware) // PAGE)
    for sec in ovmf.sections:
        n = sec.size // PAGE
        if sec.kind == SectionType.SNP_SECRETS:
            await vmm.update(sec.gpa, SECRETS, bytes(PAGE), 1)
        elif sec.kind == SectionType.CPUID:
            await vmm.update(sec.gpa, CPUID, bytes(PAGE), 1)
        else:  # SEC_MEM, and the kernel hashes with no kernel: ZERO
            await vmm.update(sec.gpa, ZERO, b"", n)
    r = await s.kvm.SnpLaunchFinish(pb.SnpLaunchFinishRequest(vm=vmm.vm), metadata=HOST)
    info = (await s.kvm.GetVm(pb.GetVmRequest(vm=vmm.vm), metadata=HOST)).vm
    assert info.state == pb.VM_STATE_RUNNING and info.measurement == r.measurement
    return bytes(r.measurement)


@pytest.mark.fidelity
@pytest.mark.rpc("snp.kvm.v1.KvmService/SnpInit2", "ok")
@pytest.mark.rpc("snp.kvm.v1.KvmService/CreateGuestMemfd", "ok")
@pytest.mark.rpc("snp.kvm.v1.KvmService/SetMemoryRegion", "ok")
@pytest.mark.rpc("snp.kvm.v1.KvmService/SetMemoryAttributes", "ok")
@pytest.mark.rpc("snp.kvm.v1.KvmService/CreateVcpu", "ok")
@pytest.mark.rpc("snp.kvm.v1.KvmService/SnpLaunchStart", "ok")
@pytest.mark.rpc("snp.kvm.v1.KvmService/SnpLaunchUpdate", "ok")
@pytest.mark.rpc("snp.kvm.v1.KvmService/SnpLaunchFinish", "ok")
async def test_a_step_by_step_launch_measures_as_launchvm_and_sev_snp_measure(
    tmp_path: Path,
) -> None:
    assert Path(OVMF).exists(), "Debian's ovmf package is not installed (make install installs it)"
    firmware = Path(OVMF).read_bytes()
    async with host_stack(tmp_path, memory="1G", SNPEMU_KVM_FIRMWARE=OVMF) as s:
        for vcpus in (1, 2):
            by_steps = await launch_step_by_step(s, firmware, 128 << 20, vcpus)
            at_once = await s.launch(
                memory=128 << 20,
                vcpus=vcpus,
                firmware_path=OVMF,
                vcpu_type=pb.VCPU_TYPE_EPYC_MILAN,
            )
            assert by_steps == at_once.measurement, vcpus
            assert by_steps.hex() == sev_snp_measure(ovmf=OVMF, vcpus=vcpus), vcpus


Case = tuple[str, Callable[[], Awaitable[object]], grpc.StatusCode, str]
BAD, STATE = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION


async def snapshot(s: Stack, vm: handles_pb2.VmHandle) -> tuple[bytes, list[bytes]]:
    info = (await s.kvm.GetVm(pb.GetVmRequest(vm=vm), metadata=HOST)).vm
    return info.SerializeToString(), await s.rmp_entries()


@pytest.mark.rpc("snp.kvm.v1.KvmService/CreateVm", "error")
@pytest.mark.rpc("snp.kvm.v1.KvmService/SnpInit2", "error")
@pytest.mark.rpc("snp.kvm.v1.KvmService/CreateGuestMemfd", "error")
@pytest.mark.rpc("snp.kvm.v1.KvmService/SetMemoryRegion", "error")
@pytest.mark.rpc("snp.kvm.v1.KvmService/SetMemoryAttributes", "error")
@pytest.mark.rpc("snp.kvm.v1.KvmService/CreateVcpu", "error")
@pytest.mark.rpc("snp.kvm.v1.KvmService/SnpLaunchStart", "error")
@pytest.mark.rpc("snp.kvm.v1.KvmService/SnpLaunchUpdate", "error")
@pytest.mark.rpc("snp.kvm.v1.KvmService/SnpLaunchFinish", "error")
async def test_each_refusal_has_the_kernels_errno_and_changes_nothing(stack: Stack) -> None:
    s, kvm = stack, stack.kvm
    # KERNEL: arch/x86/kvm/x86.c kvm_arch_init_vm(): a type the host does not support
    for vm_type in (KVM_X86_DEFAULT_VM, KVM_X86_SEV_VM, 5):
        await refused(
            kvm.CreateVm(pb.CreateVmRequest(vm_type=vm_type), metadata=HOST), BAD, "EINVAL"
        )
    vmm = Vmm(s)
    await vmm.create()
    vm = vmm.vm

    def slot(**kw: int) -> Callable[[], Awaitable[object]]:
        fields = {"slot": 0, "flags": KVM_MEM_GUEST_MEMFD, "guest_phys_addr": 0}
        fields |= {"memory_size": 1 << 20, "userspace_addr": HVA, "guest_memfd": 3} | kw
        return lambda: kvm.SetMemoryRegion(
            pb.SetMemoryRegionRequest(vm=vm, **fields), metadata=HOST
        )

    def update(**kw: int | bytes) -> Callable[[], Awaitable[object]]:
        fields: dict[str, int | bytes] = {"gfn_start": 0, "uaddr": HVA, "len": PAGE}
        fields |= {"type": NORMAL, "source": bytes(PAGE)} | kw
        return lambda: kvm.SnpLaunchUpdate(
            pb.SnpLaunchUpdateRequest(vm=vm, **fields), metadata=HOST
        )  # type: ignore[arg-type]

    def start(**kw: int | bytes) -> Callable[[], Awaitable[object]]:
        fields: dict[str, int | bytes] = {"policy": POLICY} | kw
        return lambda: kvm.SnpLaunchStart(pb.SnpLaunchStartRequest(vm=vm, **fields), metadata=HOST)  # type: ignore[arg-type]

    def finish(**kw: int | bytes | bool) -> Callable[[], Awaitable[object]]:
        return lambda: kvm.SnpLaunchFinish(pb.SnpLaunchFinishRequest(vm=vm, **kw), metadata=HOST)  # type: ignore[arg-type]

    def vcpu(vcpu_id: int, **kw: int) -> Callable[[], Awaitable[object]]:
        return lambda: kvm.CreateVcpu(
            pb.CreateVcpuRequest(vm=vm, vcpu_id=vcpu_id, **kw), metadata=HOST
        )  # type: ignore[arg-type]

    def attrs(**kw: int) -> Callable[[], Awaitable[object]]:
        fields = {"address": 0, "size": PAGE, "attributes": KVM_MEMORY_ATTRIBUTE_PRIVATE} | kw
        return lambda: kvm.SetMemoryAttributes(
            pb.SetMemoryAttributesRequest(vm=vm, **fields), metadata=HOST
        )

    before_init: list[Case] = [
        # KERNEL: sev.c snp_launch_start()/snp_launch_finish(): !sev_snp_guest() -> -ENOTTY
        ("launch start before INIT2", start(), STATE, "ENOTTY"),
        ("launch finish before INIT2", finish(), STATE, "ENOTTY"),
        # KERNEL: sev.c snp_launch_update(): !sev_snp_guest() || !snp_context -> -EINVAL
        ("launch update before INIT2", update(), STATE, "EINVAL"),
        # KERNEL: sev.c __sev_guest_init()
        (
            "INIT2 with SNP_ACTIVE (KVM sets it)",
            lambda: kvm.SnpInit2(pb.SnpInit2Request(vm=vm, vmsa_features=1), metadata=HOST),
            BAD,
            "EINVAL",
        ),
        (
            "INIT2 with flags",
            lambda: kvm.SnpInit2(pb.SnpInit2Request(vm=vm, flags=1), metadata=HOST),
            BAD,
            "EINVAL",
        ),
        (
            "INIT2 with ghcb_version 3 (> GHCB_VERSION_MAX)",
            lambda: kvm.SnpInit2(pb.SnpInit2Request(vm=vm, ghcb_version=3), metadata=HOST),
            BAD,
            "EINVAL",
        ),
        (
            "INIT2 with ghcb_version 1 (SNP needs 2)",
            lambda: kvm.SnpInit2(pb.SnpInit2Request(vm=vm, ghcb_version=1), metadata=HOST),
            BAD,
            "EINVAL",
        ),
    ]
    await check(s, vm, before_init)
    await vmm.init2()
    ram = await vmm.memory(0, 0, 8 << 20, HVA)
    other = (await kvm.CreateVm(pb.CreateVmRequest(), metadata=HOST)).vm
    await kvm.SnpInit2(pb.SnpInit2Request(vm=other), metadata=HOST)
    others = (
        await kvm.CreateGuestMemfd(
            pb.CreateGuestMemfdRequest(vm=other, size=1 << 20), metadata=HOST
        )
    ).fd
    spare = (
        await kvm.CreateGuestMemfd(pb.CreateGuestMemfdRequest(vm=vm, size=1 << 20), metadata=HOST)
    ).fd
    created: list[Case] = [
        # KERNEL: sev.c sev_mem_enc_ioctl(): a command below 100 on an SNP guest -> -EPERM
        (
            "INIT2 again",
            lambda: kvm.SnpInit2(pb.SnpInit2Request(vm=vm), metadata=HOST),
            STATE,
            "EPERM",
        ),
        # KERNEL: virt/kvm/guest_memfd.c kvm_gmem_create()
        (
            "guest_memfd of 0 bytes",
            lambda: kvm.CreateGuestMemfd(pb.CreateGuestMemfdRequest(vm=vm), metadata=HOST),
            BAD,
            "EINVAL",
        ),
        (
            "guest_memfd not page sized",
            lambda: kvm.CreateGuestMemfd(
                pb.CreateGuestMemfdRequest(vm=vm, size=100), metadata=HOST
            ),
            BAD,
            "EINVAL",
        ),
        (
            "guest_memfd with a negative loff_t size",
            lambda: kvm.CreateGuestMemfd(
                pb.CreateGuestMemfdRequest(vm=vm, size=1 << 63), metadata=HOST
            ),
            BAD,
            "EINVAL",
        ),
        (
            "guest_memfd with an unknown flag",
            lambda: kvm.CreateGuestMemfd(
                pb.CreateGuestMemfdRequest(vm=vm, size=PAGE, flags=1 << 9), metadata=HOST
            ),
            BAD,
            "EINVAL",
        ),
        # KERNEL: virt/kvm/kvm_main.c check_memory_region_flags(), kvm_set_memory_region()
        (
            "memslot LOG_DIRTY with GUEST_MEMFD",
            slot(slot=5, flags=5, guest_phys_addr=1 << 30),
            BAD,
            "EINVAL",
        ),
        (
            "memslot READONLY on an SNP VM",
            slot(slot=5, flags=6, guest_phys_addr=1 << 30),
            BAD,
            "EINVAL",
        ),
        ("memslot unknown flag", slot(slot=5, flags=4 | 8, guest_phys_addr=1 << 30), BAD, "EINVAL"),
        ("memslot size not a page multiple", slot(slot=5, memory_size=100), BAD, "EINVAL"),
        (
            "memslot GPA not page aligned",
            slot(slot=5, guest_phys_addr=(1 << 30) + 1),
            BAD,
            "EINVAL",
        ),
        (
            "memslot uaddr not page aligned",
            slot(slot=5, guest_phys_addr=1 << 30, userspace_addr=HVA + 1),
            BAD,
            "EINVAL",
        ),
        (
            "memslot uaddr outside user space",
            slot(slot=5, guest_phys_addr=1 << 30, userspace_addr=1 << 47),
            BAD,
            "EINVAL",
        ),
        (
            "memslot gmem offset not aligned",
            slot(slot=5, guest_phys_addr=1 << 30, guest_memfd_offset=1),
            BAD,
            "EINVAL",
        ),
        (
            "memslot address space 1 (no SMM)",
            slot(slot=(1 << 16) | 5, guest_phys_addr=1 << 30),
            BAD,
            "EINVAL",
        ),
        ("memslot id 32764", slot(slot=32764, guest_phys_addr=1 << 30), BAD, "EINVAL"),
        (
            "memslot GPA range wraps",
            slot(slot=5, guest_phys_addr=(1 << 64) - PAGE, memory_size=2 * PAGE),
            BAD,
            "EINVAL",
        ),
        (
            # `gpa + size < gpa` in u64: an end of exactly 2^64 wraps to 0
            "memslot GPA range ends at 2^64",
            slot(slot=5, guest_phys_addr=(1 << 64) - 2 * PAGE, memory_size=2 * PAGE),
            BAD,
            "EINVAL",
        ),
        ("delete a slot that is not there", slot(slot=5, memory_size=0), BAD, "EINVAL"),
        # "Private memslots are immutable, they can only be deleted"
        (
            "modify a guest_memfd slot",
            slot(slot=0, memory_size=8 << 20, guest_memfd=ram),
            BAD,
            "EINVAL",
        ),
        # kvm_check_memslot_overlap()
        (
            "memslot over another",
            slot(slot=5, guest_phys_addr=1 << 20, guest_memfd=spare),
            grpc.StatusCode.ALREADY_EXISTS,
            "EEXIST",
        ),
        # KERNEL: virt/kvm/guest_memfd.c kvm_gmem_bind()
        (
            "memslot with no such fd",
            slot(slot=5, guest_phys_addr=1 << 30, guest_memfd=999),
            grpc.StatusCode.NOT_FOUND,
            "EBADF",
        ),
        (
            "memslot with another VM's guest_memfd",
            slot(slot=5, guest_phys_addr=1 << 30, guest_memfd=others),
            BAD,
            "EINVAL",
        ),
        (
            "memslot past the guest_memfd's end",
            slot(slot=5, guest_phys_addr=1 << 30, guest_memfd=spare, memory_size=2 << 20),
            BAD,
            "EINVAL",
        ),
        # KERNEL: arch/x86/kvm/x86.c kvm_arch_prepare_memory_region(): base_gfn + npages - 1
        # past kvm_mmu_max_gfn(), the host's MAXPHYADDR (48 bits on EPYC), after the bind
        (
            "memslot past the host's physical address bits",
            slot(slot=5, guest_phys_addr=1 << 48, guest_memfd=spare),
            BAD,
            "EINVAL",
        ),
        (
            "memslot on gmem pages bound already",
            slot(slot=5, guest_phys_addr=1 << 30, guest_memfd=ram),
            BAD,
            "EINVAL",
        ),
        # KERNEL: virt/kvm/kvm_main.c kvm_vm_ioctl_set_mem_attributes()
        ("attributes with flags", attrs(flags=1), BAD, "EINVAL"),
        ("attributes other than PRIVATE", attrs(attributes=1), BAD, "EINVAL"),
        ("attributes of nothing", attrs(size=0), BAD, "EINVAL"),
        ("attributes wrapping", attrs(address=(1 << 64) - PAGE, size=2 * PAGE), BAD, "EINVAL"),
        ("attributes ending at 2^64", attrs(address=(1 << 64) - PAGE, size=PAGE), BAD, "EINVAL"),
        ("attributes not aligned", attrs(address=1), BAD, "EINVAL"),
        # KERNEL: virt/kvm/kvm_main.c kvm_vm_ioctl_create_vcpu()
        ("vCPU id 4096 (KVM_MAX_VCPU_IDS)", vcpu(4096), BAD, "EINVAL"),
        # KERNEL: sev.c snp_launch_start()
        ("launch start with flags", start(flags=1), BAD, "EINVAL"),
        (
            "launch start with policy bit 18 (MIGRATE_MA)",
            start(policy=POLICY | 1 << 18),
            BAD,
            "EINVAL",
        ),
        ("launch start without MBO bit 17", start(policy=0x10000), BAD, "EINVAL"),
        ("launch update before LAUNCH_START", update(), STATE, "EINVAL"),
        ("launch finish before LAUNCH_START", finish(), STATE, "EINVAL"),
    ]
    await check(s, vm, created)
    await vcpu(0)()
    await refused(vcpu(0)(), STATE, "EEXIST")  # kvm_vm_ioctl_create_vcpu(): the id is taken
    await start()()
    await refused(start()(), STATE, "EINVAL")  # one context a VM
    await kvm.SetMemoryAttributes(
        pb.SetMemoryAttributesRequest(
            vm=vm, address=0, size=2 * PAGE, attributes=KVM_MEMORY_ATTRIBUTE_PRIVATE
        ),
        metadata=HOST,
    )
    launching: list[Case] = [
        # KERNEL: sev.c snp_launch_update()
        ("launch update len 0", update(len=0), BAD, "EINVAL"),
        ("launch update len not page sized", update(len=100), BAD, "EINVAL"),
        ("launch update with flags", update(flags=1), BAD, "EINVAL"),
        ("launch update of VMSA type (KVM's own)", update(type=2), BAD, "EINVAL"),
        ("launch update of an unknown type", update(type=7), BAD, "EINVAL"),
        ("launch update uaddr 0", update(uaddr=0), BAD, "EINVAL"),
        ("launch update uaddr unaligned", update(uaddr=HVA + 1), BAD, "EINVAL"),
        ("launch update source short of len", update(len=2 * PAGE), BAD, "EFAULT"),
        ("launch update outside every memslot", update(gfn_start=(1 << 30) // PAGE), BAD, "EINVAL"),
        # kvm_gmem_populate(): a shared gfn fails the first page, and so the call: -EIO
        ("launch update of a shared page", update(gfn_start=2), BAD, "EIO"),
        # KERNEL: sev.c snp_launch_finish()
        ("launch finish with flags", finish(flags=1), BAD, "EINVAL"),
        ("launch finish ID block enabled, none given", finish(id_block_en=True), BAD, "EINVAL"),
    ]
    await check(s, vm, launching)
    # a range that runs past its page into a shared one does the private page and says so
    r = await kvm.SnpLaunchUpdate(
        pb.SnpLaunchUpdateRequest(
            vm=vm, gfn_start=1, uaddr=HVA + PAGE, len=2 * PAGE, type=NORMAL, source=bytes(2 * PAGE)
        ),
        metadata=HOST,
    )
    assert (r.gfn_start, r.uaddr, r.len) == (2, HVA + 2 * PAGE, PAGE)
    # kvm_gmem_populate(): a range is cut at the end of its memslot (8 MiB here), and the
    # caller told where to go on
    last = (8 << 20) - PAGE
    await attrs(address=last, size=2 * PAGE)()
    r = await update(
        gfn_start=last // PAGE, uaddr=HVA + last, len=2 * PAGE, source=bytes(2 * PAGE)
    )()
    assert (r.gfn_start, r.len) == ((8 << 20) // PAGE, PAGE)  # type: ignore[attr-defined]
    # sev_gmem_post_populate(): a page already private is -EEXIST, reported as -EIO
    await refused(update(gfn_start=1)(), grpc.StatusCode.FAILED_PRECONDITION, "EIO")
    await finish()()
    await refused(finish()(), STATE, "EINVAL")
    # kvm's choice where the kernel is silent (docs/fidelity.md): no vCPU after the launch
    await refused(vcpu(1)(), STATE, "EINVAL")


async def check(s: Stack, vm: handles_pb2.VmHandle, cases: list[Case]) -> None:
    """Each case refused with its code and errno, and nothing changed by any of them."""
    before = await snapshot(s, vm)
    for name, call, code, errno in cases:
        try:
            await refused(call(), code, errno)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None
        assert await snapshot(s, vm) == before, name
