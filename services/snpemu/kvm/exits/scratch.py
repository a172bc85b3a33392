"""The GHCB exits that go through a scratch area: string IO and MMIO (no device claims a port
or an MMIO address), and where that area may lie: KVM's setup_vmgexit_scratch().

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

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from snpemu.abi import ghcb as g
from snpemu.abi.addr import PAGE_MASK, PAGE_SIZE, Spa, page_bytes, page_offset
from snpemu.errors import WrongState
from snpemu.kvm.exits.nae import Reply, ioio_size, port_in
from snpemu.kvm.exits.reasons import ExitReason

GHCB_SCRATCH_AREA_LIMIT = page_bytes(16)  # KERNEL: sev.c GHCB_SCRATCH_AREA_LIMIT
U64 = 1 << 64
INT_MAX = 2**31 - 1


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
            n = min(PAGE_SIZE - page_offset(gpa), self.length - done)
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
    if beg & PAGE_MASK == ghcb_gpa:
        # begins within the GHCB: must be wholly inside the shared buffer
        if beg < ghcb_gpa + g.SHARED_BUFFER or end > ghcb_gpa + g.RESERVED_0XFF0:
            return None
        return Scratch(beg, length, True, ghcb_gpa)
    if length > GHCB_SCRATCH_AREA_LIMIT:
        return None  # "scratch area exceeds KVM limits"
    return Scratch(beg, length, False, ghcb_gpa)


@dataclass(frozen=True)
class GuestMemory:
    """What the accesses need of kvm: GPA -> SPA (None outside every memslot), a kernel
    write of one page piece, and the backing of a GPA range on first use (kvm/faultin.py:
    kvm_read_guest()/kvm_write_guest() fault a page in as the guest's own access would)."""

    translate: Callable[[int], Spa | None]
    write: Callable[[Spa, bytes], Awaitable[int]]
    back: Callable[[int, int], Awaitable[None]]


async def ioio(mem: GuestMemory, ghcb_gpa: int, x: g.Ghcb) -> Reply:
    """KERNEL: arch/x86/kvm/svm/svm.c io_interception(); sev.c sev_es_string_io() for INS/OUTS
    (SW_EXIT_INFO_2 is the count), x86.c kvm_sev_es_string_io()."""
    info1, count = x.get("sw_exit_info_1"), x.get("sw_exit_info_2")
    is_in = bool(info1 & g.IOIO_TYPE_IN)
    if not info1 & g.IOIO_STR:
        return port_in(x) if is_in else Reply()  # OUT: dropped
    size = ioio_size(info1)
    if count > INT_MAX or count * size > INT_MAX:
        # sev_es_string_io(): -EINVAL (count, or check_mul_overflow() of count * size)
        raise WrongState(
            f"string IO of {count} x {size} bytes: KVM fails the run",
            reason=ExitReason.STRING_IO_COUNT,
        )
    return await _access(mem, ghcb_gpa, x, count * size, is_in)


async def mmio(mem: GuestMemory, ghcb_gpa: int, x: g.Ghcb) -> Reply:
    """KERNEL: sev.c sev_handle_vmgexit() SVM_VMGEXIT_MMIO_READ/WRITE: a scratch area of
    SW_EXIT_INFO_2 bytes for the GPA in SW_EXIT_INFO_1, then x86.c kvm_sev_es_mmio_read() /
    kvm_sev_es_mmio_write(), which hand the access to the VMM.
    UNVERIFIED(mmio-no-device): no MMIO device is emulated (the local APIC page included): a
    read gives all ones, as a VMM answers an unassigned address, and a write is dropped."""
    read = x.get("sw_exit_code") == g.EXIT_MMIO_READ
    return await _access(mem, ghcb_gpa, x, x.get("sw_exit_info_2"), read)


async def _access(mem: GuestMemory, ghcb_gpa: int, x: g.Ghcb, length: int, fill: bool) -> Reply:
    """An access of `length` bytes through the scratch area; a read (`fill`) gets all ones,
    written into the GHCB's shared buffer or, outside the GHCB, to guest memory before the GHCB
    is written back (sev_es_unmap_ghcb() syncs the kernel buffer first)."""
    area = setup_vmgexit_scratch(ghcb_gpa, x.get("sw_scratch"), length)
    if area is None:
        return Reply(g.RESP_MALFORMED_INPUT, g.ERR_INVALID_SCRATCH_AREA)
    if area.in_ghcb:
        if not fill:
            return Reply()
        buf = bytearray(x.shared)
        buf[area.offset : area.offset + length] = b"\xff" * length
        return Reply(shared=buf)
    await mem.back(area.gpa, length)
    spas = [(mem.translate(gpa), n) for gpa, _, n in area.pages()]
    if any(spa is None for spa, _ in spas):
        # kvm_read_guest() of the area fails: -EFAULT, the vCPU run fails
        raise WrongState(
            f"scratch area {area.gpa:#x}+{length:#x} is outside guest memory",
            reason=ExitReason.SCRATCH_NOT_MAPPED,
        )
    if fill:
        for spa, n in spas:  # up to 17 page pieces, each its own kernel write
            assert spa is not None
            await mem.write(spa, b"\xff" * n)
    return Reply()
