"""OVMF's footer GUID table and SEV metadata, as QEMU reads them.

QEMU: hw/i386/pc_sysfw_ovmf.c (footer table), target/i386/sev.c (SEV metadata sections).
The table ends 32 bytes before the end of the image: entries {data, u16 size, GUID(le)} are
read backwards from the footer entry (GUID 96b582de-...). The SEV metadata ("ASEV", version
1) lists sections {u32 gpa, u32 size, u32 type} (docs/abi.md#launch-order).
"""

from __future__ import annotations

import enum
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

from snpemu.abi.addr import PAGE_SIZE

FOUR_GB = 1 << 32
FOOTER_GUID = uuid.UUID("96b582de-1fb2-45f7-baea-a366c55a082d")
SEV_META_DATA_GUID = uuid.UUID("dc886566-984a-4798-a75e-5585a7bf67cc")
SEV_ES_RESET_BLOCK_GUID = uuid.UUID("00f771de-1a7e-4fcb-890e-68c77e2fb44e")
SEV_HASH_TABLE_RV_GUID = uuid.UUID("7255371f-3a3b-4b04-927b-1da6efa8d454")
_ENTRY = struct.Struct("<H16s")
_META_HDR = struct.Struct("<4sIII")
_SECTION = struct.Struct("<III")


class SectionType(enum.IntEnum):
    SNP_SEC_MEM = 1
    SNP_SECRETS = 2
    CPUID = 3
    SVSM_CAA = 4
    SNP_KERNEL_HASHES = 0x10


@dataclass(frozen=True)
class Section:
    gpa: int
    size: int
    kind: SectionType


class OvmfError(ValueError):
    pass


@dataclass(frozen=True)
class Ovmf:
    data: bytes
    table: dict[uuid.UUID, bytes]
    sections: tuple[Section, ...]

    @classmethod
    def load(cls, path: str | Path) -> Ovmf:
        return cls.parse(Path(path).read_bytes())

    @classmethod
    def parse(cls, data: bytes) -> Ovmf:
        if len(data) % PAGE_SIZE or not data:
            raise OvmfError("a firmware image is a whole number of 4 KiB pages")
        table = _footer_table(data)
        return cls(data, table, _sections(data, table))

    @property
    def gpa(self) -> int:
        """The image is placed to end at 4 GiB."""
        return FOUR_GB - len(self.data)

    @property
    def reset_eip(self) -> int:
        """AP entry point from the SEV-ES reset block."""
        entry = self.table.get(SEV_ES_RESET_BLOCK_GUID)
        if entry is None:
            raise OvmfError("no SEV-ES reset block in the OVMF table")
        return int(struct.unpack_from("<I", entry, 0)[0])

    @property
    def hashes_table_gpa(self) -> int:
        entry = self.table.get(SEV_HASH_TABLE_RV_GUID)
        return int(struct.unpack_from("<I", entry, 0)[0]) if entry else 0


def _footer_table(data: bytes) -> dict[uuid.UUID, bytes]:
    end = len(data) - 32
    footer_size, footer_guid = _ENTRY.unpack_from(data, end - _ENTRY.size)
    if uuid.UUID(bytes_le=footer_guid) != FOOTER_GUID:
        return {}
    table = data[end - footer_size : end - _ENTRY.size]
    out: dict[uuid.UUID, bytes] = {}
    while len(table) >= _ENTRY.size:
        size, guid = _ENTRY.unpack_from(table, len(table) - _ENTRY.size)
        if size < _ENTRY.size or size > len(table):
            raise OvmfError("corrupt OVMF GUID table")
        out[uuid.UUID(bytes_le=guid)] = table[len(table) - size : len(table) - _ENTRY.size]
        table = table[: len(table) - size]
    return out


def _sections(data: bytes, table: dict[uuid.UUID, bytes]) -> tuple[Section, ...]:
    entry = table.get(SEV_META_DATA_GUID)
    if entry is None:
        return ()
    start = len(data) - int(struct.unpack_from("<I", entry, 0)[0])
    sig, size, version, count = _META_HDR.unpack_from(data, start)
    if sig != b"ASEV" or version != 1:
        raise OvmfError("bad SEV metadata header")
    if size < _META_HDR.size + count * _SECTION.size or start + size > len(data):
        raise OvmfError("SEV metadata runs past its header's size or the image")
    out = []
    for i in range(count):
        gpa, length, kind = _SECTION.unpack_from(data, start + _META_HDR.size + i * _SECTION.size)
        try:
            out.append(Section(gpa, length, SectionType(kind)))
        except ValueError:
            raise OvmfError(f"unknown SEV metadata section type {kind}") from None
    return tuple(out)
