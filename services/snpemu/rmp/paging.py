"""The nested page tables, one per ASID: how a guest's GPA reaches a host frame.

kvm keeps them in step with its memslots (UpdateNestedPageTable); guest instructions and guest
accesses translate through them, and a GPA no table maps is a #NPF.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from snpemu.errors import InvalidArgument
from snpemu.rmp.entry import MAX_ASID
from snpemu.rmp.npt import NestedPageTable
from snpemu.rmp.reasons import RmpReason


class NestedPaging:
    def __init__(self, npages: int) -> None:
        self.npages = npages
        self.npts: dict[int, NestedPageTable] = {}

    def npt(self, asid: int) -> NestedPageTable:
        return self.npts.setdefault(asid, NestedPageTable())

    def update(
        self, asid: int, unmap: list[tuple[int, int]], map: list[tuple[int, int, int]]
    ) -> None:
        """Unmap (gpa, npages) ranges, then map (gpa, first_pfn, npages) ranges, in order; all
        of it or, when one range is refused, none (the work is done on a copy)."""
        if not 1 <= asid <= MAX_ASID:
            raise InvalidArgument("asid must be in 1..1023", reason=RmpReason.OUT_OF_RANGE)
        table = self.npts.get(asid, NestedPageTable()).copy()
        for gpa, npages in unmap:
            table.unmap(gpa, npages)
        for gpa, first_pfn, npages in map:
            if first_pfn + npages > self.npages:
                raise InvalidArgument(
                    f"mapping at GPA {gpa:#x} runs beyond host memory",
                    reason=RmpReason.BEYOND_MEMORY,
                )
            table.map(gpa, first_pfn, npages)
        self.npts[asid] = table

    def translate(self, asid: int, gpa: int) -> int | None:
        table = self.npts.get(asid)
        return None if table is None else table.translate(gpa)

    def translate_many(self, asid: int, gpas: NDArray[np.uint64]) -> NDArray[np.int64]:
        """Vectorised translate(); -1 where unmapped."""
        table = self.npts.get(asid)
        if table is None:
            return np.full(len(gpas), -1, dtype=np.int64)
        return table.translate_many(gpas)

    def host_pfn(self, asid: int, gpa: int) -> int:
        """The PFN the ASID's table maps gpa to, or InvalidArgument."""
        pfn = self.translate(asid, gpa)
        if pfn is None:
            raise InvalidArgument(
                f"GPA {gpa:#x} is not mapped for ASID {asid}", reason=RmpReason.INVALID_ARGUMENT
            )
        return pfn
