"""The memory access path: how guests, the host and the firmware read and write frames.

Every access is cut into page pieces by one iterator, `spans()`, and every write of part of an
encrypted page goes through one decrypt-modify-encrypt, `_write()`: a page is encrypted as a
whole with its guest's key and its SPA as the tweak, so a partial write re-encrypts the page.

Guest accesses are checked against the nested page table and the RMP and fault as the hardware
would; the host reads without a check (a private page reads as ciphertext) and its writes to
assigned pages are the violation policy's (rmp/violations.py); the firmware reads and writes
any page, optionally only pages in given states.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from snpemu.abi.addr import PAGE_SIZE, page_offset, pfn_to_spa, spa_to_pfn
from snpemu.abi.npf import PFERR_USER, PFERR_WRITE
from snpemu.abi.rmp import PageState
from snpemu.errors import InvalidArgument, WrongState
from snpemu.rmp.crypto import MemoryKeys
from snpemu.rmp.entry import (
    ASID_MASK,
    ASID_SHIFT,
    ASSIGNED,
    GPA_MASK,
    IMMUTABLE,
    PERM_READ,
    PERM_SHIFTS,
    PERM_WRITE,
    VALIDATED,
)
from snpemu.rmp.fault import VC_PAGE_NOT_VALIDATED, Fault, npf
from snpemu.rmp.identities import Identity
from snpemu.rmp.memory import FrameStore
from snpemu.rmp.paging import NestedPaging
from snpemu.rmp.reasons import RmpReason
from snpemu.rmp.table import RmpTable

MAX_ACCESS = 1 << 20


def spans(addr: int, length: int) -> Iterator[tuple[int, int, int]]:
    """(address, offset in its page, length) of each page piece of [addr, addr + length)."""
    pos, end = addr, addr + length
    while pos < end:
        offset = page_offset(pos)
        n = min(PAGE_SIZE - offset, end - pos)
        yield pos, offset, n
        pos += n


def _check_length(length: int, what: str = "length") -> None:
    if not 0 < length <= MAX_ACCESS:
        raise InvalidArgument(f"{what} must be in 1..{MAX_ACCESS}", reason=RmpReason.OUT_OF_RANGE)


class MemoryAccess:
    def __init__(
        self,
        memory_bytes: int,
        table: RmpTable,
        frames: FrameStore,
        keys: MemoryKeys,
        paging: NestedPaging,
        alive: Callable[[], None],
    ) -> None:
        self.memory_bytes = memory_bytes
        self.npages = table.npages
        self.table = table
        self.frames = frames
        self.keys = keys
        self.paging = paging
        self.alive = alive  # raises once the host has panicked

    def pfn(self, spa: int) -> int:
        pfn = spa_to_pfn(spa)
        if not 0 <= pfn < self.npages:
            raise InvalidArgument(
                f"SPA {spa:#x} is beyond host memory ({self.memory_bytes:#x} bytes)",
                reason=RmpReason.BEYOND_MEMORY,
            )
        return pfn

    # --- one page piece ------------------------------------------------------------------

    def _read(self, pfn: int, offset: int, n: int, asid: int) -> bytes:
        """n bytes at offset of the frame; with asid, decrypted with that guest's key."""
        page = self.frames.read(pfn)
        if asid:
            page = self.keys.decrypt(asid, pfn_to_spa(pfn), page)
        return page[offset : offset + n]

    def _write(self, pfn: int, offset: int, chunk: bytes, asid: int) -> None:
        """chunk at offset of the frame; with asid, decrypt, modify and encrypt the page."""
        if not asid:
            self.frames.write(pfn, offset, chunk)
            return
        spa = pfn_to_spa(pfn)
        page = bytearray(self.keys.decrypt(asid, spa, self.frames.read(pfn)))
        page[offset : offset + len(chunk)] = chunk
        self.frames.replace(pfn, self.keys.encrypt(asid, spa, bytes(page)))

    # --- guests ----------------------------------------------------------------------------

    def _guest_page(
        self, ident: Identity, gpa: int, *, private: bool, write: bool
    ) -> tuple[int, Fault | None]:
        pfn = self.paging.translate(ident.asid, gpa)
        if pfn is None:
            fault = Fault(False, (PFERR_WRITE if write else 0) | PFERR_USER, gpa, "GPA not mapped")
            return -1, fault
        lo, hi, _ = self.table.effective(pfn)
        page_gpa = gpa & ~(PAGE_SIZE - 1)
        if not private:
            if lo & ASSIGNED:
                # C=0 access to a guest-owned page is an RMP violation. SPEC: APM vol 2, 15.36.10
                return pfn, npf(gpa, "shared access to a private page", write=write, enc=False)
            return pfn, None
        if not lo & ASSIGNED:
            return pfn, npf(gpa, "private access to a shared page", write=write)
        if (lo & ASID_MASK) >> ASID_SHIFT != ident.asid or lo & IMMUTABLE:
            return pfn, npf(gpa, "page not owned by this guest", write=write)
        if (lo & GPA_MASK) != (page_gpa & GPA_MASK):
            return pfn, npf(gpa, "GPA does not match the RMP entry", write=write)
        if not lo & VALIDATED:
            return pfn, Fault(True, VC_PAGE_NOT_VALIDATED, gpa, "page not validated")
        if ident.vmpl > 0:
            need = PERM_WRITE if write else PERM_READ
            if not (hi >> PERM_SHIFTS[ident.vmpl - 1]) & need:
                return pfn, npf(gpa, "VMPL permission", write=write, vmpl=True)
        return pfn, None

    def guest_read(
        self, ident: Identity, gpa: int, length: int, *, private: bool
    ) -> tuple[bytes, Fault | None]:
        _check_length(length, "access length")
        asid = ident.asid if private else 0
        out = bytearray()
        for pos, offset, n in spans(gpa, length):
            pfn, fault = self._guest_page(ident, pos, private=private, write=False)
            if fault is not None:
                return bytes(out), fault
            out += self._read(pfn, offset, n, asid)
        return bytes(out), None

    def guest_write(self, ident: Identity, gpa: int, data: bytes, *, private: bool) -> Fault | None:
        _check_length(len(data), "access length")
        asid = ident.asid if private else 0
        done = 0
        for pos, offset, n in spans(gpa, len(data)):
            pfn, fault = self._guest_page(ident, pos, private=private, write=True)
            if fault is not None:
                return fault
            self._write(pfn, offset, data[done : done + n], asid)
            done += n
        return None

    # --- the host and the firmware -----------------------------------------------------------

    def _host_pieces(
        self, spa: int, length: int, expect: tuple[PageState, ...] = ()
    ) -> list[tuple[int, int, int]]:
        """(pfn, offset, length) of each page piece, once the whole range is checked."""
        self.alive()
        _check_length(length)
        self.pfn(spa)
        self.pfn(spa + length - 1)
        pieces: list[tuple[int, int, int]] = [
            (spa_to_pfn(pos), offset, n) for pos, offset, n in spans(spa, length)
        ]
        if expect:
            for pfn, _, _ in pieces:
                self.check_state(pfn, expect)
        return pieces

    def host_read(self, spa: int, length: int) -> bytes:
        """No RMP check on reads: a private page reads as ciphertext."""
        return b"".join(self._read(pfn, o, n, 0) for pfn, o, n in self._host_pieces(spa, length))

    def host_write_page(self, pfn: int, offset: int, data: bytes) -> None:
        """A host write within one page the policy let through (its plaintext bytes, no key)."""
        self.frames.write(pfn, offset, data)

    def check_state(self, pfn: int, expect: tuple[PageState, ...]) -> None:
        """WrongState(PAGE_STATE_MISMATCH) unless the page is in one of the states."""
        if not 0 <= pfn < self.npages:
            raise InvalidArgument(
                f"PFN {pfn:#x} is beyond host memory", reason=RmpReason.BEYOND_MEMORY
            )
        state = self.table.entry(pfn).state
        if state not in expect:
            raise WrongState(
                f"PFN 0x{pfn:x} is {state.name}, not {' or '.join(s.name for s in expect)}",
                reason=RmpReason.PAGE_STATE_MISMATCH,
                metadata={"pfn": f"0x{pfn:x}", "state": state.name},
            )

    def fw_read(
        self,
        spa: int,
        length: int,
        asid: int = 0,
        expect: tuple[PageState, ...] = (),
        checks: tuple[tuple[int, tuple[PageState, ...]], ...] = (),
    ) -> bytes:
        """Read as the firmware: with asid, decrypt with that guest's key; with expect, only
        from pages in those states; checks: other pages' states, in the same step."""
        for other, states in checks:
            self.check_state(spa_to_pfn(other), states)
        pieces = self._host_pieces(spa, length, expect)
        return b"".join(self._read(pfn, offset, n, asid) for pfn, offset, n in pieces)

    def fw_write(
        self, spa: int, data: bytes, asid: int = 0, expect: tuple[PageState, ...] = ()
    ) -> None:
        """Write as the firmware: with asid, encrypt with that guest's key (e.g. LAUNCH_UPDATE)."""
        done = 0
        for pfn, offset, n in self._host_pieces(spa, len(data), expect):
            self._write(pfn, offset, data[done : done + n], asid)
            done += n
