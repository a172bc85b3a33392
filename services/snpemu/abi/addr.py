"""Page sizes and the four kinds of address every service passes around, defined once.

A guest physical address (`Gpa`) and its frame number (`Gfn`) live in the guest's space; a
system physical address (`Spa`) and its frame number (`Pfn`) in the host's. They are NewTypes
of int: free at run time, and mypy refuses an `Spa` where a `Gpa` is asked for. The
conversions below are the only place a page shift is written.

KERNEL: include/asm-generic/page.h PAGE_SHIFT (12 on x86), arch/x86/include/asm/pgtable_types.h
PMD_SHIFT (21, the 2M page); include/linux/kvm_types.h gpa_t / gfn_t / hpa_t, include/linux/pfn.h
PFN_PHYS() / PHYS_PFN(), include/linux/kvm_host.h gfn_to_gpa() / gpa_to_gfn().
"""

from __future__ import annotations

from typing import NewType

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = ~(PAGE_SIZE - 1)
# KERNEL: arch/x86/include/asm/pgtable_types.h PMD_SHIFT; a 2M RMP entry covers 512 4K pages.
PMD_SHIFT = 21
PMD_SIZE = 1 << PMD_SHIFT
PAGES_PER_2M = PMD_SIZE // PAGE_SIZE

Gpa = NewType("Gpa", int)
Gfn = NewType("Gfn", int)
Spa = NewType("Spa", int)
Pfn = NewType("Pfn", int)


def gfn_to_gpa(gfn: int) -> Gpa:
    return Gpa(gfn << PAGE_SHIFT)


def gpa_to_gfn(gpa: int) -> Gfn:
    return Gfn(gpa >> PAGE_SHIFT)


def pfn_to_spa(pfn: int) -> Spa:
    """KERNEL: include/linux/pfn.h PFN_PHYS()."""
    return Spa(pfn << PAGE_SHIFT)


def spa_to_pfn(spa: int) -> Pfn:
    """KERNEL: include/linux/pfn.h PHYS_PFN()."""
    return Pfn(spa >> PAGE_SHIFT)


def page_offset(addr: int) -> int:
    """The byte offset of an address in its 4K page (KERNEL: offset_in_page())."""
    return addr & (PAGE_SIZE - 1)


def page_aligned(addr: int) -> bool:
    return not addr & (PAGE_SIZE - 1)


def pages(nbytes: int) -> int:
    """How many 4K pages `nbytes` spans, rounded up (KERNEL: PFN_UP())."""
    return (nbytes + PAGE_SIZE - 1) >> PAGE_SHIFT


def page_bytes(npages: int) -> int:
    """The size in bytes of `npages` 4K pages."""
    return npages << PAGE_SHIFT
