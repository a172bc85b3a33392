"""The #NPF error codes the RMP checks of PVALIDATE and RMPADJUST raise, bit by bit.

KERNEL: arch/x86/include/asm/kvm_host.h PFERR_*_BIT, written out here:
PRESENT 0, WRITE 1, USER 2, GUEST_RMP 31, GUEST_FINAL 32, GUEST_PAGE 33, GUEST_ENC 34,
GUEST_SIZEM 35, GUEST_VMPL 36. An RMP fault is a present, user, final-address RMP violation of
an encrypted (private) access (sev_handle_rmp_fault() reads GUEST_SIZEM to decide on PSMASH).
Entries are written bit by bit as struct rmpentry_raw's lo word (arch/x86/virt/svm/sev.c):
assigned 0, pagesize 1, immutable 2, gpa 50:12, asid 60:51, validated 62.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from snpemu.rmp.fault import Fault, npf
from snpemu.rmp.table import RmpTable

PRESENT, WRITE, USER = 1 << 0, 1 << 1, 1 << 2
GUEST_RMP, GUEST_FINAL, GUEST_PAGE, GUEST_ENC = 1 << 31, 1 << 32, 1 << 33, 1 << 34
GUEST_SIZEM, GUEST_VMPL = 1 << 35, 1 << 36
BASE = PRESENT | USER | GUEST_RMP | GUEST_FINAL

A, PS, IMM, VAL = 1 << 0, 1 << 1, 1 << 2, 1 << 62
ASID = 5


def lo(gpa: int, asid: int = ASID, extra: int = 0) -> int:
    return A | VAL | gpa | asid << 51 | extra


@pytest.mark.parametrize(
    ("write", "enc", "sizem", "vmpl"), list(itertools.product([False, True], repeat=4))
)
def test_every_flag_sets_its_kernel_bit_and_no_other(
    write: bool, enc: bool, sizem: bool, vmpl: bool
) -> None:
    f = npf(0x1234000, "why", write=write, enc=enc, sizem=sizem, vmpl=vmpl)
    want = BASE | WRITE * write | GUEST_ENC * enc | GUEST_SIZEM * sizem | GUEST_VMPL * vmpl
    assert f.error_code == want
    assert f.vc is False and (f.gpa, f.cause) == (0x1234000, "why")


def test_the_defaults_are_an_encrypted_read() -> None:
    assert npf(0, "x").error_code == BASE | GUEST_ENC
    assert not npf(0, "x").error_code & GUEST_PAGE


def table() -> RmpTable:
    t = RmpTable(2048)
    t.lo[10] = np.uint64(lo(0x10000))  # a guest-valid 4K page at GPA 0x10000
    t.lo[11] = np.uint64(lo(0x11000, extra=IMM))  # immutable
    t.lo[512] = np.uint64(lo(0x200000, extra=PS))  # the head of a 2M page
    t.lo[13] = np.uint64(lo(0x13000, asid=ASID + 1))  # another guest's
    return t


# (pfn, gpa, size_2m, extra bits): every #NPF _guest_check() raises
FAULTS = {
    "no such frame": (4096, 0x10000, False, 0),
    "not assigned": (20, 0x14000, False, 0),
    "another guest's": (13, 0x13000, False, 0),
    "immutable": (11, 0x11000, False, 0),
    "4K on a 2M entry": (512, 0x200000, False, GUEST_SIZEM),
    "GPA mismatch": (10, 0x20000, False, 0),
}


@pytest.mark.parametrize("case", FAULTS)
def test_pvalidate_faults_are_encrypted_writes(case: str) -> None:
    """PVALIDATE's RMP check is made as a write (it changes the entry's Validated bit)."""
    pfn, gpa, size_2m, extra = FAULTS[case]
    f = table().pvalidate(pfn, gpa=gpa, asid=ASID, vmpl=0, size_2m=size_2m, validate=True)
    assert isinstance(f, Fault)
    assert (f.error_code, f.gpa, f.vc) == (BASE | WRITE | GUEST_ENC | extra, gpa, False)


@pytest.mark.parametrize("case", FAULTS)
def test_rmpadjust_faults_are_encrypted_reads(case: str) -> None:
    pfn, gpa, size_2m, extra = FAULTS[case]
    f = table().rmpadjust(
        pfn, gpa=gpa, asid=ASID, vmpl=0, target_vmpl=1, perms=1, vmsa=False, size_2m=size_2m
    )
    assert isinstance(f, Fault)
    assert (f.error_code, f.gpa, f.vc) == (BASE | GUEST_ENC | extra, gpa, False)


def test_a_2m_pvalidate_of_a_2m_page_checks_the_head() -> None:
    """The checks pass on the 2M head: the answer is the instruction's, not a fault."""
    r = table().pvalidate(512, gpa=0x200000, asid=ASID, vmpl=0, size_2m=True, validate=True)
    assert not isinstance(r, Fault)


PVALIDATE_FAIL_INPUT = 1  # KERNEL: arch/x86/include/asm/sev.h


@pytest.mark.parametrize(("pfn", "gpa"), [(512, 0x201000), (512, 0x200008), (513, 0x200000)])
def test_a_2m_pvalidate_off_a_2m_boundary_is_fail_input(pfn: int, gpa: int) -> None:
    """Either address not 2M-aligned: FAIL_INPUT, before the entry's size or GPA is looked at."""
    r = table().pvalidate(pfn, gpa=gpa, asid=ASID, vmpl=0, size_2m=True, validate=True)
    assert r == PVALIDATE_FAIL_INPUT
