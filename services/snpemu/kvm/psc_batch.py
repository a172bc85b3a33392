"""A GHCB Page State Change of 4K entries only, planned with array operations.

This is the common request: the guest kernel's set_memory_encrypted()/decrypted() fills the
shared buffer with up to 253 4K entries, each at cur_page 0 (KERNEL: arch/x86/coco/sev/core.c
__set_pages_state()). Entries with an operation other than PRIVATE/SHARED are completed
without an RMPUPDATE, and reserved bits 63:57 are ignored and written back as they were, as
KVM does (KERNEL: arch/x86/kvm/svm/sev.c snp_begin_psc() `default:`). Anything else (2M
entries, entries already partly done, GPAs outside the memslots, a header with nothing to do
or a bad one) is left to the entry-by-entry loop in page_state.py, which gives the same answer
(a unit test holds the two together).
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
    if end >= count or cur > end:  # INVALID_HDR (psc.check_header()), or nothing to do
        return None
    last = end
    raw = np.frombuffer(descriptor, dtype="<u8", count=count, offset=psc.HDR.size)[cur : last + 1]
    # INVARIANT: bits 63:57 (reserved) are masked off everywhere they could be looked at
    if (
        (raw >> np.uint64(56) & np.uint64(1)).any()  # a 2M entry
        or (raw & np.uint64(0xFFF)).any()  # an entry already (partly) done
    ):
        return None
    op = (raw >> np.uint64(52)) & np.uint64(0xF)
    changes = np.isin(op, psc.STATE_CHANGES)  # the others: done, no RMPUPDATE
    gpa = ((raw[changes] >> np.uint64(12)) & np.uint64(GFN_MASK)).astype(np.int64) << 12
    spa = translate(gpa)
    if (spa < 0).any():
        return None
    private = op[changes] == psc.Op.PRIVATE
    entries = rmp_batch.pack(
        spa, gpa=np.where(private, gpa, 0), assigned=private, asid=np.where(private, asid, 0)
    )
    out = bytearray(descriptor)
    psc.HDR.pack_into(out, 0, last + 1, end, reserved)
    done = np.frombuffer(out, dtype="<u8", count=count, offset=psc.HDR.size)
    done[cur : last + 1] = raw | np.uint64(1)  # cur_page = npages = 1
    n_private = int(private.sum())
    return Plan(entries, n_private, len(gpa) - n_private, bytes(out))
