"""Where a GHCB exit's scratch area (SW_SCRATCH) may lie: KVM's setup_vmgexit_scratch().

KERNEL: arch/x86/kvm/svm/sev.c setup_vmgexit_scratch(). The area begins at SW_SCRATCH and is
`length` bytes long (MMIO: SW_EXIT_INFO_2; string IO: count * size; PSC: the descriptor).

- A scratch GPA of 0, or one whose end wraps past 2^64: GHCB_ERR_INVALID_SCRATCH_AREA.
- Begins in the GHCB page (the page of the registered GHCB GPA): it must lie wholly inside the
  shared buffer, [GHCB + 0x800, GHCB + 0xFF0) (struct ghcb shared_buffer .. reserved_0xff0).
- Begins anywhere else: any guest memory of at most GHCB_SCRATCH_AREA_LIMIT (16 pages), which
  KVM copies into a kernel buffer (kvm_read_guest; a failure there fails the vCPU run with
  -EFAULT) and, for a read (sync), copies back when the GHCB is unmapped.
"""

from __future__ import annotations

from dataclasses import dataclass

from snpemu.abi import ghcb as g

PAGE = 4096
GHCB_SCRATCH_AREA_LIMIT = 16 * PAGE  # KERNEL: sev.c GHCB_SCRATCH_AREA_LIMIT
U64 = 1 << 64


@dataclass(frozen=True)
class Scratch:
    """An accepted scratch area: `in_ghcb` areas are read from and written to the GHCB page."""

    gpa: int
    length: int
    in_ghcb: bool
    ghcb_gpa: int

    @property
    def offset(self) -> int:
        """Offset into the GHCB's shared buffer (only for an area in the GHCB)."""
        return self.gpa - self.ghcb_gpa - g.SHARED_BUFFER

    def pages(self) -> list[tuple[int, int, int]]:
        """(gpa, offset into the area, length) of each page piece of an area outside the GHCB."""
        out: list[tuple[int, int, int]] = []
        done = 0
        while done < self.length:
            gpa = self.gpa + done
            n = min(PAGE - gpa % PAGE, self.length - done)
            out.append((gpa, done, n))
            done += n
        return out


def setup_vmgexit_scratch(ghcb_gpa: int, sw_scratch: int, length: int) -> Scratch | None:
    """The scratch area KVM accepts, or None where it answers GHCB_ERR_INVALID_SCRATCH_AREA.

    KERNEL: arch/x86/kvm/svm/sev.c setup_vmgexit_scratch(), check by check."""
    beg = sw_scratch
    if not beg:
        return None  # "scratch gpa not provided"
    end = beg + length
    if end >= U64:
        return None  # scratch_gpa_end < scratch_gpa_beg in u64 arithmetic
    if beg & ~(PAGE - 1) == ghcb_gpa:
        # begins within the GHCB: must be wholly inside the shared buffer
        if beg < ghcb_gpa + g.SHARED_BUFFER or end > ghcb_gpa + g.RESERVED_0XFF0:
            return None
        return Scratch(beg, length, True, ghcb_gpa)
    if length > GHCB_SCRATCH_AREA_LIMIT:
        return None  # "scratch area exceeds KVM limits"
    return Scratch(beg, length, False, ghcb_gpa)
