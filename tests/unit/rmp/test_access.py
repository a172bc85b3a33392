"""The access path: one iterator cuts every access into page pieces, and a partial write of an
encrypted page leaves the rest of that page's plaintext as it was."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st
from snpemu.abi.addr import PAGE_SIZE
from snpemu.errors import InvalidArgument
from snpemu.rmp.access import MAX_ACCESS, spans
from snpemu.rmp.machine import RmpMachine
from snpemu.rmp.reasons import RmpReason

ASID = 7


@given(st.integers(0, 1 << 40), st.integers(1, 3 * PAGE_SIZE))
def test_the_pieces_tile_the_range_one_page_each(addr: int, length: int) -> None:
    pieces = list(spans(addr, length))
    pos = addr
    for start, offset, n in pieces:
        assert start == pos and offset == start % PAGE_SIZE
        assert 0 < n <= PAGE_SIZE - offset  # never across a page boundary
        pos += n
    assert pos == addr + length


def test_a_partial_encrypted_write_keeps_the_rest_of_the_page() -> None:
    m = RmpMachine(4 << 20)
    m.install_key(ASID, os.urandom(64))
    page = os.urandom(2 * PAGE_SIZE)
    m.fw_write(0x10000, page, ASID)
    m.fw_write(0x10000 + PAGE_SIZE - 3, b"abcdef", ASID)  # across the boundary
    want = page[: PAGE_SIZE - 3] + b"abcdef" + page[PAGE_SIZE + 3 :]
    assert m.fw_read(0x10000, 2 * PAGE_SIZE, ASID) == want
    assert m.host_read(0x10000, 2 * PAGE_SIZE) != want  # the host sees ciphertext


def test_lengths_are_bounded() -> None:
    m = RmpMachine(4 << 20)
    for length in (0, MAX_ACCESS + 1):
        with pytest.raises(InvalidArgument):
            m.host_read(0, length)


def test_reasons_are_their_wire_strings() -> None:
    for reason in RmpReason:
        assert reason == reason.name and isinstance(reason, str)
