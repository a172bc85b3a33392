"""System physical memory: sparse 4 KiB frames, and the host's frame allocator.

A frame's bytes exist only once written; reading an untouched frame gives zeros, so 64 GiB
of configured memory costs nothing until used. The allocator hands out frames the way the
host kernel does for KVM and the firmware driver, and never hands out a leaked frame again.
"""

from __future__ import annotations

import numpy as np

from snpemu.abi.addr import PAGE_SIZE, PAGES_PER_2M
from snpemu.abi.rmp import Placement
from snpemu.errors import InvalidArgument, WrongState
from snpemu.rmp.reasons import RmpReason

_ZERO = bytes(PAGE_SIZE)


class FrameStore:
    def __init__(self, npages: int) -> None:
        self.npages = npages
        self._frames: dict[int, bytearray] = {}

    @property
    def resident_frames(self) -> int:
        return len(self._frames)

    def read(self, pfn: int) -> bytes:
        frame = self._frames.get(pfn)
        return bytes(frame) if frame is not None else _ZERO

    def write(self, pfn: int, offset: int, data: bytes) -> None:
        frame = self._frames.get(pfn)
        if frame is None:
            frame = self._frames[pfn] = bytearray(PAGE_SIZE)
        frame[offset : offset + len(data)] = data

    def replace(self, pfn: int, page: bytes) -> None:
        # INVARIANT: page is exactly one frame.
        if page == _ZERO:
            self._frames.pop(pfn, None)
        else:
            self._frames[pfn] = bytearray(page)


class FrameAllocator:
    """First-fit allocator over a free bitmap (one byte per frame)."""

    MAX_COUNT = 1 << 20

    def __init__(self, npages: int) -> None:
        self.npages = npages
        self.free = np.ones(npages, dtype=bool)
        self.leaked = np.zeros(npages, dtype=bool)
        self._cursor = 0

    @property
    def free_count(self) -> int:
        return int(self.free.sum())

    def allocate(self, count: int, placement: Placement) -> list[int]:
        if not 1 <= count <= self.MAX_COUNT:
            raise InvalidArgument(
                f"count must be in 1..{self.MAX_COUNT}, got {count}", reason=RmpReason.OUT_OF_RANGE
            )
        if placement == Placement.ALIGNED_2M:
            if count % PAGES_PER_2M:
                raise InvalidArgument(
                    f"2 MiB-aligned allocations come in 512-page units, got {count}",
                    reason=RmpReason.OUT_OF_RANGE,
                )
            regions = self.free.reshape(-1, PAGES_PER_2M).all(axis=1)
            starts = np.flatnonzero(regions)[: count // PAGES_PER_2M] * PAGES_PER_2M
            if len(starts) * PAGES_PER_2M < count:
                raise WrongState(
                    f"no {count // PAGES_PER_2M} free 2 MiB regions left",
                    reason=RmpReason.OUT_OF_MEMORY,
                )
            pfns = (starts[:, None] + np.arange(PAGES_PER_2M)).ravel()
        else:
            candidates = self.free.copy() if placement == Placement.SNP_SAFE else self.free
            if placement == Placement.SNP_SAFE:
                candidates[::PAGES_PER_2M] = False
            # Start at the cursor so repeated small allocations stay cheap.
            order = np.concatenate(
                [
                    np.flatnonzero(candidates[self._cursor :]) + self._cursor,
                    np.flatnonzero(candidates[: self._cursor]),
                ]
            )
            if len(order) < count:
                raise WrongState(
                    f"only {len(order)} free pages left, {count} asked",
                    reason=RmpReason.OUT_OF_MEMORY,
                )
            pfns = order[:count]
            self._cursor = int(pfns[-1]) + 1 if int(pfns[-1]) + 1 < self.npages else 0
        self.free[pfns] = False
        return [int(p) for p in pfns]

    def release(self, pfns: list[int]) -> None:
        arr = np.asarray(pfns, dtype=np.int64)
        if np.any((arr < 0) | (arr >= self.npages)):
            raise InvalidArgument("PFN out of range", reason=RmpReason.BEYOND_MEMORY)
        if np.any(self.free[arr]):
            raise WrongState("page is not allocated", reason=RmpReason.NOT_ALLOCATED)
        if np.any(self.leaked[arr]):
            raise WrongState("page is leaked and is never reused", reason=RmpReason.PAGE_LEAKED)
        self.free[arr] = True

    def leak(self, pfns: list[int]) -> int:
        """Mark pages leaked: out of the free pool for good. Returns how many were new."""
        arr = np.asarray(pfns, dtype=np.int64)
        new = int(np.count_nonzero(~self.leaked[arr]))
        self.leaked[arr] = True
        self.free[arr] = False
        return new
