"""Nested page tables: GPA ranges to host frames per ASID, as KVM programs them.

rmp's guest-mode access path walks these as the CPU's nested walk does. Ranges are kept
sorted; a lookup is a binary search.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from snpemu.abi.addr import PAGE_SHIFT, PAGE_SIZE, gpa_to_gfn
from snpemu.errors import InvalidArgument
from snpemu.rmp.reasons import RmpReason


@dataclass(frozen=True)
class Mapping:
    gfn: int
    pfn: int
    npages: int


class NestedPageTable:
    def __init__(self) -> None:
        self._starts: list[int] = []
        self._maps: list[Mapping] = []

    def map(self, gpa: int, pfn: int, npages: int) -> None:
        if gpa % PAGE_SIZE or npages <= 0 or pfn < 0:
            raise InvalidArgument(
                "mappings are page-aligned and non-empty", reason=RmpReason.INVALID_ARGUMENT
            )
        gfn = gpa_to_gfn(gpa)
        i = bisect.bisect_left(self._starts, gfn)
        prev_overlaps = i > 0 and self._maps[i - 1].gfn + self._maps[i - 1].npages > gfn
        next_overlaps = i < len(self._maps) and self._maps[i].gfn < gfn + npages
        if prev_overlaps or next_overlaps:
            raise InvalidArgument(
                f"GPA range at {gpa:#x} overlaps an existing mapping",
                reason=RmpReason.INVALID_ARGUMENT,
            )
        self._starts.insert(i, gfn)
        self._maps.insert(i, Mapping(gfn, pfn, npages))

    def unmap(self, gpa: int, npages: int) -> None:
        gfn = gpa_to_gfn(gpa)
        i = bisect.bisect_left(self._starts, gfn)
        if i == len(self._maps) or self._maps[i].gfn != gfn or self._maps[i].npages != npages:
            raise InvalidArgument(
                f"no mapping of {npages} pages at GPA {gpa:#x}", reason=RmpReason.INVALID_ARGUMENT
            )
        del self._starts[i]
        del self._maps[i]

    def copy(self) -> NestedPageTable:
        other = NestedPageTable()
        other._starts, other._maps = list(self._starts), list(self._maps)
        return other

    def translate(self, gpa: int) -> int | None:
        """The PFN backing gpa, or None (an NPF for a missing mapping)."""
        gfn = gpa_to_gfn(gpa)
        i = bisect.bisect_right(self._starts, gfn) - 1
        if i < 0:
            return None
        m = self._maps[i]
        if gfn >= m.gfn + m.npages:
            return None
        return m.pfn + (gfn - m.gfn)

    def translate_many(self, gpas: npt.NDArray[np.uint64]) -> npt.NDArray[np.int64]:
        """Vectorised translate(); -1 where unmapped."""
        gfns = (gpas >> np.uint64(PAGE_SHIFT)).astype(np.int64)
        if not self._maps:
            return np.full(len(gfns), -1, dtype=np.int64)
        starts = np.asarray(self._starts, dtype=np.int64)
        pfns = np.asarray([m.pfn for m in self._maps], dtype=np.int64)
        sizes = np.asarray([m.npages for m in self._maps], dtype=np.int64)
        i = np.searchsorted(starts, gfns, side="right") - 1
        ok = i >= 0
        ic = np.where(ok, i, 0)
        ok &= gfns < starts[ic] + sizes[ic]
        return np.where(ok, pfns[ic] + (gfns - starts[ic]), -1)

    def mappings(self) -> list[Mapping]:
        return list(self._maps)
