"""snpemu.abi.guest_message against a sealer written here from the kernel, with cryptography's
AESGCM directly.

KERNEL: arch/x86/include/asm/sev.h struct snp_guest_msg_hdr (packed):
    u8 authtag[32]; u64 msg_seqno; u8 rsvd1[8]; u8 algo; u8 hdr_version; u16 hdr_sz;
    u8 msg_type; u8 msg_version; u16 msg_sz; u32 rsvd2; u8 msg_vmpck; u8 rsvd3[35];
and struct snp_guest_msg { hdr; u8 payload[PAGE_SIZE - sizeof(hdr)]; }.
KERNEL: arch/x86/coco/sev/core.c enc_payload(): the IV is msg_seqno copied into a zeroed 12-byte
IV, the AAD is the header from `algo` on (AAD_LEN 48), the 16-byte tag goes to hdr->authtag.
"""

from __future__ import annotations

import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from snpemu.abi import guest_message as gm

KEY = bytes(range(32))


def kernel_header_tail(msg_type: int, version: int, size: int, vmpck: int) -> bytes:
    """Bytes 0x30..0x5F: algo 1 (SNP_AEAD_AES_256_GCM), hdr_version 1 (MSG_HDR_VER), hdr_sz
    sizeof(struct snp_guest_msg_hdr) = 0x60, then the message fields; reserved bytes zero."""
    tail = struct.pack("<BBHBBHIB", 1, 1, 0x60, msg_type, version, size, 0, vmpck) + bytes(35)
    assert len(tail) == 48
    return tail


def kernel_seal(
    key: bytes, seqno: int, msg_type: int, version: int, vmpck: int, payload: bytes
) -> bytes:
    tail = kernel_header_tail(msg_type, version, len(payload), vmpck)
    sealed = AESGCM(key).encrypt(seqno.to_bytes(8, "little") + bytes(4), payload, tail)
    ct, tag = sealed[:-16], sealed[-16:]
    page = tag + bytes(16) + seqno.to_bytes(8, "little") + bytes(8) + tail + ct
    return page + bytes(4096 - len(page))


def test_seal_writes_the_page_the_kernel_writes() -> None:
    payload = b"report request " * 6 + b"+"
    hdr = gm.Header(seqno=2**40 + 3, msg_type=5, msg_version=1, msg_sz=len(payload), vmpck=2)
    assert gm.seal(KEY, hdr, payload) == kernel_seal(KEY, 2**40 + 3, 5, 1, 2, payload)


def test_seal_fills_a_whole_page_with_the_largest_payload() -> None:
    payload = bytes(range(256)) * 15 + bytes(160)  # 4000 bytes: PAGE_SIZE - 0x60
    hdr = gm.Header(seqno=1, msg_type=3, msg_version=1, msg_sz=4000, vmpck=0)
    assert gm.seal(KEY, hdr, payload) == kernel_seal(KEY, 1, 3, 1, 0, payload)


@pytest.mark.parametrize("size", [4001, 4096])
def test_seal_refuses_a_payload_larger_than_the_page(size: int) -> None:
    hdr = gm.Header(seqno=1, msg_type=5, msg_version=1, msg_sz=size, vmpck=0)
    with pytest.raises(gm.MessageError, match=f"payload of {size} bytes does not fit"):
        gm.seal(KEY, hdr, bytes(size))


def test_seal_refuses_a_payload_that_is_not_msg_sz() -> None:
    hdr = gm.Header(seqno=1, msg_type=5, msg_version=1, msg_sz=10, vmpck=0)
    with pytest.raises(gm.MessageError, match="does not fit msg_sz 10"):
        gm.seal(KEY, hdr, bytes(11))


def test_parse_header_reads_the_kernels_layout() -> None:
    page = bytearray(kernel_seal(KEY, 0x0102030405060708, 0x11, 0x22, 3, b"abc"))
    h = gm.parse_header(bytes(page))
    assert (h.seqno, h.msg_type, h.msg_version, h.msg_sz, h.vmpck) == (
        0x0102030405060708,
        0x11,
        0x22,
        3,
        3,
    )
    assert (h.algo, h.hdr_version, h.hdr_sz) == (1, 1, 0x60)
    assert h.authtag == bytes(page[:32]) and h.reserved_clear
    # the fields the kernel's header has at 0x30..0x33, read as written
    page[0x30:0x34] = struct.pack("<BBH", 7, 9, 0x1234)
    h = gm.parse_header(bytes(page))
    assert (h.algo, h.hdr_version, h.hdr_sz) == (7, 9, 0x1234)


@pytest.mark.parametrize(
    "offset",
    [0x28, 0x2F, 0x38, 0x3B, 0x3D, 0x5F],
    ids=["rsvd1", "rsvd1-end", "rsvd2", "rsvd2-end", "rsvd3", "rsvd3-end"],
)
def test_parse_header_notices_any_reserved_byte(offset: int) -> None:
    page = bytearray(kernel_seal(KEY, 1, 5, 1, 0, b"x"))
    page[offset] = 0x80
    assert gm.parse_header(bytes(page)).reserved_clear is False


def test_parse_header_ignores_bytes_outside_the_reserved_fields() -> None:
    page = bytearray(kernel_seal(KEY, 1, 5, 1, 0, b"x"))
    page[0x20:0x28] = b"\xff" * 8  # seqno
    page[0x10:0x20] = b"\xff" * 16  # authtag[16..31], unused by AES-GCM
    page[0x60:] = b"\xff" * 4000  # the payload
    assert gm.parse_header(bytes(page)).reserved_clear is True


@pytest.mark.parametrize("size", [0, 4095, 4097])
def test_parse_header_refuses_anything_but_a_page(size: int) -> None:
    with pytest.raises(gm.MessageError, match=f"^a message page is 4096 bytes, got {size}$"):
        gm.parse_header(bytes(size))


def test_open_payload_opens_what_the_kernel_sealed() -> None:
    payload = bytes(range(96))
    page = kernel_seal(KEY, 9, 6, 1, 1, payload)
    assert gm.open_payload(KEY, gm.parse_header(page), page) == payload
    big = bytes(range(250)) * 16
    page = kernel_seal(KEY, 2**63, 4, 1, 0, big)
    assert gm.open_payload(KEY, gm.parse_header(page), page) == big


def test_open_payload_authenticates_tag_header_and_seqno() -> None:
    page = kernel_seal(KEY, 9, 6, 1, 1, b"payload")
    # tag, seqno, AAD fields, ciphertext (a reserved byte is not among them: the AAD is rebuilt
    # from the fields with reserved bytes zero, and psp refuses such a header before opening it)
    for where in (0x00, 0x0F, 0x20, 0x30, 0x34, 0x36, 0x3C, 0x60):
        bad = bytearray(page)
        bad[where] ^= 1
        with pytest.raises(gm.MessageError, match=r"^authentication tag mismatch$"):
            gm.open_payload(KEY, gm.parse_header(bytes(bad)), bytes(bad))
    with pytest.raises(gm.MessageError, match="authentication tag mismatch"):
        gm.open_payload(bytes(32), gm.parse_header(page), page)


def test_open_payload_refuses_msg_sz_past_the_page() -> None:
    page = bytearray(kernel_seal(KEY, 9, 6, 1, 1, b"p"))
    page[0x36:0x38] = (4001).to_bytes(2, "little")
    with pytest.raises(gm.MessageError, match=r"^msg_sz 4001 exceeds 4000$"):
        gm.open_payload(KEY, gm.parse_header(bytes(page)), bytes(page))
    # 4000 is allowed: it is only the tag that fails then
    page[0x36:0x38] = (4000).to_bytes(2, "little")
    with pytest.raises(gm.MessageError, match="authentication tag mismatch"):
        gm.open_payload(KEY, gm.parse_header(bytes(page)), bytes(page))


def test_header_packs_reserved_fields_as_zero() -> None:
    h = gm.Header(seqno=5, msg_type=3, msg_version=1, msg_sz=8, vmpck=1, reserved_clear=False)
    packed = h.packed()
    assert packed == (5).to_bytes(8, "little") + bytes(8) + kernel_header_tail(3, 1, 8, 1)
    assert h.aad() == kernel_header_tail(3, 1, 8, 1)
