"""A gmem VM's RMP side (kvm/gmem_rmp.py) with rmp stood in for: what SetMemoryAttributes on a
running VM sends for the pages already backed, and how a large range is cut into the batches
rmp takes (at most 65536 entries each: rmp.proto RmpUpdateBatchRequest)."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace
from typing import Any

from snpemu.abi import rmp_batch
from snpemu.kvm import gmem_rmp
from snpemu.kvm.throttle import Throttle
from snpemu.kvm.vm import MemoryModel, Vm, VmState

ASID = 7


class Rmp:
    def __init__(self) -> None:
        self.batches: list[bytes] = []

    async def read_entries(self, first: int, count: int, **_: Any) -> list[Any]:
        return []  # every page hypervisor-owned

    async def session_rmpupdate_batch(self, entries: bytes) -> bytes:
        self.batches.append(entries)
        return bytes(len(entries) // rmp_batch.BATCH_ENTRY.itemsize)


async def test_a_large_range_goes_in_batches_rmp_takes() -> None:
    rmp = Rmp()
    kvm: Any = SimpleNamespace(rmp=rmp, counters=SimpleNamespace(psc_pages=Counter()))
    vm = Vm("vm-g", ASID, None, Throttle(), memory_model=MemoryModel.GMEM)  # type: ignore[arg-type]
    vm.state = VmState.RUNNING
    n = 65536 + 100
    vm.memslots.add(0, list(range(0x10000, 0x10000 + n)))
    await gmem_rmp.convert(kvm, vm, 0, n * 4096, private=True)
    sizes = [len(b) // rmp_batch.BATCH_ENTRY.itemsize for b in rmp.batches]
    assert sizes == [65536, 100]
    entries = b"".join(rmp.batches)
    last = entries[-rmp_batch.BATCH_ENTRY.itemsize :]
    e = memoryview(last)
    # struct rmp_state: the last page private to the VM at its GPA (4K, not immutable)
    assert int.from_bytes(e[0:8], "little") == (0x10000 + n - 1) << 12
    assert int.from_bytes(e[8:16], "little") == (n - 1) << 12
    assert e[16] == 1 and int.from_bytes(e[20:24], "little") == ASID
    assert kvm.counters.psc_pages[("private", "4k")] == n
