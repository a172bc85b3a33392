"""netd's VMM table on the kvm service: where each VM's guest memory lives (the `Vmm` port of
netd/daemon.py)."""

from __future__ import annotations

from snp.common.v1 import handles_pb2
from snp.kvm.v1 import kvm_pb2, kvm_pb2_grpc

from snpemu.errors import NotFound
from snpemu.netd.daemon import NetdReason
from snpemu.runtime.peers import Peer, PeerError


class KvmVmm:
    def __init__(self, kvm: Peer) -> None:
        self.kvm = kvm

    async def memory_map(self, vm_id: str) -> list[tuple[int, int, int]]:
        stub: kvm_pb2_grpc.KvmServiceStub = self.kvm.ensure()
        try:
            r = await self.kvm.invoke(
                stub.GetMemoryMap, kvm_pb2.GetMemoryMapRequest(vm=handles_pb2.VmHandle(id=vm_id))
            )
        except PeerError as e:
            raise NotFound(
                f"kvm has no VM {vm_id!r}: {e.message}", reason=NetdReason.UNKNOWN_VM
            ) from None
        return [(m.gpa, m.spa, m.size) for m in r.regions]
