"""entry.py's decoding over numpy arrays of raw entries, for the table's vectorised paths.

The page state of many entries is one lookup in a table of every combination of the bits that
decide it; the 2M head of a frame is its pfn with the low nine bits cleared.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from snpemu.abi.addr import PAGES_PER_2M
from snpemu.rmp.entry import ASID_MASK, ASSIGNED, Kind, encode, page_state

U64 = np.uint64
ALIGN_MASK = ~(PAGES_PER_2M - 1)


def state_lut() -> npt.NDArray[np.int64]:
    """Page state for every combination of the bits that decide it, so that the vectorised
    state is one table lookup. Key: assigned | immutable << 1 | validated << 2 |
    (asid != 0) << 3 | kind << 4."""
    lut = np.zeros(1 << 7, dtype=np.int64)
    for key in range(1 << 7):
        assigned, immutable, validated = key & 1, key >> 1 & 1, key >> 2 & 1
        asid = 1 if key >> 3 & 1 else 0
        kind = key >> 4
        if kind > max(Kind):
            continue
        lo = encode(
            assigned=bool(assigned), immutable=bool(immutable), asid=asid, validated=bool(validated)
        )
        lut[key] = page_state(lo, kind)
    return lut


_LUT = state_lut()


def distinct(pfns: npt.NDArray[np.int64]) -> bool:
    # PSC batches are usually ascending runs: check that in O(n) before sorting.
    if len(pfns) < 2 or bool(np.all(pfns[1:] > pfns[:-1])):
        return True
    return len(np.unique(pfns)) == len(pfns)


def states(lo: npt.NDArray[np.uint64], kind: npt.NDArray[np.uint8]) -> npt.NDArray[np.int64]:
    """Vectorised entry.page_state()."""
    # ASSIGNED is bit 0, IMMUTABLE bit 2 -> key bit 1, VALIDATED bit 62 -> key bit 2
    key = ((lo & U64(ASSIGNED)) | ((lo >> U64(1)) & U64(2)) | ((lo >> U64(60)) & U64(4))).astype(
        np.int64
    )
    key |= ((lo & U64(ASID_MASK)) != 0).astype(np.int64) << 3
    key |= kind.astype(np.int64) << 4
    result: npt.NDArray[np.int64] = _LUT[key]
    return result
