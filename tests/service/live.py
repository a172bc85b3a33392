"""One host stack and one launched guest kept alive for a whole test module (hypothesis examples
and plain tests share it), and what the tests read of it through the gRPC APIs: the RMP, the
guest's memory map, its VM."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

from snp.common.v1 import types_pb2
from snp.kvm.v1 import kvm_pb2
from snp.rmp.v1 import rmp_pb2

from tests.service.host_stack import HOST, Guest, Stack, host_stack

T = TypeVar("T")
# (assigned, asid, gpa, validated, vmsa, immutable) of a page
PageView = tuple[bool, int, int, bool, bool, bool]
Snapshot = list[tuple[int, bytes, tuple[bool, int, int, bool, bool, bool, bool]]]
PAGE = 4096
LIST_MAX = 4096  # ListRmpEntriesRequest.count at most


class Live:
    """A stack with a 128 MiB host and one guest of `memory` bytes and `vcpus` vCPUs; vCPU i
    registers its GHCB at ghcbs[i] (`guests[i]` is the guest as seen from vCPU i)."""

    def __init__(
        self,
        tmp: Path,
        *,
        vcpus: int = 1,
        ghcbs: tuple[int, ...] = (0x100000,),
        memory: int = 32 << 20,
    ) -> None:
        self.runner = asyncio.Runner()
        self.cm = host_stack(tmp, memory="128M")
        self.stack: Stack = self.run(self.cm.__aenter__())
        self.guest: Guest = self.run(self.stack.launch(memory=memory, vcpus=vcpus))
        self.guests = [self.guest] + [
            dataclasses.replace(self.guest, vcpus=[v]) for v in self.guest.vcpus[1:]
        ]
        for guest, gpa in zip(self.guests, ghcbs, strict=False):
            self.run(guest.register_ghcb(gpa))
        vm = self.run(self.stack.kvm.GetVm(kvm_pb2.GetVmRequest(vm=self.guest.vm), metadata=HOST))
        self.asid = int(vm.vm.asid)
        # (gpa, size) of each memslot: memory the guest may touch, backed on first touch
        self.slots = [(int(m.guest_phys_addr), int(m.memory_size)) for m in vm.vm.memslots]
        self.host_pfns = (
            int(
                self.run(
                    self.stack.rmp.GetPlatformInfo(rmp_pb2.GetPlatformInfoRequest(), metadata=HOST)
                ).max_pfn
            )
            + 1
        )

    def run(self, aw: Awaitable[T]) -> T:
        """Run a coroutine or a gRPC call on the stack's loop."""

        async def wait() -> T:
            return await aw

        return self.runner.run(wait())

    def mapped(self, gpa: int) -> bool:
        """gpa lies in one of the guest's memslots."""
        return any(lo <= gpa < lo + size for lo, size in self.slots)

    def regions(self) -> list[tuple[int, int, int]]:
        """(gpa, spa, size) of each backed run of the guest's memory, read now: an exit may
        have backed more (kvm backs memory the first time the guest or an exit touches it)."""
        r = self.run(
            self.stack.kvm.GetMemoryMap(
                kvm_pb2.GetMemoryMapRequest(vm=self.guest.vm), metadata=HOST
            )
        )
        return [(int(x.gpa), int(x.spa), int(x.size)) for x in r.regions]

    @staticmethod
    def guest_pfns(regions: list[tuple[int, int, int]]) -> set[int]:
        return {(spa >> 12) + i for _, spa, size in regions for i in range(size // PAGE)}

    def rmp_snapshot(self) -> Snapshot:
        """Every non-default RMP entry of the host: (pfn, its own 16 bytes, the state rmp
        decodes for it: assigned, asid, gpa, validated, vmsa, immutable, 2M)."""

        async def snap() -> Snapshot:
            out: Snapshot = []
            for first in range(0, self.host_pfns, LIST_MAX):
                r = await self.stack.rmp.ListRmpEntries(
                    rmp_pb2.ListRmpEntriesRequest(
                        first_pfn=first, count=LIST_MAX, non_default_only=True
                    ),
                    metadata=HOST,
                )
                out += [
                    (
                        e.pfn,
                        bytes(e.raw),
                        (
                            e.assigned,
                            e.asid,
                            e.gpa,
                            e.validated,
                            e.vmsa,
                            e.immutable,
                            e.page_size == types_pb2.PAGE_SIZE_2M,
                        ),
                    )
                    for e in r.entries
                ]
            return out

        return self.run(snap())

    @staticmethod
    def guest_pages(snapshot: Snapshot, regions: list[tuple[int, int, int]]) -> dict[int, PageView]:
        """Each guest page (by GFN) as the RMP governs it: (assigned, asid, gpa, validated,
        vmsa, immutable). A page with a default entry of its own inside an assigned 2M page
        takes the 2M entry's state, its GPA offset by the page's place in it (SPEC: AMD64 APM
        vol. 2, "Reverse Map Table": a 2M entry covers the 512 pages of its 2M-aligned range);
        any other default entry is a hypervisor page, as is a page not backed yet. Snapshots
        taken before and after an exit are seen through the same `regions()`, read after it
        (the exit may have backed more)."""
        listed = {pfn: st for pfn, _, st in snapshot}
        out: dict[int, PageView] = {}
        for gpa, spa, size in regions:
            for i in range(size // PAGE):
                pfn = (spa >> 12) + i
                st = listed.get(pfn)
                if st is None:
                    big = listed.get(pfn & ~511)
                    if big is not None and big[0] and big[6]:
                        offset = (pfn & 511) << 12
                        st = (True, big[1], big[2] + offset, big[3], big[4], big[5], True)
                    else:
                        st = (False, 0, 0, False, False, False, False)
                out[(gpa >> 12) + i] = st[:6]
        return out

    def close(self) -> None:
        self.run(self.cm.__aexit__(None, None, None))
        self.runner.close()
