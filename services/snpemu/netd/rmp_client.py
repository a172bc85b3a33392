"""netd's host memory on the rmp service: host user-mode reads and writes (the `Memory` port
of netd/daemon.py)."""

from __future__ import annotations

from snp.rmp.v1 import rmp_pb2, rmp_pb2_grpc

from snpemu.netd.daemon import WriteOutcome
from snpemu.rmp.client import die_of_sigbus
from snpemu.runtime.peers import Peer

OUTCOMES = {
    rmp_pb2.VIOLATION_OUTCOME_NONE: WriteOutcome.NONE,
    rmp_pb2.VIOLATION_OUTCOME_CONVERTED: WriteOutcome.CONVERTED,
    rmp_pb2.VIOLATION_OUTCOME_REFUSED: WriteOutcome.REFUSED,
    rmp_pb2.VIOLATION_OUTCOME_SIGBUS: WriteOutcome.SIGBUS,
}


class RmpMemory:
    """Host user-mode reads and writes. A write the kernel answers with SIGBUS kills this
    process there and then, as the fault handler would."""

    def __init__(self, rmp: Peer) -> None:
        self.rmp = rmp

    def _stub(self) -> rmp_pb2_grpc.RmpServiceStub:
        stub: rmp_pb2_grpc.RmpServiceStub = self.rmp.ensure()
        return stub

    async def read(self, spa: int, length: int) -> bytes:
        r = await self.rmp.invoke(
            self._stub().HostRead, rmp_pb2.HostReadRequest(spa=spa, length=length)
        )
        return bytes(r.data)

    async def write(self, spa: int, data: bytes) -> WriteOutcome:
        r = await self.rmp.invoke(
            self._stub().HostWrite,
            rmp_pb2.HostWriteRequest(
                spa=spa, data=data, origin=rmp_pb2.ACCESS_ORIGIN_USER, writer="netd"
            ),
        )
        if r.outcome == rmp_pb2.VIOLATION_OUTCOME_SIGBUS:
            die_of_sigbus(list(r.rmp_dump))
        return OUTCOMES.get(r.outcome, WriteOutcome.REFUSED)
