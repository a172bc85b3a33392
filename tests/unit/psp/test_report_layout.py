"""The ATTESTATION_REPORT psp builds and signs, byte by byte against the SNP ABI's table.

SPEC: SEV-SNP Firmware ABI (AMD 56860) Table "ATTESTATION_REPORT Structure": VERSION 0x00 (4),
GUEST_SVN 0x04 (4), POLICY 0x08 (8), FAMILY_ID 0x10 (16), IMAGE_ID 0x20 (16), VMPL 0x30 (4),
SIGNATURE_ALGO 0x34 (4; 1 = ECDSA P-384 with SHA-384), CURRENT_TCB 0x38 (8), PLATFORM_INFO 0x40
(8), SIGNER_INFO 0x48 (4: bit 0 AUTHOR_KEY_EN, bit 1 MASK_CHIP_KEY, bits 4:2 SIGNING_KEY, 7 =
none), REPORT_DATA 0x50 (64), MEASUREMENT 0x90 (48), HOST_DATA 0xC0 (32), ID_KEY_DIGEST 0xE0
(48), AUTHOR_KEY_DIGEST 0x110 (48), REPORT_ID 0x140 (32), REPORT_ID_MA 0x160 (32), REPORTED_TCB
0x180 (8), CPUID_FAM_ID 0x188, CPUID_MOD_ID 0x189, CPUID_STEP 0x18A (version 3 on), CHIP_ID
0x1A0 (64), COMMITTED_TCB 0x1E0 (8), CURRENT_BUILD/MINOR/MAJOR 0x1E8..0x1EA, COMMITTED_BUILD/
MINOR/MAJOR 0x1EC..0x1EE, LAUNCH_TCB 0x1F0 (8), SIGNATURE 0x2A0 (R 72 bytes, S 72 bytes,
little-endian; the rest of the 512 bytes reserved). The signature covers 0x000..0x29F.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from snpemu.psp import report as rpt
from snpemu.psp.firmware import Firmware

from tests.unit.psp.launch_helpers import Host, make_host


def b(n: int, seed: int) -> bytes:
    return bytes((seed + i) & 0xFF for i in range(n))


FIELDS = rpt.ReportFields(
    version=3,
    guest_svn=0x1122_3344,
    policy=0x0102_0304_0506_0708,
    family_id=b(16, 0x10),
    image_id=b(16, 0x20),
    vmpl=0x8000_0002,
    current_tcb=0xA1A2_A3A4_A5A6_A7A8,
    platform_info=0xB1B2_B3B4_B5B6_B7B8,
    author_key_en=True,
    mask_chip_key=True,
    signing_key=5,
    report_data=b(64, 0x50),
    measurement=b(48, 0x90),
    host_data=b(32, 0xC0),
    id_key_digest=b(48, 0xE0),
    author_key_digest=b(48, 0x11),
    report_id=b(32, 0x40),
    report_id_ma=b(32, 0x60),
    reported_tcb=0xC1C2_C3C4_C5C6_C7C8,
    cpuid_fam=0x19,
    cpuid_mod=0x11,
    cpuid_step=0x02,
    chip_id=b(64, 0xA0),
    committed_tcb=0xD1D2_D3D4_D5D6_D7D8,
    current_version=(21, 55, 1),
    committed_version=(20, 54, 0xFE),
    launch_tcb=0xE1E2_E3E4_E5E6_E7E8,
)


def spec_report(f: rpt.ReportFields) -> bytes:
    """The report the ABI table gives for these fields, written offset by offset."""
    r = bytearray(0x4A0)

    def put(off: int, data: bytes) -> None:
        r[off : off + len(data)] = data

    def le(v: int, n: int) -> bytes:
        return v.to_bytes(n, "little")

    put(0x00, le(f.version, 4))
    put(0x04, le(f.guest_svn, 4))
    put(0x08, le(f.policy, 8))
    put(0x10, f.family_id)
    put(0x20, f.image_id)
    put(0x30, le(f.vmpl, 4))
    put(0x34, le(1, 4))
    put(0x38, le(f.current_tcb, 8))
    put(0x40, le(f.platform_info, 8))
    put(0x48, le(int(f.author_key_en) | int(f.mask_chip_key) << 1 | f.signing_key << 2, 4))
    put(0x50, f.report_data)
    put(0x90, f.measurement)
    put(0xC0, f.host_data)
    put(0xE0, f.id_key_digest)
    put(0x110, f.author_key_digest)
    put(0x140, f.report_id)
    put(0x160, f.report_id_ma)
    put(0x180, le(f.reported_tcb, 8))
    if f.version >= 3:
        put(0x188, bytes([f.cpuid_fam, f.cpuid_mod, f.cpuid_step]))
    put(0x1A0, f.chip_id)
    put(0x1E0, le(f.committed_tcb, 8))
    put(0x1E8, bytes(f.current_version))
    put(0x1EC, bytes(f.committed_version))
    put(0x1F0, le(f.launch_tcb, 8))
    return bytes(r)


def test_build_puts_every_field_at_its_abi_offset() -> None:
    assert bytes(rpt.build(FIELDS)) == spec_report(FIELDS)


def test_signer_info_bits() -> None:
    import dataclasses

    for author, mask, key, want in [
        (True, False, 0, 0b1),
        (False, True, 0, 0b10),
        (False, False, 7, 0b11100),
        (False, False, 1, 0b00100),  # VLEK
        (True, True, 7, 0b11111),
        (False, False, 0xF, 0b11100),  # only 3 bits of SIGNING_KEY
    ]:
        f = dataclasses.replace(FIELDS, author_key_en=author, mask_chip_key=mask, signing_key=key)
        assert int.from_bytes(rpt.build(f)[0x48:0x4C], "little") == want


def test_a_version_2_report_has_no_cpuid_bytes() -> None:
    import dataclasses

    f = dataclasses.replace(FIELDS, version=2)
    out = rpt.build(f)
    assert out[0x188:0x18B] == bytes(3) and bytes(out) == spec_report(f)


def test_the_signature_is_r_and_s_little_endian_over_0x2a0_bytes() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    signed = rpt.sign(rpt.build(FIELDS), key)
    assert signed[:0x2A0] == spec_report(FIELDS)[:0x2A0]
    r = int.from_bytes(signed[0x2A0 : 0x2A0 + 72], "little")
    s = int.from_bytes(signed[0x2A0 + 72 : 0x2A0 + 144], "little")
    key.public_key().verify(encode_dss_signature(r, s), signed[:0x2A0], ec.ECDSA(hashes.SHA384()))
    assert signed[0x2A0 + 144 :] == bytes(0x4A0 - 0x2A0 - 144)
    assert rpt.verify(signed, key.public_key())
    # the reserved bytes after S are not part of the signature
    reserved = bytearray(signed)
    reserved[0x2A0 + 144] = 0xFF
    reserved[-1] = 0xFF
    assert rpt.verify(bytes(reserved), key.public_key())
    for where in (0x000, 0x29F, 0x2A0, 0x2A0 + 71, 0x2A0 + 72, 0x2A0 + 143):
        bad = bytearray(signed)
        bad[where] ^= 1
        assert not rpt.verify(bytes(bad), key.public_key())
    assert rpt.sign(rpt.build(FIELDS), None) == spec_report(FIELDS)  # no key: left zero


class Guest:
    def __init__(self, tmp: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.host: Host = make_host(tmp)
        self.loop.run_until_complete(self._launch())

    async def _launch(self) -> None:
        await self.host.start()
        await self.host.finish()

    @property
    def fw(self) -> Firmware:
        return self.host.fw

    def report(self) -> bytes:
        return self.fw.attestation_report(self.fw.guests[self.host.gctx], b(64, 1), 1)


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    g = Guest(tmp_path_factory.mktemp("chip"))
    yield g
    g.loop.close()


def signer(report: bytes) -> int:
    return int.from_bytes(report[0x48:0x4C], "little")


def test_a_report_is_signed_by_the_vcek_with_the_chip_id(guest: Guest) -> None:
    fw = guest.fw
    report = guest.report()
    assert signer(report) == 0  # SIGNING_KEY 0: VCEK
    assert report[0x1A0:0x1E0] == fw.id.chip_id and any(report[0x1A0:0x1E0])
    vcek = fw.id.vcek_cert(fw.reported_tcb).public_key()
    assert isinstance(vcek, ec.EllipticCurvePublicKey) and rpt.verify(report, vcek)


def test_mask_chip_id_zeroes_the_chip_id(guest: Guest) -> None:
    guest.fw.mask_chip_id = True
    try:
        report = guest.report()
    finally:
        guest.fw.mask_chip_id = False
    assert report[0x1A0:0x1E0] == bytes(64) and any(report[0x2A0 : 0x2A0 + 144])


def test_mask_chip_key_leaves_the_report_unsigned(guest: Guest) -> None:
    guest.fw.mask_chip_key = True
    try:
        report = guest.report()
    finally:
        guest.fw.mask_chip_key = False
    assert signer(report) == 0b10 and report[0x2A0:] == bytes(0x200)


def test_vcek_disabled_is_signing_key_none_and_no_signature(guest: Guest) -> None:
    ctx = guest.fw.guests[guest.host.gctx]
    ctx.vcek_disabled = True
    try:
        report = guest.report()
    finally:
        ctx.vcek_disabled = False
    assert signer(report) == 7 << 2 and report[0x2A0:] == bytes(0x200)
