"""Split virtqueues against layouts written here from the virtio 1.2 specification: rings built
byte by byte with struct.pack drive netd's device side, and what netd writes back is read
with this file's own parser (snpemu.abi.virtio is not used to build or read anything here).

SPEC: virtio 1.2 (OASIS), 2.7 "Split Virtqueues":
    struct virtq_desc  { le64 addr; le32 len; le16 flags; le16 next; }            (2.7.5)
    VIRTQ_DESC_F_NEXT 1, VIRTQ_DESC_F_WRITE 2, VIRTQ_DESC_F_INDIRECT 4
    struct virtq_avail { le16 flags; le16 idx; le16 ring[N]; le16 used_event; }   (2.7.6)
    struct virtq_used  { le16 flags; le16 idx; struct virtq_used_elem ring[N];
                         le16 avail_event; }                                      (2.7.8)
    struct virtq_used_elem { le32 id; le32 len; }
    alignment / size: descriptor table 16 / 16*N, available ring 2 / 6+2*N, used ring
    4 / 6+8*N; N a power of 2; idx wraps at 65536 and ring[idx % N] is the slot (2.7.13);
    "len the total of bytes written into the buffer"; "The device MUST set len prior to
    updating the used idx"; "A device MUST NOT write to a device-readable buffer".
KERNEL: include/uapi/linux/virtio_ring.h vring_init(): the three parts packed in one area,
the used ring at the next VRING_USED_ALIGN_SIZE (4) boundary after avail->ring[num] and
used_event. snpemu puts one queue's three parts in one 4 KiB page that way.
SPEC: virtio 1.2 5.1.6: struct virtio_net_hdr (with VIRTIO_F_VERSION_1, 12 bytes):
    u8 flags; u8 gso_type; le16 hdr_len; le16 gso_size; le16 csum_start; le16 csum_offset;
    le16 num_buffers;  VIRTIO_NET_HDR_GSO_NONE 0
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from snpemu.abi import virtio
from snpemu.netd.daemon import NetDaemon, Result, Ring, VmRef, WriteOutcome

from tests.conftest import examples

PAGE = 4096
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
NET_HDR_LEN = 12
ETHERTYPE = 0x88B5  # IEEE 802 Local Experimental EtherType 1, as netd's guests use
MAC_A, MAC_B = bytes.fromhex("02000000000a"), bytes.fromhex("02000000000b")


def align(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def offsets(n: int) -> tuple[int, int, int, int]:
    """(descriptor table, available ring, used ring, end) of one queue packed in one area."""
    desc = 0
    avail = desc + 16 * n
    used = align(avail + 6 + 2 * n, 4)
    return desc, avail, used, used + 6 + 8 * n


# --- a driver written from the spec ----------------------------------------------------------


def put_desc(page: bytearray, n: int, i: int, addr: int, length: int, flags: int) -> None:
    struct.pack_into("<QIHH", page, offsets(n)[0] + 16 * i, addr, length, flags, 0)


def offer(page: bytearray, n: int, heads: list[int], start_idx: int) -> None:
    """avail->ring[(idx + k) % N] = head, then avail->idx += len(heads) (2.7.13.2-3)."""
    avail = offsets(n)[1]
    for k, head in enumerate(heads):
        struct.pack_into("<H", page, avail + 4 + 2 * ((start_idx + k) % n), head)
    struct.pack_into("<H", page, avail + 2, (start_idx + len(heads)) & 0xFFFF)


def used_ring(page: bytes, n: int, start_idx: int) -> tuple[int, int, list[tuple[int, int]]]:
    """(flags, idx, [(id, len) for the elements since start_idx])."""
    used = offsets(n)[2]
    flags, idx = struct.unpack_from("<HH", page, used)
    count = (idx - start_idx) & 0xFFFF
    elems = [
        struct.unpack_from("<II", page, used + 4 + 8 * ((start_idx + k) % n)) for k in range(count)
    ]
    return flags, idx, elems


def net_frame(dst: bytes, src: bytes, payload: bytes) -> bytes:
    hdr = struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, 1)  # no offload, GSO_NONE, one buffer
    return hdr + dst + src + struct.pack("!H", ETHERTYPE) + payload


class Memory:
    """Two guests' memory, flat; writes are recorded in order."""

    def __init__(self) -> None:
        self.mem = bytearray(2 << 20)
        self.writes: list[tuple[int, bytes]] = []

    async def read(self, spa: int, length: int) -> bytes:
        return bytes(self.mem[spa : spa + length])

    async def write(self, spa: int, data: bytes) -> WriteOutcome:
        self.writes.append((spa, bytes(data)))
        self.mem[spa : spa + len(data)] = data
        return WriteOutcome.NONE


BASE = {"vm-a": 0, "vm-b": 1 << 20}


class Vmm:
    async def memory_map(
        self, vm: VmRef, populate: list[tuple[int, int]]
    ) -> list[tuple[int, int, int]]:
        return [(0, BASE[vm.id], 1 << 20)]


RX_RING, TX_RING, BUFFERS = 0x0, 0x1000, 0x2000
BUF = 2048


class Guest:
    def __init__(self, mem: Memory, vm: str, n: int) -> None:
        self.mem, self.base, self.n = mem, BASE[vm], n
        self.rx = Ring(RX_RING, BUFFERS, n, BUF)
        self.tx = Ring(TX_RING, BUFFERS + n * BUF, n, BUF)
        rx, tx = bytearray(PAGE), bytearray(PAGE)
        for i in range(n):
            put_desc(rx, n, i, self.rx.buffers_gpa + i * BUF, BUF, F_WRITE)
            put_desc(tx, n, i, self.tx.buffers_gpa + i * BUF, BUF, 0)
        offer(rx, n, list(range(n)), 0)
        self.put(RX_RING, rx)
        self.put(TX_RING, tx)

    def put(self, gpa: int, data: bytes) -> None:
        self.mem.mem[self.base + gpa : self.base + gpa + len(data)] = data

    def get(self, gpa: int, length: int) -> bytes:
        return bytes(self.mem.mem[self.base + gpa : self.base + gpa + length])

    def ring(self, gpa: int) -> bytearray:
        return bytearray(self.get(gpa, PAGE))


async def pair(n: int) -> tuple[NetDaemon, Memory, Guest, Guest, str, str]:
    mem = Memory()
    d = NetDaemon(mem, Vmm())
    a, b = Guest(mem, "vm-a", n), Guest(mem, "vm-b", n)
    da = await d.register(VmRef("vm-a"), "02:00:00:00:00:0a", a.rx, a.tx, host=True)
    db = await d.register(VmRef("vm-b"), "02:00:00:00:00:0b", b.rx, b.tx, host=True)
    return d, mem, a, b, da.device_id, db.device_id


# --- the layout -------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 32, 64, 128])
def test_the_parts_sit_where_the_spec_packs_them(n: int) -> None:
    desc, avail, used, end = offsets(n)
    assert desc % 16 == 0 and avail % 2 == 0 and used % 4 == 0 and end <= PAGE
    lay = virtio.Layout(n)
    assert (lay.desc(0), lay.avail, lay.used, lay.end) == (desc, avail, used, end)
    assert (lay.avail_idx, lay.used_idx) == (avail + 2, used + 2)
    for i in (0, 1, n - 1, n, n + 1, 0xFFFF):
        assert lay.avail_slot(i) == avail + 4 + 2 * (i % n)
        assert lay.used_slot(i) == used + 4 + 8 * (i % n)


@pytest.mark.parametrize("n", [0, 3, 6, 100, 256])
def test_queue_sizes_that_are_not_a_power_of_two_or_do_not_fit_are_refused(n: int) -> None:
    """256 is a power of two, but its descriptor table alone fills the page."""
    assert n & (n - 1) or offsets(n)[3] > PAGE or n == 0
    with pytest.raises(virtio.VirtioError):
        virtio.Layout(n)


@pytest.mark.parametrize("device_writes", [True, False])
def test_a_fresh_ring_reads_back_as_the_spec_lays_it_out(device_writes: bool) -> None:
    page = virtio.empty_ring(8, 0x40000, 2048, device_writes=device_writes)
    assert len(page) == PAGE
    for i in range(8):
        addr, length, flags, nxt = struct.unpack_from("<QIHH", page, 16 * i)
        assert (addr, length, flags, nxt) == (0x40000 + i * 2048, 2048, F_WRITE * device_writes, 0)
    _, avail, used, _ = offsets(8)
    assert struct.unpack_from("<HH", page, avail) == (0, 0)  # nothing offered yet
    assert struct.unpack_from("<HH", page, used) == (0, 0)  # the driver zeroes used flags


def test_a_frame_is_the_12_byte_header_then_ethernet() -> None:
    raw = virtio.frame("02:00:00:00:00:0b", "02:00:00:00:00:0a", b"hello")
    assert raw == net_frame(MAC_B, MAC_A, b"hello")


# --- the device side, driven through rings built here ----------------------------------------


@settings(max_examples=examples(40), deadline=None)
@given(
    n=st.sampled_from([1, 2, 4, 8, 128]),
    payloads=st.lists(st.binary(min_size=1, max_size=200), min_size=1, max_size=8),
    start=st.one_of(st.just(0), st.integers(0xFFF0, 0xFFFF)),
    heads=st.randoms(use_true_random=False),
)
async def test_tx_and_rx_follow_the_split_ring_rules(
    n: int, payloads: list[bytes], start: int, heads: object
) -> None:
    """A sends k frames from descriptors it picks in any order, with both avail indexes
    starting at `start` (near 65535: they wrap); B receives them into the buffers it offered,
    in order. Every used element names the head that was offered, in the offered slot, with
    the bytes written; TX buffers, which the device must not write, come back untouched."""
    payloads = payloads[:n]
    k = len(payloads)

    d, mem, a, b, ida, idb = await pair(n)
    # both devices begin at `start`, as after that many buffers (device state: 2.7.13)
    for dev in (d.devices[ida], d.devices[idb]):
        dev.tx_avail = dev.tx_used = dev.rx_avail = dev.rx_used = start
    for guest in (a, b):
        for gpa in (RX_RING, TX_RING):
            page = guest.ring(gpa)
            struct.pack_into("<H", page, offsets(n)[1] + 2, start)  # avail idx
            struct.pack_into("<H", page, offsets(n)[2] + 2, start)  # used idx
            guest.put(gpa, page)
    # B offers all n RX buffers from `start`, heads reversed
    rx = b.ring(RX_RING)
    rx_heads = list(reversed(range(n)))
    offer(rx, n, rx_heads, start)
    b.put(RX_RING, rx)
    # A fills k TX descriptors chosen at random and offers them
    tx_heads = list(range(n))
    heads.shuffle(tx_heads)  # type: ignore[attr-defined]
    tx_heads = tx_heads[:k]
    tx = a.ring(TX_RING)
    frames = [net_frame(MAC_B, MAC_A, p) for p in payloads]
    for head, f in zip(tx_heads, frames, strict=True):
        addr = a.tx.buffers_gpa + head * BUF
        a.put(addr, f)
        put_desc(tx, n, head, addr, len(f), 0)
    offer(tx, n, tx_heads, start)
    a.put(TX_RING, tx)
    tx_before = a.get(a.tx.buffers_gpa, n * BUF)

    results = await d.notify_tx(ida)

    assert results == [Result.DELIVERED] * k
    flags, idx, elems = used_ring(a.get(TX_RING, PAGE), n, start)
    # TX: a device-readable buffer had nothing written into it, so len is 0 (2.7.8)
    assert (flags, idx, elems) == (0, (start + k) & 0xFFFF, [(h, 0) for h in tx_heads])
    assert a.get(a.tx.buffers_gpa, n * BUF) == tx_before
    flags, idx, elems = used_ring(b.get(RX_RING, PAGE), n, start)
    assert (flags, idx) == (0, (start + k) & 0xFFFF)
    assert elems == [(rx_heads[i], len(frames[i])) for i in range(k)]
    for i in range(k):
        assert b.get(b.rx.buffers_gpa + rx_heads[i] * BUF, len(frames[i])) == frames[i]
    # each used element is written before the used idx that publishes it (2.7.8.2):
    # replay the device's writes to the used ring; at every idx write, every element the
    # new idx publishes must already hold its final value
    for guest, ring_gpa in ((a, TX_RING), (b, RX_RING)):
        used = guest.base + ring_gpa + offsets(n)[2]
        final = used_ring(guest.get(ring_gpa, PAGE), n, start)[2]
        shadow = bytearray(mem.mem[used : used + 4 + 8 * n])
        shadow[4:] = bytes(8 * n)
        published = 0
        for spa, data in mem.writes:
            if not used <= spa < used + 4 + 8 * n:
                continue
            shadow[spa - used : spa - used + len(data)] = data
            if spa == used + 2:
                published += 1
                now = used_ring(bytes(offsets(n)[2]) + bytes(shadow), n, start)[2]
                assert now == final[: len(now)] and len(now) == published
        assert published == k


async def test_the_device_does_not_write_a_device_readable_rx_buffer() -> None:
    """An RX descriptor without VIRTQ_DESC_F_WRITE: netd must not write into it."""

    d, _, a, b, ida, _ = await pair(4)
    rx = b.ring(RX_RING)
    put_desc(rx, 4, 0, b.rx.buffers_gpa, BUF, 0)  # WRITE cleared on the first offered one
    b.put(RX_RING, rx)
    b.put(b.rx.buffers_gpa, b"\xee" * 64)
    f = net_frame(MAC_B, MAC_A, b"x" * 20)
    tx = a.ring(TX_RING)
    a.put(a.tx.buffers_gpa, f)
    put_desc(tx, 4, 0, a.tx.buffers_gpa, len(f), 0)
    offer(tx, 4, [0], 0)
    a.put(TX_RING, tx)
    assert await d.notify_tx(ida) == [Result.BAD_FRAME]
    assert b.get(b.rx.buffers_gpa, 64) == b"\xee" * 64


async def test_a_tx_descriptor_with_next_or_indirect_is_not_read_as_a_frame() -> None:
    """A chained (NEXT) or INDIRECT descriptor is not one whole frame: netd, which takes one
    descriptor per frame and does not offer VIRTIO_F_INDIRECT_DESC, must not deliver it as
    one. (The buffer still goes back through the used ring.)"""

    for flags in (F_NEXT, F_INDIRECT):
        d, _, a, b, ida, _ = await pair(4)
        f = net_frame(MAC_B, MAC_A, b"y" * 20)
        tx = a.ring(TX_RING)
        a.put(a.tx.buffers_gpa, f)
        put_desc(tx, 4, 0, a.tx.buffers_gpa, len(f), flags)
        offer(tx, 4, [0], 0)
        a.put(TX_RING, tx)
        assert await d.notify_tx(ida) == [Result.BAD_FRAME], flags
        assert used_ring(a.get(TX_RING, PAGE), 4, 0)[1:] == (1, [(0, 0)])
        assert used_ring(b.get(RX_RING, PAGE), 4, 0)[1] == 0
