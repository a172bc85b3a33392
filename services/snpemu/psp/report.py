"""ATTESTATION_REPORT (0x4A0 bytes) built from live guest state and signed by the VCEK.

SPEC: SNP ABI "ATTESTATION_REPORT Structure"; layout per go-sev-guest abi/abi.go and virtee
sev (docs/abi.md#report). Every reserved byte stays zero. The signature covers bytes 0x000..0x29F:
ECDSA P-384 with SHA-384, R and S little-endian, zero-padded to 72 bytes each.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

REPORT_SIZE = 0x4A0
SIGNED_SIZE = 0x2A0
SIG_OFFSET = 0x2A0
SIG_COMPONENT = 72
SIGNATURE_ALGO_ECDSA_P384_SHA384 = 1
# signer info (0x48): bits 4:2 SIGNING_KEY; 0 = VCEK, 1 = VLEK, 7 = none
SIGNING_KEY_VCEK, SIGNING_KEY_NONE = 0, 7


@dataclass(frozen=True)
class ReportFields:
    version: int
    guest_svn: int
    policy: int
    family_id: bytes
    image_id: bytes
    vmpl: int
    current_tcb: int
    platform_info: int
    author_key_en: bool
    mask_chip_key: bool
    signing_key: int
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: int
    cpuid_fam: int
    cpuid_mod: int
    cpuid_step: int
    chip_id: bytes
    committed_tcb: int
    current_version: tuple[int, int, int]  # build, minor, major
    committed_version: tuple[int, int, int]
    launch_tcb: int


def _put(buf: bytearray, offset: int, data: bytes, size: int) -> None:
    assert len(data) <= size, (offset, len(data), size)
    buf[offset : offset + len(data)] = data


def _u(value: int, size: int) -> bytes:
    return value.to_bytes(size, "little")


def build(f: ReportFields) -> bytearray:
    r = bytearray(REPORT_SIZE)
    _put(r, 0x000, _u(f.version, 4), 4)
    _put(r, 0x004, _u(f.guest_svn, 4), 4)
    _put(r, 0x008, _u(f.policy, 8), 8)
    _put(r, 0x010, f.family_id, 16)
    _put(r, 0x020, f.image_id, 16)
    _put(r, 0x030, _u(f.vmpl, 4), 4)
    _put(r, 0x034, _u(SIGNATURE_ALGO_ECDSA_P384_SHA384, 4), 4)
    _put(r, 0x038, _u(f.current_tcb, 8), 8)
    _put(r, 0x040, _u(f.platform_info, 8), 8)
    signer = int(f.author_key_en) | int(f.mask_chip_key) << 1 | (f.signing_key & 7) << 2
    _put(r, 0x048, _u(signer, 4), 4)
    _put(r, 0x050, f.report_data, 64)
    _put(r, 0x090, f.measurement, 48)
    _put(r, 0x0C0, f.host_data, 32)
    _put(r, 0x0E0, f.id_key_digest, 48)
    _put(r, 0x110, f.author_key_digest, 48)
    _put(r, 0x140, f.report_id, 32)
    _put(r, 0x160, f.report_id_ma, 32)
    _put(r, 0x180, _u(f.reported_tcb, 8), 8)
    if f.version >= 3:  # CPUID family/model/stepping are v3+; MBZ in v2
        r[0x188], r[0x189], r[0x18A] = f.cpuid_fam, f.cpuid_mod, f.cpuid_step
    _put(r, 0x1A0, f.chip_id, 64)
    _put(r, 0x1E0, _u(f.committed_tcb, 8), 8)
    r[0x1E8], r[0x1E9], r[0x1EA] = f.current_version
    r[0x1EC], r[0x1ED], r[0x1EE] = f.committed_version
    _put(r, 0x1F0, _u(f.launch_tcb, 8), 8)
    return r


def sign(report: bytearray, key: ec.EllipticCurvePrivateKey | None) -> bytes:
    """Sign bytes 0..0x29F into the signature field (left zero when key is None)."""
    if key is not None:
        der = key.sign(bytes(report[:SIGNED_SIZE]), ec.ECDSA(hashes.SHA384()))
        r, s = decode_dss_signature(der)
        _put(report, SIG_OFFSET, r.to_bytes(SIG_COMPONENT, "little"), SIG_COMPONENT)
        _put(report, SIG_OFFSET + SIG_COMPONENT, s.to_bytes(SIG_COMPONENT, "little"), SIG_COMPONENT)
    return bytes(report)


def verify(report: bytes, public_key: ec.EllipticCurvePublicKey) -> bool:
    """Check a report's signature (as a verifier does: reverse R and S, DER, SHA-384)."""
    r = int.from_bytes(report[SIG_OFFSET : SIG_OFFSET + SIG_COMPONENT], "little")
    s = int.from_bytes(
        report[SIG_OFFSET + SIG_COMPONENT : SIG_OFFSET + 2 * SIG_COMPONENT], "little"
    )
    try:
        public_key.verify(
            encode_dss_signature(r, s), report[:SIGNED_SIZE], ec.ECDSA(hashes.SHA384())
        )
    except InvalidSignature:
        return False
    return True
