"""The kernel's log lines about one RMP entry."""

from __future__ import annotations

import numpy as np

from snpemu.abi.addr import PAGES_PER_2M
from snpemu.rmp.entry import ASSIGNED
from snpemu.rmp.entry_arrays import ALIGN_MASK
from snpemu.rmp.table import RmpTable


def dump_entry(table: RmpTable, pfn: int) -> list[str]:
    """The lines the kernel logs about pfn's RMP entry (an RMP fault, a failed RMPUPDATE, a leak).

    KERNEL: arch/x86/virt/svm/sev.c dump_rmpentry(), reached through snp_dump_hva_rmpentry(),
    rmpupdate() and __snp_leak_pages(). The raw 16-byte entry prints as two u64, lo then hi.
    An assigned entry prints one line; an unassigned one prints a header line and then every
    non-zero raw entry of the 2M region it lies in. Each line is the pr_info() text without
    the "SEV-SNP: " pr_fmt prefix the kernel log adds in front of it.
    """
    lo, hi = int(table.lo[pfn]), int(table.hi[pfn])
    # The kernel tests e.assigned of get_rmpentry(pfn): the PFN's own entry, not the 2M one
    # (the 4K entries inside an assigned 2M page read ASSIGNED themselves, see rmp/table.py).
    if lo & ASSIGNED:
        return [f"PFN 0x{pfn:x}, RMP entry: [0x{lo:016x} - 0x{hi:016x}]"]
    # pfn_i = ALIGN_DOWN(pfn, PTRS_PER_PMD); pfn_end = pfn_i + PTRS_PER_PMD
    a = pfn & ALIGN_MASK
    end = a + PAGES_PER_2M
    lines = [
        f"PFN 0x{pfn:x} unassigned, dumping non-zero entries in 2M PFN region: "
        f"[0x{a:x} - 0x{end:x}]"
    ]
    nonzero = np.flatnonzero((table.lo[a:end] != 0) | (table.hi[a:end] != 0))
    for i in nonzero:
        e_lo, e_hi = int(table.lo[a + i]), int(table.hi[a + i])
        lines.append(f"PFN: 0x{a + i:x}, [0x{e_lo:016x} - 0x{e_hi:016x}]")
    return lines
