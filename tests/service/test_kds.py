"""psp's KDS endpoint over HTTP, as issue 19 found it: one VCEK file per distinct TCB asked for
without limit (1,473 files in 6 s), concurrent first requests that read a half-written DER
(lost connections, a multi-line traceback in psp.log).

Expected statuses: AMD 57230 chapter 4 and AMD's KDS as observed (tests/unit/psp/test_kds_query.py
names the sources; 400 for a malformed request is UNVERIFIED against 57230 4.1's table)."""

from __future__ import annotations

import http.client
import io
import json
import logging
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from snpemu.psp import kds as kds_module
from snpemu.psp.identity import AMD_OID, ChipIdentity
from snpemu.psp.kds import KdsServer
from snpemu.psp.tcb import Tcb
from snpemu.runtime.logs import JsonFormatter


@pytest.fixture(scope="module")
def chip(tmp_path_factory: pytest.TempPathFactory) -> ChipIdentity:
    return ChipIdentity.load_or_create(tmp_path_factory.mktemp("kds-chip"), "Milan")


@pytest.fixture
def kds(chip: ChipIdentity) -> Iterator[KdsServer]:
    server = KdsServer(chip, "127.0.0.1", 0)
    server.start()
    yield server
    server.stop()


def get(server: KdsServer, target: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("GET", target)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def vcek_target(chip: ChipIdentity, t: Tcb) -> str:
    spls = f"blSPL={t.boot_loader}&teeSPL={t.tee}&snpSPL={t.snp}&ucodeSPL={t.microcode}"
    return f"/vcek/v1/Milan/{chip.chip_id.hex()}?{spls}"


def spl(cert: x509.Certificate, oid: str) -> int:
    value = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(f"{AMD_OID}.{oid}"))
    der = value.value.value  # type: ignore[attr-defined]
    assert der[0] == 0x02  # INTEGER
    return int.from_bytes(der[2 : 2 + der[1]], "big")


def vcek_files(chip: ChipIdentity) -> list[Path]:
    return list(chip.data_dir.glob("vcek-*.der"))


def test_many_distinct_tcbs_leave_at_most_the_cap_of_files(
    kds: KdsServer, chip: ChipIdentity
) -> None:
    cap = chip.vceks.cap
    for i in range(cap + 40):
        status, der = get(kds, vcek_target(chip, Tcb(i % 200, 1, i // 200, 7)))
        assert status == 200 and x509.load_der_x509_certificate(der)
        assert len(vcek_files(chip)) <= cap
    assert len(vcek_files(chip)) == cap and len(chip.vceks) == cap
    assert chip.vceks.evictions >= 40


def test_concurrent_first_requests_for_one_tcb_all_get_the_same_valid_der(
    kds: KdsServer, chip: ChipIdentity
) -> None:
    tcb = Tcb(42, 1, 17, 201)  # asked for by no other test: its first request is one of these
    target = vcek_target(chip, tcb)
    start = threading.Barrier(24)
    answers: list[tuple[int, bytes]] = []
    lock = threading.Lock()

    def fetch() -> None:
        start.wait(10)
        got = get(kds, target)
        with lock:
            answers.append(got)

    threads = [threading.Thread(target=fetch) for _ in range(24)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert len(answers) == 24 and {s for s, _ in answers} == {200}
    ders = {d for _, d in answers}
    assert len(ders) == 1  # one signature (RSA-PSS is salted: two signings differ)
    der = ders.pop()
    cert = x509.load_der_x509_certificate(der)
    assert cert.public_key() == chip.vcek_key(tcb).public_key()
    assert [spl(cert, o) for o in ("3.1", "3.2", "3.3", "3.8")] == [42, 1, 17, 201]
    assert chip.vceks.path(tcb.raw).read_bytes() == der


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("blSPL=256&teeSPL=0&snpSPL=8&ucodeSPL=115", 400),  # an SPL above a byte
        ("blSPL=3&teeSPL=0&snpSPL=8&ucodeSPL=-1", 400),
        ("blSPL=three&teeSPL=0&snpSPL=8&ucodeSPL=115", 400),  # not numeric
        ("blSPL=3&teeSPL=&snpSPL=8&ucodeSPL=115", 400),  # empty
        ("blSPL=3&blSPL=4&teeSPL=0&snpSPL=8&ucodeSPL=115", 400),  # twice
        ("blSPL=3&teeSPL=0&snpSPL=8", 200),  # ucodeSPL not given: 0
        ("", 200),  # none given: TCB 0
    ],
)
def test_vcek_queries_get_amds_statuses(
    kds: KdsServer, chip: ChipIdentity, query: str, expected: int
) -> None:
    target = f"/vcek/v1/Milan/{chip.chip_id.hex()}" + (f"?{query}" if query else "")
    status, body = get(kds, target)
    assert status == expected, body
    if expected == 200:
        cert = x509.load_der_x509_certificate(body)
        assert spl(cert, "3.8") == 0


HWIDS: dict[str, Callable[[str], str]] = {
    "63 bytes": lambda h: h[:-2],
    "65 bytes": lambda h: h + "00",
    "not hex": lambda h: "g" + h[1:],
    "another chip": lambda h: "00" * 64,
}


@pytest.mark.parametrize(
    ("hwid", "expected"),
    [("63 bytes", 400), ("65 bytes", 400), ("not hex", 400), ("another chip", 404)],
)
def test_hwids_get_amds_statuses(
    kds: KdsServer, chip: ChipIdentity, hwid: str, expected: int
) -> None:
    hwid = HWIDS[hwid](chip.chip_id.hex())
    status, _ = get(kds, f"/vcek/v1/Milan/{hwid}?blSPL=3&teeSPL=0&snpSPL=8&ucodeSPL=115")
    assert status == expected


def test_an_unknown_product_is_404(kds: KdsServer, chip: ChipIdentity) -> None:
    assert get(kds, "/vcek/v1/Genoa/cert_chain")[0] == 404
    assert get(kds, f"/vcek/v1/Turin/{chip.chip_id.hex()}?blSPL=1")[0] == 404


def test_the_crl_is_signed_once_and_whole(kds: KdsServer, chip: ChipIdentity) -> None:
    answers: list[bytes] = []
    threads = [
        threading.Thread(target=lambda: answers.append(get(kds, "/vcek/v1/Milan/crl")[1]))
        for _ in range(8)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert len(set(answers)) == 1 and len(answers) == 8
    crl = x509.load_der_x509_crl(answers[0])
    assert crl.is_signature_valid(chip.ark_key.public_key())
    assert (chip.data_dir / "crl.der").read_bytes() == answers[0]


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """psp's log as runtime/logs.py formats it, for the KDS module's records."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter("psp", "psp"))
    logger = logging.getLogger("snpemu.psp.kds")
    logger.addHandler(handler)
    try:
        yield out
    finally:
        logger.removeHandler(handler)


def test_a_failure_while_answering_is_a_500_and_one_json_log_line(
    kds: KdsServer,
    chip: ChipIdentity,
    json_log: io.StringIO,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    def broken(tcb: Tcb) -> bytes:
        raise RuntimeError("signing failed\nwith a second line")

    monkeypatch.setattr(chip, "vcek_der", broken)
    status, _ = get(kds, vcek_target(chip, Tcb(1, 2, 3, 4)))
    assert status == 500
    lines = json_log.getvalue().splitlines()
    assert len(lines) == 1, lines
    entry = json.loads(lines[0])
    assert entry["level"] == "ERROR" and "RuntimeError" in entry["exc"]
    assert "Traceback" not in capfd.readouterr().err
    assert get(kds, "/vcek/v1/Milan/cert_chain")[0] == 200  # still serving


def test_a_failure_outside_the_handler_is_one_json_log_line_too(
    kds: KdsServer,
    json_log: io.StringIO,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """socketserver's own error path (it prints a traceback to stderr by default)."""

    def broken(self: object, request: object, client_address: object) -> None:
        raise RuntimeError("connection setup failed")

    monkeypatch.setattr(kds_module._Server, "finish_request", broken)
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        get(kds, "/vcek/v1/Milan/cert_chain")
    monkeypatch.undo()
    # the connection above is closed before the log line may be written: poll for it
    for _ in range(200):
        if json_log.getvalue():
            break
        threading.Event().wait(0.05)
    lines = json_log.getvalue().splitlines()
    assert len(lines) == 1, lines
    assert "RuntimeError" in json.loads(lines[0])["exc"]
    assert "Traceback" not in capfd.readouterr().err
    assert get(kds, "/vcek/v1/Milan/cert_chain")[0] == 200


def test_a_client_hanging_up_mid_request_is_no_error(
    kds: KdsServer,
    json_log: io.StringIO,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG, logger="snpemu.psp.kds")

    def serving() -> int:
        return sum("process_request_thread" in t.name for t in threading.enumerate())

    for i in range(3):
        before = serving()
        s = socket.create_connection(("127.0.0.1", kds.port), timeout=10)
        for _ in range(400):  # until a thread has taken the connection and reads from it
            if serving() > before:
                break
            threading.Event().wait(0.025)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()  # a reset, not a FIN
        for _ in range(400):
            if json_log.getvalue().count("hung up") + json_log.getvalue().count("failed") > i:
                break
            threading.Event().wait(0.025)
    lines = json_log.getvalue().splitlines()
    assert len(lines) == 3 and all(json.loads(ln)["level"] == "DEBUG" for ln in lines), lines
    assert "Traceback" not in capfd.readouterr().err
    assert get(kds, "/vcek/v1/Milan/cert_chain")[0] == 200
