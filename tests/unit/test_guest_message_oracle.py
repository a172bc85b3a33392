"""The SNP guest-message format against a sealer and an opener written here from the kernel's
struct and AES-GCM calls, with cryptography's AESGCM used directly (never snpemu's helpers):
what snpemu seals opens here, what is sealed here opens in snpemu (the codec, the firmware's
SNP_GUEST_REQUEST and the guest driver's response check), and tampering is refused.

KERNEL: arch/x86/include/asm/sev.h
    struct snp_guest_msg_hdr {
        u8  authtag[MAX_AUTHTAG_LEN];   /* 32 */
        u64 msg_seqno;
        u8  rsvd1[8];
        u8  algo;
        u8  hdr_version;
        u16 hdr_sz;
        u8  msg_type;
        u8  msg_version;
        u16 msg_sz;
        u32 rsvd2;
        u8  msg_vmpck;
        u8  rsvd3[35];
    } __packed;
    struct snp_guest_msg { struct snp_guest_msg_hdr hdr; u8 payload[PAGE_SIZE - sizeof(hdr)]; }
    #define AAD_LEN 48   /* the header from algo to the end */
    SNP_AEAD_AES_256_GCM = 1, MSG_HDR_VER = 1, AUTHTAG_LEN 16
KERNEL: arch/x86/coco/sev/core.c __enc_payload() / dec_payload():
    u8 iv[GCM_AES_IV_SIZE] = {}; memcpy(iv, &hdr->msg_seqno, sizeof(hdr->msg_seqno));
    aesgcm_encrypt(ctx, msg->payload, plaintext, len, &hdr->algo, AAD_LEN, iv, hdr->authtag);
KERNEL: arch/x86/coco/sev/core.c verify_and_dec_payload(): the response's msg_seqno must be the
request's + 1, msg_type the request's + 1, msg_version the request's, and msg_sz + authsize
within the caller's buffer.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st
from snpemu.abi import guest_message as gm
from snpemu.abi.page_type import PageType
from snpemu.guest.driver import Driver
from snpemu.psp.status import FirmwareError, SevStatus

from tests.conftest import examples
from tests.unit.psp.launch_helpers import make_host

PAGE = 4096
HDR = struct.Struct("<32sQ8sBBHBBHIB35s")  # struct snp_guest_msg_hdr, field by field
AAD = struct.Struct("<BBHBBHIB35s")  # algo .. rsvd3: AAD_LEN bytes
assert HDR.size == 0x60 and AAD.size == 48
AUTHTAG_LEN = 16
ALGO_AES_256_GCM, HDR_VERSION = 1, 1
REPORT_REQ, REPORT_RSP = 5, 6  # enum msg_type: SNP_MSG_REPORT_REQ, SNP_MSG_REPORT_RSP
PAYLOAD_MAX = PAGE - 0x60 - AUTHTAG_LEN  # __enc_payload(): msg_sz + authsize <= payload


def iv_of(seqno: int) -> bytes:
    return seqno.to_bytes(8, "little") + bytes(4)  # GCM_AES_IV_SIZE 12, seqno in bytes 0..7


def oracle_seal(
    key: bytes, seqno: int, msg_type: int, msg_version: int, vmpck: int, payload: bytes
) -> bytes:
    """enc_payload() + __enc_payload(): the whole struct snp_guest_msg."""
    aad = AAD.pack(
        ALGO_AES_256_GCM, HDR_VERSION, HDR.size, msg_type, msg_version, len(payload), 0, vmpck,
        bytes(35),
    )  # fmt: skip
    sealed = AESGCM(key).encrypt(iv_of(seqno), payload, aad)
    ct, tag = sealed[:-AUTHTAG_LEN], sealed[-AUTHTAG_LEN:]
    page = tag.ljust(32, b"\0") + seqno.to_bytes(8, "little") + bytes(8) + aad + ct
    return page.ljust(PAGE, b"\0")


def oracle_fields(page: bytes) -> dict[str, object]:
    names = (
        "authtag", "msg_seqno", "rsvd1", "algo", "hdr_version", "hdr_sz", "msg_type",
        "msg_version", "msg_sz", "rsvd2", "msg_vmpck", "rsvd3",
    )  # fmt: skip
    return dict(zip(names, HDR.unpack_from(page), strict=True))


def oracle_open(key: bytes, page: bytes) -> bytes:
    """dec_payload(): InvalidTag when the page does not authenticate."""
    f = oracle_fields(page)
    msg_sz = int(f["msg_sz"])  # type: ignore[call-overload]
    ct = page[0x60 : 0x60 + msg_sz]
    tag = page[:AUTHTAG_LEN]
    return AESGCM(key).decrypt(iv_of(int(f["msg_seqno"])), ct + tag, page[0x30:0x60])  # type: ignore[call-overload]


def project_open(key: bytes, page: bytes) -> bytes:
    return gm.open_payload(key, gm.parse_header(page), page)


KEYS = st.binary(min_size=32, max_size=32)
SEQNOS = st.one_of(st.integers(1, 10), st.integers(1, 2**64 - 1))
PAYLOADS = st.one_of(
    st.binary(max_size=200), st.binary(min_size=PAYLOAD_MAX - 8, max_size=PAYLOAD_MAX)
)


@settings(max_examples=examples(60), deadline=None)
@given(KEYS, SEQNOS, st.integers(0, 255), st.integers(0, 255), st.integers(0, 3), PAYLOADS)
def test_snpemu_seals_what_the_kernel_layout_seals(
    key: bytes, seqno: int, msg_type: int, msg_version: int, vmpck: int, payload: bytes
) -> None:
    hdr = gm.Header(
        seqno=seqno, msg_type=msg_type, msg_version=msg_version, msg_sz=len(payload), vmpck=vmpck
    )
    ours = gm.seal(key, hdr, payload)
    theirs = oracle_seal(key, seqno, msg_type, msg_version, vmpck, payload)
    # AES-GCM is deterministic for one key, IV and AAD: the pages must be the same bytes
    assert ours == theirs
    assert oracle_open(key, ours) == payload
    assert project_open(key, theirs) == payload
    parsed = gm.parse_header(theirs)
    assert (parsed.seqno, parsed.msg_type, parsed.msg_version, parsed.msg_sz, parsed.vmpck) == (
        seqno, msg_type, msg_version, len(payload), vmpck,
    )  # fmt: skip
    assert (parsed.algo, parsed.hdr_version, parsed.hdr_sz) == (1, 1, 0x60)
    assert parsed.reserved_clear


# every byte the kernel authenticates or feeds the IV: the tag, msg_seqno, and the AAD
TAMPER_AT = [
    *range(0, AUTHTAG_LEN),  # authtag (the GCM tag)
    *range(0x20, 0x28),  # msg_seqno: the IV
    *range(0x30, 0x60),  # algo .. rsvd3: the AAD
]


@settings(max_examples=examples(60), deadline=None)
@given(KEYS, st.sampled_from(TAMPER_AT), st.integers(0, 7), st.binary(min_size=1, max_size=96))
def test_a_tampered_tag_seqno_or_header_does_not_open(
    key: bytes, at: int, bit: int, payload: bytes
) -> None:
    page = bytearray(oracle_seal(key, 7, REPORT_REQ, 1, 0, payload))
    page[at] ^= 1 << bit
    # (a changed msg_sz reads another length of ciphertext, which cannot authenticate either)
    with pytest.raises(InvalidTag):
        oracle_open(key, bytes(page))  # the layout says this byte is covered
    with pytest.raises(gm.MessageError):
        project_open(key, bytes(page))


@given(KEYS, st.binary(min_size=1, max_size=64), st.integers(0x60, 0x60 + 63), st.integers(0, 7))
def test_a_tampered_payload_does_not_open(key: bytes, payload: bytes, at: int, bit: int) -> None:
    page = bytearray(oracle_seal(key, 3, REPORT_REQ, 1, 1, payload))
    if at >= 0x60 + len(payload):
        at = 0x60 + (at - 0x60) % len(payload)
    page[at] ^= 1 << bit
    with pytest.raises(gm.MessageError):
        project_open(key, bytes(page))


def test_rsvd1_is_outside_the_aad_for_both() -> None:
    """rsvd1 (0x28..0x2F) is neither IV nor AAD: the kernel's AAD starts at algo. The tag
    still verifies; snpemu's parser reports the reserved bytes as not clear."""
    key = os.urandom(32)
    page = bytearray(oracle_seal(key, 9, REPORT_REQ, 1, 0, b"x" * 40))
    page[0x2B] = 0xAA
    assert oracle_open(key, bytes(page)) == b"x" * 40
    assert project_open(key, bytes(page)) == b"x" * 40
    assert not gm.parse_header(bytes(page)).reserved_clear


def test_a_wrong_key_does_not_open() -> None:
    page = oracle_seal(os.urandom(32), 1, REPORT_REQ, 1, 0, b"hello")
    with pytest.raises(gm.MessageError):
        project_open(os.urandom(32), page)


# --- the guest driver's response check (verify_and_dec_payload()) ---------------------------


def request_header(seqno: int, msg_type: int = REPORT_REQ, version: int = 1) -> gm.Header:
    return gm.Header(seqno=seqno, msg_type=msg_type, msg_version=version, msg_sz=96, vmpck=0)


def test_the_driver_opens_a_response_sealed_from_the_layout() -> None:
    key = os.urandom(32)
    page = oracle_seal(key, 6, REPORT_RSP, 1, 0, b"R" * 64)
    assert Driver._verify(key, request_header(5), page) == b"R" * 64


@pytest.mark.parametrize(
    ("seqno", "msg_type", "version", "why"),
    [
        (5, REPORT_RSP, 1, "seqno not the request's + 1 (a replayed request)"),
        (7, REPORT_RSP, 1, "seqno skips one"),
        (6, REPORT_REQ, 1, "type not the request's + 1"),
        (6, REPORT_RSP, 2, "version not the request's"),
    ],
)
def test_the_driver_refuses_a_response_the_kernel_refuses(
    seqno: int, msg_type: int, version: int, why: str
) -> None:
    key = os.urandom(32)
    page = oracle_seal(key, seqno, msg_type, version, 0, b"R" * 64)
    with pytest.raises(gm.MessageError):
        Driver._verify(key, request_header(5), page)


@pytest.mark.parametrize(
    "at",
    [
        0x3C,  # msg_vmpck
        0x38,  # rsvd2: inside the AAD, so the host cannot set it unnoticed
        0x50,  # rsvd3, likewise
        0x05,  # the tag
    ],
)
def test_the_driver_refuses_a_tampered_response(at: int) -> None:
    key = os.urandom(32)
    page = bytearray(oracle_seal(key, 6, REPORT_RSP, 1, 0, b"R" * 64))
    page[at] ^= 1
    with pytest.raises(gm.MessageError):
        Driver._verify(key, request_header(5), bytes(page))


# --- the firmware's SNP_GUEST_REQUEST, fed and read with the layout -------------------------


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("chip")


def report_req(vmpl: int = 0) -> bytes:
    """struct snp_report_req: user_data[64], u32 vmpl, rsvd[28]
    (KERNEL: include/uapi/linux/sev-guest.h)."""
    return b"U" * 64 + struct.pack("<I", vmpl) + bytes(28)


async def test_the_firmware_answers_a_request_sealed_from_the_layout(tmp: Path) -> None:
    host = make_host(tmp)
    await host.start()
    await host.place(0x5000, None, PageType.SECRETS)
    host.secrets_gpa = 0x5000
    await host.finish()
    key = host.vmpck(0)

    async def ask(page: bytes) -> bytes:
        req, res = host.shared_page(), host.firmware_page()
        host.rmp.frames.replace(req >> 12, page)
        await host.fw.guest_request(host.gctx, req, res)
        return host.rmp.fw_read(res, PAGE)

    back = await ask(oracle_seal(key, 1, REPORT_REQ, 1, 0, report_req()))
    f = oracle_fields(back)
    assert (f["msg_seqno"], f["msg_type"], f["msg_version"], f["msg_vmpck"]) == (
        2, REPORT_RSP, 1, 0,
    )  # fmt: skip
    assert (f["algo"], f["hdr_version"], f["hdr_sz"]) == (1, 1, 0x60)
    assert f["rsvd1"] == bytes(8) and f["rsvd2"] == 0 and f["rsvd3"] == bytes(35)
    payload = oracle_open(key, back)
    # struct snp_report_resp: u32 status, u32 report_size, rsvd[24], report
    status, size = struct.unpack_from("<II", payload)
    assert (status, size) == (0, 0x4A0) and len(payload) == 0x20 + 0x4A0
    assert payload[0x20 + 0x50 : 0x20 + 0x90] == b"U" * 64  # REPORT_DATA

    # tampered tag, seqno (an IV the firmware did not expect) and AAD: all refused
    for at in (0, 0x20, 0x34, 0x3C):
        page = bytearray(oracle_seal(key, 3, REPORT_REQ, 1, 0, report_req()))
        page[at] ^= 1
        with pytest.raises(FirmwareError) as info:
            await ask(bytes(page))
        assert info.value.status == SevStatus.INVALID_PARAM, at
    # the refused requests consumed nothing: seqno 3 is still the next one
    f = oracle_fields(await ask(oracle_seal(key, 3, REPORT_REQ, 1, 0, report_req())))
    assert f["msg_seqno"] == 4
