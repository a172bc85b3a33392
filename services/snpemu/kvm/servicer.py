"""gRPC adapter of kvm: VM control (KVM ioctls, the VMM's launch) and vCPU exits."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from snp.common.v1 import handles_pb2
from snp.kvm.v1 import kvm_pb2 as pb

from snpemu.abi.addr import page_bytes, pfn_to_spa
from snpemu.abi.asid import MAX_SNP_ASID
from snpemu.abi.msr_protocol import HV_FEATURES
from snpemu.kvm.exits import Exits, sev_status
from snpemu.kvm.handles import check_id, check_token
from snpemu.kvm.machine import CBIT, Kvm
from snpemu.kvm.throttle import Throttle, check_throttle
from snpemu.kvm.vm import Vm
from snpemu.kvm.wire import config_from_pb, config_to_pb, identity_from_pb, identity_to_pb
from snpemu.runtime.caller import Role, current_caller

log = logging.getLogger(__name__)


def vm_info(vm: Vm) -> pb.VmInfo:
    return pb.VmInfo(
        vm=handles_pb2.VmHandle(id=vm.vm_id),
        state=pb.VmState.ValueType(int(vm.state)),
        asid=vm.asid,
        config=config_to_pb(vm.config),
        gctx=handles_pb2.GuestContextHandle(gctx_paddr=vm.gctx),
        measurement=vm.measurement,
        term_reason_set=vm.term_reason[0],
        term_reason_code=vm.term_reason[1],
        sev_status=sev_status(vm),
    )


class KvmServicer:
    def __init__(self, kvm: Kvm) -> None:
        self.kvm = kvm
        self.exits = Exits(kvm)
        self.holds: dict[str, int] = {}  # open HoldVm streams per VM (its open "fds")
        self.releases: set[asyncio.Task[None]] = set()

    def _vm(self, handle: Any) -> Vm:
        """The VM a handle names, if the caller may act on it (kvm/handles.py)."""
        check_id(handle.id)
        vm = self.kvm.vm(handle.id)
        check_token(vm.vm_id, vm.owner, vm.token, handle.token, current_caller())
        return vm

    async def GetCapabilities(self, request: Any, context: Any) -> pb.GetCapabilitiesResponse:
        k = self.kvm
        return pb.GetCapabilitiesResponse(
            snp_enabled=k.snp_enabled,
            min_sev_asid=MAX_SNP_ASID + 1,
            max_sev_asid=MAX_SNP_ASID + 1,
            firmware_api_major=k.api[0],
            firmware_api_minor=k.api[1],
            supported_vm_types=[4] if k.snp_enabled else [],
            hv_features=HV_FEATURES,
            cbit_position=CBIT,
        )

    async def CreateVm(self, request: Any, context: Any) -> pb.CreateVmResponse:
        t = request.config.throttle
        check_throttle(t.interval_ms, t.burst)
        vm = await self.kvm.create_vm(config_from_pb(request.config))
        caller = current_caller()
        # a VM the host made is the host's to hand on (with its token) to any VMM
        vm.owner = caller.name if caller.role is Role.VMM else ""
        # the only answer that carries the token: the VM fd goes to its creator alone
        return pb.CreateVmResponse(
            vm=handles_pb2.VmHandle(id=vm.vm_id, token=vm.token), asid=vm.asid
        )

    async def LaunchVm(self, request: Any, context: Any) -> pb.LaunchVmResponse:
        vm = self._vm(request.vm)
        measurement = await self.kvm.launch_vm(vm)
        return pb.LaunchVmResponse(
            measurement=measurement,
            vcpus=[identity_to_pb(self.kvm.identity(vm, i)) for i in sorted(vm.vcpus)],
        )

    async def GetVm(self, request: Any, context: Any) -> pb.GetVmResponse:
        return pb.GetVmResponse(vm=vm_info(self._vm(request.vm)))

    async def ListVms(self, request: Any, context: Any) -> pb.ListVmsResponse:
        return pb.ListVmsResponse(vms=[vm_info(v) for v in self.kvm.vms.values()])

    async def GetMemoryMap(self, request: Any, context: Any) -> pb.GetMemoryMapResponse:
        vm = self._vm(request.vm)
        return pb.GetMemoryMapResponse(
            asid=vm.asid,
            regions=[
                pb.MemoryRegion(gpa=r.gpa, spa=pfn_to_spa(r.first_pfn), size=page_bytes(r.npages))
                for r in vm.memslots.runs
            ],
        )

    async def DestroyVm(self, request: Any, context: Any) -> pb.DestroyVmResponse:
        return pb.DestroyVmResponse(leaked_pages=await self.kvm.destroy_vm(self._vm(request.vm)))

    async def HoldVm(self, request: Any, context: Any) -> AsyncIterator[pb.HoldVmResponse]:
        vm = self._vm(request.vm)
        self.holds[vm.vm_id] = self.holds.get(vm.vm_id, 0) + 1
        try:
            yield pb.HoldVmResponse(vm=handles_pb2.VmHandle(id=vm.vm_id))
            await asyncio.Event().wait()  # until the VMM goes away: the call is cancelled
        finally:
            self.holds[vm.vm_id] -= 1
            if not self.holds[vm.vm_id]:
                del self.holds[vm.vm_id]
                if self.kvm.vms.get(vm.vm_id) is vm:  # not destroyed by DestroyVm first
                    task = asyncio.ensure_future(self._release(vm))
                    self.releases.add(task)
                    task.add_done_callback(self.releases.discard)

    async def _release(self, vm: Vm) -> None:
        """kvm_vm_release(): the last fd closed, the VM goes as DestroyVm would take it."""
        log.warning(
            "the VMM of %s went away without destroying it: destroying it",
            vm.vm_id,
            extra={"event": "vm_released", "vm": vm.vm_id},
        )
        try:
            leaked = await self.kvm.destroy_vm(vm)
        except Exception as e:  # peers gone at host shutdown: say so, nothing else to do
            log.error("releasing %s failed: %s", vm.vm_id, e, extra={"event": "vm_release_failed"})
            return
        if leaked:
            log.warning("%s released with %d leaked pages", vm.vm_id, leaked)

    async def SetGuestRequestThrottle(
        self, request: Any, context: Any
    ) -> pb.SetGuestRequestThrottleResponse:
        vm = self._vm(request.vm)
        t = request.throttle
        check_throttle(t.interval_ms, t.burst)
        vm.throttle = Throttle(t.interval_ms, t.burst or 1, clock=self.kvm.clock)
        return pb.SetGuestRequestThrottleResponse()

    async def KickVcpus(self, request: Any, context: Any) -> pb.KickVcpusResponse:
        vm = self._vm(request.vm)
        for vcpu in vm.vcpus.values():
            vcpu.kicks += 1
        return pb.KickVcpusResponse(kicked=len(vm.vcpus))

    async def VmgexitMsr(self, request: Any, context: Any) -> pb.VmgexitMsrResponse:
        value, terminated = await self.exits.msr_exit(
            identity_from_pb(request.identity), request.ghcb_msr
        )
        return pb.VmgexitMsrResponse(ghcb_msr=value, terminated=terminated)

    async def Vmgexit(self, request: Any, context: Any) -> pb.VmgexitResponse:
        r, page = await self.exits.ghcb_exit(identity_from_pb(request.identity), request.ghcb)
        return pb.VmgexitResponse(
            sw_exit_info_1=r.sw_exit_info_1,
            sw_exit_info_2=r.sw_exit_info_2,
            terminated=r.terminated,
            ghcb=page if request.ghcb else b"",
        )

    async def NestedPageFault(self, request: Any, context: Any) -> pb.NestedPageFaultResponse:
        action, retry = await self.exits.npf(
            identity_from_pb(request.identity), request.gpa, request.error_code
        )
        return pb.NestedPageFaultResponse(action=action, retry=retry)

    async def StreamTraceEvents(
        self, request: Any, context: Any
    ) -> AsyncIterator[pb.StreamTraceEventsResponse]:
        only = request.vm.id
        async for ev in self.kvm.trace.subscribe():
            if only and ev.vm_id != only:
                continue
            yield pb.StreamTraceEventsResponse(
                name=ev.name,
                vcpu=handles_pb2.VcpuHandle(
                    vm=handles_pb2.VmHandle(id=ev.vm_id), vcpu_id=ev.vcpu_id
                ),
                timestamp_ns=ev.timestamp_ns,
                **ev.fields,  # type: ignore[arg-type]
            )
