"""Where the VMM snpemu plays (the guest agent, kvm's LaunchVm, the grpcurl walk-through) puts
guest memory, as QEMU's q35 machine does: RAM from GPA 0 up to the PCI hole, the rest of it
from 4 GiB, the firmware ending at 4 GiB.

RAM is one guest_memfd (QEMU's one RAMBlock) bound to memslot 0 below 4 GiB and, for a guest
with RAM above 4 GiB, to memslot 2 from there at the offset where the low part ends (QEMU's
"ram-above-4g" alias of the block); the firmware has memslot 1. Their user addresses start at
VMM_HVA_BASE (where QEMU's mmap of the block might be; KVM only checks such addresses).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from snpemu.abi.addr import PMD_SIZE

RAM_SLOT, FIRMWARE_SLOT, RAM_HIGH_SLOT = 0, 1, 2
VMM_HVA_BASE = 0x7F00_0000_0000
GIB = 1 << 30
# QEMU hw/i386/pc.c: x86ms->above_4g_mem_start (4 GiB unless RAM reaches the AMD
# HyperTransport hole at 1012 GiB, which no guest here does)
ABOVE_4G_START = 4 * GIB


class E820Type(enum.IntEnum):
    """QEMU hw/i386/e820_memory_layout.h (the ACPI address range types)."""

    RAM = 1
    RESERVED = 2


@dataclass(frozen=True)
class E820Entry:
    addr: int
    size: int
    type: E820Type


@dataclass(frozen=True)
class RamRegion:
    """One memslot of guest RAM: its GPA range and where it sits in the RAM guest_memfd."""

    slot: int
    gpa: int
    size: int
    offset: int

    @property
    def hva(self) -> int:
        return VMM_HVA_BASE + self.offset


def below_4g(ram_bytes: int) -> int:
    """How much RAM QEMU's q35 puts below 4 GiB. QEMU hw/i386/pc_q35.c pc_q35_init(): RAM that
    fits below 0xb0000000 (leaving 1/2 GiB for I/O and 256 MiB for MMCONFIG) stays there
    whole; more is split at 2 GiB, "so that guest addresses aligned at 1G boundaries get
    mapped to host addresses aligned at 1G boundaries" (max-ram-below-4g left at its default)."""
    lowmem = 0x8000_0000 if ram_bytes >= 0xB000_0000 else 0xB000_0000
    return min(ram_bytes, lowmem)


def ram_regions(ram_bytes: int) -> list[RamRegion]:
    low = below_4g(ram_bytes)
    regions = [RamRegion(RAM_SLOT, 0, low, 0)]
    if ram_bytes > low:
        regions.append(RamRegion(RAM_HIGH_SLOT, ABOVE_4G_START, ram_bytes - low, low))
    return regions


def e820(ram_bytes: int) -> list[E820Entry]:
    """The guest's RAM as QEMU's e820 table gives it (fw_cfg "etc/e820"). QEMU hw/i386/pc.c
    pc_memory_init(): e820_add_entry(0, below_4g_mem_size, E820_RAM) and, when there is RAM
    above 4 GiB, e820_add_entry(above_4g_mem_start, above_4g_mem_size, E820_RAM).
    UNVERIFIED(e820-reserved): QEMU's reserved entries (SGX EPC, the HyperTransport hole) are
    for devices and sizes snpemu does not have."""
    return [E820Entry(r.gpa, r.size, E820Type.RAM) for r in ram_regions(ram_bytes)]


def ram_end(ram_bytes: int) -> int:
    """The first GPA past the highest RAM."""
    last = ram_regions(ram_bytes)[-1]
    return last.gpa + last.size


def firmware_hva(ram_bytes: int) -> int:
    """The firmware's memory follows the RAM block's, 2 MiB aligned."""
    return VMM_HVA_BASE + -(-ram_bytes // PMD_SIZE) * PMD_SIZE
