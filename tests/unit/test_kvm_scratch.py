"""kvm's scratch-area rule and the AP VMSA address rule, against oracles written from upstream.

KERNEL: arch/x86/kvm/svm/sev.c setup_vmgexit_scratch() (GHCB_SCRATCH_AREA_LIMIT = 16 pages;
in the GHCB page only offsetof(struct ghcb, shared_buffer) = 0x800 .. reserved_0xff0 = 0xFF0);
arch/x86/kvm/cpuid.h page_address_valid() with sev_vcpu_after_set_cpuid() (C-bit not reserved).
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from snpemu.kvm.exits import ap
from snpemu.kvm.exits.scratch import setup_vmgexit_scratch

GHCB = 0x5000


def oracle(beg: int, length: int) -> str:
    if beg == 0 or (beg + length) % 2**64 < beg:
        return "refused"
    if beg & ~0xFFF == GHCB:
        inside = beg >= GHCB + 0x800 and beg + length <= GHCB + 0xFF0
        return "ghcb" if inside else "refused"
    return "memory" if length <= 16 * 4096 else "refused"


@given(
    beg=st.one_of(
        st.integers(GHCB - 16, GHCB + 0x1010),
        st.sampled_from([0, 1, 2**64 - 1, 2**64 - 0x1000]),
        st.integers(0, 2**64 - 1),
    ),
    length=st.one_of(
        st.sampled_from([0, 1, 0x7F0, 0x7F1, 16 * 4096, 16 * 4096 + 1]),
        st.integers(0, 2**64 - 1),
    ),
)
def test_setup_vmgexit_scratch_matches_the_kernel(beg: int, length: int) -> None:
    area = setup_vmgexit_scratch(GHCB, beg, length)
    got = "refused" if area is None else "ghcb" if area.in_ghcb else "memory"
    assert got == oracle(beg, length)
    if area is not None and not area.in_ghcb:
        pieces = area.pages()
        assert sum(n for *_, n in pieces) == length
        assert all(gpa // 4096 == (gpa + n - 1) // 4096 for gpa, _, n in pieces)


def test_scratch_edges() -> None:
    assert setup_vmgexit_scratch(GHCB, GHCB + 0x800, 0x7F0) is not None
    assert setup_vmgexit_scratch(GHCB, GHCB + 0x800, 0x7F1) is None
    assert setup_vmgexit_scratch(GHCB, GHCB + 0x7FF, 1) is None
    assert setup_vmgexit_scratch(GHCB, 0x10_0010, 16 * 4096) is not None
    assert setup_vmgexit_scratch(GHCB, 0x10_0010, 16 * 4096 + 1) is None
    assert setup_vmgexit_scratch(GHCB, 2**64 - 8, 8) is None  # the end wraps to 0
    assert setup_vmgexit_scratch(GHCB, 0, 1) is None


def test_page_address_valid() -> None:
    """Aligned, no bit from MAXPHYADDR (48 here) up set except the C-bit (51)."""
    assert ap.page_address_valid(0x7FFF_1000)
    assert ap.page_address_valid(1 << 51 | 0x1000)
    assert not ap.page_address_valid(0x1008)
    assert not ap.page_address_valid(1 << 48)
    assert not ap.page_address_valid(1 << 52)
    assert not ap.page_address_valid(1 << 63)
