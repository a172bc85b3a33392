"""The 1184-byte ATTESTATION_REPORT: one field table that psp builds from and verifiers parse.

SPEC: SEV-SNP Firmware ABI (AMD 56860) Table "ATTESTATION_REPORT Structure"; the same offsets in
go-sev-guest abi/abi.go (`ReportToProto()`, `ReportToAbiBytes()`) and virtee sev
(docs/abi.md#report). Every byte the table does not name is reserved and zero. The signature
(R then S, 72 bytes each, little-endian) covers bytes 0x000..0x29F (go-sev-guest
`SignedComponent()`); snpemu.psp.report signs and checks it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

REPORT_SIZE = 0x4A0
SIGNED_SIZE = 0x2A0  # bytes 0x000..0x29F are signed
SIG_OFFSET = 0x2A0
SIG_COMPONENT = 72  # R, then S, zero-padded little-endian
SIGNATURE_ALGO_ECDSA_P384_SHA384 = 1
# SIGNER_INFO (0x48): bit 0 AUTHOR_KEY_EN, bit 1 MASK_CHIP_KEY, bits 4:2 SIGNING_KEY
SIGNER_AUTHOR_KEY_EN = 1 << 0
SIGNER_MASK_CHIP_KEY = 1 << 1
SIGNER_SIGNING_KEY_SHIFT = 2
SIGNER_SIGNING_KEY_MASK = 0x7
SIGNING_KEY_VCEK, SIGNING_KEY_VLEK, SIGNING_KEY_NONE = 0, 1, 7


@dataclass(frozen=True)
class Field:
    """One named field: `integer` ones are little-endian unsigned, the rest raw bytes.

    `summary`: parse() returns it (the fields snp.guest.v1.ReportFields carries); the one-byte
    version and CPUID fields and the signature are read with decode() or field().
    `since`: the first report VERSION that has it; before, the bytes are reserved and zero.
    """

    name: str
    offset: int
    size: int
    integer: bool
    summary: bool = True
    since: int = 0

    @property
    def end(self) -> int:
        return self.offset + self.size


# SPEC: SNP ABI Table "ATTESTATION_REPORT Structure" (offset, size, name), in offset order.
FIELDS: tuple[Field, ...] = (
    Field("version", 0x000, 4, True),
    Field("guest_svn", 0x004, 4, True),
    Field("policy", 0x008, 8, True),
    Field("family_id", 0x010, 16, False),
    Field("image_id", 0x020, 16, False),
    Field("vmpl", 0x030, 4, True),
    Field("signature_algo", 0x034, 4, True),
    Field("current_tcb", 0x038, 8, True),
    Field("platform_info", 0x040, 8, True),  # bit 0 SMT_EN, bit 1 TSME_EN, ...
    Field("signer_info", 0x048, 4, True),  # SIGNER_* above; 0x04C..0x04F reserved
    Field("report_data", 0x050, 64, False),
    Field("measurement", 0x090, 48, False),
    Field("host_data", 0x0C0, 32, False),
    Field("id_key_digest", 0x0E0, 48, False),
    Field("author_key_digest", 0x110, 48, False),
    Field("report_id", 0x140, 32, False),
    Field("report_id_ma", 0x160, 32, False),
    Field("reported_tcb", 0x180, 8, True),
    # Version 3 on; reserved (zero) in version 2 (docs/abi.md#report)
    Field("cpuid_fam_id", 0x188, 1, True, summary=False, since=3),
    Field("cpuid_mod_id", 0x189, 1, True, summary=False, since=3),
    Field("cpuid_step", 0x18A, 1, True, summary=False, since=3),
    Field("chip_id", 0x1A0, 64, False),
    Field("committed_tcb", 0x1E0, 8, True),
    Field("current_build", 0x1E8, 1, True, summary=False),
    Field("current_minor", 0x1E9, 1, True, summary=False),
    Field("current_major", 0x1EA, 1, True, summary=False),
    Field("committed_build", 0x1EC, 1, True, summary=False),
    Field("committed_minor", 0x1ED, 1, True, summary=False),
    Field("committed_major", 0x1EE, 1, True, summary=False),
    Field("launch_tcb", 0x1F0, 8, True),
    Field("signature", SIG_OFFSET, REPORT_SIZE - SIG_OFFSET, False, summary=False),
)
BY_NAME: dict[str, Field] = {f.name: f for f in FIELDS}


def field(report: bytes, name: str) -> Any:
    """One field's value: an int for integer fields, bytes for the others."""
    f = BY_NAME[name]
    raw = bytes(report[f.offset : f.end])
    return int.from_bytes(raw, "little") if f.integer else raw


def _sized(report: bytes) -> bytes:
    if len(report) != REPORT_SIZE:
        raise ValueError(f"an attestation report is {REPORT_SIZE} bytes, got {len(report)}")
    return report


def parse(report: bytes) -> dict[str, Any]:
    """The summary fields by name; ValueError unless the report is exactly 1184 bytes."""
    _sized(report)
    return {f.name: field(report, f.name) for f in FIELDS if f.summary}


def decode(report: bytes) -> dict[str, Any]:
    """Every field of the table by name."""
    _sized(report)
    return {f.name: field(report, f.name) for f in FIELDS}


def pack(values: Mapping[str, int | bytes]) -> bytearray:
    """The report with the named fields set and every other byte zero (the signature too
    unless given). A field of a later VERSION than values["version"] stays zero."""
    version = int(values.get("version", 0))
    out = bytearray(REPORT_SIZE)
    for name, value in values.items():
        f = BY_NAME[name]
        if version < f.since:
            continue
        raw = value.to_bytes(f.size, "little") if isinstance(value, int) else bytes(value)
        if len(raw) > f.size:
            raise ValueError(f"{name} is {f.size} bytes, got {len(raw)}")
        out[f.offset : f.offset + len(raw)] = raw
    return out


def signer_info(*, author_key_en: bool, mask_chip_key: bool, signing_key: int) -> int:
    """SIGNER_INFO from its parts; only 3 bits of SIGNING_KEY fit."""
    key = (signing_key & SIGNER_SIGNING_KEY_MASK) << SIGNER_SIGNING_KEY_SHIFT
    return (
        int(author_key_en) * SIGNER_AUTHOR_KEY_EN | int(mask_chip_key) * SIGNER_MASK_CHIP_KEY | key
    )
