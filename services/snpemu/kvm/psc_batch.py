"""A GHCB Page State Change of 4K entries only, planned with array operations.

This is the common request: the guest kernel's set_memory_encrypted()/decrypted() fills the
shared buffer with up to 253 4K entries, each at cur_page 0 (KERNEL: arch/x86/coco/sev/core.c
__set_pages_state()). Anything else (2M entries, PSMASH/UNSMASH, entries already partly done,
invalid entries, GPAs outside the memslots, a bad header) is left to the entry-by-entry loop in
exits.py, which gives the same answer (a unit test holds the two together).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from snpemu.abi import psc, rmp_batch

GFN_MASK = (1 << 40) - 1


@dataclass(frozen=True)
class Plan:
    entries: bytes  # the RMPUPDATE batch, one entry per page, in descriptor order
    private: int  # pages to make private
    shared: int  # pages to make shared
    descriptor: bytes  # the descriptor as KVM writes it back when every update succeeds


def plan_4k(
    descriptor: bytes, translate: Callable[[np.ndarray], np.ndarray], asid: int
) -> Plan | None:
    """The RMPUPDATEs of a 4K-only PSC and the descriptor after them; None when the request is
    not of that kind. `translate` maps GPAs to SPAs (-1 outside the memslots)."""
    cur, end, reserved = psc.HDR.unpack_from(descriptor, 0)
    count = min(psc.MAX_ENTRIES, (len(descriptor) - psc.HDR.size) // 8)
    last = min(end, count - 1)
    if end >= psc.MAX_ENTRIES or cur > last:
        return None
    raw = np.frombuffer(descriptor, dtype="<u8", count=count, offset=psc.HDR.size)[cur : last + 1]
    op = (raw >> np.uint64(52)) & np.uint64(0xF)
    if (
        (raw >> np.uint64(56)).any()  # a 2M entry or reserved bits
        or (raw & np.uint64(0xFFF)).any()  # an entry already (partly) done
        or ((op != psc.Op.PRIVATE) & (op != psc.Op.SHARED)).any()
    ):
        return None
    gpa = ((raw >> np.uint64(12)) & np.uint64(GFN_MASK)).astype(np.int64) << 12
    spa = translate(gpa)
    if (spa < 0).any():
        return None
    private = op == psc.Op.PRIVATE
    entries = rmp_batch.pack(
        spa, gpa=np.where(private, gpa, 0), assigned=private, asid=np.where(private, asid, 0)
    )
    out = bytearray(descriptor)
    psc.HDR.pack_into(out, 0, last + 1, end, reserved)
    done = np.frombuffer(out, dtype="<u8", count=count, offset=psc.HDR.size)
    done[cur : last + 1] = raw | np.uint64(1)  # cur_page = npages = 1
    n_private = int(private.sum())
    return Plan(entries, n_private, len(raw) - n_private, bytes(out))
