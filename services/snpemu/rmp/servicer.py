"""gRPC adapter of the rmp model: decode requests, call RmpMachine, encode replies."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import numpy as np
from grpc_health.v1 import health_pb2
from snp.common.v1 import types_pb2
from snp.rmp.v1 import rmp_pb2 as pb

from snpemu.abi.addr import PAGE_SHIFT
from snpemu.abi.rmp import FwOp, PageState
from snpemu.abi.rmp_batch import BATCH_ENTRY
from snpemu.errors import InvalidArgument, NotFound, SnpemuError
from snpemu.rmp.entry import RMP_STATE, Entry
from snpemu.rmp.machine import Identity, Origin, Policy, RmpMachine
from snpemu.rmp.memory import Placement
from snpemu.rmp.table import Fault
from snpemu.runtime.status import grpc_code

log = logging.getLogger(__name__)

# RPCs a guest vCPU issues (with its identity); every other rmp RPC is host only.
GUEST_RPCS = frozenset(
    {"Pvalidate", "PvalidateBatch", "RmpAdjust", "GuestRead", "GuestWrite", "GuestSession"}
)

assert BATCH_ENTRY.itemsize == 8 + RMP_STATE.size
MAX_BATCH = 1 << 16
# A kernel path between two guest entries is a handful of accesses (rmp.proto HostSequenceRequest).
MAX_SEQUENCE = 8


def _result(code: int) -> pb.RmpResult.ValueType:
    # Enum values are the hardware codes plus one (0 means "not given").
    return pb.RmpResult.ValueType(code + 1)


def _size_2m(size: int, field: str = "page_size") -> bool:
    if size == types_pb2.PAGE_SIZE_4K:
        return False
    if size == types_pb2.PAGE_SIZE_2M:
        return True
    raise InvalidArgument(f"{field} must be PAGE_SIZE_4K or PAGE_SIZE_2M")


def entry_pb(e: Entry) -> pb.RmpEntry:
    return pb.RmpEntry(
        pfn=e.pfn,
        assigned=e.assigned,
        page_size=types_pb2.PAGE_SIZE_2M if e.page_size_2m else types_pb2.PAGE_SIZE_4K,
        immutable=e.immutable,
        gpa=e.gpa,
        asid=e.asid,
        vmsa=e.vmsa,
        validated=e.validated,
        vmpl1_perms=e.vmpl_perms[0],
        vmpl2_perms=e.vmpl_perms[1],
        vmpl3_perms=e.vmpl_perms[2],
        state=types_pb2.PageState.ValueType(int(e.state)),
        raw=e.raw,
        leaked=e.leaked,
    )


def fault_pb(f: Fault | None) -> pb.GuestFault | None:
    if f is None:
        return None
    return pb.GuestFault(vc=f.vc, npf=not f.vc, error_code=f.error_code, gpa=f.gpa, cause=f.cause)


class KickHub:
    """The MMU-notifier stream kvm subscribes to, and the acknowledgements it sends back."""

    def __init__(
        self, timeout_s: float, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    ) -> None:
        self.timeout_s = timeout_s
        self.sleep = sleep  # the timer of the acknowledgement timeout (tests drive their own)
        self.subscribers: list[asyncio.Queue[pb.WatchMmuNotificationsResponse]] = []
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._seq = itertools.count(1)

    async def kick(self, asid: int, pfn: int, reason: str, terminate: bool) -> bool:
        if not self.subscribers:
            log.warning("no kvm subscribed to MMU notifications: cannot kick ASID %d", asid)
            return False
        seq = next(self._seq)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending[seq] = done
        note = pb.WatchMmuNotificationsResponse(
            sequence=seq, asid=asid, pfn=pfn, reason=reason, terminate=terminate
        )
        for q in self.subscribers:
            q.put_nowait(note)
        timer = asyncio.ensure_future(self.sleep(self.timeout_s))
        try:
            await asyncio.wait((done, timer), return_when=asyncio.FIRST_COMPLETED)
            if done.done():
                return True
            log.warning("kvm did not acknowledge kick %d of ASID %d in time", seq, asid)
            return False
        finally:
            timer.cancel()
            self._pending.pop(seq, None)

    def acknowledge(self, seq: int) -> None:
        done = self._pending.get(seq)
        if done is None:
            raise NotFound(f"no kick {seq} is waiting for an acknowledgement")
        if not done.done():
            done.set_result(None)


class RmpServicer:
    def __init__(
        self,
        machine: RmpMachine,
        kick_timeout_s: float,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.m = machine
        # a HostSession op (and a HostSequence step) by name
        self.host_handlers: dict[str, Any] = {
            "read": self.HostRead,
            "write": self.HostWrite,
            "rmp_update_batch": self.RmpUpdateBatch,
            "copy": self.HostCopy,
        }
        self.hub = KickHub(kick_timeout_s, sleep)
        machine.notifier = self.hub

    # --- helpers -------------------------------------------------------------------------

    def _identity(self, ident: Any) -> Identity:
        if not ident.vcpu.vm.id:
            raise InvalidArgument("identity.vcpu.vm.id is required")
        return self.m.guest(ident.vcpu.vm.id, ident.vcpu.vcpu_id, ident.asid, ident.token)

    # --- platform ------------------------------------------------------------------------

    async def GetPlatformInfo(self, request: Any, context: Any) -> pb.GetPlatformInfoResponse:
        m = self.m
        m.check_alive()
        return pb.GetPlatformInfoResponse(
            memory_bytes=m.memory_bytes,
            max_pfn=m.npages - 1,
            rmp_covered_bytes=m.memory_bytes,
            iommu_mode=pb.IommuMode.ValueType(int(m.iommu)),
            snp_capable=m.snp_capable,
            violation_policy=pb.ViolationPolicy.ValueType(int(m.policy)),
            free_pages=m.allocator.free_count,
            leaked_pages=int(m.allocator.leaked.sum()),
            resident_pages=m.frames.resident_frames,
        )

    async def Wbinvd(self, request: Any, context: Any) -> pb.WbinvdResponse:
        self.m.wbinvd()
        return pb.WbinvdResponse()

    async def AllocatePages(self, request: Any, context: Any) -> pb.AllocatePagesResponse:
        if request.placement == pb.PLACEMENT_UNSPECIFIED:
            raise InvalidArgument("placement is required")
        pfns = self.m.allocate(request.count, Placement(request.placement))
        return pb.AllocatePagesResponse(pfns=pfns)

    async def FreePages(self, request: Any, context: Any) -> pb.FreePagesResponse:
        self.m.free(list(request.pfns))
        return pb.FreePagesResponse()

    # --- RMP table ---------------------------------------------------------------------------

    async def ReadRmpEntry(self, request: Any, context: Any) -> pb.ReadRmpEntryResponse:
        self.m.check_alive()
        return pb.ReadRmpEntryResponse(entry=entry_pb(self.m.entry(request.pfn)))

    async def ListRmpEntries(self, request: Any, context: Any) -> pb.ListRmpEntriesResponse:
        self.m.check_alive()
        if not 1 <= request.count <= 4096:
            raise InvalidArgument("count must be in 1..4096")
        first = request.first_pfn
        if first >= self.m.npages:
            raise InvalidArgument(f"first_pfn {first:#x} is beyond host memory")
        last = min(first + request.count, self.m.npages)
        t = self.m.table
        pfns = range(first, last)
        if request.non_default_only:
            span = slice(first, last)
            nonzero = (t.lo[span] != 0) | (t.hi[span] != 0) | (t.kind[span] != 0)
            pfns = [first + int(i) for i in np.flatnonzero(nonzero)]  # type: ignore[assignment]
        return pb.ListRmpEntriesResponse(entries=[entry_pb(self.m.entry(p)) for p in pfns])

    async def RmpUpdate(self, request: Any, context: Any) -> pb.RmpUpdateResponse:
        st = request.state
        code = self.m.rmpupdate(
            request.spa,
            gpa=st.gpa,
            assigned=st.assigned,
            size_2m=_size_2m(st.page_size, "state.page_size"),
            immutable=st.immutable,
            asid=st.asid,
        )
        return pb.RmpUpdateResponse(result=_result(code), eax=int(code))

    async def RmpUpdateBatch(self, request: Any, context: Any) -> pb.RmpUpdateBatchResponse:
        self.m.check_alive()
        raw = request.entries
        if len(raw) % BATCH_ENTRY.itemsize:
            raise InvalidArgument(
                f"entries is {len(raw)} bytes, not a multiple of {BATCH_ENTRY.itemsize}"
            )
        arr = np.frombuffer(raw, dtype=BATCH_ENTRY)
        if len(arr) > MAX_BATCH:
            raise InvalidArgument(f"at most {MAX_BATCH} entries per batch")
        if (
            np.any(arr["pagesize"] > 1)
            or np.any(arr["assigned"] > 1)
            or np.any(arr["immutable"] > 1)
        ):
            raise InvalidArgument("assigned, pagesize and immutable are 0 or 1")
        spa = arr["spa"]
        misaligned = (spa & np.uint64(0xFFF)) != 0
        pfns = np.where(misaligned, -1, (spa >> np.uint64(PAGE_SHIFT)).astype(np.int64))
        codes = self.m.table.rmpupdate_batch(
            pfns,
            arr["gpa"].copy(),
            arr["assigned"] == 1,
            arr["pagesize"] == 1,
            arr["immutable"] == 1,
            arr["asid"].astype(np.int64),
        )
        self.m.count("rmpupdate", codes)
        return pb.RmpUpdateBatchResponse(codes=codes.tobytes())

    async def Psmash(self, request: Any, context: Any) -> pb.PsmashResponse:
        code = self.m.psmash(request.spa)
        return pb.PsmashResponse(result=_result(code), eax=int(code))

    async def LeakPages(self, request: Any, context: Any) -> pb.LeakPagesResponse:
        self.m.check_alive()
        if not request.reason:
            raise InvalidArgument("reason is required (it is logged with the RMP entry)")
        self.m.leak(list(request.pfns), request.reason)
        return pb.LeakPagesResponse()

    async def ListLeakedPages(self, request: Any, context: Any) -> pb.ListLeakedPagesResponse:
        return pb.ListLeakedPagesResponse(pfns=self.m.leaked())

    # --- guest instructions ---------------------------------------------------------------------

    async def Pvalidate(self, request: Any, context: Any) -> pb.PvalidateResponse:
        ident = self._identity(request.identity)
        r = self.m.pvalidate(
            ident, request.gpa, size_2m=_size_2m(request.page_size), validate=request.validate
        )
        if isinstance(r, Fault):
            return pb.PvalidateResponse(fault=fault_pb(r))
        return pb.PvalidateResponse(result=_result(r), eax=int(r))

    async def PvalidateBatch(self, request: Any, context: Any) -> pb.PvalidateBatchResponse:
        ident = self._identity(request.identity)
        if len(request.gpas) > MAX_BATCH:
            raise InvalidArgument(f"at most {MAX_BATCH} pages per batch")
        gpas = np.fromiter(request.gpas, dtype=np.uint64, count=len(request.gpas))
        codes, fault = self.m.pvalidate_batch(ident, gpas, validate=request.validate)
        return pb.PvalidateBatchResponse(codes=codes.tobytes(), fault=fault_pb(fault))

    async def RmpAdjust(self, request: Any, context: Any) -> pb.RmpAdjustResponse:
        ident = self._identity(request.identity)
        r = self.m.rmpadjust(
            ident,
            request.gpa,
            size_2m=_size_2m(request.page_size),
            target_vmpl=request.target_vmpl,
            perms=request.perms,
            vmsa=request.vmsa,
        )
        if isinstance(r, Fault):
            return pb.RmpAdjustResponse(fault=fault_pb(r))
        return pb.RmpAdjustResponse(result=_result(r), eax=int(r))

    # --- nested paging and memory -------------------------------------------------------------

    async def UpdateNestedPageTable(
        self, request: Any, context: Any
    ) -> pb.UpdateNestedPageTableResponse:
        self.m.check_alive()
        if not 1 <= request.asid <= 1023:
            raise InvalidArgument("asid must be in 1..1023")
        table = self.m.npt(request.asid)
        for u in request.unmap:
            table.unmap(u.gpa, u.npages)
        for mp in request.map:
            if mp.first_pfn + mp.npages > self.m.npages:
                raise InvalidArgument(f"mapping at GPA {mp.gpa:#x} runs beyond host memory")
            table.map(mp.gpa, mp.first_pfn, mp.npages)
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
        if not 0 < request.length <= 4096 or request.peek > min(256, request.length):
            raise InvalidArgument("length is 1..4096 and peek at most 256 and at most length")
        data = self.m.host_read(request.src_spa, request.length)
        write = await self.HostWrite(
            pb.HostWriteRequest(
                spa=request.dst_spa, data=data, origin=request.origin, writer=request.writer
            ),
            context,
        )
        return pb.HostCopyResponse(write=write, head=data[: request.peek])

    async def HostWrite(self, request: Any, context: Any) -> pb.HostWriteResponse:
        if request.origin == pb.ACCESS_ORIGIN_UNSPECIFIED:
            raise InvalidArgument("origin is required: ACCESS_ORIGIN_USER or ACCESS_ORIGIN_KERNEL")
        outcome, entry, dump = await self.m.host_write(
            request.spa, request.data, Origin(request.origin), request.writer
        )
        return pb.HostWriteResponse(
            outcome=pb.ViolationOutcome.ValueType(int(outcome)),
            entry=entry_pb(entry) if entry is not None else None,
            rmp_dump=dump,
        )

    async def MapHostPage(self, request: Any, context: Any) -> pb.MapHostPageResponse:
        which = request.WhichOneof("page")
        if which == "spa":
            pfn = request.spa >> PAGE_SHIFT
        elif which == "guest":
            table = self.m.npts.get(request.guest.asid)
            translated = table.translate(request.guest.gpa) if table else None
            if translated is None:
                raise InvalidArgument(
                    f"GPA {request.guest.gpa:#x} is not mapped for ASID {request.guest.asid}"
                )
            pfn = translated
        else:
            raise InvalidArgument("give the page as spa or as guest {asid, gpa}")
        if not request.holder:
            raise InvalidArgument("holder is required (named when a map leaks)")
        m = self.m.map_page(pfn, request.holder)
        return pb.MapHostPageResponse(map_id=m.map_id, spa=pfn << PAGE_SHIFT)

    async def UnmapHostPage(self, request: Any, context: Any) -> pb.UnmapHostPageResponse:
        self.m.unmap_page(request.map_id)
        return pb.UnmapHostPageResponse()

    async def ListHostMaps(self, request: Any, context: Any) -> pb.ListHostMapsResponse:
        now = self.m.clock()
        stale = {m.map_id for m in self.m.stale_maps()}
        return pb.ListHostMapsResponse(
            maps=[
                pb.HostMap(
                    map_id=m.map_id,
                    pfn=m.pfn,
                    holder=m.holder,
                    held_seconds=now - m.since,
                    stale=m.map_id in stale,
                )
                for m in self.m.maps.values()
            ]
        )

    # --- identities and keys ----------------------------------------------------------------

    async def RegisterVcpuIdentity(
        self, request: Any, context: Any
    ) -> pb.RegisterVcpuIdentityResponse:
        i = request.identity
        if not i.vcpu.vm.id:
            raise InvalidArgument("identity.vcpu.vm.id is required")
        self.m.register(Identity(i.vcpu.vm.id, i.vcpu.vcpu_id, i.asid, i.vmpl, i.token))
        return pb.RegisterVcpuIdentityResponse()

    async def RevokeVcpuIdentity(self, request: Any, context: Any) -> pb.RevokeVcpuIdentityResponse:
        i = request.identity
        self.m.revoke(i.vcpu.vm.id, i.vcpu.vcpu_id)
        return pb.RevokeVcpuIdentityResponse()

    async def InstallMemoryKey(self, request: Any, context: Any) -> pb.InstallMemoryKeyResponse:
        self.m.check_alive()
        self.m.keys.install(request.asid, request.key)
        return pb.InstallMemoryKeyResponse()

    async def RemoveMemoryKey(self, request: Any, context: Any) -> pb.RemoveMemoryKeyResponse:
        self.m.check_alive()
        self.m.keys.remove(request.asid)
        return pb.RemoveMemoryKeyResponse()

    # --- the firmware's own access ----------------------------------------------------------

    async def FirmwareWbinvdIndicator(
        self, request: Any, context: Any
    ) -> pb.FirmwareWbinvdIndicatorResponse:
        return pb.FirmwareWbinvdIndicatorResponse(set=self.m.fw_wbinvd_indicator(request.clear))

    async def FirmwareTransition(self, request: Any, context: Any) -> pb.FirmwareTransitionResponse:
        if request.op == pb.FIRMWARE_OP_UNSPECIFIED:
            raise InvalidArgument("op is required")
        try:
            op = FwOp(request.op)
        except ValueError:
            raise InvalidArgument(f"unknown firmware transition {request.op}") from None
        changed = self.m.fw_transition(list(request.spas), op, request.asid)
        return pb.FirmwareTransitionResponse(changed=changed)

    async def FirmwareRead(self, request: Any, context: Any) -> pb.FirmwareReadResponse:
        expect = tuple(PageState(s) for s in request.expect_states)
        checks = tuple(
            (c.spa, tuple(PageState(s) for s in c.expect_states)) for c in request.checks
        )
        return pb.FirmwareReadResponse(
            data=self.m.fw_read(request.spa, request.length, request.asid, expect, checks)
        )

    async def FirmwareWrite(self, request: Any, context: Any) -> pb.FirmwareWriteResponse:
        if not request.data:
            raise InvalidArgument("data is required")
        expect = tuple(PageState(s) for s in request.expect_states)
        self.m.fw_write(request.spa, request.data, request.asid, expect)
        return pb.FirmwareWriteResponse()

    async def _session(
        self, requests: Any, context: Any, response_cls: Any, handlers: dict[str, Any]
    ) -> AsyncIterator[Any]:
        """Run each op of a session stream through its unary handler; errors stay in-band."""
        async for op in requests:
            which = op.WhichOneof("op")
            try:
                if which not in handlers:
                    raise InvalidArgument(f"a session request is one of {', '.join(handlers)}")
                yield response_cls(**{which: await handlers[which](getattr(op, which), context)})
            except SnpemuError as e:
                yield response_cls(error=session_error(e))

    async def FirmwareSession(
        self, requests: Any, context: Any
    ) -> AsyncIterator[pb.FirmwareSessionResponse]:
        handlers = {"read": self.FirmwareRead, "write": self.FirmwareWrite}
        async for reply in self._session(requests, context, pb.FirmwareSessionResponse, handlers):
            yield reply

    async def _host_sequence(self, request: Any, context: Any) -> pb.HostSequenceResponse:
        """A kernel path's accesses in order, up to the first that fails (see rmp.proto)."""
        handlers = self.host_handlers
        if not 0 < len(request.ops) <= MAX_SEQUENCE:
            raise InvalidArgument(f"a sequence has 1 to {MAX_SEQUENCE} ops")
        kinds = [op.WhichOneof("op") for op in request.ops]
        if any(k not in handlers for k in kinds):
            raise InvalidArgument(f"each op of a sequence is one of {', '.join(handlers)}")
        results = []
        for op, kind in zip(request.ops, kinds, strict=True):
            try:
                result = await handlers[kind](getattr(op, kind), context)
            except SnpemuError as e:
                results.append(pb.HostSessionResponse(error=session_error(e)))
                break
            results.append(pb.HostSessionResponse(**{kind: result}))
            if kind == "rmp_update_batch" and any(result.codes):
                break
        return pb.HostSequenceResponse(results=results)

    async def HostSession(
        self, requests: Any, context: Any
    ) -> AsyncIterator[pb.HostSessionResponse]:
        handlers = self.host_handlers | {"sequence": self._host_sequence}
        async for reply in self._session(requests, context, pb.HostSessionResponse, handlers):
            yield reply

    async def GuestSession(
        self, requests: Any, context: Any
    ) -> AsyncIterator[pb.GuestSessionResponse]:
        handlers = {
            "read": self.GuestRead,
            "write": self.GuestWrite,
            "pvalidate_batch": self.PvalidateBatch,
        }
        async for reply in self._session(requests, context, pb.GuestSessionResponse, handlers):
            yield reply

    # --- policy and notifications ----------------------------------------------------------------

    async def GetViolationPolicy(self, request: Any, context: Any) -> pb.GetViolationPolicyResponse:
        return pb.GetViolationPolicyResponse(
            policy=pb.ViolationPolicy.ValueType(int(self.m.policy))
        )

    async def SetViolationPolicy(self, request: Any, context: Any) -> pb.SetViolationPolicyResponse:
        self.m.check_alive()
        if request.policy == pb.VIOLATION_POLICY_UNSPECIFIED:
            raise InvalidArgument("policy is required")
        previous = self.m.policy
        self.m.policy = Policy(request.policy)
        log.info(
            "RMP violation policy %s -> %s",
            previous.label,
            self.m.policy.label,
            extra={"event": "policy_changed"},
        )
        return pb.SetViolationPolicyResponse(previous=pb.ViolationPolicy.ValueType(int(previous)))

    async def WatchMmuNotifications(
        self, request: Any, context: Any
    ) -> AsyncIterator[pb.WatchMmuNotificationsResponse]:
        queue: asyncio.Queue[pb.WatchMmuNotificationsResponse] = asyncio.Queue()
        self.hub.subscribers.append(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self.hub.subscribers.remove(queue)

    async def AcknowledgeMmuNotification(
        self, request: Any, context: Any
    ) -> pb.AcknowledgeMmuNotificationResponse:
        self.hub.acknowledge(request.sequence)
        return pb.AcknowledgeMmuNotificationResponse()


async def set_not_serving(health: Any, service_name: str) -> None:
    for name in ("", service_name):
        await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)


def session_error(e: SnpemuError) -> pb.SessionError:
    """What a unary call would carry as its status, in-band in a session reply."""
    return pb.SessionError(
        code=grpc_code(e).value[0], message=e.message, reason=e.reason, metadata=e.metadata
    )
