"""A small firmware image with OVMF's SEV layout, for fast launches in tests.

It carries what QEMU and sev-snp-measure read from OVMF: the footer GUID table 32 bytes before
the end, the SEV metadata ("ASEV" v1) with SNP_SEC_MEM, SNP_SECRETS, CPUID and
SNP_KERNEL_HASHES sections, the SEV-ES reset block (AP entry point) and the hashes-table entry.
The code itself is filler: nothing executes it.
"""

from __future__ import annotations

import struct
import uuid

from snpemu.abi.addr import page_bytes
from snpemu.vmm.ovmf import (
    FOOTER_GUID,
    SEV_ES_RESET_BLOCK_GUID,
    SEV_HASH_TABLE_RV_GUID,
    SEV_META_DATA_GUID,
    SectionType,
)

SECTIONS = (
    (0x800000, 0x3000, SectionType.SNP_SEC_MEM),
    (0x803000, 0x1000, SectionType.SNP_SECRETS),
    (0x804000, 0x1000, SectionType.CPUID),
    (0x805000, 0x1000, SectionType.SNP_KERNEL_HASHES),
    (0x806000, 0x2000, SectionType.SNP_SEC_MEM),
)
SECRETS_GPA = 0x803000
CPUID_GPA = 0x804000
HASHES_TABLE_GPA = 0x805C00
AP_RESET_EIP = 0xFFFFF000 | 0x0004  # within the image's last page


def _entry(guid: uuid.UUID, data: bytes) -> bytes:
    return data + struct.pack("<H", len(data) + 18) + guid.bytes_le


def build(pages: int = 16, with_hashes: bool = True) -> bytes:
    size = page_bytes(pages)
    image = bytearray((i * 7 + 13) & 0xFF for i in range(size))
    sections = [s for s in SECTIONS if with_hashes or s[2] != SectionType.SNP_KERNEL_HASHES]
    meta = b"ASEV" + struct.pack("<III", 16 + 12 * len(sections), 1, len(sections))
    meta += b"".join(struct.pack("<III", gpa, length, kind) for gpa, length, kind in sections)
    meta_offset = size - 0x2000  # metadata placed 8 KiB before the end
    image[meta_offset : meta_offset + len(meta)] = meta
    table = _entry(SEV_META_DATA_GUID, struct.pack("<I", size - meta_offset))
    table += _entry(SEV_ES_RESET_BLOCK_GUID, struct.pack("<I", AP_RESET_EIP))
    if with_hashes:
        table += _entry(SEV_HASH_TABLE_RV_GUID, struct.pack("<II", HASHES_TABLE_GPA, 0x400))
    footer = struct.pack("<H", len(table) + 18) + FOOTER_GUID.bytes_le
    end = size - 32
    image[end - len(table) - len(footer) : end] = table + footer
    return bytes(image)
