"""The RMP entry codec (rmp/entry.py) against the bit positions of the kernel's decoder and the
page states of the SNP ABI, written here as literals.

KERNEL: arch/x86/virt/svm/sev.c struct rmpentry_raw (lo u64): assigned:1 (bit 0), pagesize:1
(bit 1), immutable:1 (bit 2), rsvd1:9, gpa:39 (bits 50:12), asid:10 (bits 60:51), vmsa:1 (61),
validated:1 (62), rsvd2:1. The hi u64 is not decoded by Linux (snpemu's VMPL1..3 masks there are
UNVERIFIED(rmp-hi-permissions), one nibble at bits 3:0, 11:8, 19:16).
SPEC: SEV-SNP Firmware ABI (AMD 56860) "Page States": hypervisor (not assigned), hypervisor-fixed
(not assigned, immutable), firmware/reclaim/context/metadata (assigned to ASID 0), pre-guest
(assigned to a guest, immutable), guest-invalid / guest-valid (assigned, by the Validated bit).
"""

from __future__ import annotations

import struct

import pytest
from snpemu.abi.rmp import PageState
from snpemu.rmp.entry import Entry, Kind, encode, page_state


def test_encode_puts_each_field_at_the_kernels_bit() -> None:
    assert encode(assigned=True) == 1 << 0
    assert encode(assigned=False, page_size_2m=True) == 1 << 1
    assert encode(assigned=False, immutable=True) == 1 << 2
    assert encode(assigned=False, gpa=0x7_FFFF_FFFF_F000) == 0x7_FFFF_FFFF_F000  # bits 50:12
    assert encode(assigned=False, gpa=0xFFF | 1 << 51) == 0  # outside 50:12: dropped
    assert encode(assigned=False, asid=0x3FF) == 0x3FF << 51  # bits 60:51
    assert encode(assigned=False, asid=0x400) == 0  # an 11th bit does not reach bit 61
    assert encode(assigned=False, vmsa=True) == 1 << 61
    assert encode(assigned=False, validated=True) == 1 << 62
    every = encode(
        assigned=True,
        page_size_2m=True,
        immutable=True,
        gpa=0x1234_5000,
        asid=0x155,
        vmsa=True,
        validated=True,
    )
    assert every == 1 | 2 | 4 | 0x1234_5000 | 0x155 << 51 | 1 << 61 | 1 << 62


def test_decode_reads_each_field_at_the_kernels_bit() -> None:
    lo = 1 | 1 << 1 | 0 << 2 | 0x4_0000_3000 | 0x2AA << 51 | 0 << 61 | 1 << 62 | 1 << 63
    hi = 0xA | 0x5 << 8 | 0xF << 16 | 0xF0 | 0xF0 << 8 | 0xFF << 24
    e = Entry.decode(0x77, lo, hi, Kind.NONE, leaked=True)
    assert (e.pfn, e.assigned, e.page_size_2m, e.immutable) == (0x77, True, True, False)
    assert (e.gpa, e.asid, e.vmsa, e.validated) == (0x4_0000_3000, 0x2AA, False, True)
    assert e.vmpl_perms == (0xA, 0x5, 0xF)
    assert e.raw == struct.pack("<QQ", lo, hi) and e.leaked is True
    assert e.state == PageState.GUEST_VALID
    f = Entry.decode(1, 1 << 2 | 1 << 61 | 0xFF8, 0, Kind.NONE)  # rsvd1 (bits 11:3) set
    assert (f.assigned, f.page_size_2m, f.immutable, f.vmsa, f.validated) == (
        False,
        False,
        True,
        True,
        False,
    )
    assert (f.gpa, f.asid, f.leaked, f.vmpl_perms) == (0, 0, False, (0, 0, 0))


A, IMM, VAL = 1 << 0, 1 << 2, 1 << 62


@pytest.mark.parametrize(
    ("lo", "kind", "state"),
    [
        (0, Kind.NONE, PageState.HYPERVISOR),
        (VAL | 5 << 51, Kind.NONE, PageState.HYPERVISOR),  # not assigned: nothing else counts
        (IMM, Kind.NONE, PageState.HYPERVISOR_FIXED),
        (IMM, Kind.CONTEXT, PageState.HYPERVISOR_FIXED),
        (A | IMM, Kind.NONE, PageState.FIRMWARE),
        (A | IMM, Kind.FIRMWARE, PageState.FIRMWARE),
        (A | IMM, Kind.CONTEXT, PageState.CONTEXT),
        (A | IMM, Kind.METADATA, PageState.METADATA),
        (A | IMM, Kind.RECLAIM, PageState.RECLAIM),
        (A, Kind.NONE, PageState.RECLAIM),  # ASID 0, not immutable
        (A, Kind.CONTEXT, PageState.CONTEXT),
        (A | IMM | 1 << 51, Kind.NONE, PageState.PRE_GUEST),
        (A | IMM | VAL | 0x3FF << 51, Kind.NONE, PageState.PRE_GUEST),
        (A | 1 << 51, Kind.NONE, PageState.GUEST_INVALID),
        (A | 1 << 51, Kind.CONTEXT, PageState.GUEST_INVALID),  # a guest's page: kind unused
        (A | VAL | 0x200 << 51, Kind.NONE, PageState.GUEST_VALID),
    ],
)
def test_page_states(lo: int, kind: Kind, state: PageState) -> None:
    assert page_state(lo, kind) == state
    assert Entry.decode(0, lo, 0, kind).state == state
