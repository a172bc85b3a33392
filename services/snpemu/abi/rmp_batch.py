"""The packed entry of rmp's batched RMPUPDATE (rmp.proto RmpUpdateBatchRequest.entries):
{u64 spa; struct rmp_state}, struct rmp_state as the kernel passes it to RMPUPDATE
(KERNEL: arch/x86/include/asm/sev.h struct rmp_state: u64 gpa; u8 assigned; u8 pagesize;
u8 immutable; u8 rsvd; u32 asid). kvm packs these; rmp unpacks them."""

from __future__ import annotations

from typing import Any

import numpy as np

BATCH_ENTRY = np.dtype(
    [
        ("spa", "<u8"),
        ("gpa", "<u8"),
        ("assigned", "u1"),
        ("pagesize", "u1"),
        ("immutable", "u1"),
        ("rsvd", "u1"),
        ("asid", "<u4"),
    ]
)
assert BATCH_ENTRY.itemsize == 24


def pack(
    spa: Any, gpa: Any = 0, assigned: Any = False, asid: Any = 0, immutable: Any = False
) -> bytes:
    """Batch entries for the SPAs in `spa`; each other field is one value for all entries or
    one per entry (pagesize 4K: 2M pages go through the unary RmpUpdate)."""
    spas = np.asarray(spa, dtype=np.uint64)
    batch = np.zeros(spas.shape, dtype=BATCH_ENTRY)
    batch["spa"] = spas
    batch["gpa"] = gpa
    batch["assigned"] = assigned
    batch["immutable"] = immutable
    batch["asid"] = asid
    return batch.tobytes()
