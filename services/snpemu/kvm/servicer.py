"""gRPC adapter of kvm: VM control (KVM ioctls, the VMM's launch) and vCPU exits."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from snp.common.v1 import handles_pb2
from snp.kvm.v1 import kvm_pb2 as pb

from snpemu.abi.addr import PAGE_SIZE, page_bytes, pfn_to_spa
from snpemu.abi.asid import MAX_SNP_ASID
from snpemu.abi.msr_protocol import HV_FEATURES
from snpemu.abi.page_type import PageType
from snpemu.errors import InvalidArgument, NotFound, WrongState
from snpemu.kvm import create, memory_ioctls, snp_cmds
from snpemu.kvm.exits import ExitResult, Exits, sev_status
from snpemu.kvm.exits.map_gpa import Hypercall
from snpemu.kvm.exits.msr import MsrOutcome
from snpemu.kvm.fds import check_room
from snpemu.kvm.handles import check_id, check_token
from snpemu.kvm.machine import CBIT, Kvm
from snpemu.kvm.ports import LaunchFinish
from snpemu.kvm.reasons import KvmReason
from snpemu.kvm.throttle import Throttle, check_throttle
from snpemu.kvm.uapi import KVM_X86_SNP_VM, Errno, refuse
from snpemu.kvm.vm import MemoryModel, Vm
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
        vm_type=vm.vm_type,
        memory_model=pb.MemoryModel.ValueType(int(vm.memory_model)),
        memslots=[
            pb.Memslot(
                slot=m.slot,
                flags=m.flags,
                guest_phys_addr=m.gpa,
                memory_size=m.size,
                userspace_addr=m.userspace_addr,
                guest_memfd=m.gmem_fd,
                guest_memfd_offset=m.gmem_offset,
            )
            for m in sorted(vm.slots.values(), key=lambda m: m.slot)
        ],
        e820=e820_pb(vm),
    )


def e820_pb(vm: Vm) -> list[pb.E820Entry]:
    return [pb.E820Entry(addr=e.addr, size=e.size, type=int(e.type)) for e in vm.e820]


def vmm_name() -> str:
    """The calling VMM, "" for the host (whose fds kvm does not count: kvm/fds.py)."""
    caller = current_caller()
    return caller.name if caller.role is Role.VMM else ""


def memory_model(value: int) -> MemoryModel:
    """CreateVmRequest.memory_model; unset is the v5 kind for now."""
    if value == 0:
        return MemoryModel.V5
    if value not in {m.value for m in MemoryModel}:
        raise refuse(InvalidArgument, Errno.EINVAL, f"memory_model {value} is not a MemoryModel")
    return MemoryModel(value)


def kvm_exit_pb(hc: Hypercall | None) -> pb.KvmExit | None:
    if hc is None:
        return None
    return pb.KvmExit(
        exit_reason=hc.exit_reason,
        hypercall=pb.KvmHypercall(nr=hc.nr, args=list(hc.args), flags=hc.flags),
    )


def msr_response(out: MsrOutcome) -> pb.VmgexitMsrResponse:
    if out.hypercall is not None:
        return pb.VmgexitMsrResponse(exit=kvm_exit_pb(out.hypercall))
    return pb.VmgexitMsrResponse(ghcb_msr=out.ghcb_msr, terminated=out.terminated)


def ghcb_response(r: ExitResult, page: bytes) -> pb.VmgexitResponse:
    if r.hypercall is not None:
        return pb.VmgexitResponse(exit=kvm_exit_pb(r.hypercall))
    return pb.VmgexitResponse(
        sw_exit_info_1=r.sw_exit_info_1,
        sw_exit_info_2=r.sw_exit_info_2,
        terminated=r.terminated,
        ghcb=page,
    )


def check_u16(name: str, value: int) -> None:
    """A __u16 of the uapi struct, carried in a proto uint32."""
    if value > 0xFFFF:
        raise refuse(InvalidArgument, Errno.EINVAL, f"{name} {value:#x} does not fit its __u16")


class KvmServicer:
    def __init__(self, kvm: Kvm) -> None:
        self.kvm = kvm
        self.exits = Exits(kvm)
        self.holds: dict[str, int] = {}  # open HoldVm streams per VM (its open "fds")
        self.releases: set[asyncio.Task[None]] = set()
        self.fd_locks: dict[str, asyncio.Lock] = {}  # per VMM (_fds())

    def _fds(self, owner: str) -> contextlib.AbstractAsyncContextManager[object]:
        """A VMM's fd count checked and the fd made, one VMM call at a time (kvm/fds.py); the
        host's are not counted."""
        if not owner:
            return contextlib.nullcontext()
        return self.fd_locks.setdefault(owner, asyncio.Lock())

    def _vm(self, handle: Any) -> Vm:
        """The VM a handle names, if the caller may act on it (kvm/handles.py)."""
        check_id(handle.id)
        vm = self.kvm.vm(handle.id)
        check_token(vm.vm_id, vm.owner, vm.token, handle.token, current_caller())
        return vm

    @contextlib.asynccontextmanager
    async def _locked(self, vm: Vm, *, released_ok: bool = False) -> AsyncIterator[None]:
        """The VM's ioctls one at a time (KERNEL: kvm->lock, kvm->slots_lock), on a VM still
        there when its turn comes (DestroyVm or a VMM's exit may have taken it meanwhile). A
        VM a firmware reset terminated has given its frames back (kvm/teardown.py release()):
        only its destruction (`released_ok`) may act on it then."""
        async with vm.lock:
            if self.kvm.vms.get(vm.vm_id) is not vm:
                raise NotFound(f"{vm.vm_id} was destroyed")
            if vm.backing_released and not released_ok:
                raise refuse(
                    WrongState,
                    Errno.EIO,
                    f"{vm.vm_id} was terminated and its memory released (a firmware reset): "
                    "only DestroyVm remains",
                    reason=KvmReason.VM_STATE,
                )
            yield

    async def GetCapabilities(self, request: Any, context: Any) -> pb.GetCapabilitiesResponse:
        k = self.kvm
        return pb.GetCapabilitiesResponse(
            snp_enabled=k.snp_enabled,
            min_sev_asid=MAX_SNP_ASID + 1,
            max_sev_asid=MAX_SNP_ASID + 1,
            firmware_api_major=k.api[0],
            firmware_api_minor=k.api[1],
            supported_vm_types=[KVM_X86_SNP_VM] if k.snp_enabled else [],
            hv_features=HV_FEATURES,
            cbit_position=CBIT,
        )

    async def CreateVm(self, request: Any, context: Any) -> pb.CreateVmResponse:
        vm_type = request.vm_type if request.HasField("vm_type") else KVM_X86_SNP_VM
        model = memory_model(request.memory_model)
        # a VM the host made is the host's to hand on (with its token) to any VMM
        owner = vmm_name()
        async with self._fds(owner):
            if request.HasField("config"):
                t = request.config.throttle
                check_throttle(t.interval_ms, t.burst)
                # the VM, its RAM's and its firmware's guest_memfds, its vCPUs
                check_room(self.kvm.vms.values(), self.kvm.gmems, owner, 3 + request.config.vcpus)
                if vm_type != KVM_X86_SNP_VM:
                    create.new_vm(self.kvm, vm_type)  # refuses it
                vm = await self.kvm.create_vm(config_from_pb(request.config), owner, model)
            else:
                vm = create.new_vm(self.kvm, vm_type, model=model)
                check_room(self.kvm.vms.values(), self.kvm.gmems, owner)
                self.kvm.vms[vm.vm_id] = vm
            vm.owner = owner
        # the only answer that carries the token: the VM fd goes to its creator alone
        return pb.CreateVmResponse(
            vm=handles_pb2.VmHandle(id=vm.vm_id, token=vm.token), asid=vm.asid
        )

    async def LaunchVm(self, request: Any, context: Any) -> pb.LaunchVmResponse:
        vm = self._vm(request.vm)
        async with self._locked(vm):
            measurement = await self.kvm.launch_vm(vm)
        return pb.LaunchVmResponse(
            measurement=measurement,
            vcpus=[identity_to_pb(self.kvm.identity(vm, i)) for i in sorted(vm.vcpus)],
        )

    async def SnpInit2(self, request: Any, context: Any) -> pb.SnpInit2Response:
        vm = self._vm(request.vm)
        check_u16("ghcb_version", request.ghcb_version)
        async with self._locked(vm):
            await snp_cmds.init2(
                self.kvm, vm, request.vmsa_features, request.flags, request.ghcb_version
            )
        return pb.SnpInit2Response(asid=vm.asid)

    async def CreateGuestMemfd(self, request: Any, context: Any) -> pb.CreateGuestMemfdResponse:
        vm = self._vm(request.vm)
        async with self._locked(vm), self._fds(vmm_name()):
            check_room(self.kvm.vms.values(), self.kvm.gmems, vmm_name())
            g = await memory_ioctls.create_guest_memfd(
                self.kvm, vm, request.size, request.flags, current_caller().name
            )
        return pb.CreateGuestMemfdResponse(fd=g.fd)

    async def SetMemoryRegion(self, request: Any, context: Any) -> pb.SetMemoryRegionResponse:
        vm = self._vm(request.vm)
        caller = current_caller()
        async with self._locked(vm):
            await memory_ioctls.set_memory_region(
                self.kvm,
                vm,
                slot=request.slot,
                flags=request.flags,
                gpa=request.guest_phys_addr,
                size=request.memory_size,
                userspace_addr=request.userspace_addr,
                gmem_fd=request.guest_memfd,
                gmem_offset=request.guest_memfd_offset,
                caller=caller.name,
                is_host=caller.is_host,
            )
        return pb.SetMemoryRegionResponse()

    async def SetMemoryAttributes(
        self, request: Any, context: Any
    ) -> pb.SetMemoryAttributesResponse:
        vm = self._vm(request.vm)
        async with self._locked(vm):
            await memory_ioctls.set_memory_attributes(
                self.kvm, vm, request.address, request.size, request.attributes, request.flags
            )
        return pb.SetMemoryAttributesResponse()

    async def EnableCap(self, request: Any, context: Any) -> pb.EnableCapResponse:
        vm = self._vm(request.vm)
        async with self._locked(vm):
            memory_ioctls.enable_cap(vm, request.cap, request.flags, list(request.args))
        return pb.EnableCapResponse()

    async def SnpLaunchStart(self, request: Any, context: Any) -> pb.SnpLaunchStartResponse:
        vm = self._vm(request.vm)
        check_u16("flags", request.flags)
        async with self._locked(vm):
            await snp_cmds.launch_start(
                self.kvm, vm, request.policy, bytes(request.gosvw), request.flags
            )
        return pb.SnpLaunchStartResponse()

    async def SnpLaunchUpdate(self, request: Any, context: Any) -> pb.SnpLaunchUpdateResponse:
        vm = self._vm(request.vm)
        check_u16("flags", request.flags)
        if request.type > 0xFF:
            raise refuse(InvalidArgument, Errno.EINVAL, f"type {request.type} is a __u8")
        async with self._locked(vm):
            done = await snp_cmds.launch_update(
                self.kvm,
                vm,
                gfn_start=request.gfn_start,
                uaddr=request.uaddr,
                length=request.len,
                page_type=request.type,
                flags=request.flags,
                source=bytes(request.source),
            )
        # KERNEL: snp_launch_update() writes the progress back; uaddr stays for ZERO
        zero = request.type == PageType.ZERO
        return pb.SnpLaunchUpdateResponse(
            gfn_start=request.gfn_start + done,
            uaddr=request.uaddr + (0 if zero else done * PAGE_SIZE),
            len=request.len - done * PAGE_SIZE,
        )

    async def SnpLaunchFinish(self, request: Any, context: Any) -> pb.SnpLaunchFinishResponse:
        vm = self._vm(request.vm)
        check_u16("flags", request.flags)
        async with self._locked(vm):
            measurement = await snp_cmds.launch_finish(
                self.kvm,
                vm,
                LaunchFinish(
                    id_block=bytes(request.id_block),
                    id_auth=bytes(request.id_auth),
                    id_block_en=request.id_block_en,
                    auth_key_en=request.auth_key_en,
                    vcek_disabled=request.vcek_disabled,
                    host_data=bytes(request.host_data),
                ),
                request.flags,
            )
        return pb.SnpLaunchFinishResponse(measurement=measurement)

    async def CreateVcpu(self, request: Any, context: Any) -> pb.CreateVcpuResponse:
        vm = self._vm(request.vm)
        async with self._locked(vm), self._fds(vmm_name()):
            check_room(self.kvm.vms.values(), self.kvm.gmems, vmm_name())
            vcpu = await snp_cmds.create_vcpu(
                self.kvm, vm, request.vcpu_id, request.reset_eip, int(request.vcpu_type)
            )
        return pb.CreateVcpuResponse(identity=identity_to_pb(self.kvm.identity(vm, vcpu.vcpu_id)))

    async def GetVm(self, request: Any, context: Any) -> pb.GetVmResponse:
        return pb.GetVmResponse(vm=vm_info(self._vm(request.vm)))

    async def ListVms(self, request: Any, context: Any) -> pb.ListVmsResponse:
        return pb.ListVmsResponse(vms=[vm_info(v) for v in self.kvm.vms.values()])

    async def GetMemoryMap(self, request: Any, context: Any) -> pb.GetMemoryMapResponse:
        vm = self._vm(request.vm)
        if request.populate:
            ranges = [(int(r.gpa), int(r.size)) for r in request.populate]
            async with self._locked(vm):
                await memory_ioctls.populate(self.kvm, vm, ranges)
        return pb.GetMemoryMapResponse(
            asid=vm.asid,
            regions=[
                pb.MemoryRegion(gpa=r.gpa, spa=pfn_to_spa(r.first_pfn), size=page_bytes(r.npages))
                for r in vm.memslots.runs
            ],
            e820=e820_pb(vm),
        )

    async def DestroyVm(self, request: Any, context: Any) -> pb.DestroyVmResponse:
        vm = self._vm(request.vm)
        async with self._locked(vm, released_ok=True):
            return pb.DestroyVmResponse(leaked_pages=await self.kvm.destroy_vm(vm))

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
            async with self._locked(vm, released_ok=True):
                leaked = await self.kvm.destroy_vm(vm)
        except NotFound:
            return  # DestroyVm took it while this waited
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
        out = await self.exits.msr_exit(identity_from_pb(request.identity), request.ghcb_msr)
        return msr_response(out)

    async def Vmgexit(self, request: Any, context: Any) -> pb.VmgexitResponse:
        r, page = await self.exits.ghcb_exit(identity_from_pb(request.identity), request.ghcb)
        return ghcb_response(r, page if request.ghcb else b"")

    async def RunVcpu(self, request: Any, context: Any) -> pb.RunVcpuResponse:
        vm = self._vm(request.vcpu.vm)
        done = await self.exits.run_vcpu(vm, request.vcpu.vcpu_id, request.hypercall_ret)
        if isinstance(done, MsrOutcome):
            return pb.RunVcpuResponse(msr=msr_response(done))
        r, page = done
        return pb.RunVcpuResponse(ghcb=ghcb_response(r, page))

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
