"""rmp over gRPC as a guest vCPU reaches it (guest/ports.py GuestRmp): its memory accesses and
PVALIDATE batches as messages on GuestSession streams, the single instructions as calls."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from snp.common.v1 import types_pb2
from snp.rmp.v1 import rmp_pb2, rmp_pb2_grpc

from snpemu.abi.addr import Gpa
from snpemu.guest.ports import Batch, Fault, Instruction, Read
from snpemu.kvm.identity import VcpuIdentity
from snpemu.kvm.wire import identity_to_pb
from snpemu.runtime.peers import Peer, SessionPool

if TYPE_CHECKING:
    from snp.rmp.v1.rmp_pb2_grpc import RmpServiceAsyncStub

SESSIONS = 4  # streams open at once: one op in flight on each


def fault_of(msg: rmp_pb2.GuestFault) -> Fault:
    return Fault(msg.vc, msg.npf, int(msg.error_code), Gpa(msg.gpa), msg.cause)


def _size(size_2m: bool) -> types_pb2.PageSize.ValueType:
    return types_pb2.PAGE_SIZE_2M if size_2m else types_pb2.PAGE_SIZE_4K


class GuestSessions(SessionPool):
    """rmp's GuestSession, typed: a vCPU's memory accesses and PVALIDATE batches."""

    def __init__(self, peer: Peer, size: int = SESSIONS) -> None:
        super().__init__(peer, size)

    async def exchange(self, request: rmp_pb2.GuestSessionRequest) -> rmp_pb2.GuestSessionResponse:
        reply: rmp_pb2.GuestSessionResponse = await super().exchange(request)
        return reply

    def _open(self) -> Any:
        stub: RmpServiceAsyncStub = self.peer.ensure()
        return stub.GuestSession(metadata=self.peer.md)


class GrpcGuestRmp:
    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.sessions = GuestSessions(peer)

    @classmethod
    def connect(cls, address: str, credential: str | None) -> GrpcGuestRmp:
        return cls(Peer("rmp", address, credential, rmp_pb2_grpc.RmpServiceStub))

    def _stub(self) -> RmpServiceAsyncStub:
        return self.peer.ensure()  # type: ignore[no-any-return]

    async def read(self, vcpu: VcpuIdentity, gpa: Gpa, length: int, *, private: bool) -> Read:
        req = rmp_pb2.GuestReadRequest(
            identity=identity_to_pb(vcpu), gpa=gpa, length=length, private=private
        )
        r = (await self.sessions.exchange(rmp_pb2.GuestSessionRequest(read=req))).read
        return Read(bytes(r.data), fault_of(r.fault) if r.HasField("fault") else None)

    async def write(
        self, vcpu: VcpuIdentity, gpa: Gpa, data: bytes, *, private: bool
    ) -> Fault | None:
        req = rmp_pb2.GuestWriteRequest(
            identity=identity_to_pb(vcpu), gpa=gpa, data=data, private=private
        )
        r = (await self.sessions.exchange(rmp_pb2.GuestSessionRequest(write=req))).write
        return fault_of(r.fault) if r.HasField("fault") else None

    async def pvalidate_batch(
        self, vcpu: VcpuIdentity, gpas: Sequence[Gpa], *, validate: bool
    ) -> Batch:
        req = rmp_pb2.PvalidateBatchRequest(
            identity=identity_to_pb(vcpu), gpas=gpas, validate=validate
        )
        msg = rmp_pb2.GuestSessionRequest(pvalidate_batch=req)
        r = (await self.sessions.exchange(msg)).pvalidate_batch
        return Batch(bytes(r.codes), fault_of(r.fault) if r.HasField("fault") else None)

    async def read_call(self, vcpu: VcpuIdentity, gpa: Gpa, length: int, *, private: bool) -> Read:
        r = await self.peer.invoke(
            self._stub().GuestRead,
            rmp_pb2.GuestReadRequest(
                identity=identity_to_pb(vcpu), gpa=gpa, length=length, private=private
            ),
        )
        return Read(bytes(r.data), fault_of(r.fault) if r.HasField("fault") else None)

    async def pvalidate(
        self, vcpu: VcpuIdentity, gpa: Gpa, *, size_2m: bool, validate: bool
    ) -> Instruction:
        r = await self.peer.invoke(
            self._stub().Pvalidate,
            rmp_pb2.PvalidateRequest(
                identity=identity_to_pb(vcpu), gpa=gpa, page_size=_size(size_2m), validate=validate
            ),
        )
        return Instruction(r.eax, fault_of(r.fault) if r.HasField("fault") else None)

    async def rmpadjust(
        self, vcpu: VcpuIdentity, gpa: Gpa, *, target_vmpl: int, perms: int, vmsa: bool
    ) -> Instruction:
        r = await self.peer.invoke(
            self._stub().RmpAdjust,
            rmp_pb2.RmpAdjustRequest(
                identity=identity_to_pb(vcpu),
                gpa=gpa,
                page_size=types_pb2.PAGE_SIZE_4K,
                target_vmpl=target_vmpl,
                perms=perms,
                vmsa=vmsa,
            ),
        )
        return Instruction(r.eax, fault_of(r.fault) if r.HasField("fault") else None)

    async def close(self) -> None:
        await self.sessions.close()
        await self.peer.close()
