"""The extended-request certificate table: {GUID[16]; u32 offset; u32 length} entries ended by
an all-zero entry, offsets from the start of the data, certificates in DER (docs/abi.md#cert-table).
GUIDs are stored in RFC 4122 byte order, as go-sev-guest and virtee write them."""

from __future__ import annotations

import struct
import uuid

VCEK = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd")
VLEK = uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1")
ASK = uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782")
ARK = uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae")
ENTRY = struct.Struct("<16sII")


def build(entries: list[tuple[uuid.UUID, bytes]]) -> bytes:
    header = ENTRY.size * (len(entries) + 1)
    table, blobs = b"", b""
    for guid, der in entries:
        table += ENTRY.pack(guid.bytes, header + len(blobs), len(der))
        blobs += der
    return table + bytes(ENTRY.size) + blobs


def parse(blob: bytes) -> list[tuple[uuid.UUID, bytes]]:
    """Entries until the zero entry; ValueError on an entry pointing outside the data."""
    out: list[tuple[uuid.UUID, bytes]] = []
    for off in range(0, len(blob) - ENTRY.size + 1, ENTRY.size):
        raw, start, length = ENTRY.unpack_from(blob, off)
        if raw == bytes(16) and start == 0 and length == 0:
            return out
        if start < off + ENTRY.size or start + length > len(blob):
            raise ValueError(f"certificate entry {len(out)} points outside the table's data")
        out.append((uuid.UUID(bytes=raw), blob[start : start + length]))
    raise ValueError("certificate table has no terminating zero entry")
