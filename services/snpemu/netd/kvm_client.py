"""netd's VMM table on the kvm service: where each VM's guest memory lives (the `Vmm` port of
netd/daemon.py)."""

from __future__ import annotations

import grpc
from snp.common.v1 import handles_pb2
from snp.kvm.v1 import kvm_pb2, kvm_pb2_grpc

from snpemu.errors import InvalidArgument, NotFound, PermissionDenied, SnpemuError, WrongState
from snpemu.netd.daemon import VmRef
from snpemu.netd.limits import quote
from snpemu.netd.reasons import NetdReason
from snpemu.runtime.peers import Peer, PeerError


def _caller_error(vm: VmRef, e: PeerError) -> SnpemuError:
    """kvm's refusal as netd's caller caused it: the same code, kvm's reason and metadata (a
    wrong VM token is PERMISSION_DENIED from kvm, and stays so)."""
    message = f"kvm refused VM {quote(vm.id)}: {e.message[:200]}"
    meta = {**e.metadata, "peer": "kvm"}
    if e.code == grpc.StatusCode.NOT_FOUND:
        return NotFound(message, reason=NetdReason.UNKNOWN_VM, metadata=meta)
    by_code: dict[grpc.StatusCode, type[SnpemuError]] = {
        grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
        grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
        grpc.StatusCode.FAILED_PRECONDITION: WrongState,
    }
    cls = by_code.get(e.code)
    if cls is None:  # not the caller's doing: kvm's failure, reported as such
        return e
    return cls(message, reason=e.reason, metadata=meta)


class KvmVmm:
    def __init__(self, kvm: Peer) -> None:
        self.kvm = kvm

    async def memory_map(
        self, vm: VmRef, populate: list[tuple[int, int]]
    ) -> list[tuple[int, int, int]]:
        stub: kvm_pb2_grpc.KvmServiceStub = self.kvm.ensure()
        # the caller's handle, unchanged: kvm checks the token against the VM
        handle = handles_pb2.VmHandle(id=vm.id, token=vm.token)
        ranges = [kvm_pb2.GpaRange(gpa=gpa, size=size) for gpa, size in populate]
        request = kvm_pb2.GetMemoryMapRequest(vm=handle, populate=ranges)
        try:
            r = await self.kvm.invoke(stub.GetMemoryMap, request)
        except PeerError as e:
            raise _caller_error(vm, e) from None
        return [(m.gpa, m.spa, m.size) for m in r.regions]
