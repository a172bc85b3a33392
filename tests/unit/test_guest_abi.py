"""The codecs the guest side parses host-written data with, fuzzed: the certificate table the
host fills in, the report the firmware returns, and snpemu-verify's input files."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from snpemu.abi import cert_table, report
from snpemu.guest import verify

from tests.conftest import examples

GUIDS = st.sampled_from([cert_table.VCEK, cert_table.ASK, cert_table.ARK, cert_table.VLEK])
ENTRIES = st.lists(st.tuples(GUIDS, st.binary(min_size=1, max_size=64)), max_size=4)


@given(ENTRIES)
def test_certificate_table_round_trips(entries: list[tuple[uuid.UUID, bytes]]) -> None:
    blob = cert_table.build(entries)
    assert cert_table.parse(blob) == entries
    # the host may hand back a buffer padded to whole pages: the zero entry still ends it
    assert cert_table.parse(blob + bytes(4096 - len(blob) % 4096)) == entries


def test_certificate_table_layout_is_guid_offset_length() -> None:
    blob = cert_table.build([(cert_table.VCEK, b"DER")])
    assert blob[:16] == cert_table.VCEK.bytes  # RFC 4122 byte order
    assert int.from_bytes(blob[16:20], "little") == 48  # after two 24-byte entries
    assert int.from_bytes(blob[20:24], "little") == 3
    assert blob[24:48] == bytes(24) and blob[48:] == b"DER"


@given(st.binary(max_size=512))
def test_certificate_table_parser_never_reads_outside(blob: bytes) -> None:
    try:
        entries = cert_table.parse(blob)
    except ValueError:
        return
    assert all(len(der) <= len(blob) for _, der in entries)


@given(st.binary(max_size=2048))
def test_report_parser_takes_exactly_1184_bytes(raw: bytes) -> None:
    if len(raw) != report.REPORT_SIZE:
        with pytest.raises(ValueError):
            report.parse(raw)
    else:
        assert report.parse(raw)["chip_id"] == raw[0x1A0:0x1E0]


def test_report_fields_sit_at_their_offsets() -> None:
    raw = bytearray(report.REPORT_SIZE)
    raw[0:4] = (3).to_bytes(4, "little")
    raw[0x90:0xC0] = b"M" * 48
    raw[0x180:0x188] = (0x1122334455667788).to_bytes(8, "little")
    fields = report.parse(bytes(raw))
    assert fields["version"] == 3 and fields["measurement"] == b"M" * 48
    assert fields["reported_tcb"] == 0x1122334455667788


def _self_signed() -> bytes:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ARK-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA384())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


ARK_PEM = _self_signed()
# certificate tables that parse, with garbage where the DER should be, and plain garbage
CERTS = st.one_of(
    st.binary(max_size=600),
    st.lists(st.tuples(GUIDS, st.binary(min_size=1, max_size=64)), max_size=3).map(
        cert_table.build
    ),
)


@settings(max_examples=examples(80), deadline=None)
@given(st.binary(max_size=1300) | st.binary(min_size=1184, max_size=1184), CERTS, st.booleans())
def test_verify_rejects_garbage_with_exit_1(
    tmp_path_factory: pytest.TempPathFactory, rep: bytes, certs: bytes, real_ark: bool
) -> None:
    tmp: Path = tmp_path_factory.mktemp("verify")
    for name, data in (("r", rep), ("c", certs), ("a", ARK_PEM if real_ark else rep[:300])):
        (tmp / name).write_bytes(data)
    assert verify.main([str(tmp / "r"), str(tmp / "c"), "--ark", str(tmp / "a")]) == 1
