"""The Page State Change descriptor in the GHCB shared buffer, and KVM's rules for it.

KERNEL: arch/x86/include/asm/sev-common.h struct psc_hdr / psc_entry; arch/x86/kvm/svm/sev.c
snp_begin_psc() (docs/abi.md#psc):
    psc_hdr (8 B): u16 cur_entry; u16 end_entry (inclusive); u32 reserved
    psc_entry (u64): 11:0 cur_page, 51:12 gfn, 55:52 operation, 56 pagesize, 63:57 reserved

KVM reads neither reserved field: the header's is never checked, an entry's bits 63:57 are
never looked at, and both go back to the guest as it wrote them (KVM writes only cur_page and
cur_entry into the buffer). Of the operations only PRIVATE and SHARED change page state; any
other value (PSMASH, UNSMASH, 0, 5..15) is completed without acting (snp_begin_psc()'s
`default:` branch calls __snp_complete_one_psc()).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

MAX_ENTRIES = 253  # VMGEXIT_PSC_MAX_COUNT: 8 + 253 * 8 = 2032, the shared buffer
HDR = struct.Struct("<HHI")
# sw_exit_info_2 results (KERNEL: arch/x86/include/asm/sev-common.h)
PSC_ERROR_INVALID_HDR = (1 << 32) | 1
PSC_ERROR_INVALID_ENTRY = (1 << 32) | 2
PSC_ERROR_GENERIC = 0x100 << 32


class Op(enum.IntEnum):
    PRIVATE = 1
    SHARED = 2
    PSMASH = 3
    UNSMASH = 4


# KERNEL: arch/x86/kvm/svm/sev.c snp_begin_psc(): the operations KVM forwards
# (VMGEXIT_PSC_OP_PRIVATE / VMGEXIT_PSC_OP_SHARED); every other one takes the `default:` branch
STATE_CHANGES = (Op.PRIVATE, Op.SHARED)


@dataclass
class Entry:
    cur_page: int
    gfn: int
    op: int  # any 4-bit value: only PRIVATE and SHARED change anything
    size_2m: bool
    reserved: int = 0  # bits 63:57, kept only to write the entry back as the guest wrote it

    @classmethod
    def decode(cls, raw: int) -> Entry:
        return cls(
            raw & 0xFFF,
            raw >> 12 & ((1 << 40) - 1),
            raw >> 52 & 0xF,
            bool(raw >> 56 & 1),
            raw >> 57,
        )

    def encode(self) -> int:
        return (
            self.cur_page & 0xFFF
            | (self.gfn & ((1 << 40) - 1)) << 12
            | (self.op & 0xF) << 52
            | int(self.size_2m) << 56
            | (self.reserved & 0x7F) << 57
        )

    @property
    def npages(self) -> int:
        return 512 if self.size_2m else 1


@dataclass
class Descriptor:
    cur_entry: int
    end_entry: int
    reserved: int
    entries: list[Entry]

    @classmethod
    def decode(cls, buf: bytes) -> Descriptor:
        cur, end, rsvd = HDR.unpack_from(buf, 0)
        count = min(MAX_ENTRIES, (len(buf) - HDR.size) // 8)
        raws = struct.unpack_from(f"<{count}Q", buf, HDR.size)
        return cls(cur, end, rsvd, [Entry.decode(r) for r in raws])

    def encode_into(self, buf: bytearray) -> None:
        HDR.pack_into(buf, 0, self.cur_entry, self.end_entry, self.reserved)
        for i, e in enumerate(self.entries):
            struct.pack_into("<Q", buf, HDR.size + 8 * i, e.encode())


def check_header(d: Descriptor) -> bool:
    """KERNEL: arch/x86/kvm/svm/sev.c snp_begin_psc(): an end_entry past the entries the
    scratch area holds is VMGEXIT_PSC_ERROR_INVALID_HDR (`idx_end >= max_nr_entries`, where
    max_nr_entries = (ghcb_sa_len - sizeof(struct psc_hdr)) / sizeof(struct psc_entry): 253,
    VMGEXIT_PSC_MAX_COUNT, for a descriptor at the start of the shared buffer; older kernels
    compare with VMGEXIT_PSC_MAX_COUNT only). Nothing else in the header is checked (cur_entry
    beyond end_entry is not an error but nothing to do, and the reserved word is never read).
    `d` was decoded from the scratch area, so it holds exactly max_nr_entries entries."""
    return d.end_entry < len(d.entries)


def check_entry(e: Entry) -> bool:
    """KERNEL: arch/x86/kvm/svm/sev.c snp_begin_psc(): `entry_start.cur_page > npages ||
    !IS_ALIGNED(gfn, npages)` (npages 512 for a 2M entry, else 1) is
    VMGEXIT_PSC_ERROR_INVALID_ENTRY, whatever the operation; the operation and reserved bits
    are not part of the check."""
    return e.cur_page <= e.npages and e.gfn % e.npages == 0
