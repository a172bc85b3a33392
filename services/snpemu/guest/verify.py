"""snpemu-verify: check an attestation report and its certificate table offline.

    snpemu-verify REPORT CERTS --ark ARK [--report-data HEX]

REPORT is the 1184-byte report, CERTS the extended-request certificate table (both as
GetExtendedReport returns them, raw or base64), ARK the AMD root to pin (DER or PEM: the
emulated one from psp's KDS endpoint or GetCertificates). Checks: the chain ARK -> ASK -> VCEK
(RSASSA-PSS/SHA-384), the report's ECDSA P-384 signature with the VCEK, CHIP_ID against the
VCEK's hwID, REPORTED_TCB against the VCEK's SPLs, and the expected REPORT_DATA. Exit 0 when
every check passes.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import sys
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from snpemu.abi import cert_table, report
from snpemu.psp import report as signature
from snpemu.psp.identity import AMD_OID, PSS
from snpemu.psp.tcb import Tcb


def _load_bytes(path: str) -> bytes:
    data = Path(path).read_bytes()
    text = data.strip()
    try:
        return base64.b64decode(text, validate=True) if text and b"\0" not in text else data
    except (binascii.Error, ValueError):
        return data


def _cert(data: bytes) -> x509.Certificate:
    """The root to pin: a DER or PEM certificate, or the self-signed one of a PEM chain (KDS's
    cert_chain answers ASK then ARK)."""
    if not data.lstrip().startswith(b"-----BEGIN"):
        return x509.load_der_x509_certificate(data)
    certs = x509.load_pem_x509_certificates(data)
    roots = [c for c in certs if c.subject == c.issuer]
    return roots[0] if roots else certs[0]


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    key = issuer.public_key()
    if not isinstance(key, rsa.RSAPublicKey):  # AMD's ARK and ASK are RSA-4096
        return False
    try:
        key.verify(cert.signature, cert.tbs_certificate_bytes, PSS, cert.signature_hash_algorithm)  # type: ignore[arg-type]
    except InvalidSignature:
        return False
    return True


def _ext_int(cert: x509.Certificate, oid: str) -> int | None:
    try:
        raw = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(f"{AMD_OID}.{oid}")).value
    except x509.ExtensionNotFound:
        return None
    value = raw.value  # type: ignore[attr-defined]
    return int.from_bytes(value[2 : 2 + value[1]], "big")  # DER INTEGER


def check(
    report_bytes: bytes, certs: bytes, ark_pinned: x509.Certificate, report_data: bytes | None
) -> list[tuple[bool, str]]:
    results: list[tuple[bool, str]] = []
    fields = report.parse(report_bytes)
    table = {guid: der for guid, der in cert_table.parse(certs)}
    vcek, ask, ark = (
        x509.load_der_x509_certificate(table[g]) if g in table else None
        for g in (cert_table.VCEK, cert_table.ASK, cert_table.ARK)
    )
    if vcek is None or ask is None:
        return [(False, "the certificate table has no VCEK or no ASK")]
    if ark is not None:
        results.append((ark == ark_pinned, "the table's ARK is the pinned root"))
    results.append((_signed_by(ark_pinned, ark_pinned), "ARK is self-signed"))
    results.append((_signed_by(ask, ark_pinned), "ASK is signed by the ARK"))
    results.append((_signed_by(vcek, ask), "VCEK is signed by the ASK"))
    key = vcek.public_key()
    results.append(
        (
            isinstance(key, ec.EllipticCurvePublicKey) and signature.verify(report_bytes, key),
            "report signature verifies with the VCEK",
        )
    )
    try:
        hwid = vcek.extensions.get_extension_for_oid(
            x509.ObjectIdentifier(f"{AMD_OID}.4")
        ).value.value  # type: ignore[attr-defined]
    except x509.ExtensionNotFound:
        hwid = None
    results.append((hwid == fields["chip_id"], "CHIP_ID matches the VCEK hwID"))
    tcb = Tcb.from_raw(fields["reported_tcb"])
    spls = (
        _ext_int(vcek, "3.1"),
        _ext_int(vcek, "3.2"),
        _ext_int(vcek, "3.3"),
        _ext_int(vcek, "3.8"),
    )
    results.append((spls == tcb.parts(), "REPORTED_TCB matches the VCEK SPLs"))
    if report_data is not None:
        results.append(
            (
                fields["report_data"] == report_data.ljust(64, b"\0"),
                "REPORT_DATA is the expected one",
            )
        )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="snpemu-verify", description=__doc__.splitlines()[0])
    parser.add_argument("report")
    parser.add_argument("certs")
    parser.add_argument("--ark", required=True, help="the root to pin (DER or PEM)")
    parser.add_argument("--report-data", help="expected REPORT_DATA, hex")
    args = parser.parse_args(argv)
    try:
        results = check(
            _load_bytes(args.report),
            _load_bytes(args.certs),
            _cert(Path(args.ark).read_bytes()),
            bytes.fromhex(args.report_data) if args.report_data else None,
        )
    except (ValueError, OSError) as e:
        print(f"FAIL: {e}")
        return 1
    for ok, what in results:
        print(f"{'OK  ' if ok else 'FAIL'}: {what}")
    return 0 if all(ok for ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
