"""kvm's own accesses to guest memory and the RMP, through rmp's host session and RPCs."""

from __future__ import annotations

from snpemu.abi.addr import PAGE_SIZE, PMD_SIZE, Gpa, Spa
from snpemu.abi.rmp import Code
from snpemu.kvm.ports import GPA_NONE, HostCopy, HostRead, HostWrite, RmpPort, RmpState
from snpemu.kvm.vm import Vm

PSMASH_TRIES = 8  # KVM retries PSMASH while another CPU holds the entry (FAIL_INUSE)


def kernel_write(spa: Spa, data: bytes) -> HostWrite:
    """A kernel write into guest memory: an RMP violation if the guest made it private."""
    return HostWrite(spa, data)


def kernel_copy(src: Spa, dst: Spa, peek: int = 0) -> HostCopy:
    """A kernel memcpy of one page (the write through the violation policy), answering the
    first `peek` bytes copied."""
    return HostCopy(src, dst, PAGE_SIZE, peek=peek)


class HostAccess:
    def __init__(self, rmp: RmpPort) -> None:
        self.rmp = rmp

    async def read(self, spa: Spa, length: int = PAGE_SIZE) -> bytes:
        return await self.rmp.session_read(HostRead(spa, length))

    async def write(self, spa: Spa, data: bytes) -> int:
        return (await self.rmp.session_write(kernel_write(spa, data))).outcome

    async def copy(self, src: Spa, dst: Spa, peek: int = 0) -> bytes:
        return (await self.rmp.session_copy(kernel_copy(src, dst, peek))).head

    async def rmpupdate(
        self, spa: Spa, *, private: bool, vm: Vm, gpa: Gpa, size_2m: bool = False
    ) -> Code:
        state = RmpState(
            assigned=private,
            gpa=gpa if private else GPA_NONE,
            asid=vm.asid if private else 0,
            size_2m=size_2m,
        )
        return await self.rmp.rmpupdate(spa, state)

    async def psmash(self, spa: Spa) -> Code:
        """PSMASH of the 2M entry over spa, retried while another CPU holds it.
        KERNEL: arch/x86/kvm/svm/sev.c snp_rmptable_psmash()"""
        code = Code.FAIL_INUSE
        for _ in range(PSMASH_TRIES):
            code = await self.rmp.psmash(Spa(spa & ~(PMD_SIZE - 1)))
            if code != Code.FAIL_INUSE:
                break
        return code
