"""The ATTESTATION_REPORT the firmware assembles from live guest state and signs with the VCEK.

The layout is abi/report.py's one field table (SPEC: SNP ABI "ATTESTATION_REPORT Structure");
here the firmware's values go into it and the signature over bytes 0x000..0x29F: ECDSA P-384
with SHA-384, R and S little-endian, zero-padded to 72 bytes each.
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

from snpemu.abi import report as layout
from snpemu.abi.report import (
    SIG_COMPONENT,
    SIG_OFFSET,
    SIGNATURE_ALGO_ECDSA_P384_SHA384,
    SIGNED_SIZE,
)


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


def build(f: ReportFields) -> bytearray:
    """The unsigned report (every reserved byte zero)."""
    cur_build, cur_minor, cur_major = f.current_version
    com_build, com_minor, com_major = f.committed_version
    return layout.pack(
        {
            "version": f.version,
            "guest_svn": f.guest_svn,
            "policy": f.policy,
            "family_id": f.family_id,
            "image_id": f.image_id,
            "vmpl": f.vmpl,
            "signature_algo": SIGNATURE_ALGO_ECDSA_P384_SHA384,
            "current_tcb": f.current_tcb,
            "platform_info": f.platform_info,
            "signer_info": layout.signer_info(
                author_key_en=f.author_key_en,
                mask_chip_key=f.mask_chip_key,
                signing_key=f.signing_key,
            ),
            "report_data": f.report_data,
            "measurement": f.measurement,
            "host_data": f.host_data,
            "id_key_digest": f.id_key_digest,
            "author_key_digest": f.author_key_digest,
            "report_id": f.report_id,
            "report_id_ma": f.report_id_ma,
            "reported_tcb": f.reported_tcb,
            "cpuid_fam_id": f.cpuid_fam,
            "cpuid_mod_id": f.cpuid_mod,
            "cpuid_step": f.cpuid_step,
            "chip_id": f.chip_id,
            "committed_tcb": f.committed_tcb,
            "current_build": cur_build,
            "current_minor": cur_minor,
            "current_major": cur_major,
            "committed_build": com_build,
            "committed_minor": com_minor,
            "committed_major": com_major,
            "launch_tcb": f.launch_tcb,
        }
    )


def sign(report: bytearray, key: ec.EllipticCurvePrivateKey | None) -> bytes:
    """Sign bytes 0..0x29F into the signature field (left zero when key is None)."""
    if key is not None:
        der = key.sign(bytes(report[:SIGNED_SIZE]), ec.ECDSA(hashes.SHA384()))
        r, s = decode_dss_signature(der)
        sig = r.to_bytes(SIG_COMPONENT, "little") + s.to_bytes(SIG_COMPONENT, "little")
        report[SIG_OFFSET : SIG_OFFSET + len(sig)] = sig
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
