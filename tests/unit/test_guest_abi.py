"""The codecs the guest side parses host-written data with, fuzzed: the certificate table the
host fills in, the report the firmware returns, and snpemu-verify's input files."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from hypothesis import event, given, settings
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


# The table as the layout defines it, written here and not taken from cert_table.
# SPEC: AMD GHCB specification, "SNP Extended Guest Request" (the certificate table):
# entries of {GUID[16]; u32 offset; u32 length}, little-endian, ended by an all-zero entry;
# offset is from the start of the certificate data (the table's first byte).
# KERNEL: drivers/virt/coco/sev-guest/sev-guest.c struct snp_msg_cert_entry { guid_t guid;
# u32 offset; u32 length; } and sev_report_new(): entries are read until guid_is_null() &&
# !offset && !length, and the data a guest may use ends at offset + length inside the
# buffer it handed over (certs_size bounded by ext_size).
ENTRY_SIZE = 24


def pack_entry(guid: bytes, offset: int, length: int) -> bytes:
    return guid + offset.to_bytes(4, "little") + length.to_bytes(4, "little")


def layout_walk(blob: bytes) -> list[tuple[bytes, int, int]] | None:
    """(guid, offset, length) up to the zero entry; None when the zero entry never comes."""
    out = []
    for pos in range(0, len(blob) - ENTRY_SIZE + 1, ENTRY_SIZE):
        guid = blob[pos : pos + 16]
        offset = int.from_bytes(blob[pos + 16 : pos + 20], "little")
        length = int.from_bytes(blob[pos + 20 : pos + 24], "little")
        if guid == bytes(16) and offset == 0 and length == 0:
            return out
        out.append((guid, offset, length))
    return None


GUID_BYTES = st.sampled_from(
    [g.bytes for g in (cert_table.VCEK, cert_table.ASK, cert_table.ARK, cert_table.VLEK)]
)


@st.composite
def tables(draw: st.DrawFn) -> bytes:
    """A table of n entries, a zero entry and a data area; each entry's offset/length either
    inside the data area or anywhere in u32 (past the end, wrapping in 32 bits, ...)."""
    n = draw(st.integers(0, 4))
    data = draw(st.binary(max_size=200))
    header = ENTRY_SIZE * (n + 1)
    total = header + len(data)
    entries = b""
    for _ in range(n):
        if draw(st.integers(0, 3)) and data:  # mostly in bounds
            start = draw(st.integers(header, total - 1))
            length = draw(st.integers(1, total - start))
        else:
            start = draw(st.one_of(st.integers(0, total + 8), st.integers(2**32 - 64, 2**32 - 1)))
            length = draw(st.one_of(st.integers(0, 64), st.integers(2**32 - 64, 2**32 - 1)))
        entries += pack_entry(draw(GUID_BYTES), start, length)
    return entries + bytes(ENTRY_SIZE) + data


@settings(max_examples=examples(300))
@given(st.one_of(tables(), st.binary(max_size=512)))
def test_certificate_table_keeps_every_certificate_inside_the_buffer(blob: bytes) -> None:
    """Each entry before the zero entry must lie inside the buffer (offset + length, in
    unbounded arithmetic, at most the buffer's length); such a table parses to exactly the
    bytes the layout names, one that does not is refused."""
    walked = layout_walk(blob)
    if walked is None:
        event("no zero entry")
        with pytest.raises(ValueError):
            cert_table.parse(blob)
        return
    table_end = ENTRY_SIZE * (len(walked) + 1)
    if any(off + length > len(blob) for _, off, length in walked):
        event("an entry points past the buffer")
        with pytest.raises(ValueError):
            cert_table.parse(blob)
        return
    got_or_refused: list[tuple[uuid.UUID, bytes]] | None
    try:
        got_or_refused = cert_table.parse(blob)
    except ValueError:
        got_or_refused = None
    if any(off < table_end for _, off, _ in walked):
        # a certificate that starts inside the table itself: the layout puts the data after
        # the table, but neither it nor the kernel says a reader must refuse this; either
        # answer is allowed, and an accepted table must still name the layout's bytes
        event("an entry points into the table")
        if got_or_refused is not None:
            assert [(g.bytes, der) for g, der in got_or_refused] == [
                (guid, blob[off : off + length]) for guid, off, length in walked
            ]
        return
    event(f"{len(walked)} entries, all inside the data")
    assert got_or_refused is not None
    assert [(g.bytes, der) for g, der in got_or_refused] == [
        (guid, blob[off : off + length]) for guid, off, length in walked
    ]


def _one_entry(offset: int, length: int, data: bytes = b"0123456789") -> bytes:
    return pack_entry(cert_table.VCEK.bytes, offset, length) + bytes(ENTRY_SIZE) + data


@pytest.mark.parametrize(
    ("offset", "length"),
    [
        (48, 11),  # one byte past the 58-byte buffer
        (58, 1),  # starts at the end of the buffer
        (49, 10),  # ends one byte past
        (0xFFFFFFFF, 1),  # far past
        (48, 0xFFFFFFFF),  # length past
        (0xFFFFFFF8, 0x10),  # offset + length wraps to 8 in 32-bit arithmetic
    ],
)
def test_certificate_table_refuses_an_entry_outside_its_data(offset: int, length: int) -> None:
    with pytest.raises(ValueError):
        cert_table.parse(_one_entry(offset, length))


@pytest.mark.parametrize(("offset", "length"), [(48, 10), (48, 1), (57, 1), (50, 8)])
def test_certificate_table_takes_an_entry_up_to_the_last_byte(offset: int, length: int) -> None:
    blob = _one_entry(offset, length)
    assert cert_table.parse(blob) == [(cert_table.VCEK, blob[offset : offset + length])]


def test_certificate_table_without_a_zero_entry_is_refused() -> None:
    blob = pack_entry(cert_table.VCEK.bytes, 24, 0) * 3  # three entries, no terminator
    with pytest.raises(ValueError):
        cert_table.parse(blob)


# SPEC: AMD SEV-SNP Firmware ABI specification, ATTESTATION_REPORT structure: the offsets
# below are written from that table, not from report.py
REPORT_FIELDS = {
    "version": (0x000, 4),
    "guest_svn": (0x004, 4),
    "policy": (0x008, 8),
    "vmpl": (0x030, 4),
    "signature_algo": (0x034, 4),
    "current_tcb": (0x038, 8),
    "platform_info": (0x040, 8),
    "reported_tcb": (0x180, 8),
    "committed_tcb": (0x1E0, 8),
    "launch_tcb": (0x1F0, 8),
}
REPORT_BYTES = {
    "family_id": (0x010, 0x020),
    "image_id": (0x020, 0x030),
    "report_data": (0x050, 0x090),
    "measurement": (0x090, 0x0C0),
    "host_data": (0x0C0, 0x0E0),
    "id_key_digest": (0x0E0, 0x110),
    "author_key_digest": (0x110, 0x140),
    "report_id": (0x140, 0x160),
    "report_id_ma": (0x160, 0x180),
    "chip_id": (0x1A0, 0x1E0),
}


@settings(max_examples=examples(120))
@given(
    st.one_of(
        st.binary(min_size=0x4A0, max_size=0x4A0),  # the only accepted size, drawn on purpose
        st.binary(min_size=0x4A0 - 2, max_size=0x4A0 + 2),
        st.binary(max_size=2048),
    )
)
def test_report_parser_takes_exactly_1184_bytes(raw: bytes) -> None:
    if len(raw) != 0x4A0:  # SPEC: ATTESTATION_REPORT is 4A0h bytes
        event("wrong size")
        with pytest.raises(ValueError):
            report.parse(raw)
        return
    event("1184 bytes")
    fields = report.parse(raw)
    for name, (off, size) in REPORT_FIELDS.items():
        assert fields[name] == int.from_bytes(raw[off : off + size], "little"), name
    for name, (start, end) in REPORT_BYTES.items():
        assert fields[name] == raw[start:end], name


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
