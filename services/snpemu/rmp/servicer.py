"""gRPC adapter of the rmp model: decode requests, call RmpMachine, encode replies."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from grpc_health.v1 import health_pb2
from snp.rmp.v1 import rmp_pb2 as pb

from snpemu.abi.addr import PAGE_SIZE, pfn_to_spa, spa_to_pfn
from snpemu.abi.rmp import AccessOrigin, FwOp, PageState, Placement
from snpemu.abi.rmp_batch import BATCH_ENTRY
from snpemu.errors import InvalidArgument
from snpemu.rmp import checks
from snpemu.rmp.entry import MAX_ASID, RMP_STATE
from snpemu.rmp.fault import Fault
from snpemu.rmp.identities import Identity
from snpemu.rmp.machine import RmpMachine
from snpemu.rmp.reasons import RmpReason
from snpemu.rmp.sessions import Handler, host_sequence, run_session
from snpemu.rmp.violations import KickHub, Policy
from snpemu.rmp.wire import entry_pb, fault_pb, kick_pb, result_pb, size_2m

# RPCs a guest vCPU issues (with its identity); every other rmp RPC is host only.
GUEST_RPCS = frozenset(
    {"Pvalidate", "PvalidateBatch", "RmpAdjust", "GuestRead", "GuestWrite", "GuestSession"}
)

assert BATCH_ENTRY.itemsize == 8 + RMP_STATE.size
MAX_BATCH = 1 << 16
# A vCPU identity's token: kvm issues 32 random bytes; room to spare, not a megabyte.
MAX_TOKEN = 64
# Other pages a firmware read's state check covers (a command names a few, never many).
MAX_CHECKS = 16
# RMPADJUST takes the target VMPL in RDX bits 7:0 and the permission mask in bits 15:8.
RDX_BYTE_MAX = 0xFF


class RmpServicer:
    def __init__(self, machine: RmpMachine, hub: KickHub) -> None:
        """hub: the machine's notifier, which WatchMmuNotifications streams to kvm."""
        self.m = machine
        self.hub = hub
        # this boot of the host (GetPlatformInfo.boot_id)
        self.boot_id = uuid.uuid4().hex
        # a HostSession op (and a HostSequence step) by name
        self.host_handlers: dict[str, Handler] = {
            "read": self.HostRead,
            "write": self.HostWrite,
            "rmp_update_batch": self.RmpUpdateBatch,
            "copy": self.HostCopy,
        }

    def _identity(self, ident: Any) -> Identity:
        self._identity_fields(ident)
        return self.m.guest(ident.vcpu.vm.id, ident.vcpu.vcpu_id, ident.asid, ident.token)

    @staticmethod
    def _identity_fields(ident: Any) -> None:
        checks.text(ident.vcpu.vm.id, "identity.vcpu.vm.id", limit=checks.MAX_ID, required=True)
        if len(ident.token) > MAX_TOKEN:
            raise InvalidArgument(
                f"identity.token is {len(ident.token)} bytes, at most {MAX_TOKEN}",
                reason=RmpReason.TOO_LONG,
            )

    def _spa(self, spa: int, field: str = "spa") -> int:
        return checks.spa(spa, self.m.npages, field)

    def _asid(self, asid: int, field: str = "asid", low: int = 1) -> int:
        return checks.in_range(asid, low, MAX_ASID, field)

    # --- platform ------------------------------------------------------------------------

    async def GetPlatformInfo(self, request: Any, context: Any) -> pb.GetPlatformInfoResponse:
        p = self.m.platform_info()
        return pb.GetPlatformInfoResponse(
            memory_bytes=p.memory_bytes,
            max_pfn=p.max_pfn,
            rmp_covered_bytes=p.rmp_covered_bytes,
            iommu_mode=pb.IommuMode.ValueType(int(p.iommu)),
            snp_capable=p.snp_capable,
            violation_policy=pb.ViolationPolicy.ValueType(int(p.policy)),
            free_pages=p.free_pages,
            leaked_pages=p.leaked_pages,
            resident_pages=p.resident_pages,
            boot_id=self.boot_id,
        )

    async def Wbinvd(self, request: Any, context: Any) -> pb.WbinvdResponse:
        self.m.wbinvd()
        return pb.WbinvdResponse()

    async def AllocatePages(self, request: Any, context: Any) -> pb.AllocatePagesResponse:
        placement = checks.member(Placement, request.placement, "placement")
        pfns = self.m.allocate(request.count, placement)
        return pb.AllocatePagesResponse(pfns=pfns)

    async def FreePages(self, request: Any, context: Any) -> pb.FreePagesResponse:
        checks.count(len(request.pfns), MAX_BATCH, "pfns")
        self.m.free(list(request.pfns))
        return pb.FreePagesResponse()

    # --- RMP table ---------------------------------------------------------------------------

    async def ReadRmpEntry(self, request: Any, context: Any) -> pb.ReadRmpEntryResponse:
        self.m.check_alive()
        return pb.ReadRmpEntryResponse(entry=entry_pb(self.m.entry(request.pfn)))

    async def ListRmpEntries(self, request: Any, context: Any) -> pb.ListRmpEntriesResponse:
        entries = self.m.list_entries(request.first_pfn, request.count, request.non_default_only)
        return pb.ListRmpEntriesResponse(entries=[entry_pb(e) for e in entries])

    async def RmpUpdate(self, request: Any, context: Any) -> pb.RmpUpdateResponse:
        st = request.state
        code = self.m.rmpupdate(
            request.spa,
            gpa=st.gpa,
            assigned=st.assigned,
            size_2m=size_2m(st.page_size, "state.page_size"),
            immutable=st.immutable,
            asid=st.asid,
        )
        return pb.RmpUpdateResponse(result=result_pb(code), eax=int(code))

    async def RmpUpdateBatch(self, request: Any, context: Any) -> pb.RmpUpdateBatchResponse:
        self.m.check_alive()
        raw = request.entries
        if len(raw) % BATCH_ENTRY.itemsize:
            raise InvalidArgument(
                f"entries is {len(raw)} bytes, not a multiple of {BATCH_ENTRY.itemsize}",
                reason=RmpReason.INVALID_ARGUMENT,
            )
        arr = np.frombuffer(raw, dtype=BATCH_ENTRY)
        if len(arr) > MAX_BATCH:
            raise InvalidArgument(
                f"at most {MAX_BATCH} entries per batch", reason=RmpReason.TOO_LONG
            )
        if (
            np.any(arr["pagesize"] > 1)
            or np.any(arr["assigned"] > 1)
            or np.any(arr["immutable"] > 1)
        ):
            raise InvalidArgument(
                "assigned, pagesize and immutable are 0 or 1", reason=RmpReason.OUT_OF_RANGE
            )
        codes = self.m.rmpupdate_batch(
            arr["spa"],
            arr["gpa"].copy(),
            arr["assigned"] == 1,
            arr["pagesize"] == 1,
            arr["immutable"] == 1,
            arr["asid"].astype(np.int64),
        )
        return pb.RmpUpdateBatchResponse(codes=codes.tobytes())

    async def Psmash(self, request: Any, context: Any) -> pb.PsmashResponse:
        code = self.m.psmash(request.spa)
        return pb.PsmashResponse(result=result_pb(code), eax=int(code))

    async def LeakPages(self, request: Any, context: Any) -> pb.LeakPagesResponse:
        self.m.check_alive()
        checks.text(request.reason, "reason (logged with the RMP entry)", required=True)
        checks.count(len(request.pfns), MAX_BATCH, "pfns")
        self.m.leak(list(request.pfns), request.reason)
        return pb.LeakPagesResponse()

    async def ListLeakedPages(self, request: Any, context: Any) -> pb.ListLeakedPagesResponse:
        return pb.ListLeakedPagesResponse(pfns=self.m.leaked())

    # --- guest instructions ---------------------------------------------------------------------

    async def Pvalidate(self, request: Any, context: Any) -> pb.PvalidateResponse:
        ident = self._identity(request.identity)
        r = self.m.pvalidate(
            ident, request.gpa, size_2m=size_2m(request.page_size), validate=request.validate
        )
        if isinstance(r, Fault):
            return pb.PvalidateResponse(fault=fault_pb(r))
        return pb.PvalidateResponse(result=result_pb(r), eax=int(r))

    async def PvalidateBatch(self, request: Any, context: Any) -> pb.PvalidateBatchResponse:
        ident = self._identity(request.identity)
        if len(request.gpas) > MAX_BATCH:
            raise InvalidArgument(f"at most {MAX_BATCH} pages per batch", reason=RmpReason.TOO_LONG)
        gpas = np.fromiter(request.gpas, dtype=np.uint64, count=len(request.gpas))
        codes, fault = self.m.pvalidate_batch(ident, gpas, validate=request.validate)
        return pb.PvalidateBatchResponse(codes=codes.tobytes(), fault=fault_pb(fault))

    async def RmpAdjust(self, request: Any, context: Any) -> pb.RmpAdjustResponse:
        ident = self._identity(request.identity)
        checks.in_range(request.target_vmpl, 0, RDX_BYTE_MAX, "target_vmpl (RDX bits 7:0)")
        checks.in_range(request.perms, 0, RDX_BYTE_MAX, "perms (RDX bits 15:8)")
        r = self.m.rmpadjust(
            ident,
            request.gpa,
            size_2m=size_2m(request.page_size),
            target_vmpl=request.target_vmpl,
            perms=request.perms,
            vmsa=request.vmsa,
        )
        if isinstance(r, Fault):
            return pb.RmpAdjustResponse(fault=fault_pb(r))
        return pb.RmpAdjustResponse(result=result_pb(r), eax=int(r))

    # --- nested paging and memory -------------------------------------------------------------

    async def UpdateNestedPageTable(
        self, request: Any, context: Any
    ) -> pb.UpdateNestedPageTableResponse:
        checks.count(len(request.map) + len(request.unmap), MAX_BATCH, "map and unmap")
        checks.text(request.vm.id, "vm.id", limit=checks.MAX_ID)
        self.m.update_npt(
            request.asid,
            unmap=[(u.gpa, u.npages) for u in request.unmap],
            map=[(mp.gpa, mp.first_pfn, mp.npages) for mp in request.map],
        )
        return pb.UpdateNestedPageTableResponse()

    async def GuestRead(self, request: Any, context: Any) -> pb.GuestReadResponse:
        ident = self._identity(request.identity)
        data, fault = self.m.guest_read(ident, request.gpa, request.length, private=request.private)
        return pb.GuestReadResponse(data=data, fault=fault_pb(fault))

    async def GuestWrite(self, request: Any, context: Any) -> pb.GuestWriteResponse:
        ident = self._identity(request.identity)
        fault = self.m.guest_write(ident, request.gpa, request.data, private=request.private)
        return pb.GuestWriteResponse(fault=fault_pb(fault))

    async def HostRead(self, request: Any, context: Any) -> pb.HostReadResponse:
        return pb.HostReadResponse(data=self.m.host_read(request.spa, request.length))

    async def HostCopy(self, request: Any, context: Any) -> pb.HostCopyResponse:
        if not 0 < request.length <= PAGE_SIZE or request.peek > min(256, request.length):
            raise InvalidArgument(
                "length is 1..4096 and peek at most 256 and at most length",
                reason=RmpReason.OUT_OF_RANGE,
            )
        checks.member(AccessOrigin, request.origin, "origin")
        checks.text(request.writer, "writer")
        self._spa(request.dst_spa, "dst_spa")
        data = self.m.host_read(request.src_spa, request.length)
        write = await self.HostWrite(
            pb.HostWriteRequest(
                spa=request.dst_spa, data=data, origin=request.origin, writer=request.writer
            ),
            context,
        )
        return pb.HostCopyResponse(write=write, head=data[: request.peek])

    async def HostWrite(self, request: Any, context: Any) -> pb.HostWriteResponse:
        origin = checks.member(AccessOrigin, request.origin, "origin")
        checks.text(request.writer, "writer")
        outcome, entry, dump = await self.m.host_write(
            request.spa, request.data, origin, request.writer
        )
        return pb.HostWriteResponse(
            outcome=pb.ViolationOutcome.ValueType(int(outcome)),
            entry=entry_pb(entry) if entry is not None else None,
            rmp_dump=dump,
        )

    async def MapHostPage(self, request: Any, context: Any) -> pb.MapHostPageResponse:
        which = request.WhichOneof("page")
        pfn: int
        checks.text(request.holder, "holder (named when a map leaks)", required=True)
        if which == "spa":
            pfn = spa_to_pfn(self._spa(request.spa))
        elif which == "guest":
            self._asid(request.guest.asid, "guest.asid")
            pfn = self.m.guest_pfn(request.guest.asid, request.guest.gpa)
        else:
            raise InvalidArgument(
                "give the page as spa or as guest {asid, gpa}", reason=RmpReason.MISSING_FIELD
            )
        m = self.m.map_page(pfn, request.holder)
        return pb.MapHostPageResponse(map_id=m.map_id, spa=pfn_to_spa(pfn))

    async def UnmapHostPage(self, request: Any, context: Any) -> pb.UnmapHostPageResponse:
        checks.text(request.map_id, "map_id", limit=checks.MAX_ID, required=True)
        self.m.unmap_page(request.map_id)
        return pb.UnmapHostPageResponse()

    async def ListHostMaps(self, request: Any, context: Any) -> pb.ListHostMapsResponse:
        return pb.ListHostMapsResponse(
            maps=[
                pb.HostMap(
                    map_id=h.map.map_id,
                    pfn=h.map.pfn,
                    holder=h.map.holder,
                    held_seconds=h.held_seconds,
                    stale=h.stale,
                )
                for h in self.m.held_maps()
            ]
        )

    # --- identities and keys ----------------------------------------------------------------

    async def RegisterVcpuIdentity(
        self, request: Any, context: Any
    ) -> pb.RegisterVcpuIdentityResponse:
        i = request.identity
        self._identity_fields(i)
        self.m.register(Identity(i.vcpu.vm.id, i.vcpu.vcpu_id, i.asid, i.vmpl, i.token))
        return pb.RegisterVcpuIdentityResponse()

    async def RevokeVcpuIdentity(self, request: Any, context: Any) -> pb.RevokeVcpuIdentityResponse:
        i = request.identity
        self._identity_fields(i)
        self.m.revoke(i.vcpu.vm.id, i.vcpu.vcpu_id)
        return pb.RevokeVcpuIdentityResponse()

    async def InstallMemoryKey(self, request: Any, context: Any) -> pb.InstallMemoryKeyResponse:
        self.m.install_key(request.asid, request.key)
        return pb.InstallMemoryKeyResponse()

    async def RemoveMemoryKey(self, request: Any, context: Any) -> pb.RemoveMemoryKeyResponse:
        self._asid(request.asid)
        self.m.remove_key(request.asid)
        return pb.RemoveMemoryKeyResponse()

    # --- the firmware's own access ----------------------------------------------------------

    async def FirmwareWbinvdIndicator(
        self, request: Any, context: Any
    ) -> pb.FirmwareWbinvdIndicatorResponse:
        return pb.FirmwareWbinvdIndicatorResponse(set=self.m.fw_wbinvd_indicator(request.clear))

    async def FirmwareTransition(self, request: Any, context: Any) -> pb.FirmwareTransitionResponse:
        op = checks.member(FwOp, request.op, "op")
        self._asid(request.asid, low=0)
        checks.count(len(request.spas), MAX_BATCH, "spas")
        spas = list(request.spas)
        checks.distinct_pfns([spa_to_pfn(self._spa(s, "spas")) for s in spas], self.m.npages)
        changed = self.m.fw_transition(spas, op, request.asid)
        return pb.FirmwareTransitionResponse(changed=changed)

    async def FirmwareRead(self, request: Any, context: Any) -> pb.FirmwareReadResponse:
        self._asid(request.asid, low=0)
        expect = checks.members(PageState, request.expect_states, "expect_states")
        checks.count(len(request.checks), MAX_CHECKS, "checks")
        others = tuple(
            (
                self._spa(c.spa, "checks.spa"),
                checks.members(PageState, c.expect_states, "checks.expect_states"),
            )
            for c in request.checks
        )
        return pb.FirmwareReadResponse(
            data=self.m.fw_read(request.spa, request.length, request.asid, expect, others)
        )

    async def FirmwareWrite(self, request: Any, context: Any) -> pb.FirmwareWriteResponse:
        if not request.data:
            raise InvalidArgument("data is required", reason=RmpReason.MISSING_FIELD)
        self._asid(request.asid, low=0)
        expect = checks.members(PageState, request.expect_states, "expect_states")
        self.m.fw_write(request.spa, request.data, request.asid, expect)
        return pb.FirmwareWriteResponse()

    async def FirmwareSession(
        self, requests: Any, context: Any
    ) -> AsyncIterator[pb.FirmwareSessionResponse]:
        handlers: dict[str, Handler] = {"read": self.FirmwareRead, "write": self.FirmwareWrite}
        async for reply in run_session(requests, context, pb.FirmwareSessionResponse, handlers):
            yield reply

    async def _host_sequence(self, request: Any, context: Any) -> pb.HostSequenceResponse:
        return await host_sequence(request, context, self.host_handlers)

    async def HostSession(
        self, requests: Any, context: Any
    ) -> AsyncIterator[pb.HostSessionResponse]:
        handlers = self.host_handlers | {"sequence": self._host_sequence}
        async for reply in run_session(requests, context, pb.HostSessionResponse, handlers):
            yield reply

    async def GuestSession(
        self, requests: Any, context: Any
    ) -> AsyncIterator[pb.GuestSessionResponse]:
        handlers: dict[str, Handler] = {
            "read": self.GuestRead,
            "write": self.GuestWrite,
            "pvalidate_batch": self.PvalidateBatch,
        }
        async for reply in run_session(requests, context, pb.GuestSessionResponse, handlers):
            yield reply

    # --- policy and notifications ----------------------------------------------------------------

    async def GetViolationPolicy(self, request: Any, context: Any) -> pb.GetViolationPolicyResponse:
        return pb.GetViolationPolicyResponse(
            policy=pb.ViolationPolicy.ValueType(int(self.m.policy))
        )

    async def SetViolationPolicy(self, request: Any, context: Any) -> pb.SetViolationPolicyResponse:
        self.m.check_alive()
        previous = self.m.set_policy(checks.member(Policy, request.policy, "policy"))
        return pb.SetViolationPolicyResponse(previous=pb.ViolationPolicy.ValueType(int(previous)))

    async def WatchMmuNotifications(
        self, request: Any, context: Any
    ) -> AsyncIterator[pb.WatchMmuNotificationsResponse]:
        queue = self.hub.subscribe()
        try:
            while True:
                yield kick_pb(await queue.get())
        finally:
            self.hub.unsubscribe(queue)

    async def AcknowledgeMmuNotification(
        self, request: Any, context: Any
    ) -> pb.AcknowledgeMmuNotificationResponse:
        self.hub.acknowledge(request.sequence)
        return pb.AcknowledgeMmuNotificationResponse()


async def set_not_serving(health: Any, service_name: str) -> None:
    for name in ("", service_name):
        await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
