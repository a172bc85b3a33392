"""psp's KDS endpoint, fetched and judged by a third-party KDS client.

secretvm-verify (PyPI, pinned in pyproject.toml) verifies a report the way a relying party does
against AMD: it builds the KDS URLs from the report (VCEK by product, hwID and the four SPLs;
cert_chain; crl), fetches them with `requests`, checks the VCEK's extensions against the report,
the chain ASK -> ARK with the ARK pinned, the CRL's signature by the ARK and the VCEK's serial
against it, and the report's signature. It offers no setting for the KDS base: the base is the
module constant `secretvm.verify.amd._AMD_KDS_BASE`, read each time a URL is built, so the test
points it at the endpoint by reassigning that constant, and pins the emulated ARK in its pin
table the same way (tests/fidelity/verifiers.py does the latter too). Its cache is an empty
directory and every call asks for a reload, so every byte it judges came from the endpoint."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from snpemu.psp import report as signer
from snpemu.psp.identity import ChipIdentity
from snpemu.psp.kds import KdsServer
from snpemu.psp.tcb import Tcb

from tests.unit.psp.launch_helpers import launched_report, make_host

pytestmark = pytest.mark.fidelity

REPORTED_TCB, CHIP_ID = 0x180, 0x1A0  # SPEC: SNP ABI ATTESTATION_REPORT


@pytest.fixture(scope="module")
def emulated(tmp_path_factory: pytest.TempPathFactory) -> tuple[ChipIdentity, bytes]:
    """A chip and a report its firmware returned through SNP_GUEST_REQUEST."""
    host = make_host(tmp_path_factory.mktemp("chip"))

    return host.fw.id, asyncio.run(launched_report(host, b"k" * 64))


@pytest.fixture
def kds(emulated: tuple[ChipIdentity, bytes]) -> Iterator[KdsServer]:
    server = KdsServer(emulated[0], "127.0.0.1", 0)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def client(
    kds: KdsServer,
    emulated: tuple[ChipIdentity, bytes],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> Any:
    """secretvm-verify's AMD module, pointed at the endpoint, with the emulated ARK pinned."""
    monkeypatch.setenv("SECRETVM_VERIFY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    from secretvm.verify import amd

    monkeypatch.setattr(amd, "_AMD_KDS_BASE", f"http://127.0.0.1:{kds.port}")
    spki = (
        emulated[0]
        .ark_cert.public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    digest = hashes.Hash(hashes.SHA256())
    digest.update(spki)
    monkeypatch.setitem(amd._PINNED_ARK_SPKI_SHA256, "Milan", digest.finalize().hex())
    caplog.set_level(logging.DEBUG, logger="snpemu.psp.kds")
    return amd


def requested(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The request lines the endpoint served ("GET /vcek/v1/... HTTP/1.1" status size)."""
    return [r.getMessage() for r in caplog.records if r.name == "snpemu.psp.kds"]


def check(amd: Any, report: bytes, product: str = "Milan") -> Any:
    return amd.check_sev_cpu_attestation(
        report.hex(), product=product, reload_amd_kds=True, strict=True
    )


def test_the_client_fetches_and_accepts_the_chain_and_report(
    client: Any, emulated: tuple[ChipIdentity, bytes], caplog: pytest.LogCaptureFixture
) -> None:
    ident, report = emulated
    res = check(client, report)
    assert res.valid, (res.checks, res.errors)
    assert all(res.checks.values()), res.checks
    lines = requested(caplog)
    tcb = report[REPORTED_TCB : REPORTED_TCB + 8]
    vcek_path = (
        f"/vcek/v1/Milan/{ident.chip_id.hex()}"
        f"?blSPL={tcb[0]}&teeSPL={tcb[1]}&snpSPL={tcb[6]}&ucodeSPL={tcb[7]}"
    )
    for path in (vcek_path, "/vcek/v1/Milan/cert_chain", "/vcek/v1/Milan/crl"):
        assert any(f"GET {path} " in ln and '" 200 ' in ln for ln in lines), (path, lines)


def test_the_client_finds_the_product_by_asking(
    client: Any, emulated: tuple[ChipIdentity, bytes], caplog: pytest.LogCaptureFixture
) -> None:
    """Without a product it asks Genoa first: the endpoint says 404, and it goes on to Milan."""
    res = check(client, emulated[1], product="")
    assert res.valid, (res.checks, res.errors)
    assert res.report["product"] == "Milan"
    lines = requested(caplog)
    assert any("GET /vcek/v1/Genoa/" in ln and '" 404 ' in ln for ln in lines), lines


def test_a_report_at_another_tcb_gets_that_tcbs_vcek(
    client: Any, emulated: tuple[ChipIdentity, bytes]
) -> None:
    """The endpoint issues the VCEK for the SPLs asked for, not the firmware's own."""
    ident, report = emulated
    other = Tcb(2, 0, 6, 100)
    b = bytearray(report)
    b[REPORTED_TCB : REPORTED_TCB + 8] = bytes([2, 0, 0, 0, 0, 0, 6, 100])
    res = check(client, signer.sign(b, ident.vcek_key(other)))
    assert res.checks["vcek_matches_report"] and res.checks["report_signature_valid"], res.checks
    assert res.valid, (res.checks, res.errors)


def test_another_chips_report_gets_no_vcek(
    client: Any, emulated: tuple[ChipIdentity, bytes], caplog: pytest.LogCaptureFixture
) -> None:
    b = bytearray(emulated[1])
    b[CHIP_ID : CHIP_ID + 64] = bytes(64)
    res = check(client, bytes(b))
    assert not res.valid and res.checks["vcek_fetched"] is False, res.checks
    assert any('" 404 ' in ln for ln in requested(caplog))


def test_a_flipped_report_byte_is_rejected_with_the_endpoints_vcek(
    client: Any, emulated: tuple[ChipIdentity, bytes]
) -> None:
    b = bytearray(emulated[1])
    b[0x90] ^= 0x01  # MEASUREMENT
    res = check(client, bytes(b))
    assert res.checks["vcek_fetched"] and res.checks["cert_chain_valid"], res.checks
    assert not res.valid and not res.checks["report_signature_valid"]
