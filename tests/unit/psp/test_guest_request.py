"""SNP_GUEST_REQUEST with message pages sealed here (cryptography's AESGCM, the kernel's header
layout), not by snpemu.abi.guest_message: which headers the firmware refuses, and the response it
seals.

KERNEL: arch/x86/include/asm/sev.h struct snp_guest_msg_hdr (authtag[32] at 0, msg_seqno u64 at
0x20, rsvd1[8] at 0x28, algo u8 0x30, hdr_version u8 0x31, hdr_sz u16 0x32, msg_type u8 0x34,
msg_version u8 0x35, msg_sz u16 0x36, rsvd2 u32 0x38, msg_vmpck u8 0x3C, rsvd3[35] 0x3D);
arch/x86/coco/sev/core.c enc_payload() / verify_and_dec_payload(): IV = msg_seqno in a zeroed
12-byte IV, AAD = header bytes 0x30..0x5F, the response's msg_seqno is the request's + 1 and its
msg_type the request's + 1.
SPEC: SEV-SNP Firmware ABI (AMD 56860) "SNP_GUEST_REQUEST": a header that is not AEAD algorithm
1 / header version 1 / header size 0x60, a VMPCK above 3, a reserved field not zero, a message
version 0, a sequence number other than the next one, a message that does not authenticate, or
an unsupported message type is INVALID_PARAM (0x16); a sequence number at 2^64 - 2 or above is
AEAD_OFLOW (0x1D). MSG_REPORT_RSP: u32 status, u32 report_size, rsvd[24], report.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from snpemu.abi.page_type import PageType
from snpemu.psp.status import FirmwareError

from tests.unit.psp.launch_helpers import make_host

INVALID_PARAM, AEAD_OFLOW = 0x16, 0x1D
REPORT_REQ, REPORT_RSP, KEY_REQ, CPUID_REQ = 5, 6, 3, 1


def seal(
    key: bytes,
    seqno: int,
    payload: bytes,
    *,
    msg_type: int = REPORT_REQ,
    version: int = 1,
    vmpck: int = 0,
    algo: int = 1,
    hdr_version: int = 1,
    hdr_sz: int = 0x60,
    rsvd1: bytes = bytes(8),
    rsvd2: int = 0,
    rsvd3: bytes = bytes(35),
) -> bytes:
    tail = struct.pack(
        "<BBHBBHIB", algo, hdr_version, hdr_sz, msg_type, version, len(payload), rsvd2, vmpck
    )
    tail += rsvd3
    sealed = AESGCM(key).encrypt(seqno.to_bytes(8, "little") + bytes(4), payload, tail)
    page = sealed[-16:] + bytes(16) + seqno.to_bytes(8, "little") + rsvd1 + tail + sealed[:-16]
    return page + bytes(4096 - len(page))


def report_request(vmpl: int = 0) -> bytes:
    """MSG_REPORT_REQ: report_data[64], u32 vmpl, rsvd[28]."""
    return bytes(range(64)) + struct.pack("<I", vmpl) + bytes(28)


class Guest:
    def __init__(self, tmp: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.host = make_host(tmp)
        self.loop.run_until_complete(self._launch())

    async def _launch(self) -> None:
        await self.host.start()
        await self.host.place(0x5000, None, PageType.SECRETS)
        self.host.secrets_gpa = 0x5000
        await self.host.finish()

    @property
    def seqnos(self) -> list[int]:
        return self.host.fw.guests[self.host.gctx].seqnos

    def send(self, page: bytes) -> bytes:
        """The response page; FirmwareError propagates."""
        req, res = self.host.shared_page(), self.host.firmware_page()
        self.host.rmp.frames.replace(req >> 12, page)
        self.loop.run_until_complete(self.host.fw.guest_request(self.host.gctx, req, res))
        return bytes(self.host.rmp.fw_read(res, 4096))

    def refused(self, page: bytes) -> int:
        before = list(self.seqnos)
        with pytest.raises(FirmwareError) as info:
            self.send(page)
        assert self.seqnos == before  # a refused request changes nothing
        return int(info.value.status)


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    g = Guest(tmp_path_factory.mktemp("chip"))
    yield g
    g.loop.close()


def open_response(key: bytes, page: bytes) -> tuple[tuple[int, ...], bytes]:
    """(seqno, algo, hdr_version, hdr_sz, type, version, size, vmpck), payload."""
    seqno, rsvd1 = struct.unpack_from("<QQ", page, 0x20)
    fields = struct.unpack_from("<BBHBBHIB", page, 0x30)
    assert rsvd1 == 0 and fields[6] == 0 and page[0x3D:0x60] == bytes(35)
    size = fields[5]
    payload = AESGCM(key).decrypt(
        seqno.to_bytes(8, "little") + bytes(4),
        page[0x60 : 0x60 + size] + page[:16],
        page[0x30:0x60],
    )
    return (seqno, *fields[:6], fields[7]), payload


def test_a_report_request_gets_a_sealed_report_response(guest: Guest) -> None:
    key = guest.host.vmpck(1)
    s = guest.seqnos[1]
    page = guest.send(seal(key, s, report_request(vmpl=2), vmpck=1, version=7))
    hdr, payload = open_response(key, page)
    # seqno + 1; AES-256-GCM, version 1, 0x60; REPORT_RSP; the request's version; size; VMPCK1
    assert hdr == (s + 1, 1, 1, 0x60, REPORT_RSP, 7, len(payload), 1)
    assert struct.unpack_from("<II", payload) == (0, 0x4A0) and payload[8:0x20] == bytes(24)
    report = payload[0x20:]
    assert len(report) == 0x4A0 and report[0x50:0x90] == bytes(range(64))
    assert struct.unpack_from("<I", report, 0x30)[0] == 2  # the requested VMPL
    assert guest.seqnos[1] == s + 2


@pytest.mark.parametrize(
    "field",
    [
        {"algo": 0},
        {"algo": 2},
        {"hdr_version": 2},
        {"hdr_sz": 0x5F},
        {"hdr_sz": 0x61},
        {"vmpck": 4},
        {"version": 0},
        {"rsvd1": b"\x01" + bytes(7)},
        {"rsvd2": 1 << 31},
        {"rsvd3": bytes(34) + b"\x01"},
    ],
    ids=lambda f: "-".join(f"{k}={v!r}"[:20] for k, v in f.items()),
)
def test_a_malformed_header_is_invalid_param(guest: Guest, field: dict[str, object]) -> None:
    key = guest.host.vmpck(0)
    assert guest.refused(seal(key, guest.seqnos[0], report_request(), **field)) == INVALID_PARAM  # type: ignore[arg-type]


def test_each_vmpck_up_to_3_is_accepted(guest: Guest) -> None:
    for vmpck in (0, 3):
        key = guest.host.vmpck(vmpck)
        page = guest.send(seal(key, guest.seqnos[vmpck], report_request(vmpl=3), vmpck=vmpck))
        assert open_response(key, page)[0][7] == vmpck


def test_only_the_next_sequence_number_is_accepted(guest: Guest) -> None:
    key = guest.host.vmpck(2)
    s = guest.seqnos[2]
    for wrong in (s - 1, s + 1, s + 2, 0):
        assert guest.refused(seal(key, wrong, report_request(vmpl=2), vmpck=2)) == INVALID_PARAM
    guest.send(seal(key, s, report_request(vmpl=2), vmpck=2))
    assert guest.seqnos[2] == s + 2


def test_sequence_numbers_run_out_at_2_64_minus_2(guest: Guest) -> None:
    key = guest.host.vmpck(3)
    guest.seqnos[3] = 2**64 - 3
    page = guest.send(seal(key, 2**64 - 3, report_request(vmpl=3), vmpck=3))
    assert open_response(key, page)[0][0] == 2**64 - 2
    assert guest.seqnos[3] == 2**64 - 1
    guest.seqnos[3] = 2**64 - 2
    assert guest.refused(seal(key, 2**64 - 2, report_request(vmpl=3), vmpck=3)) == AEAD_OFLOW


def test_a_message_that_does_not_authenticate_is_invalid_param(guest: Guest) -> None:
    key = guest.host.vmpck(0)
    good = seal(key, guest.seqnos[0], report_request())
    for where in (0x00, 0x35, 0x60):
        bad = bytearray(good)
        bad[where] ^= 0x40
        assert guest.refused(bytes(bad)) == INVALID_PARAM
    assert (
        guest.refused(seal(guest.host.vmpck(1), guest.seqnos[0], report_request())) == INVALID_PARAM
    )


def test_an_unsupported_message_type_is_invalid_param(guest: Guest) -> None:
    key = guest.host.vmpck(0)
    for msg_type in (CPUID_REQ, REPORT_RSP, 7, 17):
        page = seal(key, guest.seqnos[0], report_request(), msg_type=msg_type)
        assert guest.refused(page) == INVALID_PARAM


def test_a_bad_report_request_gets_invalid_param_inside_the_response(guest: Guest) -> None:
    key = guest.host.vmpck(1)
    for payload in (report_request()[:95], report_request(vmpl=0), report_request(vmpl=4)):
        s = guest.seqnos[1]
        hdr, reply = open_response(key, guest.send(seal(key, s, payload, vmpck=1)))
        assert hdr[0] == s + 1 and hdr[4] == REPORT_RSP
        assert reply == struct.pack("<II", INVALID_PARAM, 0) + bytes(24)
    # 96 bytes is a whole request; VMPL 1 is VMPCK1's own
    hdr, reply = open_response(
        key, guest.send(seal(key, guest.seqnos[1], report_request(1), vmpck=1))
    )
    assert struct.unpack_from("<II", reply) == (0, 0x4A0)
