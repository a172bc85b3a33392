"""kvm's own accesses to guest memory and the RMP, through rmp's host session and RPCs."""

from __future__ import annotations

from snp.common.v1 import types_pb2
from snp.rmp.v1 import rmp_pb2

from snpemu.abi.addr import PAGE_SIZE
from snpemu.kvm.machine import Kvm
from snpemu.kvm.vm import Vm


def kernel_write(spa: int, data: bytes) -> rmp_pb2.HostWriteRequest:
    """A kernel write into guest memory: an RMP violation if the guest made it private."""
    return rmp_pb2.HostWriteRequest(
        spa=spa, data=data, origin=rmp_pb2.ACCESS_ORIGIN_KERNEL, writer="kvm"
    )


def kernel_copy(src: int, dst: int, peek: int = 0) -> rmp_pb2.HostCopyRequest:
    """A kernel memcpy of one page (the write through the violation policy), answering the
    first `peek` bytes copied."""
    return rmp_pb2.HostCopyRequest(
        src_spa=src,
        dst_spa=dst,
        length=PAGE_SIZE,
        origin=rmp_pb2.ACCESS_ORIGIN_KERNEL,
        writer="kvm",
        peek=peek,
    )


class HostAccess:
    def __init__(self, kvm: Kvm) -> None:
        self.kvm = kvm

    async def read(self, spa: int, length: int = PAGE_SIZE) -> bytes:
        r = await self.kvm.host.call("read", rmp_pb2.HostReadRequest(spa=spa, length=length))
        return bytes(r.data)

    async def write(self, spa: int, data: bytes) -> int:
        return int((await self.kvm.host.call("write", kernel_write(spa, data))).outcome)

    async def copy(self, src: int, dst: int, peek: int = 0) -> bytes:
        return bytes((await self.kvm.host.call("copy", kernel_copy(src, dst, peek))).head)

    async def rmpupdate(
        self, spa: int, *, private: bool, vm: Vm, gpa: int, size_2m: bool = False
    ) -> int:
        r = await self.kvm.rmp.call(
            "RmpUpdate",
            rmp_pb2.RmpUpdateRequest(
                spa=spa,
                state=rmp_pb2.RmpState(
                    gpa=gpa if private else 0,
                    assigned=private,
                    asid=vm.asid if private else 0,
                    page_size=types_pb2.PAGE_SIZE_2M if size_2m else types_pb2.PAGE_SIZE_4K,
                ),
            ),
        )
        return int(r.eax)
