"""kvm's VM-control RPCs through gRPC, on their success path and refusing a wrong request."""

from __future__ import annotations

import grpc
import pytest
from snp.common.v1 import handles_pb2
from snp.kvm.v1 import kvm_pb2 as pb

from tests.service.host_stack import HOST, Stack
from tests.service.test_rpc_netd import refused

KVM = "snp.kvm.v1.KvmService/"
NOWHERE = handles_pb2.VmHandle(id="vm-nowhere")
# KERNEL: arch/x86/include/uapi/asm/kvm.h KVM_X86_SNP_VM 4
KVM_X86_SNP_VM = 4
# SPEC: AMD APM vol. 3, CPUID Fn8000_001F EBX[5:0] C-bit position: 51 on EPYC Milan/Genoa
CBIT_MILAN = 51


@pytest.mark.rpc("snp.kvm.v1.KvmService/GetCapabilities", "ok", "error")
@pytest.mark.rpc("snp.kvm.v1.KvmService/ListVms", "ok", "error")
@pytest.mark.rpc("snp.kvm.v1.KvmService/KickVcpus", "ok", "error")
@pytest.mark.rpc("snp.kvm.v1.KvmService/GetMemoryMap", "ok", "error")
@pytest.mark.rpc("snp.kvm.v1.KvmService/GetVm", "ok", "error")
@pytest.mark.rpc("snp.kvm.v1.KvmService/LaunchVm", "ok", "error")
@pytest.mark.rpc("snp.kvm.v1.KvmService/DestroyVm", "ok", "error")
@pytest.mark.rpc("snp.kvm.v1.KvmService/SetGuestRequestThrottle", "ok", "error")
@pytest.mark.rpc("snp.kvm.v1.KvmService/NestedPageFault", "error")
@pytest.mark.rpc("snp.kvm.v1.KvmService/StreamTraceEvents", "error")
async def test_vm_control(stack: Stack) -> None:
    caps = await stack.kvm.GetCapabilities(pb.GetCapabilitiesRequest(), metadata=HOST)
    assert caps.snp_enabled
    assert list(caps.supported_vm_types) == [KVM_X86_SNP_VM]
    assert caps.cbit_position == CBIT_MILAN
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stack.kvm.GetCapabilities(pb.GetCapabilitiesRequest())
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stack.kvm.ListVms(pb.ListVmsRequest())
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED

    two = await stack.launch(vcpus=2)
    one = await stack.launch(vcpus=1)
    vms = (await stack.kvm.ListVms(pb.ListVmsRequest(), metadata=HOST)).vms
    assert {v.vm.id for v in vms} == {two.vm.id, one.vm.id}
    # a kick reaches every vCPU of that VM
    k = await stack.kvm.KickVcpus(pb.KickVcpusRequest(vm=two.vm, reason="test"), metadata=HOST)
    assert k.kicked == 2
    k = await stack.kvm.KickVcpus(pb.KickVcpusRequest(vm=one.vm), metadata=HOST)
    assert k.kicked == 1
    await refused(
        stack.kvm.KickVcpus(pb.KickVcpusRequest(vm=NOWHERE), metadata=HOST),
        grpc.StatusCode.NOT_FOUND,
        "NOT_FOUND",
    )
    message = await refused(
        stack.kvm.KickVcpus(pb.KickVcpusRequest(), metadata=HOST),
        grpc.StatusCode.INVALID_ARGUMENT,
        "VM_ID_INVALID",
    )
    assert "vm.id is required" in message

    # the e820 map is the configured 64 MiB of RAM from GPA 0 (QEMU's q35 keeps RAM this
    # small below 4 GiB); the memory map lists only backed memory: all of the firmware
    # image's pages (launch measured them, the file's size, ending at 4 GiB) and RAM pages
    # only inside the e820 RAM
    mm = await stack.kvm.GetMemoryMap(pb.GetMemoryMapRequest(vm=one.vm), metadata=HOST)
    info_one = (await stack.kvm.GetVm(pb.GetVmRequest(vm=one.vm), metadata=HOST)).vm
    assert mm.asid == info_one.asid
    assert [(e.addr, e.size, e.type) for e in info_one.e820] == [(0, 64 << 20, 1)]
    assert [(e.addr, e.size, e.type) for e in mm.e820] == [(0, 64 << 20, 1)]
    fw = 1 << 32
    fw -= stack.firmware.stat().st_size
    assert sum(r.size for r in mm.regions if r.gpa >= fw) == stack.firmware.stat().st_size
    assert all(r.gpa + r.size <= 64 << 20 for r in mm.regions if r.gpa < fw)
    assert all(r.spa % 4096 == 0 for r in mm.regions)

    def covered(m: pb.GetMemoryMapResponse, gpa: int) -> bool:
        return any(r.gpa <= gpa < r.gpa + r.size for r in m.regions)

    # populate backs what lies in a memslot (past the RAM nothing): a bad range changes nothing
    top = (64 << 20) - 4096
    for bad in (
        [pb.GpaRange(gpa=top, size=0)],
        [pb.GpaRange(gpa=(1 << 64) - 4096, size=8192)],
        [pb.GpaRange(gpa=0, size=(1 << 30) + 4096)],
        [pb.GpaRange(gpa=top, size=4096)] * 17,
    ):
        await refused(
            stack.kvm.GetMemoryMap(pb.GetMemoryMapRequest(vm=one.vm, populate=bad), metadata=HOST),
            grpc.StatusCode.INVALID_ARGUMENT,
            "POPULATE_INVALID",
        )
    still = await stack.kvm.GetMemoryMap(pb.GetMemoryMapRequest(vm=one.vm), metadata=HOST)
    assert still.regions == mm.regions and not covered(still, top)
    wide = [pb.GpaRange(gpa=top, size=8192)]  # its last page lies past the RAM
    populated = await stack.kvm.GetMemoryMap(
        pb.GetMemoryMapRequest(vm=one.vm, populate=wide), metadata=HOST
    )
    assert covered(populated, top) and not covered(populated, top + 4096)
    await refused(
        stack.kvm.GetMemoryMap(pb.GetMemoryMapRequest(vm=NOWHERE), metadata=HOST),
        grpc.StatusCode.NOT_FOUND,
        "NOT_FOUND",
    )
    await refused(
        stack.kvm.GetVm(pb.GetVmRequest(vm=NOWHERE), metadata=HOST),
        grpc.StatusCode.NOT_FOUND,
        "NOT_FOUND",
    )

    # a VM is launched once
    await refused(
        stack.kvm.LaunchVm(pb.LaunchVmRequest(vm=one.vm), metadata=HOST),
        grpc.StatusCode.FAILED_PRECONDITION,
        "VM_STATE",
    )

    # the throttle's bounds
    for bad in (
        pb.GuestRequestThrottle(interval_ms=3_600_001, burst=1),
        pb.GuestRequestThrottle(interval_ms=1000, burst=1001),
    ):
        await refused(
            stack.kvm.SetGuestRequestThrottle(
                pb.SetGuestRequestThrottleRequest(vm=one.vm, throttle=bad), metadata=HOST
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "THROTTLE_OUT_OF_RANGE",
        )
    await stack.kvm.SetGuestRequestThrottle(
        pb.SetGuestRequestThrottleRequest(
            vm=one.vm, throttle=pb.GuestRequestThrottle(interval_ms=60_000, burst=1)
        ),
        metadata=HOST,
    )
    # one request within the burst, the next one BUSY (SNP_GUEST_VMM_ERR_BUSY 2 in
    # the upper half of SW_EXITINFO2: KERNEL: include/uapi/linux/sev-guest.h)
    await one.register_ghcb()
    r, _, payload = await one.guest_request(bytes(96))
    assert r.sw_exit_info_2 == 0 and payload is not None
    r, _, payload = await one.guest_request(bytes(96))
    assert (r.sw_exit_info_2 >> 32, payload) == (2, None)

    # exits carry the vCPU identity kvm issued: a forged token is refused
    forged = handles_pb2.VcpuIdentity()
    forged.CopyFrom(two.ident)
    forged.token = bytes(len(two.ident.token))
    await refused(
        stack.kvm.NestedPageFault(
            pb.NestedPageFaultRequest(identity=forged, gpa=0x1000, error_code=0x4)
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "BAD_VCPU_IDENTITY",
    )
    await refused(
        stack.kvm.StreamTraceEvents(pb.StreamTraceEventsRequest(vm=two.vm)).read(),
        grpc.StatusCode.UNAUTHENTICATED,
        "HOST_CREDENTIAL_MISSING",
    )

    await stack.kvm.DestroyVm(pb.DestroyVmRequest(vm=two.vm), metadata=HOST)
    await refused(
        stack.kvm.GetVm(pb.GetVmRequest(vm=two.vm), metadata=HOST),
        grpc.StatusCode.NOT_FOUND,
        "NOT_FOUND",
    )
    await refused(
        stack.kvm.DestroyVm(pb.DestroyVmRequest(vm=two.vm), metadata=HOST),
        grpc.StatusCode.NOT_FOUND,
        "NOT_FOUND",
    )
    vms = (await stack.kvm.ListVms(pb.ListVmsRequest(), metadata=HOST)).vms
    assert [v.vm.id for v in vms] == [one.vm.id]
