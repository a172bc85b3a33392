"""The RMP entry dump, line for line as the kernel prints it.

KERNEL: arch/x86/virt/svm/sev.c dump_rmpentry():
    assigned:   pr_info("PFN 0x%llx, RMP entry: [0x%016llx - 0x%016llx]\\n", pfn, lo, hi)
    unassigned: pr_info("PFN 0x%llx unassigned, dumping non-zero entries in 2M PFN region: "
                        "[0x%llx - 0x%llx]\\n", pfn, pfn_i, pfn_end)
                then per non-zero entry of the 2M region:
                pr_info("PFN: 0x%llx, [0x%016llx - 0x%016llx]\\n", pfn_i, lo, hi)

The expected lo words are built here from struct rmpentry_raw's bit fields (same file), not
from the module under test: assigned:1, pagesize:1, immutable:1, rsvd1:9, gpa:39, asid:10,
vmsa:1, validated:1, rsvd2:1.
"""

from __future__ import annotations

from snpemu.abi.addr import PAGES_PER_2M
from snpemu.abi.rmp import Code, FwOp
from snpemu.rmp.dump import dump_entry
from snpemu.rmp.table import RmpTable

ASID = 0x155


def raw_lo(
    *,
    assigned: int = 0,
    pagesize: int = 0,
    immutable: int = 0,
    gpa: int = 0,
    asid: int = 0,
    vmsa: int = 0,
    validated: int = 0,
) -> int:
    """struct rmpentry_raw's lo word. KERNEL: arch/x86/virt/svm/sev.c struct rmpentry_raw"""
    return (
        assigned << 0
        | pagesize << 1
        | immutable << 2
        | (gpa >> 12) << 12  # gpa:39 after assigned:1, pagesize:1, immutable:1, rsvd1:9
        | asid << 51  # asid:10 after gpa:39
        | vmsa << 61
        | validated << 62
    )


def table() -> RmpTable:
    return RmpTable(4 * PAGES_PER_2M)


def test_assigned_entry_prints_lo_then_hi() -> None:
    t = table()
    pfn = 0x203
    assert (
        t.rmpupdate(pfn, gpa=0x7000, assigned=True, size_2m=False, immutable=False, asid=ASID) == 0
    )
    code = t.pvalidate(pfn, gpa=0x7000, asid=ASID, vmpl=0, size_2m=False, validate=True)
    assert code == Code.SUCCESS
    # VMPL1 read+write: a non-zero hi word, so the order of the two words shows.
    code = t.rmpadjust(
        pfn, gpa=0x7000, asid=ASID, vmpl=0, size_2m=False, target_vmpl=1, perms=3, vmsa=False
    )
    assert code == Code.SUCCESS
    lo = raw_lo(assigned=1, gpa=0x7000, asid=ASID, validated=1)
    hi = int(t.hi[pfn])
    assert hi != 0
    assert dump_entry(t, pfn) == [f"PFN 0x203, RMP entry: [0x{lo:016x} - 0x{hi:016x}]"]
    assert lo == 0x4AA8000000007001  # the same word written out by hand


def test_a_4k_entry_inside_an_assigned_2m_page_prints_its_own_raw_entry() -> None:
    # dump_rmpentry() tests e.assigned of get_rmpentry(pfn) and prints get_raw_rmpentry(pfn):
    # the PFN's own 16 bytes, not the 2M-aligned entry's.
    t = table()
    assert (
        t.rmpupdate(0x200, gpa=0x200000, assigned=True, size_2m=True, immutable=False, asid=ASID)
        == 0
    )
    assert dump_entry(t, 0x205) == [
        "PFN 0x205, RMP entry: [0x0000000000000001 - 0x0000000000000000]"
    ]
    lo = raw_lo(assigned=1, pagesize=1, gpa=0x200000, asid=ASID)
    assert dump_entry(t, 0x200) == [f"PFN 0x200, RMP entry: [0x{lo:016x} - 0x0000000000000000]"]


def test_unassigned_entry_lists_the_non_zero_entries_of_its_2m_region() -> None:
    t = table()
    assert (
        t.rmpupdate(0x401, gpa=0x1000, assigned=True, size_2m=False, immutable=False, asid=ASID)
        == 0
    )
    # HV-fixed: unassigned but immutable, a non-zero raw entry (SNP_INIT_EX's HV_FIXED pages)
    assert t.fw_transition(0x5FF, FwOp.HV_FIXED)
    # an entry in the next 2M region is not listed
    assert (
        t.rmpupdate(0x600, gpa=0x2000, assigned=True, size_2m=False, immutable=False, asid=ASID)
        == 0
    )
    assigned = raw_lo(assigned=1, gpa=0x1000, asid=ASID)
    fixed = raw_lo(immutable=1)
    assert dump_entry(t, 0x4A0) == [
        "PFN 0x4a0 unassigned, dumping non-zero entries in 2M PFN region: [0x400 - 0x600]",
        f"PFN: 0x401, [0x{assigned:016x} - 0x0000000000000000]",
        f"PFN: 0x5ff, [0x{fixed:016x} - 0x0000000000000000]",
    ]


def test_unassigned_entry_in_an_empty_region_prints_the_header_only() -> None:
    t = table()
    assert dump_entry(t, 0x17) == [
        "PFN 0x17 unassigned, dumping non-zero entries in 2M PFN region: [0x0 - 0x200]"
    ]
