"""KVM_SEV_INIT2's VMSA features and the guest-policy checks of an SNP launch, over real gRPC.

The expected values are upstream's, written out here:

- KERNEL: arch/x86/kvm/svm/sev.c __sev_guest_init(): vmsa_features outside
  sev_supported_vmsa_features is -EINVAL; SVM_SEV_FEAT_SNP_ACTIVE is ORed in for an SNP VM.
  sev_hardware_setup(): sev_supported_vmsa_features is SVM_SEV_FEAT_DEBUG_SWAP (with debug_swap
  on and a CPU that has it). QEMU target/i386/sev.c sev_common_kvm_init() clears SNP_ACTIVE
  before the ioctl, so a caller may pass it.
- KERNEL: arch/x86/kvm/svm/sev.c snp_launch_start(): a policy bit outside SNP_POLICY_MASK_VALID
  or RSVD_MBO clear is -EINVAL; SMT and SINGLE_SOCKET are left to the firmware.
- SPEC: SNP ABI, SNP_LAUNCH_START / SNP_ACTIVATE: SMT = 0 with SMT enabled, or SINGLE_SOCKET on a
  system with more than one socket, is POLICY_FAILURE (0x07).
"""

from __future__ import annotations

import struct
from pathlib import Path

import grpc
import pytest
from snp.kvm.v1 import kvm_pb2
from snp.rmp.v1 import rmp_pb2
from snpemu.runtime.status import error_info

from tests.conftest import sev_snp_measure
from tests.service.host_stack import HOST, Stack, host_stack

# KERNEL: arch/x86/include/asm/svm.h
SVM_SEV_FEAT_SNP_ACTIVE = 1 << 0
SVM_SEV_FEAT_DEBUG_SWAP = 1 << 5
# KERNEL: arch/x86/include/asm/msr-index.h MSR_AMD64_SEV_{ENABLED,ES_ENABLED,SNP_ENABLED}_BIT,
# MSR_AMD64_SNP_DEBUG_SWAP_BIT
SEV_STATUS_SEV_SNP = 0b111
SEV_STATUS_DEBUG_SWAP = 1 << 7
# KERNEL: arch/x86/kvm/svm/sev.c SNP_POLICY_MASK_*
API_MINOR, API_MAJOR = 0xFF, 0xFF << 8
SMT, RSVD_MBO, DEBUG, SINGLE_SOCKET = 1 << 16, 1 << 17, 1 << 19, 1 << 20
MASK_VALID = API_MINOR | API_MAJOR | SMT | RSVD_MBO | DEBUG | SINGLE_SOCKET
# SPEC: SNP ABI, Status Codes; ATTESTATION_REPORT PLATFORM_INFO (0x40) bit 0 SMT_EN
POLICY_FAILURE = 0x07
PLATFORM_INFO = 0x40


async def free_pages(s: Stack) -> int:
    info = await s.rmp.GetPlatformInfo(rmp_pb2.GetPlatformInfoRequest(), metadata=HOST)
    return int(info.free_pages)


async def create(s: Stack, **config: object) -> kvm_pb2.CreateVmResponse:
    cfg = kvm_pb2.VmConfig(
        memory_bytes=16 << 20,
        vcpus=1,
        firmware_path=str(s.firmware),
        **config,  # type: ignore[arg-type]
    )
    return await s.kvm.CreateVm(kvm_pb2.CreateVmRequest(config=cfg), metadata=HOST)


async def refused_by_kvm(s: Stack, **config: object) -> str:
    """CreateVm fails INVALID_ARGUMENT and nothing exists afterwards; the reason."""
    before = await free_pages(s)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await create(s, **config)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, config
    assert not (await s.kvm.ListVms(kvm_pb2.ListVmsRequest(), metadata=HOST)).vms
    assert await free_pages(s) == before
    reason = error_info(info.value)
    assert reason is not None
    return reason.reason


async def destroy(s: Stack, vm: object) -> None:
    r = await s.kvm.DestroyVm(kvm_pb2.DestroyVmRequest(vm=vm), metadata=HOST)  # type: ignore[arg-type]
    assert r.leaked_pages == 0


async def test_every_vmsa_feature_bit(tmp_path: Path) -> None:
    """__sev_guest_init(): only sev_supported_vmsa_features (DEBUG_SWAP) and SNP_ACTIVE (which
    QEMU clears and KVM sets) pass; any other bit is INVALID_ARGUMENT before anything exists."""
    supported = {0: SEV_STATUS_SEV_SNP, 5: SEV_STATUS_SEV_SNP | SEV_STATUS_DEBUG_SWAP}

    asids = []
    async with host_stack(tmp_path) as s:
        for bit in range(64):
            if bit not in supported:
                reason = await refused_by_kvm(s, guest_features=1 << bit)
                assert reason == "VMSA_FEATURES_UNSUPPORTED", bit
                continue
            made = await create(s, guest_features=1 << bit)
            vm = (await s.kvm.GetVm(kvm_pb2.GetVmRequest(vm=made.vm), metadata=HOST)).vm
            assert vm.sev_status == supported[bit], bit
            asids.append(made.asid)
            await destroy(s, made.vm)
        # the refusals took no ASID: the second VM has the next one
    result = asids
    assert result == [1, 2]


async def test_snp_active_is_in_the_measured_vmsa_even_when_not_requested(tmp_path: Path) -> None:
    """The VMSA's SEV_FEATURES (measured, SPEC: SNP ABI, VMSA page) carry SNP_ACTIVE whatever
    the caller asked: 0 launches as sev-snp-measure's 0x1, DEBUG_SWAP as 0x21."""

    async with host_stack(tmp_path) as s:
        plain = await s.launch(vcpus=2, guest_features=0)
        swap = await s.launch(vcpus=2, guest_features=SVM_SEV_FEAT_DEBUG_SWAP)
        plain, swap, fw = plain.measurement, swap.measurement, s.firmware
    assert plain.hex() == sev_snp_measure("--guest-features", "0x1", ovmf=str(fw), vcpus=2)
    features = SVM_SEV_FEAT_SNP_ACTIVE | SVM_SEV_FEAT_DEBUG_SWAP
    assert swap.hex() == sev_snp_measure("--guest-features", hex(features), ovmf=str(fw), vcpus=2)


async def test_kvm_refuses_policy_bits_outside_its_mask_and_mbo_clear(stack: Stack) -> None:
    """snp_launch_start(): every bit outside SNP_POLICY_MASK_VALID, and RSVD_MBO clear, are
    INVALID_ARGUMENT with nothing created; every bit inside it is KVM's to pass on."""

    for bit in range(64):
        if not MASK_VALID & 1 << bit:
            reason = await refused_by_kvm(stack, policy=SMT | RSVD_MBO | 1 << bit)
            assert reason == "POLICY_UNSUPPORTED", bit
    assert await refused_by_kvm(stack, policy=SMT) == "POLICY_MBO"
    # SMT and SINGLE_SOCKET are no longer KVM's to refuse (nor DEBUG, nor ABI bits)
    for policy in (RSVD_MBO, SMT | RSVD_MBO | SINGLE_SOCKET, MASK_VALID):
        made = await create(stack, policy=policy)
        await destroy(stack, made.vm)


async def launch_refused(s: Stack, policy: int) -> None:
    """LaunchVm fails with the firmware's POLICY_FAILURE in ErrorInfo; the VM is still CREATED
    with no guest context, and no page was kept (KVM decommissions the context)."""
    made = await create(s, policy=policy)
    before = await free_pages(s)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await s.kvm.LaunchVm(kvm_pb2.LaunchVmRequest(vm=made.vm), metadata=HOST)
    # the psp's mapping of POLICY_FAILURE (snpemu/psp/status.py): bad input for this platform
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error_info(info.value)
    assert details is not None
    assert (details.reason, details.metadata["fw_status"]) == (
        "POLICY_FAILURE",
        f"0x{POLICY_FAILURE:04x}",
    )
    vm = (await s.kvm.GetVm(kvm_pb2.GetVmRequest(vm=made.vm), metadata=HOST)).vm
    assert (vm.state, vm.gctx.gctx_paddr) == (kvm_pb2.VM_STATE_CREATED, 0)
    assert await free_pages(s) == before
    await destroy(s, made.vm)


async def smt_en(s: Stack, policy: int) -> int:
    """Launch, then PLATFORM_INFO bit 0 of the guest's attestation report."""
    guest = await s.launch(policy=policy)
    await guest.register_ghcb()
    r, _, payload = await guest.guest_request(bytes(96))
    assert r.sw_exit_info_2 == 0 and payload is not None
    return int(struct.unpack_from("<Q", payload, 0x20 + PLATFORM_INFO)[0]) & 1


async def test_smt_and_single_socket_are_refused_by_the_firmware(tmp_path: Path) -> None:
    """Default host: SMT enabled, one socket. SMT = 0 fails SNP_LAUNCH_START; SINGLE_SOCKET
    launches."""

    async with host_stack(tmp_path) as s:
        await launch_refused(s, RSVD_MBO)
        result = await smt_en(s, SMT | RSVD_MBO | SINGLE_SOCKET)
    assert result == 1


async def test_without_smt_and_with_two_sockets(tmp_path: Path) -> None:
    """SMT disabled, two sockets: SMT = 0 launches (and the report says SMT is off);
    SINGLE_SOCKET fails SNP_ACTIVATE."""

    env = {"SNPEMU_HOST_SMT": "0", "SNPEMU_HOST_SOCKETS": "2"}
    async with host_stack(tmp_path, psp_env=env) as s:
        await launch_refused(s, SMT | RSVD_MBO | SINGLE_SOCKET)
        result = await smt_en(s, RSVD_MBO)
    assert result == 0


async def test_a_launch_that_failed_after_launch_start_is_not_started_again(stack: Stack) -> None:
    """KERNEL: arch/x86/kvm/svm/sev.c snp_launch_start(): "Don't allow userspace to allocate
    memory for more than 1 SNP context" (-EINVAL while sev->snp_context is set). A launch whose
    SNP_LAUNCH_FINISH the firmware refuses (an ID block whose ID auth does not verify) keeps its
    context; a second LaunchVm is refused before any firmware call (before, it overwrote the
    context, failed ACTIVATE with ASID_OWNED and orphaned the first context), and after
    DestroyVm the next VM launches."""

    made = await create(stack, id_block=bytes(96), id_auth=bytes(4096))
    with pytest.raises(grpc.aio.AioRpcError) as first:
        await stack.kvm.LaunchVm(kvm_pb2.LaunchVmRequest(vm=made.vm), metadata=HOST)
    assert error_info(first.value) is not None
    vm = (await stack.kvm.GetVm(kvm_pb2.GetVmRequest(vm=made.vm), metadata=HOST)).vm
    assert vm.state == kvm_pb2.VM_STATE_CREATED and vm.gctx.gctx_paddr != 0
    before = await free_pages(stack)
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await stack.kvm.LaunchVm(kvm_pb2.LaunchVmRequest(vm=made.vm), metadata=HOST)
    assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = error_info(again.value)
    assert details is not None and details.reason == "LAUNCH_STARTED"
    after = (await stack.kvm.GetVm(kvm_pb2.GetVmRequest(vm=made.vm), metadata=HOST)).vm
    assert after.gctx.gctx_paddr == vm.gctx.gctx_paddr
    assert await free_pages(stack) == before
    # pages SNP_LAUNCH_UPDATE made pre-guest are reclaimed (SNP_PAGE_RECLAIM) and freed
    await stack.kvm.DestroyVm(kvm_pb2.DestroyVmRequest(vm=made.vm), metadata=HOST)
    # the host is left in a state that launches the next VM
    guest = await stack.launch()
    assert len(guest.measurement) == 48
