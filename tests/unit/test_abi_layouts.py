"""The abi codecs byte by byte against layouts written here from the kernel headers and the AMD
specifications: every offset, width and bit position below is a literal taken from the source
named next to it, never from snpemu.abi. Each test pins down what a mutant of the codec would
get wrong (a moved field, a bounds check off by one, a flipped condition)."""

from __future__ import annotations

import struct
import uuid

import numpy as np
import pytest
from snpemu.abi import cert_table, ghcb, msr_protocol, psc, report, rmp_batch, virtio

# --- the extended-request certificate table ------------------------------------------------------
# SPEC: GHCB specification (AMD 56421) "SNP Extended Guest Request": the certificate table is
# entries of {GUID (16 bytes), u32 offset, u32 length}, offsets from the start of the table,
# ended by an all-zero entry. GUIDs in RFC 4122 byte order (uuid.UUID.bytes).

VCEK = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd")


def entry(guid: bytes, offset: int, length: int) -> bytes:
    assert len(guid) == 16
    return guid + offset.to_bytes(4, "little") + length.to_bytes(4, "little")


def test_a_table_written_by_hand_parses() -> None:
    der = b"0123456789"
    blob = entry(VCEK.bytes, 48, len(der)) + bytes(24) + der
    assert cert_table.parse(blob) == [(VCEK, der)]
    assert cert_table.build([(VCEK, der)]) == blob


def test_an_entry_may_end_exactly_at_the_end_of_the_data() -> None:
    blob = entry(VCEK.bytes, 48, 4) + bytes(24) + b"DER!"
    assert cert_table.parse(blob) == [(VCEK, b"DER!")]
    # one byte further is outside the data
    with pytest.raises(ValueError, match="points outside the table's data"):
        cert_table.parse(entry(VCEK.bytes, 48, 5) + bytes(24) + b"DER!")
    # an offset one past the data with length 0 as well (48 + 0 > 48 is false: that one is in)
    assert cert_table.parse(entry(VCEK.bytes, 48, 0) + bytes(24)) == [(VCEK, b"")]
    with pytest.raises(ValueError, match="points outside"):
        cert_table.parse(entry(VCEK.bytes, 49, 0) + bytes(24))


def test_an_offset_back_into_the_entries_is_refused() -> None:
    """An offset into the entry itself (or the terminator): the data starts after the entry."""
    data = b"x" * 64
    for offset in (0, 8, 23):
        with pytest.raises(ValueError, match="points outside the table's data"):
            cert_table.parse(entry(VCEK.bytes, offset, 1) + bytes(24) + data)
    # the first byte after this entry is allowed (it is the terminator here, but in range)
    assert cert_table.parse(entry(VCEK.bytes, 24, 24) + bytes(24)) == [(VCEK, bytes(24))]
    # for the second entry the bound is 48, not 24: an offset of 40 is inside entry two
    two = entry(VCEK.bytes, 72, 1) + entry(VCEK.bytes, 40, 1) + bytes(24) + data
    with pytest.raises(ValueError, match="entry 1 points outside"):
        cert_table.parse(two)
    two_ok = entry(VCEK.bytes, 72, 1) + entry(VCEK.bytes, 48, 1) + bytes(24) + data
    assert [d for _, d in cert_table.parse(two_ok)] == [b"x", bytes(1)]


def test_a_length_past_the_end_is_refused_even_at_a_small_offset() -> None:
    # offset 48 + length 17 = 65 > 64 bytes of blob (offset - length would be 31, in range)
    blob = entry(VCEK.bytes, 48, 17) + bytes(24) + b"y" * 16
    with pytest.raises(ValueError, match="points outside"):
        cert_table.parse(blob)


def test_only_an_all_zero_entry_ends_the_table() -> None:
    # a zero GUID with an offset and length is an entry, not the end
    zero_guid = entry(bytes(16), 48, 2) + bytes(24) + b"ab"
    assert cert_table.parse(zero_guid) == [(uuid.UUID(int=0), b"ab")]
    # a zero GUID and offset with a length is out of bounds, not the end
    with pytest.raises(ValueError, match="points outside"):
        cert_table.parse(entry(bytes(16), 0, 2) + bytes(24))
    # a GUID with offset and length zero is out of bounds (offset 0 is inside the entries)
    with pytest.raises(ValueError, match="points outside"):
        cert_table.parse(entry(VCEK.bytes, 0, 0) + bytes(24))


def test_a_table_without_its_zero_entry_is_refused() -> None:
    one = entry(VCEK.bytes, 24, 0)  # valid, but nothing ends the table
    with pytest.raises(ValueError, match=r"^certificate table has no terminating zero entry$"):
        cert_table.parse(one)
    # 23 trailing bytes cannot hold another entry: still "no terminator", not a struct error
    with pytest.raises(ValueError, match=r"^certificate table has no terminating zero entry$"):
        cert_table.parse(one + b"\xff" * 23)
    with pytest.raises(ValueError, match=r"^certificate table has no terminating zero entry$"):
        cert_table.parse(b"")


# --- ATTESTATION_REPORT --------------------------------------------------------------------------
# SPEC: SEV-SNP Firmware ABI (AMD 56860) Table "ATTESTATION_REPORT Structure"; the same offsets
# are in the kernel's include/uapi/linux/sev-guest.h users and go-sev-guest's abi.go.
REPORT_FIELDS = {  # name: (offset, width; 4/8 = little-endian integer, other = bytes)
    "version": (0x000, 4),
    "guest_svn": (0x004, 4),
    "policy": (0x008, 8),
    "family_id": (0x010, 16),
    "image_id": (0x020, 16),
    "vmpl": (0x030, 4),
    "signature_algo": (0x034, 4),
    "current_tcb": (0x038, 8),
    "platform_info": (0x040, 8),
    "signer_info": (0x048, 4),
    "report_data": (0x050, 64),
    "measurement": (0x090, 48),
    "host_data": (0x0C0, 32),
    "id_key_digest": (0x0E0, 48),
    "author_key_digest": (0x110, 48),
    "report_id": (0x140, 32),
    "report_id_ma": (0x160, 32),
    "reported_tcb": (0x180, 8),
    "chip_id": (0x1A0, 64),
    "committed_tcb": (0x1E0, 8),
    "launch_tcb": (0x1F0, 8),
}
INT_FIELDS = {"version", "guest_svn", "policy", "vmpl", "signature_algo", "current_tcb"} | {
    "platform_info",
    "signer_info",
    "reported_tcb",
    "committed_tcb",
    "launch_tcb",
}


def test_report_parse_reads_every_field_at_its_abi_offset() -> None:
    raw = bytearray(0x4A0)
    want: dict[str, object] = {}
    for i, (name, (off, width)) in enumerate(REPORT_FIELDS.items()):
        # distinct bytes per field, the top byte of integers set so a narrow read shows
        value = bytes((i * 16 + j + 1) & 0xFF for j in range(width - 1)) + bytes([0x80 | i])
        raw[off : off + width] = value
        want[name] = int.from_bytes(value, "little") if name in INT_FIELDS else value
    assert report.parse(bytes(raw)) == want


@pytest.mark.parametrize("size", [0, 0x49F, 0x4A1, 4096])
def test_report_parse_refuses_any_other_size(size: int) -> None:
    with pytest.raises(ValueError, match=f"^an attestation report is 1184 bytes, got {size}$"):
        report.parse(bytes(size))


# --- the GHCB page -------------------------------------------------------------------------------
# KERNEL: arch/x86/include/asm/svm.h struct ghcb_save_area (offsets checked there by
# BUILD_BUG_RESERVED_OFFSET) and struct ghcb: save area at 0, shared_buffer[2032] at 0x800,
# protocol_version u16 at 0xFFA, ghcb_usage u32 at 0xFFC; valid_bitmap[16] at 0x3F0, a field's bit
# being offsetof(struct ghcb_save_area, field) / sizeof(u64) (GHCB_BITMAP_IDX()).
GHCB_OFFSETS = {
    "cpl": 0x0CB,
    "xss": 0x140,
    "dr7": 0x160,
    "rip": 0x178,
    "rsp": 0x1D8,
    "rax": 0x1F8,
    "rcx": 0x308,
    "rdx": 0x310,
    "rbx": 0x318,
    "sw_exit_code": 0x390,
    "sw_exit_info_1": 0x398,
    "sw_exit_info_2": 0x3A0,
    "sw_scratch": 0x3A8,
    "xcr0": 0x3E8,
}


def test_ghcb_decode_reads_the_kernels_layout() -> None:
    page = bytearray(4096)
    for i, (name, off) in enumerate(GHCB_OFFSETS.items()):
        if name == "cpl":
            page[off] = 0x83  # u8 cpl
        else:
            page[off : off + 8] = (0x8000_0000_0000_0000 | i << 8 | 0x11).to_bytes(8, "little")
    page[0x0CC] = 0x5A  # reserved_0xcc: not part of cpl
    page[0x3F0:0x400] = (1 << 127 | 1 << 62 | 1).to_bytes(16, "little")
    page[0x400:0x408] = b"\x87" * 8  # x87_state_gpa, right after the bitmap: not part of it
    page[0x800:0xFF0] = bytes(range(256)) * 7 + bytes(range(240))
    page[0xFF0:0xFFA] = b"\xee" * 10  # reserved_0xff0: not part of the buffer
    struct.pack_into("<HI", page, 0xFFA, 0xBEEF, 0xDEADBEEF)
    decoded = ghcb.Ghcb.decode(bytes(page))
    assert decoded.fields == {
        name: 0x83 if name == "cpl" else 0x8000_0000_0000_0000 | i << 8 | 0x11
        for i, name in enumerate(GHCB_OFFSETS)
    }
    assert decoded.valid == 1 << 127 | 1 << 62 | 1
    assert bytes(decoded.shared) == bytes(page[0x800:0xFF0]) and len(decoded.shared) == 2032
    assert (decoded.version, decoded.usage) == (0xBEEF, 0xDEADBEEF)
    # a full page out again, byte for byte, but the bytes the codec does not keep
    page[0xFF0:0xFFA] = bytes(10)
    page[0x0CC] = 0
    page[0x400:0x408] = bytes(8)
    assert decoded.encode() == bytes(page)


@pytest.mark.parametrize("size", [0, 4095, 4097])
def test_ghcb_decode_refuses_a_short_or_long_page(size: int) -> None:
    with pytest.raises(ValueError, match=r"^a GHCB is 4096 bytes$"):
        ghcb.Ghcb.decode(bytes(size))


def test_ghcb_valid_bits_are_the_kernels_bitmap_index() -> None:
    g = ghcb.Ghcb()
    g.set("rax", 2**64 + 5)  # stored as the u64 the field holds
    g.set("sw_exit_code", 0x72)
    g.set("cpl", 0x1FF)  # u8
    assert g.valid == 1 << (0x1F8 // 8) | 1 << (0x390 // 8) | 1 << (0x0CB // 8)
    assert (g.get("rax"), g.get("sw_exit_code"), g.get("cpl")) == (5, 0x72, 0xFF)
    assert g.is_valid("rax") and g.is_valid("cpl") and not g.is_valid("rbx")
    assert g.get("rbx") == 0
    page = g.encode()
    assert page[0x1F8:0x200] == (5).to_bytes(8, "little")
    assert page[0x0CB] == 0xFF and page[0x0CC] == 0
    assert int.from_bytes(page[0x3F0:0x400], "little") == g.valid
    # the bitmap's top bits are not lost: bit 127 lives in the last byte
    g.valid |= 1 << 127
    assert ghcb.Ghcb.decode(g.encode()).is_valid("xcr0") is False
    assert ghcb.Ghcb.decode(g.encode()).valid >> 127 == 1


def test_ghcb_is_valid_reads_exactly_the_fields_bit() -> None:
    for name, off in GHCB_OFFSETS.items():
        only = ghcb.Ghcb(valid=1 << (off // 8))
        assert [n for n in GHCB_OFFSETS if only.is_valid(n)] == [name]


# --- the GHCB MSR protocol -----------------------------------------------------------------------
# KERNEL: arch/x86/include/asm/sev-common.h GHCB_MSR_SEV_INFO(), GHCB_CPUID_REQ(),
# GHCB_MSR_PSC_REQ_GFN(), GHCB_SEV_TERM_REASON() and the GHCB_MSR_*_POS/_MASK definitions.


def test_sev_info_response() -> None:
    # GHCB_MSR_SEV_INFO(max, min, cbit): max 63:48, min 47:32, cbit 31:24, 0x001
    assert msr_protocol.sev_info(51) == 2 << 48 | 1 << 32 | 51 << 24 | 0x001
    assert msr_protocol.sev_info(47, max_version=1) == 0x0001_0001_2F00_0001


def test_cpuid_request_and_response() -> None:
    # GHCB_CPUID_REQ(fn, reg): fn 63:32, reg 31:30, 0x004
    req = 0x8000_001F << 32 | 3 << 30 | 0x004
    assert msr_protocol.cpuid_request(req) == (0x8000_001F, 3)
    assert msr_protocol.cpuid_request(0x7 << 32 | 1 << 30 | 0x004) == (7, 1)
    # response: value 63:32, reg 31:30, GHCB_MSR_CPUID_RESP 0x005
    assert msr_protocol.cpuid_response(2, 0x1_DEAD_BEEF) == 0xDEAD_BEEF << 32 | 2 << 30 | 0x005


def test_psc_request_and_other_fields() -> None:
    # GHCB_MSR_PSC_REQ_GFN(gfn, op): op 55:52, gfn 51:12 (40 bits), 0x014
    raw = 0xF << 60 | 2 << 52 | 0xAB_CDEF_0123 << 12 | 0x014
    assert msr_protocol.psc_request(raw) == (0xAB_CDEF_0123, 2)
    assert msr_protocol.psc_request(1 << 52 | 0xFF_FFFF_FFFF << 12 | 0x014) == (2**40 - 1, 1)
    # GHCB_SEV_TERM_REASON(set, code): set 15:12, code 23:16, 0x100
    assert msr_protocol.term_reason(0xFF << 24 | 0x5A << 16 | 0x3 << 12 | 0x100) == (3, 0x5A)
    assert msr_protocol.term_reason(0xF << 12 | 0x100) == (0xF, 0)
    # GHCB_MSR_REG_GPA_REQ: gfn in 63:12
    assert msr_protocol.gfn_of(0x1234_5678_9000 | 0x012) == 0x1_2345_6789


# --- rmp's packed RMPUPDATE batch entry ----------------------------------------------------------
# KERNEL: arch/x86/include/asm/sev.h struct rmp_state { u64 gpa; u8 assigned; u8 pagesize;
# u8 immutable; u8 rsvd; u32 asid; } after the u64 SPA: 24 bytes, little-endian.


def test_rmp_batch_entries_are_the_kernels_rmp_state() -> None:
    out = rmp_batch.pack(
        spa=[0x1000, 0xFFFF_F000],
        gpa=[0x2000, 0],
        assigned=[True, False],
        asid=[7, 0],
        immutable=[False, True],
    )
    want = struct.pack("<QQBBBBI", 0x1000, 0x2000, 1, 0, 0, 0, 7) + struct.pack(
        "<QQBBBBI", 0xFFFF_F000, 0, 0, 0, 1, 0, 0
    )
    assert out == want
    # one value for every entry
    assert rmp_batch.pack(np.array([0x5000, 0x6000]), gpa=9, assigned=True, asid=3) == struct.pack(
        "<QQBBBBI", 0x5000, 9, 1, 0, 0, 0, 3
    ) + struct.pack("<QQBBBBI", 0x6000, 9, 1, 0, 0, 0, 3)
    # defaults: shared, ASID 0, not immutable
    assert rmp_batch.pack([0x7000]) == struct.pack("<QQBBBBI", 0x7000, 0, 0, 0, 0, 0, 0)


# --- the Page State Change descriptor ------------------------------------------------------------
# KERNEL: arch/x86/include/asm/sev-common.h struct psc_hdr { u16 cur_entry; u16 end_entry;
# u32 reserved; } and struct psc_entry { u64 cur_page:12, gfn:40, operation:4, pagesize:1,
# reserved:7; }; VMGEXIT_PSC_MAX_COUNT 253.


def test_psc_entry_bitfields() -> None:
    raw = 0x7F << 57 | 1 << 56 | 0xA << 52 | 0xFF_1234_5678 << 12 | 0x1FF
    e = psc.Entry.decode(raw)
    assert (e.cur_page, e.gfn, e.op, e.size_2m, e.reserved) == (
        0x1FF,
        0xFF_1234_5678,
        0xA,
        True,
        0x7F,
    )
    assert e.encode() == raw and e.npages == 512
    f = psc.Entry.decode(1 << 52 | 0x400 << 12)
    assert (f.cur_page, f.gfn, f.op, f.size_2m, f.reserved, f.npages) == (0, 0x400, 1, False, 0, 1)
    # encode keeps each value inside its bits
    wide = psc.Entry(cur_page=0x1FFF, gfn=2**41 - 1, op=0x1F, size_2m=False, reserved=0xFF)
    assert wide.encode() == 0x7F << 57 | 0xF << 52 | (2**40 - 1) << 12 | 0xFFF
    # a GFN wider than 40 bits does not spill into the operation
    assert psc.Entry(0, 2**41 - 1, 0, False).encode() == (2**40 - 1) << 12


def test_psc_descriptor_reads_the_header_and_at_most_253_entries() -> None:
    entries = [(i << 12 | i) for i in range(1, 260)]
    buf = struct.pack("<HHI", 0x102, 0x304, 0xA0B0C0D0) + struct.pack(f"<{len(entries)}Q", *entries)
    d = psc.Descriptor.decode(buf)
    assert (d.cur_entry, d.end_entry, d.reserved) == (0x102, 0x304, 0xA0B0C0D0)
    assert len(d.entries) == 253 and d.entries[252].gfn == 253 and d.entries[0].cur_page == 1
    # a scratch area of 8 + 8n bytes (n < 253) holds n entries; a partial entry is not one
    short = psc.Descriptor.decode(buf[: 8 + 8 * 5 + 7])
    assert [e.gfn for e in short.entries] == [1, 2, 3, 4, 5]
    out = bytearray(8 + 8 * 253)
    d.encode_into(out)
    assert bytes(out) == buf[: 8 + 8 * 253]


def test_psc_header_and_entry_checks() -> None:
    """KERNEL: arch/x86/kvm/svm/sev.c snp_begin_psc(): `idx_end >= max_nr_entries` is
    INVALID_HDR; `cur_page > npages || !IS_ALIGNED(gfn, npages)` is INVALID_ENTRY."""

    def desc(end: int, n: int) -> psc.Descriptor:
        return psc.Descriptor(0, end, 0, [psc.Entry(0, 0, 1, False)] * n)

    assert psc.check_header(desc(252, 253)) and not psc.check_header(desc(253, 253))
    assert psc.check_header(desc(0, 1)) and not psc.check_header(desc(1, 1))
    assert not psc.check_header(desc(0, 0))
    ok = [(0, 0x1234, False), (1, 0x1234, False), (512, 0x400, True), (0, 0x200, True)]
    bad = [(2, 0x10, False), (513, 0x400, True), (0, 0x401, True), (0, 0x300, True)]
    for cur, gfn, big in ok:
        assert psc.check_entry(psc.Entry(cur, gfn, 1, big)), (cur, gfn, big)
    for cur, gfn, big in bad:
        assert not psc.check_entry(psc.Entry(cur, gfn, 2, big)), (cur, gfn, big)


# --- the split virtqueue and virtio-net --------------------------------------------------------
# SPEC: virtio 1.2 (OASIS) 2.7 "Split Virtqueues": descriptor table 16 * N bytes (16-byte
# aligned), available ring 6 + 2 * N (flags, idx, ring[N], used_event; 2-aligned), used ring
# 6 + 8 * N (flags, idx, ring[N] of {le32 id; le32 len}, avail_event; 4-aligned).


@pytest.mark.parametrize(
    ("n", "avail", "used", "end"),
    # avail = 16n; used = avail + 6 + 2n rounded up to 4; end = used + 6 + 8n
    [
        (1, 16, 24, 38),
        (2, 32, 44, 66),
        (4, 64, 80, 118),
        (8, 128, 152, 222),
        (128, 2048, 2312, 3342),
    ],
)
def test_virtqueue_layout_offsets(n: int, avail: int, used: int, end: int) -> None:
    lay = virtio.Layout(n)
    assert (lay.avail, lay.avail_idx, lay.used, lay.used_idx, lay.end) == (
        avail,
        avail + 2,
        used,
        used + 2,
        end,
    )
    assert [lay.avail_slot(i) for i in (0, n - 1, n, n + 1)] == [
        avail + 4,
        avail + 4 + 2 * (n - 1),
        avail + 4,
        avail + 4 + 2 * (1 % n),
    ]
    assert [lay.used_slot(i) for i in (0, n - 1, n)] == [used + 4, used + 4 + 8 * (n - 1), used + 4]
    assert [lay.desc(i) for i in (0, 1, n - 1)] == [0, 16, 16 * (n - 1)]


@pytest.mark.parametrize("n", [0, 3, 6, 100, 129, 256, -1])
def test_virtqueue_sizes_are_powers_of_two_up_to_128(n: int) -> None:
    with pytest.raises(
        virtio.VirtioError, match=f"^queue size {n} is not a power of two in 1..128$"
    ):
        virtio.check_queue_size(n)


def test_virtqueue_descriptor_and_empty_ring() -> None:
    # struct vring_desc: le64 addr; le32 len; le16 flags; le16 next (2.7.5)
    d = virtio.Desc(0x1122_3344_5566_7788, 0x99AA_BBCC, 0xDDEE, 0x0F1E)
    assert d.encode() == struct.pack("<QIHH", 0x1122_3344_5566_7788, 0x99AA_BBCC, 0xDDEE, 0x0F1E)
    assert virtio.Desc.decode(d.encode()) == d
    for size in (15, 17):
        with pytest.raises(virtio.VirtioError, match=f"^a descriptor is 16 bytes, not {size}$"):
            virtio.Desc.decode(bytes(size))
    ring = virtio.empty_ring(4, 0x10_0000, 2048, device_writes=True)
    assert len(ring) == 4096
    want = b"".join(struct.pack("<QIHH", 0x10_0000 + 2048 * i, 2048, 2, 0) for i in range(4))
    assert ring[:64] == want and ring[64:] == bytes(4096 - 64)  # VRING_DESC_F_WRITE = 2
    tx = virtio.empty_ring(2, 0x2000, 512, device_writes=False)
    assert tx[:32] == struct.pack("<QIHH", 0x2000, 512, 0, 0) + struct.pack(
        "<QIHH", 0x2200, 512, 0, 0
    )


def test_mac_addresses() -> None:
    assert virtio.mac_bytes("02:00:0a:FF:10:01") == bytes([2, 0, 0x0A, 0xFF, 0x10, 1])
    assert virtio.mac_text(bytes([2, 0, 0x0A, 0xFF, 0x10, 1])) == "02:00:0a:ff:10:01"
    for bad in ("02:00:00:00:00", "02:00:00:00:00:01:02", "2:00:00:00:00:01", "02:00:00:00:00:001"):
        with pytest.raises(virtio.VirtioError, match="is not six hex octets like"):
            virtio.mac_bytes(bad)
    with pytest.raises(
        virtio.VirtioError, match=r"^MAC '02:00:00:00:00:zz' is not six hex octets$"
    ):
        virtio.mac_bytes("02:00:00:00:00:zz")
    # IEEE 802: the I/G bit (bit 0 of the first octet) set is a group address
    with pytest.raises(virtio.VirtioError, match=r"^MAC 03:00:00:00:00:01 is a multicast address$"):
        virtio.mac_bytes("03:00:00:00:00:01")
    assert virtio.mac_bytes("fe:ff:ff:ff:ff:ff")[0] == 0xFE


def test_frames() -> None:
    # virtio 1.2 5.1.6: struct virtio_net_hdr_v1 (12 bytes) then the Ethernet frame
    hdr = struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, 1)
    eth = bytes([2, 0, 0, 0, 0, 2]) + bytes([2, 0, 0, 0, 0, 1]) + b"\x88\xb5"
    raw = virtio.frame("02:00:00:00:00:02", "02:00:00:00:00:01", b"hello")
    assert raw == hdr + eth + b"hello"
    f = virtio.parse_frame(raw)
    assert (f.dst, f.src, f.ethertype, f.payload) == (eth[:6], eth[6:12], 0x88B5, b"hello")
    # 1514 bytes (14 + 1500) is the largest frame without FCS; one more is refused
    assert len(virtio.frame("02:00:00:00:00:02", "02:00:00:00:00:01", bytes(1500))) == 12 + 1514
    with pytest.raises(
        virtio.VirtioError, match=r"^payload of 1501 bytes exceeds the 1514-byte frame$"
    ):
        virtio.frame("02:00:00:00:00:02", "02:00:00:00:00:01", bytes(1501))
    assert virtio.parse_frame(hdr + eth + bytes(1500)).payload == bytes(1500)
    with pytest.raises(virtio.VirtioError, match=r"^a 1515-byte frame exceeds 1514 bytes$"):
        virtio.parse_frame(hdr + eth + bytes(1501))
    # the shortest: a header and an Ethernet header, no payload
    assert virtio.parse_frame(hdr + eth).payload == b""
    with pytest.raises(
        virtio.VirtioError, match=r"^25 bytes is shorter than a header and an Ethernet header$"
    ):
        virtio.parse_frame((hdr + eth)[:-1])
    # VIRTIO_NET_HDR_F_NEEDS_CSUM (1) is accepted; any other flag, or GSO, is not
    assert virtio.parse_frame(b"\x01" + hdr[1:] + eth).ethertype == 0x88B5
    for flags, gso in ((2, 0), (0x80, 0), (0, 1), (0, 0x80)):
        with pytest.raises(virtio.VirtioError, match=f"flags {flags:#x}, gso {gso}"):
            virtio.parse_frame(bytes([flags, gso]) + hdr[2:] + eth)
