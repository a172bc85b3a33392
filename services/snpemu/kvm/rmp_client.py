"""kvm's RmpPort over gRPC: the typed rmp stub, and rmp's HostSession for the exit path."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from snp.common.v1 import handles_pb2, types_pb2
from snp.rmp.v1 import rmp_pb2 as pb

from snpemu.abi.addr import Gpa, Pfn, Spa
from snpemu.abi.rmp import Code, PageState, Placement
from snpemu.errors import Unavailable
from snpemu.kvm.identity import VcpuIdentity
from snpemu.kvm.ports import (
    BatchResult,
    CopyResult,
    HostCopy,
    HostOp,
    HostRead,
    HostResult,
    HostWrite,
    MmuNotification,
    PlatformInfo,
    ReadResult,
    RmpEntry,
    RmpState,
    RmpUpdateBatch,
    WriteResult,
)
from snpemu.kvm.vm import Run
from snpemu.kvm.wire import identity_to_pb
from snpemu.runtime.peers import HostSessions, Peer, session_error


def _size(size_2m: bool) -> types_pb2.PageSize.ValueType:
    return types_pb2.PAGE_SIZE_2M if size_2m else types_pb2.PAGE_SIZE_4K


def entry(e: pb.RmpEntry) -> RmpEntry:
    return RmpEntry(
        pfn=Pfn(e.pfn),
        state=PageState(e.state),
        size_2m=e.page_size == types_pb2.PAGE_SIZE_2M,
        assigned=e.assigned,
        asid=e.asid,
        gpa=Gpa(e.gpa),
        immutable=e.immutable,
        vmsa=e.vmsa,
        validated=e.validated,
    )


def write_pb(op: HostWrite) -> pb.HostWriteRequest:
    return pb.HostWriteRequest(
        spa=op.spa, data=op.data, origin=pb.AccessOrigin.ValueType(op.origin), writer=op.writer
    )


def copy_pb(op: HostCopy) -> pb.HostCopyRequest:
    return pb.HostCopyRequest(
        src_spa=op.src,
        dst_spa=op.dst,
        length=op.length,
        origin=pb.AccessOrigin.ValueType(op.origin),
        writer=op.writer,
        peek=op.peek,
    )


def session_op(op: HostOp) -> pb.HostSessionRequest:
    match op:
        case HostRead():
            return pb.HostSessionRequest(read=pb.HostReadRequest(spa=op.spa, length=op.length))
        case HostWrite():
            return pb.HostSessionRequest(write=write_pb(op))
        case HostCopy():
            return pb.HostSessionRequest(copy=copy_pb(op))
        case RmpUpdateBatch():
            return pb.HostSessionRequest(
                rmp_update_batch=pb.RmpUpdateBatchRequest(entries=op.entries)
            )


def session_result(r: pb.HostSessionResponse) -> HostResult:
    match r.WhichOneof("result"):
        case "read":
            return ReadResult(bytes(r.read.data))
        case "write":
            return WriteResult(int(r.write.outcome))
        case "copy":
            return CopyResult(int(r.copy.write.outcome), bytes(r.copy.head))
        case "rmp_update_batch":
            return BatchResult(bytes(r.rmp_update_batch.codes))
        case "error":
            raise session_error(r.error)
    raise Unavailable(f"rmp answered a host session op with {r.WhichOneof('result')}")


class GrpcRmp:
    """RmpPort on the rmp service. `host` is the pool of HostSession streams (kvm's exits)."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.host = HostSessions(peer)

    @property
    def stub(self) -> Any:  # snp.rmp.v1.rmp_pb2_grpc.RmpServiceStub on the peer's channel
        return self.peer.ensure()

    async def platform_info(self) -> PlatformInfo:
        r: pb.GetPlatformInfoResponse = await self.peer.invoke(
            self.stub.GetPlatformInfo, pb.GetPlatformInfoRequest()
        )
        return PlatformInfo(snp_capable=r.snp_capable)

    async def wbinvd(self) -> None:
        await self.peer.invoke(self.stub.Wbinvd, pb.WbinvdRequest())

    async def allocate(self, count: int, placement: Placement) -> list[Pfn]:
        r: pb.AllocatePagesResponse = await self.peer.invoke(
            self.stub.AllocatePages,
            pb.AllocatePagesRequest(count=count, placement=pb.Placement.ValueType(placement)),
        )
        return [Pfn(p) for p in r.pfns]

    async def free(self, pfns: Sequence[Pfn]) -> None:
        await self.peer.invoke(self.stub.FreePages, pb.FreePagesRequest(pfns=pfns))

    async def leak(self, pfns: Sequence[Pfn], reason: str) -> None:
        await self.peer.invoke(self.stub.LeakPages, pb.LeakPagesRequest(pfns=pfns, reason=reason))

    async def rmpupdate(self, spa: Spa, state: RmpState) -> Code:
        r: pb.RmpUpdateResponse = await self.peer.invoke(
            self.stub.RmpUpdate,
            pb.RmpUpdateRequest(
                spa=spa,
                state=pb.RmpState(
                    gpa=state.gpa,
                    assigned=state.assigned,
                    asid=state.asid,
                    immutable=state.immutable,
                    page_size=_size(state.size_2m),
                ),
            ),
        )
        return Code(r.eax)

    async def rmpupdate_batch(self, entries: bytes) -> bytes:
        r: pb.RmpUpdateBatchResponse = await self.peer.invoke(
            self.stub.RmpUpdateBatch, pb.RmpUpdateBatchRequest(entries=entries)
        )
        return bytes(r.codes)

    async def psmash(self, spa: Spa) -> Code:
        r: pb.PsmashResponse = await self.peer.invoke(self.stub.Psmash, pb.PsmashRequest(spa=spa))
        return Code(r.eax)

    async def read_entry(self, pfn: Pfn) -> RmpEntry:
        r: pb.ReadRmpEntryResponse = await self.peer.invoke(
            self.stub.ReadRmpEntry, pb.ReadRmpEntryRequest(pfn=pfn)
        )
        return entry(r.entry)

    async def read_entries(
        self, first: Pfn, count: int, *, non_default_only: bool = True
    ) -> list[RmpEntry]:
        r: pb.ListRmpEntriesResponse = await self.peer.invoke(
            self.stub.ListRmpEntries,
            pb.ListRmpEntriesRequest(
                first_pfn=first, count=count, non_default_only=non_default_only
            ),
        )
        return [entry(e) for e in r.entries]

    async def update_npt(
        self, vm_id: str, asid: int, *, map: Sequence[Run] = (), unmap: Sequence[Run] = ()
    ) -> None:
        def mappings(runs: Sequence[Run]) -> list[pb.NptMapping]:
            return [pb.NptMapping(gpa=r.gpa, first_pfn=r.first_pfn, npages=r.npages) for r in runs]

        await self.peer.invoke(
            self.stub.UpdateNestedPageTable,
            pb.UpdateNestedPageTableRequest(
                vm=handles_pb2.VmHandle(id=vm_id),
                asid=asid,
                map=mappings(map),
                unmap=mappings(unmap),
            ),
        )

    async def register_identity(self, ident: VcpuIdentity) -> None:
        await self.peer.invoke(
            self.stub.RegisterVcpuIdentity,
            pb.RegisterVcpuIdentityRequest(identity=identity_to_pb(ident)),
        )

    async def revoke_identity(self, ident: VcpuIdentity) -> None:
        await self.peer.invoke(
            self.stub.RevokeVcpuIdentity,
            pb.RevokeVcpuIdentityRequest(identity=identity_to_pb(ident)),
        )

    async def host_write(self, op: HostWrite) -> WriteResult:
        r: pb.HostWriteResponse = await self.peer.invoke(self.stub.HostWrite, write_pb(op))
        return WriteResult(int(r.outcome))

    async def _session(self, op: HostOp) -> HostResult:
        return session_result(await self.host.exchange(session_op(op)))

    async def session_read(self, op: HostRead) -> bytes:
        r = await self._session(op)
        assert isinstance(r, ReadResult)  # INVARIANT: rmp answers each op in kind
        return r.data

    async def session_write(self, op: HostWrite) -> WriteResult:
        r = await self._session(op)
        assert isinstance(r, WriteResult)  # INVARIANT: as above
        return r

    async def session_copy(self, op: HostCopy) -> CopyResult:
        r = await self._session(op)
        assert isinstance(r, CopyResult)  # INVARIANT: as above
        return r

    async def session_rmpupdate_batch(self, entries: bytes) -> bytes:
        r = await self._session(RmpUpdateBatch(entries))
        assert isinstance(r, BatchResult)  # INVARIANT: as above
        return r.codes

    async def sequence(self, ops: Sequence[HostOp]) -> list[HostResult]:
        reply = await self.host.exchange(
            pb.HostSessionRequest(
                sequence=pb.HostSequenceRequest(ops=[session_op(op) for op in ops])
            )
        )
        return [session_result(r) for r in reply.sequence.results]

    async def mmu_notifications(self) -> AsyncIterator[MmuNotification]:
        """rmp's kick requests, as long as the stream lasts (its errors raised as they come)."""
        call = self.stub.WatchMmuNotifications(
            pb.WatchMmuNotificationsRequest(), metadata=self.peer.md
        )
        async for note in call:
            yield MmuNotification(
                note.sequence, note.asid, Pfn(note.pfn), note.reason, note.terminate
            )

    async def acknowledge(self, sequence: int) -> None:
        await self.peer.invoke(
            self.stub.AcknowledgeMmuNotification,
            pb.AcknowledgeMmuNotificationRequest(sequence=sequence),
        )

    async def close(self) -> None:
        await self.host.close()
        await self.peer.close()
