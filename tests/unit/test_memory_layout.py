"""Guest RAM placed as QEMU's q35 machine places it (vmm/memory_layout.py).

The expected values are QEMU's: hw/i386/pc_q35.c pc_q35_init() keeps RAM below 0xb0000000
whole below 4 GiB and splits more at 2 GiB (lowmem 0x80000000), and hw/i386/pc.c
pc_memory_init() puts the rest at 4 GiB, both as e820 RAM.
"""

from __future__ import annotations

import pytest
from snpemu.vmm import memory_layout as ml

GIB, MIB = 1 << 30, 1 << 20


@pytest.mark.parametrize(
    ("ram", "low", "high"),
    [
        (256 * MIB, 256 * MIB, 0),
        (2 * GIB, 2 * GIB, 0),
        (0xB000_0000 - 2 * MIB, 0xB000_0000 - 2 * MIB, 0),  # just fits below the hole
        (0xB000_0000, 2 * GIB, 0xB000_0000 - 2 * GIB),  # does not: split at 2 GiB
        (3 * GIB, 2 * GIB, GIB),
        (64 * GIB, 2 * GIB, 62 * GIB),
    ],
)
def test_ram_is_split_as_qemu_q35_splits_it(ram: int, low: int, high: int) -> None:
    table = ml.e820(ram)
    assert table[0] == ml.E820Entry(0, low, ml.E820Type.RAM)
    if high:
        assert table[1:] == [ml.E820Entry(4 * GIB, high, ml.E820Type.RAM)]
        assert ml.ram_end(ram) == 4 * GIB + high
    else:
        assert table[1:] == [] and ml.ram_end(ram) == ram


def test_the_high_memslot_binds_the_ram_memfd_where_the_low_one_ends() -> None:
    low, high = ml.ram_regions(64 * GIB)
    assert (low.slot, low.gpa, low.offset) == (ml.RAM_SLOT, 0, 0)
    assert (high.slot, high.gpa, high.offset) == (ml.RAM_HIGH_SLOT, 4 * GIB, low.size)
    # one RAMBlock: the user addresses follow the memfd offsets, and the firmware's come after
    assert high.hva - low.hva == high.offset
    assert ml.firmware_hva(64 * GIB) >= high.hva + high.size
    assert len({ml.RAM_SLOT, ml.RAM_HIGH_SLOT, ml.FIRMWARE_SLOT}) == 3
