"""SNP guest messages: the 0x60-byte header and AES-256-GCM payload of a 4 KiB message page.

KERNEL: arch/x86/include/asm/sev.h struct snp_guest_msg_hdr; arch/x86/coco/sev/core.c
(enc_payload/verify_and_dec_payload) - docs/abi.md#guest-message:
    0x00 authtag[32] (GCM tag in the first 16)   0x20 u64 msg_seqno   0x28 u64 rsvd1
    0x30 u8 algo (1 = AES-256-GCM)  0x31 u8 hdr_version (1)  0x32 u16 hdr_sz (0x60)
    0x34 u8 msg_type  0x35 u8 msg_version  0x36 u16 msg_sz  0x38 u32 rsvd2
    0x3C u8 msg_vmpck  0x3D rsvd3[35]  0x60 payload[4000]
IV = msg_seqno little-endian in bytes 0..7, zeros in 8..11; AAD = header bytes 0x30..0x5F.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from snpemu.abi.addr import PAGE_SIZE

HDR_SIZE = 0x60
MAX_PAYLOAD = PAGE_SIZE - HDR_SIZE  # 4000
AUTHTAG_LEN = 16
AEAD_ALGO_AES_256_GCM = 1
MSG_HDR_VER = 1
_FIXED = struct.Struct(
    "<QQBBHBBHIB"
)  # seqno, rsvd1, algo, hdr_version, hdr_sz, type, version, sz, rsvd2, vmpck


class MsgType(enum.IntEnum):
    """enum msg_type. KERNEL: arch/x86/include/asm/sev.h"""

    INVALID = 0
    CPUID_REQ = 1
    CPUID_RSP = 2
    KEY_REQ = 3
    KEY_RSP = 4
    REPORT_REQ = 5
    REPORT_RSP = 6
    EXPORT_REQ = 7
    EXPORT_RSP = 8
    IMPORT_REQ = 9
    IMPORT_RSP = 10
    ABSORB_REQ = 11
    ABSORB_RSP = 12
    VMRK_REQ = 13
    VMRK_RSP = 14
    TSC_INFO_REQ = 17
    TSC_INFO_RSP = 18


@dataclass(frozen=True)
class Header:
    seqno: int
    msg_type: int
    msg_version: int
    msg_sz: int
    vmpck: int
    algo: int = AEAD_ALGO_AES_256_GCM
    hdr_version: int = MSG_HDR_VER
    hdr_sz: int = HDR_SIZE
    authtag: bytes = bytes(32)
    reserved_clear: bool = True

    def packed(self) -> bytes:
        """Header bytes 0x20..0x5F (everything after the auth tag), reserved fields zero."""
        fixed = _FIXED.pack(
            self.seqno,
            0,
            self.algo,
            self.hdr_version,
            self.hdr_sz,
            self.msg_type,
            self.msg_version,
            self.msg_sz,
            0,
            self.vmpck,
        )
        return fixed + bytes(HDR_SIZE - 0x20 - len(fixed))

    def aad(self) -> bytes:
        return self.packed()[0x10:]  # header bytes 0x30..0x5F


class MessageError(ValueError):
    """The page does not hold a well-formed, authentic message."""


def iv(seqno: int) -> bytes:
    return seqno.to_bytes(8, "little") + bytes(4)


def parse_header(page: bytes) -> Header:
    if len(page) != PAGE_SIZE:
        raise MessageError(f"a message page is {PAGE_SIZE} bytes, got {len(page)}")
    seqno, rsvd1, algo, hv, hsz, mtype, mver, msz, rsvd2, vmpck = _FIXED.unpack_from(page, 0x20)
    reserved_clear = rsvd1 == 0 and rsvd2 == 0 and not any(page[0x3D:0x60])
    return Header(seqno, mtype, mver, msz, vmpck, algo, hv, hsz, bytes(page[:32]), reserved_clear)


def seal(key: bytes, header: Header, payload: bytes) -> bytes:
    """The 4 KiB message page: header, then the GCM ciphertext of payload."""
    if len(payload) > MAX_PAYLOAD or len(payload) != header.msg_sz:
        raise MessageError(f"payload of {len(payload)} bytes does not fit msg_sz {header.msg_sz}")
    sealed = AESGCM(key).encrypt(iv(header.seqno), payload, header.aad())
    ct, tag = sealed[:-AUTHTAG_LEN], sealed[-AUTHTAG_LEN:]
    page = bytearray(PAGE_SIZE)
    page[:AUTHTAG_LEN] = tag
    page[0x20:HDR_SIZE] = header.packed()
    page[HDR_SIZE : HDR_SIZE + len(ct)] = ct
    return bytes(page)


def open_payload(key: bytes, header: Header, page: bytes) -> bytes:
    """Authenticate and decrypt; MessageError on a bad size or a failed tag."""
    if header.msg_sz > MAX_PAYLOAD:
        raise MessageError(f"msg_sz {header.msg_sz} exceeds {MAX_PAYLOAD}")
    ct = page[HDR_SIZE : HDR_SIZE + header.msg_sz]
    # the AAD is the header as it sits on the page, reserved bytes included (KERNEL:
    # dec_payload() passes &hdr->algo, AAD_LEN), not the fields re-packed with zeros
    aad = bytes(page[0x30:HDR_SIZE])
    try:
        return AESGCM(key).decrypt(iv(header.seqno), ct + header.authtag[:AUTHTAG_LEN], aad)
    except InvalidTag:
        raise MessageError("authentication tag mismatch") from None
