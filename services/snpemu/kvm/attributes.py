"""A VM's memory attributes: which GPA ranges are private (KVM_MEMORY_ATTRIBUTE_PRIVATE).

KVM keeps them in an xarray indexed by GFN (kvm->mem_attr_array); disjoint sorted ranges hold
the same for memory of any size. A range need not be backed by a memslot.
KERNEL: virt/kvm/kvm_main.c kvm_vm_set_mem_attributes(), kvm_range_has_memory_attributes()
"""

from __future__ import annotations

import bisect


class PrivateRanges:
    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def set(self, start: int, end: int, private: bool) -> None:
        """[start, end) private (or shared)."""
        # the ranges that touch or overlap [start, end) merge with it (private) or are cut
        i = bisect.bisect_left(self._ends, start)
        j = bisect.bisect_right(self._starts, end)
        near = list(zip(self._starts[i:j], self._ends[i:j], strict=True))
        keep_lo = [(s, min(e, start)) for s, e in near if s < start]
        keep_hi = [(max(s, end), e) for s, e in near if e > end]
        if private:
            lo = min([start] + [s for s, _ in keep_lo])
            hi = max([end] + [e for _, e in keep_hi])
            new = [(lo, hi)]
        else:
            new = keep_lo + keep_hi
        self._starts[i:j] = [s for s, _ in new]
        self._ends[i:j] = [e for _, e in new]

    def private_prefix(self, start: int, end: int) -> int:
        """How many bytes from start (up to end) are private."""
        i = bisect.bisect_right(self._starts, start) - 1
        if i < 0 or self._ends[i] <= start:
            return 0
        return min(self._ends[i], end) - start

    def is_private(self, gpa: int) -> bool:
        return self.private_prefix(gpa, gpa + 1) == 1

    def ranges(self) -> list[tuple[int, int]]:
        return list(zip(self._starts, self._ends, strict=True))
