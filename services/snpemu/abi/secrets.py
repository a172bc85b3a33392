"""The secrets page the firmware writes into the page launched as SECRETS, and the guest reads.

KERNEL: arch/x86/include/asm/sev.h struct snp_secrets_page and struct secrets_os_area
(docs/abi.md#secrets-page):
    0x000 u32 version   0x004 u32 imien (bit 0)   0x008 u32 fms   0x010 gosvw[16]
    0x020 vmpck0[32]  0x040 vmpck1  0x060 vmpck2  0x080 vmpck3
    0x0A0 os_area: u32 msg_seqno_0..3, u64 ap_jump_table_pa, ...  (the guest's, zero from FW)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from snpemu.abi.addr import PAGE_SIZE

HEADER = struct.Struct("<III")  # version, imien, fms
GOSVW_OFFSET, GOSVW_SIZE = 0x010, 16
VMPCK_OFFSET, VMPCK_SIZE, VMPCK_COUNT = 0x020, 32, 4
OS_AREA_OFFSET = 0x0A0
MSG_SEQNO = struct.Struct("<I")  # os_area.msg_seqno_N, one per VMPCK


def vmpck_offset(vmpck: int) -> int:
    return VMPCK_OFFSET + VMPCK_SIZE * vmpck


def msg_seqno_offset(vmpck: int) -> int:
    """Where the guest keeps VMPCK `vmpck`'s sequence number (secrets_os_area)."""
    return OS_AREA_OFFSET + MSG_SEQNO.size * vmpck


@dataclass(frozen=True)
class SecretsPage:
    version: int
    imi_en: bool
    fms: int
    gosvw: bytes
    vmpcks: tuple[bytes, ...]
    msg_seqnos: tuple[int, ...] = (0, 0, 0, 0)

    def pack(self) -> bytes:
        """The 4 KiB page as the firmware writes it (the OS area zero)."""
        page = bytearray(PAGE_SIZE)
        HEADER.pack_into(page, 0, self.version, int(self.imi_en), self.fms)
        page[GOSVW_OFFSET : GOSVW_OFFSET + GOSVW_SIZE] = self.gosvw
        for i, key in enumerate(self.vmpcks):
            page[vmpck_offset(i) : vmpck_offset(i) + VMPCK_SIZE] = key
        return bytes(page)

    @classmethod
    def unpack(cls, page: bytes) -> SecretsPage:
        version, imien, fms = HEADER.unpack_from(page, 0)
        return cls(
            version=version,
            imi_en=bool(imien & 1),
            fms=fms,
            gosvw=bytes(page[GOSVW_OFFSET : GOSVW_OFFSET + GOSVW_SIZE]),
            vmpcks=tuple(
                bytes(page[vmpck_offset(i) : vmpck_offset(i) + VMPCK_SIZE])
                for i in range(VMPCK_COUNT)
            ),
            msg_seqnos=tuple(
                MSG_SEQNO.unpack_from(page, msg_seqno_offset(i))[0] for i in range(VMPCK_COUNT)
            ),
        )
