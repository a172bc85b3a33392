"""snpemu-verify's chip and TCB binding, on reports whose signature is valid.

A report carries CHIP_ID (0x1A0, 64 bytes) and REPORTED_TCB (0x180, u64: boot loader, TEE,
reserved x4, SNP, microcode SPLs); the VCEK certificate that signs it carries the same facts in
AMD's extensions 1.3.6.1.4.1.3704.1.4 (hwID) and .3.1/.3.2/.3.3/.3.8 (SPLs). SPEC: SNP ABI
"ATTESTATION_REPORT Structure"; AMD "Versioned Chip Endorsement Key (VCEK) Certificate and KDS
Interface Specification". A verifier must reject a report whose signature is good but whose
chip or TCB is not the certificate's, and say which. The reports here come from the emulated
firmware (SNP_GUEST_REQUEST on a launched guest), then have one field changed and are signed
again with the VCEK, so that only the binding is wrong; the test checks the signature itself
with `cryptography`, and holds snpemu-verify's verdict against secretvm-verify's (PyPI) check of
the same binding.

Then AMD's own evidence: omne-attest 0.1.0 (PyPI) ships a real Milan report with its VCEK from
AMD's KDS and AMD's Milan ASK and ARK. Its ARK is checked against two pins that come from
outside this project: omne-attest's SHA-256 of the DER and secretvm-verify's SHA-256 of the
SubjectPublicKeyInfo."""

from __future__ import annotations

import asyncio
import hashlib
import os
import struct
import subprocess
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from snpemu.psp import report as signer
from snpemu.psp.identity import ChipIdentity
from snpemu.psp.tcb import Tcb

from tests.conftest import tool
from tests.unit.psp.launch_helpers import launched_report, make_host

pytestmark = [
    pytest.mark.fidelity,
    # AMD's real VCEK has a serial number with its top bit set, which DER reads as negative
    pytest.mark.filterwarnings("ignore:Parsed a serial number which wasn't positive"),
]

# SPEC: SNP ABI ATTESTATION_REPORT: offsets of the fields these tests change
REPORTED_TCB, CHIP_ID, SIGNED, SIG = 0x180, 0x1A0, 0x2A0, 0x2A0
# SPEC: GHCB spec, SNP extended guest request: the certificate table's GUIDs
GUID = {
    "vcek": uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd"),
    "ask": uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782"),
    "ark": uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae"),
}
CHIP = "CHIP_ID matches the VCEK hwID"
TCB = "REPORTED_TCB matches the VCEK SPLs"
SIGNATURE = "report signature verifies with the VCEK"


def cert_table(vcek: bytes, ask: bytes, ark: bytes) -> bytes:
    """{GUID, u32 offset, u32 length} per certificate, a zero entry, then the DER blobs."""
    entries = [(GUID["vcek"], vcek), (GUID["ask"], ask), (GUID["ark"], ark)]
    offset = 24 * (len(entries) + 1)
    head, blobs = b"", b""
    for guid, der in entries:
        head += guid.bytes + struct.pack("<II", offset + len(blobs), len(der))
        blobs += der
    return head + bytes(24) + blobs


def tcb_bytes(bl: int, tee: int, snp: int, ucode: int) -> bytes:
    return bytes([bl, tee, 0, 0, 0, 0, snp, ucode])


def signature_valid(report: bytes, vcek_der: bytes) -> bool:
    """ECDSA P-384/SHA-384 over bytes 0..0x29F, R and S little-endian, 72 bytes each."""
    key = x509.load_der_x509_certificate(vcek_der).public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    r = int.from_bytes(report[SIG : SIG + 72], "little")
    s = int.from_bytes(report[SIG + 72 : SIG + 144], "little")
    try:
        key.verify(encode_dss_signature(r, s), report[:SIGNED], ec.ECDSA(hashes.SHA384()))
    except Exception:
        return False
    return True


def snpemu_verify(tmp: Path, report: bytes, certs: bytes, ark: bytes) -> tuple[int, set[str]]:
    """Run the CLI; its exit code and the checks it printed as failed."""
    name = hashlib.sha256(report + certs + ark).hexdigest()[:12]
    (tmp / f"{name}.report").write_bytes(report)
    (tmp / f"{name}.certs").write_bytes(certs)
    (tmp / f"{name}.ark").write_bytes(ark)
    out = subprocess.run(
        [
            tool("snpemu-verify"),
            *(str(tmp / f"{name}.report"), str(tmp / f"{name}.certs")),
            *("--ark", str(tmp / f"{name}.ark")),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = out.stdout.splitlines()
    assert lines and all(ln.startswith(("OK  : ", "FAIL: ")) for ln in lines), out
    return out.returncode, {ln[6:] for ln in lines if ln.startswith("FAIL: ")}


def secretvm_binding(report: bytes, vcek_der: bytes) -> bool:
    """secretvm-verify's own check that the VCEK's hwID and SPLs are the report's."""
    from secretvm.verify import amd

    return bool(
        amd._amd_vcek_matches_report(
            x509.load_der_x509_certificate(vcek_der), amd._amd_parse_report(report)
        )
    )


@pytest.fixture(scope="module")
def emulated(tmp_path_factory: pytest.TempPathFactory) -> tuple[ChipIdentity, bytes]:
    """A chip and a report its firmware returned through SNP_GUEST_REQUEST."""
    host = make_host(tmp_path_factory.mktemp("chip"))

    return host.fw.id, asyncio.run(launched_report(host, b"m" * 64))


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


def resigned(report: bytes, offset: int, value: bytes, key: ec.EllipticCurvePrivateKey) -> bytes:
    """`report` with `value` at `offset`, signed again with the project's signer and `key`."""
    b = bytearray(report)
    b[offset : offset + len(value)] = value
    return signer.sign(b, key)


def test_the_firmwares_report_is_accepted(
    emulated: tuple[ChipIdentity, bytes], tmp_path: Path
) -> None:
    ident, report = emulated
    tcb = Tcb.from_raw(int.from_bytes(report[REPORTED_TCB : REPORTED_TCB + 8], "little"))
    vcek = der(ident.vcek_cert(tcb))
    assert signature_valid(report, vcek) and secretvm_binding(report, vcek)
    certs = cert_table(vcek, der(ident.ask_cert), der(ident.ark_cert))
    assert snpemu_verify(tmp_path, report, certs, der(ident.ark_cert)) == (0, set())


def test_another_chips_id_under_a_valid_signature_fails_only_the_chip_check(
    emulated: tuple[ChipIdentity, bytes], tmp_path: Path
) -> None:
    ident, report = emulated
    tcb = Tcb.from_raw(int.from_bytes(report[REPORTED_TCB : REPORTED_TCB + 8], "little"))
    vcek = der(ident.vcek_cert(tcb))
    certs = cert_table(vcek, der(ident.ask_cert), der(ident.ark_cert))
    for other in (bytes(64), bytes([ident.chip_id[0] ^ 1]) + ident.chip_id[1:], os.urandom(64)):
        forged = resigned(report, CHIP_ID, other, ident.vcek_key(tcb))
        assert signature_valid(forged, vcek), "the signature itself is good"
        assert not secretvm_binding(forged, vcek)
        assert snpemu_verify(tmp_path, forged, certs, der(ident.ark_cert)) == (1, {CHIP})


@pytest.mark.parametrize("component", ["boot_loader", "tee", "snp", "microcode"])
def test_a_tcb_the_vcek_was_not_issued_for_fails_only_the_tcb_check(
    emulated: tuple[ChipIdentity, bytes], tmp_path: Path, component: str
) -> None:
    """The report claims one SPL higher than the VCEK that signed it certifies."""
    ident, report = emulated
    raw = report[REPORTED_TCB : REPORTED_TCB + 8]
    spl = {"boot_loader": raw[0], "tee": raw[1], "snp": raw[6], "microcode": raw[7]}
    signed_by = Tcb(spl["boot_loader"], spl["tee"], spl["snp"], spl["microcode"])
    vcek = der(ident.vcek_cert(signed_by))
    certs = cert_table(vcek, der(ident.ask_cert), der(ident.ark_cert))
    claimed = {**spl, component: spl[component] + 1}
    forged = resigned(
        report,
        REPORTED_TCB,
        tcb_bytes(claimed["boot_loader"], claimed["tee"], claimed["snp"], claimed["microcode"]),
        ident.vcek_key(signed_by),
    )
    assert signature_valid(forged, vcek), "the signature itself is good"
    assert not secretvm_binding(forged, vcek)
    assert snpemu_verify(tmp_path, forged, certs, der(ident.ark_cert)) == (1, {TCB})


def test_a_report_at_another_tcb_with_that_tcbs_vcek_is_accepted(
    emulated: tuple[ChipIdentity, bytes], tmp_path: Path
) -> None:
    """The matching case: the binding follows the report's TCB, not the firmware's."""
    ident, report = emulated
    other = Tcb(1, 0, 5, 90)
    vcek = der(ident.vcek_cert(other))
    report = resigned(report, REPORTED_TCB, tcb_bytes(1, 0, 5, 90), ident.vcek_key(other))
    assert signature_valid(report, vcek) and secretvm_binding(report, vcek)
    certs = cert_table(vcek, der(ident.ask_cert), der(ident.ark_cert))
    assert snpemu_verify(tmp_path, report, certs, der(ident.ark_cert)) == (0, set())


def test_a_report_at_another_tcb_with_the_firmwares_vcek_fails_the_signature_and_tcb(
    emulated: tuple[ChipIdentity, bytes], tmp_path: Path
) -> None:
    """Signed by another TCB's VCEK, presented with the firmware's: both checks fail."""
    ident, report = emulated
    tcb = Tcb.from_raw(int.from_bytes(report[REPORTED_TCB : REPORTED_TCB + 8], "little"))
    vcek = der(ident.vcek_cert(tcb))
    other = Tcb(1, 0, 5, 90)
    forged = resigned(report, REPORTED_TCB, tcb_bytes(1, 0, 5, 90), ident.vcek_key(other))
    assert not signature_valid(forged, vcek)
    certs = cert_table(vcek, der(ident.ask_cert), der(ident.ark_cert))
    assert snpemu_verify(tmp_path, forged, certs, der(ident.ark_cert)) == (1, {SIGNATURE, TCB})


# --- AMD's real evidence -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def amd() -> dict[str, bytes]:
    from omne_attest import vectors
    from secretvm.verify import amd as secretvm_amd

    ev = {
        "report": vectors.attestation(),
        "vcek": vectors.vcek(),
        "ask": vectors.ask(),
        "ark": vectors.ark(),
    }
    # the root is AMD's Milan ARK by two pins from two packages
    assert hashlib.sha256(ev["ark"]).digest() == vectors.ARK_SHA256
    spki = (
        x509.load_der_x509_certificate(ev["ark"])
        .public_key()
        .public_bytes(Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    assert hashlib.sha256(spki).hexdigest() == secretvm_amd._PINNED_ARK_SPKI_SHA256["Milan"]
    assert "CN=ARK-Milan" in x509.load_der_x509_certificate(ev["ark"]).subject.rfc4514_string()
    return ev


def test_amds_real_milan_report_is_accepted(amd: dict[str, bytes], tmp_path: Path) -> None:
    assert len(amd["report"]) == 0x4A0
    assert signature_valid(amd["report"], amd["vcek"])
    assert secretvm_binding(amd["report"], amd["vcek"])
    certs = cert_table(amd["vcek"], amd["ask"], amd["ark"])
    assert snpemu_verify(tmp_path, amd["report"], certs, amd["ark"]) == (0, set())


# a byte in: version, policy, REPORT_DATA, MEASUREMENT, REPORTED_TCB, CHIP_ID, the last signed
# byte, and the signature's R and S
FLIPS = {
    0x000: {SIGNATURE},
    0x008: {SIGNATURE},
    0x050: {SIGNATURE},
    0x090: {SIGNATURE},
    0x180: {SIGNATURE, TCB},
    0x1A0: {SIGNATURE, CHIP},
    0x29F: {SIGNATURE},
    0x2A0: {SIGNATURE},
    0x2E8: {SIGNATURE},
}


@pytest.mark.parametrize("offset", sorted(FLIPS))
def test_amds_real_report_with_one_byte_flipped_is_rejected(
    amd: dict[str, bytes], tmp_path: Path, offset: int
) -> None:
    report = bytearray(amd["report"])
    report[offset] ^= 0x01
    certs = cert_table(amd["vcek"], amd["ask"], amd["ark"])
    assert snpemu_verify(tmp_path, bytes(report), certs, amd["ark"]) == (1, FLIPS[offset])


def test_amds_real_vcek_with_one_byte_flipped_in_its_signature_is_rejected(
    amd: dict[str, bytes], tmp_path: Path
) -> None:
    vcek = bytearray(amd["vcek"])
    vcek[-10] ^= 0x01  # inside the ASK's RSASSA-PSS signature, the certificate's last field
    certs = cert_table(bytes(vcek), amd["ask"], amd["ark"])
    assert snpemu_verify(tmp_path, amd["report"], certs, amd["ark"]) == (
        1,
        {"VCEK is signed by the ASK"},
    )


def test_amds_real_chain_under_another_pinned_root_is_rejected(
    amd: dict[str, bytes], emulated: tuple[ChipIdentity, bytes], tmp_path: Path
) -> None:
    ident, _ = emulated
    certs = cert_table(amd["vcek"], amd["ask"], amd["ark"])
    code, failed = snpemu_verify(tmp_path, amd["report"], certs, der(ident.ark_cert))
    assert code == 1
    assert failed == {"the table's ARK is the pinned root", "ASK is signed by the ARK"}
