"""kvm's VM-control RPCs through gRPC, on their success path and refusing a wrong request."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from snp.common.v1 import handles_pb2
from snp.kvm.v1 import kvm_pb2 as pb
from snpemu.runtime.status import error_info

from tests.service.host_stack import HOST, host_stack
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
async def test_vm_control(tmp_path: Path) -> None:
    async with host_stack(tmp_path) as s:
        caps = await s.kvm.GetCapabilities(pb.GetCapabilitiesRequest(), metadata=HOST)
        assert caps.snp_enabled
        assert list(caps.supported_vm_types) == [KVM_X86_SNP_VM]
        assert caps.cbit_position == CBIT_MILAN
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await s.kvm.GetCapabilities(pb.GetCapabilitiesRequest())
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await s.kvm.ListVms(pb.ListVmsRequest())
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED

        two = await s.launch(vcpus=2)
        one = await s.launch(vcpus=1)
        vms = (await s.kvm.ListVms(pb.ListVmsRequest(), metadata=HOST)).vms
        assert {v.vm.id for v in vms} == {two.vm.id, one.vm.id}
        # a kick reaches every vCPU of that VM
        k = await s.kvm.KickVcpus(pb.KickVcpusRequest(vm=two.vm, reason="test"), metadata=HOST)
        assert k.kicked == 2
        k = await s.kvm.KickVcpus(pb.KickVcpusRequest(vm=one.vm), metadata=HOST)
        assert k.kicked == 1
        await refused(
            s.kvm.KickVcpus(pb.KickVcpusRequest(vm=NOWHERE), metadata=HOST),
            grpc.StatusCode.NOT_FOUND,
            "NOT_FOUND",
        )
        message = await refused(
            s.kvm.KickVcpus(pb.KickVcpusRequest(), metadata=HOST),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
        )
        assert "vm.id is required" in message

        # the memory map covers the VM's RAM as configured (64 MiB) and the pages holding
        # its firmware image (the file's size)
        mm = await s.kvm.GetMemoryMap(pb.GetMemoryMapRequest(vm=one.vm), metadata=HOST)
        info_one = (await s.kvm.GetVm(pb.GetVmRequest(vm=one.vm), metadata=HOST)).vm
        assert mm.asid == info_one.asid
        assert sum(r.size for r in mm.regions) == (64 << 20) + s.firmware.stat().st_size
        assert all(r.spa % 4096 == 0 for r in mm.regions)
        await refused(
            s.kvm.GetMemoryMap(pb.GetMemoryMapRequest(vm=NOWHERE), metadata=HOST),
            grpc.StatusCode.NOT_FOUND,
            "NOT_FOUND",
        )
        await refused(
            s.kvm.GetVm(pb.GetVmRequest(vm=NOWHERE), metadata=HOST),
            grpc.StatusCode.NOT_FOUND,
            "NOT_FOUND",
        )

        # a VM is launched once
        await refused(
            s.kvm.LaunchVm(pb.LaunchVmRequest(vm=one.vm), metadata=HOST),
            grpc.StatusCode.FAILED_PRECONDITION,
            "VM_STATE",
        )

        # the throttle's bounds
        for bad in (
            pb.GuestRequestThrottle(interval_ms=3_600_001, burst=1),
            pb.GuestRequestThrottle(interval_ms=1000, burst=1001),
        ):
            await refused(
                s.kvm.SetGuestRequestThrottle(
                    pb.SetGuestRequestThrottleRequest(vm=one.vm, throttle=bad), metadata=HOST
                ),
                grpc.StatusCode.INVALID_ARGUMENT,
                "INVALID_ARGUMENT",
            )
        await s.kvm.SetGuestRequestThrottle(
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
            s.kvm.NestedPageFault(
                pb.NestedPageFaultRequest(identity=forged, gpa=0x1000, error_code=0x4)
            ),
            grpc.StatusCode.PERMISSION_DENIED,
            "BAD_VCPU_IDENTITY",
        )
        await refused(
            s.kvm.StreamTraceEvents(pb.StreamTraceEventsRequest(vm=two.vm)).read(),
            grpc.StatusCode.UNAUTHENTICATED,
            "HOST_CREDENTIAL_MISSING",
        )

        await s.kvm.DestroyVm(pb.DestroyVmRequest(vm=two.vm), metadata=HOST)
        await refused(
            s.kvm.GetVm(pb.GetVmRequest(vm=two.vm), metadata=HOST),
            grpc.StatusCode.NOT_FOUND,
            "NOT_FOUND",
        )
        await refused(
            s.kvm.DestroyVm(pb.DestroyVmRequest(vm=two.vm), metadata=HOST),
            grpc.StatusCode.NOT_FOUND,
            "NOT_FOUND",
        )
        vms = (await s.kvm.ListVms(pb.ListVmsRequest(), metadata=HOST)).vms
        assert [v.vm.id for v in vms] == [one.vm.id]


@pytest.mark.rpc("snp.kvm.v1.KvmService/CreateVcpu", "unbuilt")
@pytest.mark.rpc("snp.kvm.v1.KvmService/SetMemoryRegion", "unbuilt")
@pytest.mark.rpc("snp.kvm.v1.KvmService/SetMemoryAttributes", "unbuilt")
@pytest.mark.rpc("snp.kvm.v1.KvmService/SnpLaunchStart", "unbuilt")
@pytest.mark.rpc("snp.kvm.v1.KvmService/SnpLaunchUpdate", "unbuilt")
@pytest.mark.rpc("snp.kvm.v1.KvmService/SnpLaunchFinish", "unbuilt")
async def test_step_by_step_launch_rpcs_are_not_built(tmp_path: Path) -> None:
    """LaunchVm does the launch in one call; the ioctl-by-ioctl RPCs answer UNIMPLEMENTED with
    NOT_BUILT and the method's name, not some other error."""

    async with host_stack(tmp_path) as s:
        vm = (
            await s.kvm.CreateVm(
                pb.CreateVmRequest(
                    config=pb.VmConfig(
                        memory_bytes=64 << 20, vcpus=1, firmware_path=str(s.firmware)
                    )
                ),
                metadata=HOST,
            )
        ).vm
        calls = {
            "CreateVcpu": s.kvm.CreateVcpu(pb.CreateVcpuRequest(vm=vm), metadata=HOST),
            "SetMemoryRegion": s.kvm.SetMemoryRegion(
                pb.SetMemoryRegionRequest(vm=vm, memory_size=1 << 20), metadata=HOST
            ),
            "SetMemoryAttributes": s.kvm.SetMemoryAttributes(
                pb.SetMemoryAttributesRequest(vm=vm, size=4096, private=True), metadata=HOST
            ),
            "SnpLaunchStart": s.kvm.SnpLaunchStart(
                pb.SnpLaunchStartRequest(vm=vm, policy=0x30000), metadata=HOST
            ),
            "SnpLaunchUpdate": s.kvm.SnpLaunchUpdate(
                pb.SnpLaunchUpdateRequest(vm=vm, data=bytes(4096), type=1), metadata=HOST
            ),
            "SnpLaunchFinish": s.kvm.SnpLaunchFinish(
                pb.SnpLaunchFinishRequest(vm=vm), metadata=HOST
            ),
        }
        for name, call in calls.items():
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED, name
            detail = error_info(info.value)
            assert detail is not None
            assert (detail.reason, dict(detail.metadata)) == (
                "NOT_BUILT",
                {"method": KVM + name},
            )
        # and the VM they named is untouched: still CREATED, launchable
        got = (await s.kvm.GetVm(pb.GetVmRequest(vm=vm), metadata=HOST)).vm
        assert got.state == pb.VM_STATE_CREATED
        await s.kvm.LaunchVm(pb.LaunchVmRequest(vm=vm), metadata=HOST)
