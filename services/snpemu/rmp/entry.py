"""One RMP entry: its 16-byte hardware encoding, decoded fields, page state and result codes.

Raw layout (Zen3/Zen4 PPR, Fam19h Model01h; "not architectural"), as the kernel decodes it.
KERNEL: arch/x86/virt/svm/sev.c struct rmpentry_raw
    lo bit 0      ASSIGNED
    lo bit 1      PAGESIZE (0 = 4K, 1 = 2M)
    lo bit 2      IMMUTABLE
    lo bits 50:12 GPA bits 50:12, in place (the frame number)
    lo bits 60:51 ASID
    lo bit 61     VMSA
    lo bit 62     VALIDATED
    hi            not decoded by Linux. UNVERIFIED(rmp-hi-permissions): snpemu keeps the
                  VMPL1..3 permission masks in hi bits 3:0, 11:8, 19:16 (one byte each, low
                  nibble R/W/XU/XS).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from snpemu.abi.rmp import PageState

# ASID field is 10 bits. KERNEL: arch/x86/virt/svm/sev.c (asid:10)
MAX_ASID = (1 << 10) - 1

ASSIGNED = 1 << 0
PAGESIZE = 1 << 1
IMMUTABLE = 1 << 2
GPA_SHIFT = 12
GPA_MASK = ((1 << 39) - 1) << GPA_SHIFT  # bits 50:12
ASID_SHIFT = 51
ASID_MASK = MAX_ASID << ASID_SHIFT  # bits 60:51
VMSA = 1 << 61
VALIDATED = 1 << 62

# hi: VMPL1, VMPL2, VMPL3 (UNVERIFIED(rmp-hi-permissions) layout, see the module doc)
PERM_SHIFTS = (0, 8, 16)
PERM_MASK = 0xF  # READ 1, WRITE 2, EXEC_USER 4, EXEC_SUPERVISOR 8 (docs/abi.md#rmp-instructions)
PERM_READ, PERM_WRITE = 1, 2


class Kind(enum.IntEnum):
    """What the firmware keeps apart among its own pages (A=1, ASID=0); not in the raw entry.

    UNVERIFIED(rmp-firmware-kinds): the hardware encodes these states in bits Linux does not
    decode; snpemu keeps them beside the raw entry (one byte per frame).
    """

    NONE = 0
    FIRMWARE = 1
    CONTEXT = 2
    METADATA = 3
    RECLAIM = 4


def page_state(lo: int, kind: int) -> PageState:
    """Page state of a decoded entry (the 2M-aligned entry's, for a page inside a 2M page)."""
    assigned, immutable = bool(lo & ASSIGNED), bool(lo & IMMUTABLE)
    asid = (lo & ASID_MASK) >> ASID_SHIFT
    if not assigned:
        return PageState.HYPERVISOR_FIXED if immutable else PageState.HYPERVISOR
    if asid == 0:
        if kind == Kind.CONTEXT:
            return PageState.CONTEXT
        if kind == Kind.METADATA:
            return PageState.METADATA
        if kind == Kind.RECLAIM or not immutable:
            return PageState.RECLAIM
        return PageState.FIRMWARE
    if immutable:
        return PageState.PRE_GUEST
    return PageState.GUEST_VALID if lo & VALIDATED else PageState.GUEST_INVALID


@dataclass(frozen=True)
class Entry:
    """A decoded RMP entry of one 4K frame."""

    pfn: int
    assigned: bool
    page_size_2m: bool
    immutable: bool
    gpa: int
    asid: int
    vmsa: bool
    validated: bool
    vmpl_perms: tuple[int, int, int]
    state: PageState
    raw: bytes
    leaked: bool = False

    @classmethod
    def decode(cls, pfn: int, lo: int, hi: int, kind: int, leaked: bool = False) -> Entry:
        return cls(
            pfn=pfn,
            assigned=bool(lo & ASSIGNED),
            page_size_2m=bool(lo & PAGESIZE),
            immutable=bool(lo & IMMUTABLE),
            gpa=lo & GPA_MASK,
            asid=(lo & ASID_MASK) >> ASID_SHIFT,
            vmsa=bool(lo & VMSA),
            validated=bool(lo & VALIDATED),
            vmpl_perms=tuple((hi >> s) & PERM_MASK for s in PERM_SHIFTS),  # type: ignore[arg-type]
            state=page_state(lo, kind),
            raw=struct.pack("<QQ", lo, hi),
            leaked=leaked,
        )


def encode(
    *,
    assigned: bool,
    page_size_2m: bool = False,
    immutable: bool = False,
    gpa: int = 0,
    asid: int = 0,
    vmsa: bool = False,
    validated: bool = False,
) -> int:
    """The lo u64 of an entry."""
    return (
        (ASSIGNED if assigned else 0)
        | (PAGESIZE if page_size_2m else 0)
        | (IMMUTABLE if immutable else 0)
        | (gpa & GPA_MASK)
        | ((asid << ASID_SHIFT) & ASID_MASK)
        | (VMSA if vmsa else 0)
        | (VALIDATED if validated else 0)
    )


# struct rmp_state, the RMPUPDATE input pointed to by RCX (16 bytes).
# KERNEL: arch/x86/include/asm/sev.h struct rmp_state {u64 gpa; u8 assigned; u8 pagesize;
# u8 immutable; u8 rsvd; u32 asid;}
RMP_STATE = struct.Struct("<QBBBBI")
assert RMP_STATE.size == 16
