"""Third-party report verifiers from PyPI, pinned to the emulated ARK instead of AMD's.

`ev` holds DER certificates ("vcek", "ask", "ark") and the DER "crl"."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding


def omne(ev: dict[str, bytes], report: bytes) -> None:
    from omne_attest import Policy, verify

    verify(
        report,
        ev["vcek"],
        ev["ask"],
        ev["ark"],
        hashlib.sha256(ev["ark"]).digest(),
        Policy(max_vmpl=0, reject_debug=True),
    )


def secretvm(ev: dict[str, bytes], report: bytes, tmp: Path) -> tuple[bool, object]:
    os.environ["SECRETVM_VERIFY_CACHE_DIR"] = str(tmp)
    from secretvm.verify import _kds_cache, amd

    def pem(d: bytes) -> bytes:
        return x509.load_der_x509_certificate(d).public_bytes(Encoding.PEM)

    chip = report[0x1A0:0x1E0]
    tcb = amd._amd_parse_tcb(report[0x180:0x188])
    _kds_cache.put("vcek", amd._vcek_cache_key("Milan", chip, tcb), ev["vcek"], 86400)
    _kds_cache.put("cert_chain", "Milan", pem(ev["ask"]) + pem(ev["ark"]), 86400)
    _kds_cache.put("crl", "Milan", ev["crl"], 86400)
    # The verifier pins AMD's real ARK in a module table; pin the emulated one for this call
    # only (the tests that check AMD's real chain read AMD's pin from that table)
    amd_pin = amd._PINNED_ARK_SPKI_SHA256["Milan"]
    amd._PINNED_ARK_SPKI_SHA256["Milan"] = amd._amd_spki_sha256_hex(
        x509.load_der_x509_certificate(ev["ark"])
    )
    try:
        res = amd.check_sev_cpu_attestation(report.hex(), product="Milan", strict=True)
    finally:
        amd._PINNED_ARK_SPKI_SHA256["Milan"] = amd_pin
    return bool(res.valid), res
