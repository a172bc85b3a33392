"""kvm over gRPC as the guest agent reaches it: its vCPUs' exits and, with the VMM
credential, its VM's lifecycle (guest/ports.py Exits and Vmm)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from snp.common.v1 import handles_pb2
from snp.kvm.v1 import kvm_pb2, kvm_pb2_grpc

from snpemu.abi.addr import PAGE_SIZE, Gpa
from snpemu.guest.holds import StreamHold, held
from snpemu.guest.ports import (
    GhcbReply,
    Launched,
    LaunchFinish,
    LaunchUpdate,
    MemoryRegion,
    MsrReply,
    NpfReply,
    VmHandle,
    VmmExit,
    VmStatus,
)
from snpemu.kvm.config import VmConfig
from snpemu.kvm.identity import VcpuIdentity
from snpemu.kvm.uapi import KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_X86_SNP_VM
from snpemu.kvm.wire import config_to_pb, identity_from_pb, identity_to_pb
from snpemu.runtime.peers import Peer

if TYPE_CHECKING:
    from snp.kvm.v1.kvm_pb2_grpc import KvmServiceAsyncStub

LAUNCH_TIMEOUT_S = 300


def _vm(vm: VmHandle) -> handles_pb2.VmHandle:
    return handles_pb2.VmHandle(id=vm.id, token=vm.token)


def _exit(r: kvm_pb2.VmgexitMsrResponse | kvm_pb2.VmgexitResponse) -> VmmExit | None:
    if not r.HasField("exit"):
        return None
    hc = r.exit.hypercall
    return VmmExit(r.exit.exit_reason, hc.nr, tuple(hc.args))


def _msr_reply(r: kvm_pb2.VmgexitMsrResponse) -> MsrReply:
    return MsrReply(int(r.ghcb_msr), r.terminated, _exit(r))


def _ghcb_reply(r: kvm_pb2.VmgexitResponse) -> GhcbReply:
    return GhcbReply(
        int(r.sw_exit_info_1), int(r.sw_exit_info_2), r.terminated, bytes(r.ghcb), _exit(r)
    )


class GrpcKvm:
    def __init__(self, peer: Peer) -> None:
        self.peer = peer

    @classmethod
    def connect(cls, address: str, credential: str | None) -> GrpcKvm:
        return cls(Peer("kvm", address, credential, kvm_pb2_grpc.KvmServiceStub))

    def _stub(self) -> KvmServiceAsyncStub:
        return self.peer.ensure()  # type: ignore[no-any-return]

    async def vmgexit_msr(self, vcpu: VcpuIdentity, value: int) -> MsrReply:
        r = await self.peer.invoke(
            self._stub().VmgexitMsr,
            kvm_pb2.VmgexitMsrRequest(identity=identity_to_pb(vcpu), ghcb_msr=value),
        )
        return _msr_reply(r)

    async def vmgexit(self, vcpu: VcpuIdentity, ghcb: bytes) -> GhcbReply:
        r = await self.peer.invoke(
            self._stub().Vmgexit, kvm_pb2.VmgexitRequest(identity=identity_to_pb(vcpu), ghcb=ghcb)
        )
        return _ghcb_reply(r)

    async def run_vcpu(self, vm: VmHandle, vcpu_id: int, ret: int) -> MsrReply | GhcbReply:
        r = await self.peer.invoke(
            self._stub().RunVcpu,
            kvm_pb2.RunVcpuRequest(
                vcpu=handles_pb2.VcpuHandle(vm=_vm(vm), vcpu_id=vcpu_id), hypercall_ret=ret
            ),
        )
        return _msr_reply(r.msr) if r.HasField("msr") else _ghcb_reply(r.ghcb)

    async def enable_cap(self, vm: VmHandle, cap: int, args: tuple[int, ...]) -> None:
        await self.peer.invoke(
            self._stub().EnableCap, kvm_pb2.EnableCapRequest(vm=_vm(vm), cap=cap, args=args)
        )

    async def nested_page_fault(self, vcpu: VcpuIdentity, gpa: Gpa, error_code: int) -> NpfReply:
        r = await self.peer.invoke(
            self._stub().NestedPageFault,
            kvm_pb2.NestedPageFaultRequest(
                identity=identity_to_pb(vcpu), gpa=gpa, error_code=error_code
            ),
        )
        return NpfReply(r.action, r.retry)

    async def create_vm(self, config: VmConfig | None, memory_model: int = 0) -> VmHandle:
        request = kvm_pb2.CreateVmRequest(
            vm_type=KVM_X86_SNP_VM, memory_model=kvm_pb2.MemoryModel.ValueType(memory_model)
        )
        if config is not None:
            request.config.CopyFrom(config_to_pb(config))
        r = await self.peer.invoke(self._stub().CreateVm, request)
        return VmHandle(r.vm.id, bytes(r.vm.token))

    async def snp_init2(self, vm: VmHandle, vmsa_features: int, ghcb_version: int) -> None:
        await self.peer.invoke(
            self._stub().SnpInit2,
            kvm_pb2.SnpInit2Request(
                vm=_vm(vm), vmsa_features=vmsa_features, ghcb_version=ghcb_version
            ),
        )

    async def create_guest_memfd(self, vm: VmHandle, size: int) -> int:
        r = await self.peer.invoke(
            self._stub().CreateGuestMemfd, kvm_pb2.CreateGuestMemfdRequest(vm=_vm(vm), size=size)
        )
        return int(r.fd)

    async def set_memory_region(self, vm: VmHandle, region: MemoryRegion) -> None:
        await self.peer.invoke(
            self._stub().SetMemoryRegion,
            kvm_pb2.SetMemoryRegionRequest(vm=_vm(vm), **dataclasses.asdict(region)),
        )

    async def set_memory_attributes(
        self, vm: VmHandle, address: int, size: int, private: bool
    ) -> None:
        await self.peer.invoke(
            self._stub().SetMemoryAttributes,
            kvm_pb2.SetMemoryAttributesRequest(
                vm=_vm(vm),
                address=address,
                size=size,
                attributes=KVM_MEMORY_ATTRIBUTE_PRIVATE if private else 0,
            ),
        )

    async def create_vcpu(
        self, vm: VmHandle, vcpu_id: int, reset_eip: int, vcpu_type: int
    ) -> VcpuIdentity:
        r = await self.peer.invoke(
            self._stub().CreateVcpu,
            kvm_pb2.CreateVcpuRequest(
                vm=_vm(vm),
                vcpu_id=vcpu_id,
                reset_eip=reset_eip,
                vcpu_type=kvm_pb2.VcpuType.ValueType(vcpu_type),
            ),
        )
        return identity_from_pb(r.identity)

    async def snp_launch_start(self, vm: VmHandle, policy: int) -> None:
        await self.peer.invoke(
            self._stub().SnpLaunchStart, kvm_pb2.SnpLaunchStartRequest(vm=_vm(vm), policy=policy)
        )

    async def snp_launch_update(self, vm: VmHandle, update: LaunchUpdate) -> LaunchUpdate:
        r = await self.peer.invoke(
            self._stub().SnpLaunchUpdate,
            kvm_pb2.SnpLaunchUpdateRequest(vm=_vm(vm), **dataclasses.asdict(update)),
            timeout=LAUNCH_TIMEOUT_S,
        )
        done = (update.len - r.len) // PAGE_SIZE
        return dataclasses.replace(
            update,
            gfn_start=r.gfn_start,
            uaddr=r.uaddr,
            len=r.len,
            source=update.source[done * PAGE_SIZE :],
        )

    async def snp_launch_finish(self, vm: VmHandle, finish: LaunchFinish) -> bytes:
        r = await self.peer.invoke(
            self._stub().SnpLaunchFinish,
            kvm_pb2.SnpLaunchFinishRequest(vm=_vm(vm), **dataclasses.asdict(finish)),
            timeout=LAUNCH_TIMEOUT_S,
        )
        return bytes(r.measurement)

    async def set_guest_request_throttle(self, vm: VmHandle, interval_ms: int, burst: int) -> None:
        await self.peer.invoke(
            self._stub().SetGuestRequestThrottle,
            kvm_pb2.SetGuestRequestThrottleRequest(
                vm=_vm(vm),
                throttle=kvm_pb2.GuestRequestThrottle(interval_ms=interval_ms, burst=burst),
            ),
        )

    async def hold_vm(self, vm: VmHandle) -> StreamHold:
        call = self._stub().HoldVm(kvm_pb2.HoldVmRequest(vm=_vm(vm)), metadata=self.peer.md)
        hold, _ = await held(self.peer.name, call)
        return hold

    async def launch_vm(self, vm: VmHandle) -> Launched:
        r = await self.peer.invoke(
            self._stub().LaunchVm, kvm_pb2.LaunchVmRequest(vm=_vm(vm)), timeout=LAUNCH_TIMEOUT_S
        )
        return Launched(bytes(r.measurement), tuple(identity_from_pb(v) for v in r.vcpus))

    async def get_vm(self, vm: VmHandle) -> VmStatus:
        info = (await self.peer.invoke(self._stub().GetVm, kvm_pb2.GetVmRequest(vm=_vm(vm)))).vm
        return VmStatus(info.term_reason_set, info.term_reason_code)

    async def destroy_vm(self, vm: VmHandle) -> None:
        await self.peer.invoke(self._stub().DestroyVm, kvm_pb2.DestroyVmRequest(vm=_vm(vm)))

    async def close(self) -> None:
        await self.peer.close()
