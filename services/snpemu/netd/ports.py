"""netd's two peers as the daemon model sees them: host memory (rmp) and the VMM table (kvm)."""

from __future__ import annotations

from snp.common.v1 import handles_pb2
from snp.kvm.v1 import kvm_pb2
from snp.rmp.v1 import rmp_pb2

from snpemu.errors import NotFound
from snpemu.netd.daemon import NetdReason, WriteOutcome
from snpemu.rmp.client import die_of_sigbus
from snpemu.runtime.peers import Peer, PeerError

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

    async def read(self, spa: int, length: int) -> bytes:
        r = await self.rmp.call("HostRead", rmp_pb2.HostReadRequest(spa=spa, length=length))
        return bytes(r.data)

    async def write(self, spa: int, data: bytes) -> WriteOutcome:
        r = await self.rmp.call(
            "HostWrite",
            rmp_pb2.HostWriteRequest(
                spa=spa, data=data, origin=rmp_pb2.ACCESS_ORIGIN_USER, writer="netd"
            ),
        )
        if r.outcome == rmp_pb2.VIOLATION_OUTCOME_SIGBUS:
            die_of_sigbus(list(r.rmp_dump))
        return OUTCOMES.get(r.outcome, WriteOutcome.REFUSED)


class KvmVmm:
    def __init__(self, kvm: Peer) -> None:
        self.kvm = kvm

    async def memory_map(self, vm_id: str) -> list[tuple[int, int, int]]:
        try:
            r = await self.kvm.call(
                "GetMemoryMap", kvm_pb2.GetMemoryMapRequest(vm=handles_pb2.VmHandle(id=vm_id))
            )
        except PeerError as e:
            raise NotFound(
                f"kvm has no VM {vm_id!r}: {e.message}", reason=NetdReason.UNKNOWN_VM
            ) from None
        return [(m.gpa, m.spa, m.size) for m in r.regions]
